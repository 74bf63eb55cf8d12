"""Patched tiny Qwen2.5-VL / Qwen3-VL against the models' own eager attention and an independent eager
implementation of the DESIGN.md formulas (written here, not imported from attn_mod.kernels)."""

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TEXT
from helpers import onehot, tok_id, twin_models, vlm_inputs

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (60, 60)]

# ------------------------------------------------------------------ independent eager formula
_REF: dict = {}


def eager_formula(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(mul*s + absw*|s| + add + mask) then w-weighting (renormalised or raw), per DESIGN.md."""
    cfg = _REF
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    s = torch.matmul(query, key.transpose(2, 3)) * scaling
    Q, K = s.shape[-2:]
    c = cfg["cats"][:, None, None, :].long()
    active = module.layer_idx in cfg["layers"]
    en = cfg["heads"][None, :, None, None] & cfg["rows"][:, None, K - Q:, None]
    t = cfg["mul"][c] * s + cfg["absw"][c] * s.abs() + cfg["add"][c] if active else s
    t = torch.where(en, t, s) if active else s
    if attention_mask is not None:
        t = t + attention_mask
    p = torch.softmax(t, dim=-1, dtype=torch.float32)
    if active:
        wk = torch.where(en, cfg["w"][c], torch.ones_like(p))
        p = p * wk
        if cfg["renorm"]:
            p = p / p.sum(-1, keepdim=True)
    out = torch.matmul(p.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), p


AttentionInterface.register("test_eager_formula", eager_formula)
AttentionMaskInterface.register("test_eager_formula", eager_mask)


def independent_categories(processor, batch, family, labels=None):
    """Categories built from masks and known positions only: PAD / SYSTEM (default system turn) / IMAGE /
    RESPONSE (labels != -100) / TEXT."""
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    end = tok_id(processor, "<|im_end|>")
    if family == "qwen2_5_vl":
        for b in range(ids.shape[0]):
            first = am[b].nonzero()[0].item()
            stop = (ids[b] == end).nonzero()[0].item()
            cats[b, first:stop + 1] = SYSTEM
    cats[batch["mm_token_type_ids"] == 1] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


def set_reference(iv: Intervention, cats, num_layers, num_heads):
    tr = iv.transform()
    rows = torch.ones(cats.shape, dtype=torch.bool)
    if iv.query != "all":
        codes, _ = iv.query_codes()
        rows = torch.isin(cats, torch.tensor(codes))
    _REF.update(cats=cats, mul=tr.mul, absw=tr.absw, add=tr.add, w=tr.w, renorm=tr.renorm,
                layers=set(iv.layer_indices(num_layers)), heads=iv.head_mask(num_heads), rows=rows)


def valid_logits(out, batch):
    return out.logits[batch["attention_mask"].bool()]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ------------------------------------------------------------------------------ identity / masses
def test_identity_matches_eager_logits_and_masses(family):
    model, eager, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    assert torch.equal(rec.categories.long(), independent_categories(proc, batch, family))
    oh = onehot(rec.categories)
    valid = batch["attention_mask"].bool()
    for layer, attn in enumerate(ref.attentions):
        want = torch.einsum("bhqk,bkc->bhqc", attn.float(), oh)
        got = rec.mass(layer)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=0)
        assert got[..., IMAGE].sum() > 0 and torch.isfinite(got).all()
    handle.remove()


# ------------------------------------------------------------------------ interventions vs formula
@pytest.mark.parametrize("renorm", [True, False])
def test_avar_matches_eager_formula(family, renorm):
    model, eager, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    iv = Intervention.avar(alpha=0.3, beta=0.5, renorm=renorm)
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with torch.no_grad():
        got = model(**batch)
        base = eager(**batch)
        set_reference(iv, independent_categories(proc, batch, family), 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    # and the intervention really changes the model
    assert (valid_logits(got, batch) - valid_logits(base, batch)).abs().max() > 1e-2
    handle.remove()


def test_generic_intervention_rows_heads_layers_match_formula(family):
    model, eager, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -5:-1] = batch["input_ids"][:, -5:-1]
    iv = Intervention(mul={"text": 1.2}, absw={"visual": 0.3}, add={"system": -0.5},
                      w={"visual": 1.5, "response": 0.7}, renorm=True, layers=[1], heads=[0, 3],
                      query=["response", "text"])
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with torch.no_grad():
        got = model(**batch, labels=labels)
        set_reference(iv, independent_categories(proc, batch, family, labels), 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch, labels=labels)
        base = copy.deepcopy(eager)
        base.set_attn_implementation({"text_config": "eager"})
        plain = base(**batch)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    assert (valid_logits(got, batch) - valid_logits(plain, batch)).abs().max() > 1e-3
    handle.remove()


# ------------------------------------------------------------------------------ generate / cache
@pytest.mark.parametrize("iv", [Intervention.identity(), Intervention.avar(0.3, 0.5)], ids=["identity", "avar"])
def test_left_padded_generate_equals_single_prompts(family, iv):
    model, _, proc = twin_models(family)
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    together = model.generate(**batch, **kw)
    for i in range(2):
        single_batch = vlm_inputs(proc, [QUESTIONS[i]], [SIZES[i]], seed=i)
        alone = model.generate(**single_batch, **kw)
        assert torch.equal(together.sequences[i, -6:], alone.sequences[0, -6:])
        for s_batch, s_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=0)
    handle.remove()


def test_remove_restores_identical_logits(family):
    model, _, proc = twin_models(family)
    twin = copy.deepcopy(model)
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    impl = model.config.text_config._attn_implementation
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.5, 0.5))
    assert model.config.text_config._attn_implementation == "attn_mod"
    assert model.config.vision_config._attn_implementation == twin.config.vision_config._attn_implementation
    with torch.no_grad():
        model(**batch)
    handle.remove()
    assert model.config.text_config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, twin(**batch).logits)
    # patchable again after removal
    attn_mod.patch(model, proc).remove()


def test_update_equals_fresh_patch(family):
    model, _, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.1, 0.1))
    with torch.no_grad():
        model(**batch)
        handle.update(alpha=0.4, beta=0.7)
        retuned = model(**batch).logits
    handle.remove()
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.4, 0.7))
    with torch.no_grad():
        fresh = model(**batch).logits
    handle.remove()
    assert torch.equal(retuned, fresh)


# ----------------------------------------------------------------------------------- training
def test_training_gradients_match_eager_and_checkpointing_records_once(family):
    model, eager, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)  # supervise the answers (never predicted from pad rows)
    labels[:, -6:] = batch["input_ids"][:, -6:]
    for m in (model, eager):
        m.train()
    eager(**batch, labels=labels).loss.backward()
    attn_mod.patch(model, proc)
    model(**batch, labels=labels).loss.backward()
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(p.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)

    # a loss on masses back-propagates, and checkpoint recomputation does not record twice
    def grads_with_mass_loss(checkpointing: bool):
        m, _, _ = twin_models(family)
        m.train()
        if checkpointing:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        attn_mod.patch(m, proc)
        with attn_mod.capture(m, detach=False) as rec:
            out = m(**batch, labels=labels)
        img = rec.masses()[..., IMAGE].mean()
        (out.loss - img).backward()
        chunks = [len(rec._runs[-1][layer]) for layer in rec.layers]
        q_grad = m.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()
        return chunks, q_grad, img.detach()

    chunks_plain, g_plain, img_plain = grads_with_mass_loss(False)
    chunks_ckpt, g_ckpt, img_ckpt = grads_with_mass_loss(True)
    assert chunks_plain == chunks_ckpt == [1, 1]
    torch.testing.assert_close(img_ckpt, img_plain)
    torch.testing.assert_close(g_ckpt, g_plain, atol=1e-6, rtol=1e-5)
    assert g_plain.abs().sum() > 0


# --------------------------------------------------------------------------------- bad input
def test_patch_twice_and_unsupported_models():
    model, _, proc = twin_models("qwen2_5_vl")
    handle = attn_mod.patch(model, proc)
    with pytest.raises(RuntimeError, match="already patched.*handle.update"):
        attn_mod.patch(model, proc)
    handle.remove()
    with pytest.raises(ValueError, match="needs its processor or tokenizer"):
        attn_mod.patch(model)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn_mod.patch(model, proc, backend="cuda-magic")
    with pytest.raises(ValueError, match="layer index 9 is out of range for a model with 2 decoder layers"):
        attn_mod.patch(model, proc, intervention=Intervention.vaf(layers=range(9, 15)))  # explicit layers stay absolute
    assert model.config.text_config._attn_implementation == "sdpa"  # failed patches leave no trace

    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(attn_mod.UnsupportedModelError, match=r"supported families: qwen2_5_vl, qwen3_vl.*"
                                                             r"categories='explicit'.*set_categories"):
        attn_mod.patch(llama, proc)


def test_update_errors_keep_previous_intervention():
    model, _, proc = twin_models("qwen2_5_vl")
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.2, 0.3))
    for bad, match in [(dict(alpha=-1), "alpha must be >= 0"), (dict(beta=2), r"beta must lie in \[0, 1\]"),
                       (dict(layers=[7]), "out of range")]:
        with pytest.raises(ValueError, match=match):
            handle.update(**bad)
    assert handle.intervention.params["alpha"] == 0.2 and handle.intervention.params["beta"] == 0.3
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.update(alpha=0.1)


def test_explicit_labels_on_any_decoder_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(cfg).eval()
    for p in llama.parameters():
        p.data.mul_(3.0)
    eager = copy.deepcopy(llama)
    eager.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (2, 12))
    am = torch.ones_like(ids)
    am[1, :3] = 0
    cats = torch.randint(1, 6, (2, 12))
    cats[am == 0] = PAD
    handle = attn_mod.patch(llama, categories="explicit", intervention=Intervention.avar(0.5, 0.4))
    with pytest.raises(ValueError, match="set_categories"):
        llama(input_ids=ids, attention_mask=am)
    with pytest.raises(ValueError, match="one label per token"):
        handle.set_categories(cats[:, :-1])
        llama(input_ids=ids, attention_mask=am)
    handle.set_categories(cats)
    with torch.no_grad():
        got = llama(input_ids=ids, attention_mask=am).logits
        set_reference(handle.intervention, cats, 2, 4)
        eager.set_attn_implementation("test_eager_formula")
        want = eager(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=1e-5, rtol=0)
    handle.remove()


def test_label_length_mismatch_is_caught():
    model, _, proc = twin_models("qwen2_5_vl")
    batch = vlm_inputs(proc, QUESTIONS[:1], SIZES[:1])
    handle = attn_mod.patch(model, proc)
    handle.set_target(torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="target_mask has shape"):
        model(**batch)
    handle.set_target(None)
    layer0 = model.model.language_model.layers[0].self_attn
    with torch.no_grad():
        model(**batch)
        # calling a decoder layer with a sequence of another length cannot silently reuse labels
        from attn_mod.patch import attention_forward
        q = torch.randn(1, 4, 5, 16)
        kv = torch.randn(1, 2, 5, 16)
        with pytest.raises(RuntimeError, match="labels must cover every KV slot"):
            attention_forward(layer0, q, kv, kv, None, scaling=0.25)
    handle.remove()

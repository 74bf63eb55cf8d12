"""Mllama (Llama-3.2-Vision): a patched tiny MllamaForConditionalGeneration against the model's own eager
attention (self- and cross-attention layers), an independent eager implementation of DESIGN's formulas written
here (float64), the real processor's pixels and tile layout, and eager gradients."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT
from attn_mod.kernels.spec import NUM_CATEGORIES
from attn_mod.models.mllama import MllamaAdapter
from attn_mod.tiny import build_tiny
from helpers import chat_text, onehot, random_image

SYSTEM_PROMPT = "You are a helpful assistant."
QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (40, 40)]  # (W, H): 2 x 2 tiles, and 1 tile (3 padding tiles)
HW = [(h, w) for w, h in SIZES]  # attn-mod's image sizes are (H, W)
CROSS = 1  # the tiny model's cross-attention layer (layers 0 and 2 self-attend)


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_tiny("mllama")
    return model.state_dict(), proc


def twins(tiny, dtype=torch.float32):
    state, proc = tiny
    model, _ = build_tiny("mllama", dtype=dtype)
    eager, _ = build_tiny("mllama", attn_implementation="eager", dtype=dtype)
    model.load_state_dict(state)
    eager.load_state_dict(state)
    return model.to(dtype), eager.to(dtype), proc


def batch_of(proc, questions, sizes, *, answers=None, seed=0, system=SYSTEM_PROMPT, boxes=None, dtype=None):
    answers = answers or [None] * len(questions)
    texts = [chat_text(proc, q, answer=a, system=system) for q, a in zip(questions, answers)]
    images = [[_box_image(w, h, boxes[i]) if boxes else random_image(w, h, seed + i)] for i, (w, h) in enumerate(sizes)]
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    if dtype is not None:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


# ------------------------------------------------------------------ independent category oracles
def text_categories(proc, batch, labels=None):
    """SYSTEM = first <|start_header_id|> through the first <|eot_id|> (the system turn; BOS stays TEXT);
    IMAGE = <|image|> ids; RESPONSE = labels != -100; PAD = mask 0; TEXT = rest."""
    tok = proc.tokenizer
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    start, eot = tok.convert_tokens_to_ids("<|start_header_id|>"), tok.convert_tokens_to_ids("<|eot_id|>")
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    for b in range(ids.shape[0]):
        s, e = (ids[b] == start).nonzero()[0].item(), (ids[b] == eot).nonzero()[0].item()
        cats[b, s:e + 1] = SYSTEM
    cats[ids == tok.convert_tokens_to_ids("<|image|>")] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


def vision_categories(batch, image_token_id, per_tile=10):
    """Vision keys (image, tile, patch): IMAGE on tile t of image slot n when the sample has more than n <|image|>
    tokens and aspect_ratio_mask marks the tile; PAD elsewhere."""
    arm = batch["aspect_ratio_mask"].bool()  # (B, N, T)
    n_images = (batch["input_ids"] == image_token_id).sum(1)
    real = torch.arange(arm.shape[1])[None, :] < n_images[:, None]
    cats = torch.where(arm & real[..., None], IMAGE, PAD).repeat_interleave(per_tile, dim=2)
    return cats.reshape(arm.shape[0], -1).long()


def rows_seeing_image(batch):
    return batch["cross_attention_mask"].bool().flatten(2).any(-1)  # (B, S)


def valid_logits(out, batch):
    return out.logits[batch["attention_mask"].bool()]


# ------------------------------------------------------------------ independent eager formula
_REF: dict = {}


def formula(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """DESIGN's operator on the model's own masks: softmax(mul*s + absw*|s| + add + mask) then w (renorm or raw).
    Self-attention keys = text categories; cross-attention keys = vision categories, and rows that see no image
    keep Hugging Face's plain softmax over every vision key (never transformed)."""
    cfg = _REF
    cross = type(module).__name__ == "MllamaTextCrossAttention"
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    s = torch.matmul(query, key.transpose(2, 3)) * scaling
    Q, K = s.shape[-2:]
    c = (cfg["vision"] if cross else cfg["cats"])[:, None, None, :]
    rows = cfg["rows"][:, None, -Q:, None] if not cross else (cfg["rows"] & cfg["sees"])[:, None, -Q:, None]
    en = cfg["heads"][None, :, None, None] & rows & (module.layer_idx in cfg["layers"])
    t = torch.where(en, cfg["mul"][c] * s + cfg["absw"][c] * s.abs() + cfg["add"][c], s)
    if attention_mask is not None:
        t = t + attention_mask
    p = torch.softmax(t, dim=-1)
    p = p * torch.where(en, cfg["w"][c], torch.ones_like(p))
    if cfg["renorm"]:
        p = p / p.sum(-1, keepdim=True)
    return torch.matmul(p, value).transpose(1, 2).contiguous(), p


AttentionInterface.register("test_mllama_formula", formula)
AttentionMaskInterface.register("test_mllama_formula", eager_mask)


def set_reference(iv, proc, batch, vision, num_layers=3, num_heads=4, labels=None, dtype=torch.float64):
    tr = iv.transform()
    cats = text_categories(proc, batch, labels)
    rows = torch.ones(cats.shape, dtype=torch.bool)
    if iv.query != "all":
        rows = torch.isin(cats, torch.tensor(iv.query_codes()[0]))
    _REF.update(cats=cats, vision=vision, sees=rows_seeing_image(batch), rows=rows, renorm=tr.renorm,
                layers=set(iv.layer_indices(num_layers)), heads=iv.head_mask(num_heads),
                **{n: getattr(tr, n).to(dtype) for n in ("mul", "absw", "add", "w")})


# ------------------------------------------------------------------------------ identity / masses
def test_identity_matches_eager_logits_and_masses(tiny):
    model, eager, proc = twins(tiny)
    batch = batch_of(proc, QUESTIONS, SIZES)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
        other = eager(**batch_of(proc, QUESTIONS, SIZES, seed=7))  # the image matters (gates are open)
    seen = rows_seeing_image(batch)
    assert (other.logits - ref.logits)[seen].abs().max() > 1e-3
    handle = attn_mod.patch(model, proc, backend="torch")
    assert handle.state.cross_layers == {CROSS}
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    assert rec.layers == (0, 2) and rec.cross_layers == (CROSS,)
    assert torch.equal(rec.categories.long(), text_categories(proc, batch))
    assert torch.equal(rec.cross_categories.long(), vision_categories(batch, model.config.image_token_id))
    valid = batch["attention_mask"].bool()
    for layer in rec.layers:  # self-attention: eager weights summed per text category
        want = torch.einsum("bhqk,bkc->bhqc", ref.attentions[layer].float(), onehot(rec.categories))
        got = rec.mass(layer)
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=0)
        assert got[..., IMAGE].sum() > 0 and got[..., SYSTEM].sum() > 0
    # cross-attention: eager weights summed per vision category on rows that see the image, zero elsewhere
    want = torch.einsum("bhqk,bkc->bhqc", ref.attentions[CROSS].float(), onehot(rec.cross_categories))
    got = rec.cross_mass(CROSS).permute(0, 2, 1, 3)
    torch.testing.assert_close(got[seen], want.permute(0, 2, 1, 3)[seen], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[seen].sum(-1), torch.ones_like(got[seen].sum(-1)), atol=1e-5, rtol=0)
    assert got[seen][..., PAD].abs().max() == 0 and got[~seen].abs().max() == 0
    assert (~seen & valid).any()  # the system turn precedes the image: fully masked rows were exercised
    with pytest.raises(KeyError, match="cross_mass"):
        rec.mass(CROSS)
    # SAYO a / v on the cross layer: per-head mean of mass_X over the sample's X vision keys (no box: a undefined)
    res = attn_mod.metrics.target_attention_from_masses(rec.cross_masses(), rec.cross_categories, causal=False)
    n_img = (vision_categories(batch, model.config.image_token_id) == IMAGE).sum(1)  # (B,)
    want_v = want[..., IMAGE].mean(1) / n_img[:, None]  # (B, Q)
    torch.testing.assert_close(res.v[0][seen], want_v[seen], atol=1e-6, rtol=1e-5)
    assert torch.isnan(res.a).all()
    handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_identity_triton_backend_matches_eager(tiny):
    """The cross-attention layer is non-causal with Q != K: the Triton kernels (interpreter here) take it."""
    model, eager, proc = twins(tiny)
    batch = batch_of(proc, QUESTIONS, SIZES)
    with torch.no_grad():
        ref = eager(**batch)
        attn_mod.patch(model, proc, backend="triton")
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ interventions vs formula
SETTINGS = {
    "avar_renorm": Intervention.avar(alpha=0.3, beta=0.5),
    "avar_raw": Intervention.avar(alpha=0.3, beta=0.5, renorm=False),
    "generic": Intervention(mul={"text": 1.2}, absw={"visual": 0.3}, add={"system": -0.5},
                            w={"image": 1.5, "target": 2.5, "response": 0.7}, renorm=True, layers=[1, 2],
                            heads=[0, 3], query=["response", "text"]),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_intervention_matches_eager_formula(tiny, name):
    iv = SETTINGS[name]
    model, eager, proc = twins(tiny, torch.float64)
    boxes = [(20, 10, 90, 60), (5, 5, 20, 30)]
    batch = batch_of(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"], boxes=boxes, dtype=torch.float64)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -5:-1] = batch["input_ids"][:, -5:-1]
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    handle.set_target(boxes=[[b] for b in boxes], images=HW)
    with torch.no_grad():
        got = model(**batch, labels=labels)
        vision = handle.state.cross.key_cats.long()
        geo = MllamaAdapter().box_geometry(proc, model.config)
        want_target = torch.zeros_like(vision, dtype=torch.bool)
        for b, (size, box) in enumerate(zip(HW, boxes)):
            want_target[b, attn_mod.regions.select_cells(geo.cells(size), box, size)] = True
        assert torch.equal(vision == TARGET, want_target) and want_target.any(1).all()
        set_reference(iv, proc, batch, vision, labels=labels)
        # the vision tower as in the patched model (eager's fp32 softmax would round the float64 features)
        eager.set_attn_implementation({"text_config": "test_mllama_formula", "vision_config": "sdpa"})
        want = eager(**batch, labels=labels)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-9, rtol=0)
    handle.remove()
    with torch.no_grad():  # (the unpatched sdpa model: eager's fp32 vision softmax is NaN on padding tiles in fp64)
        base = model(**batch)
    assert (valid_logits(got, batch) - valid_logits(base, batch)).abs().max() > 1e-3


def test_cross_attention_boost_renorm_is_identity_raw_scales_output(tiny):
    """The documented mapping: on a cross-attention layer every visible key is visual, so a uniform image weight
    cancels under renorm and scales the attention output by (1 + alpha) in the raw form."""
    model, eager, proc = twins(tiny)
    batch = batch_of(proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.5, 0.9, layers=[CROSS]), backend="torch")
    outs = {}

    def grab(name):
        def hook(module, args, kwargs, out):
            outs[name] = out[0]
        return hook

    attn = model.model.language_model.layers[CROSS].cross_attn
    hook = attn.register_forward_hook(grab("x"), with_kwargs=True)
    with torch.no_grad():
        renorm = model(**batch)
        ref = eager(**batch)
        ident = outs["x"]
        handle.update(intervention=Intervention.avar(0.5, 0.9, layers=[CROSS], renorm=False))
        raw = model(**batch)
    hook.remove()
    torch.testing.assert_close(valid_logits(renorm, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    seen = rows_seeing_image(batch)  # o_proj is linear without bias: its output scales with the attention's
    torch.testing.assert_close(outs["x"][seen], 1.5 * ident[seen], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["x"][~seen], ident[~seen], atol=1e-6, rtol=0)
    assert (valid_logits(raw, batch) - valid_logits(ref, batch)).abs().max() > 1e-3
    handle.remove()


# ------------------------------------------------------------------------------ generate / cache
@pytest.mark.parametrize("iv", [Intervention.identity(), Intervention.avar(0.3, 0.5, renorm=False)],
                         ids=["identity", "avar_raw"])
def test_left_padded_generate_equals_single_prompts(tiny, iv):
    model, eager, proc = twins(tiny)
    batch = batch_of(proc, QUESTIONS, SIZES)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    singles = [batch_of(proc, [QUESTIONS[i]], [SIZES[i]], seed=i) for i in range(2)]
    # the model's own eager implementation is consistent between the two paths
    e_together = eager.generate(**batch, **kw)
    for i in range(2):
        assert torch.equal(e_together.sequences[i, -5:], eager.generate(**singles[i], **kw).sequences[0, -5:])
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with attn_mod.capture(model) as rec:
        together = model.generate(**batch, **kw)
    assert rec.cross_mass(CROSS).shape[2] == batch["input_ids"].shape[1] + 4  # prompt rows + decode rows
    decode = rec.cross_mass(CROSS)[:, :, -4:].sum(-1)  # decode rows see the image: mass 1 (1 + alpha raw)
    torch.testing.assert_close(decode, torch.full_like(decode, 1.0 + iv.params.get("alpha", 0.0) * (not iv.renorm)),
                               atol=1e-5, rtol=0)
    if iv.transform().is_identity():
        assert torch.equal(together.sequences, e_together.sequences)
    for i in range(2):
        alone = model.generate(**singles[i], **kw)
        assert torch.equal(together.sequences[i, -5:], alone.sequences[0, -5:])
        for s_batch, s_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=0)
    handle.remove()


# ----------------------------------------------------------------------------------- training
def test_training_gradients_match_eager(tiny):
    """LM loss + AGTO (self-attention masses) + a TARGET-share term on the cross-attention masses: parameter
    gradients through the patched model equal those through eager output_attentions summed per category."""
    from attn_mod.trainers.losses import agto_losses, agto_rows

    model, eager, proc = twins(tiny)
    boxes = [(20, 10, 90, 60), (5, 5, 20, 30)]
    batch = batch_of(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"], boxes=boxes)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -6:] = batch["input_ids"][:, -6:]
    for m in (model, eager):
        m.train()
    handle = attn_mod.patch(model, proc)
    handle.set_target(boxes=[[b] for b in boxes], images=HW)
    with attn_mod.capture(model, detach=False) as rec:
        out = model(**batch, labels=labels)
    rows = agto_rows(rec.query_categories(), labels)
    seen = rows_seeing_image(batch)[:, None, :]

    def objective(lm, masses, cats, cross_mass):
        agto = agto_losses(masses, cats, rows)
        share = (cross_mass[..., TARGET] * seen).sum() / seen.sum()
        return lm + 0.15 * agto.loss_img + 0.15 * agto.loss_sys - share

    objective(out.loss, rec.masses(), rec.categories, rec.cross_mass(CROSS)).backward()
    ref = eager(**batch, labels=labels, output_attentions=True)
    cats, vision = rec.categories.long(), rec.cross_categories.long()
    masses = torch.stack([torch.einsum("bhqk,bkc->bhqc", ref.attentions[l].float(), onehot(cats)) for l in (0, 2)])
    cross = torch.einsum("bhqk,bkc->bhqc", ref.attentions[CROSS].float(), onehot(vision)) * seen[..., None]
    objective(ref.loss, masses, cats, cross).backward()
    n = 0
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(p.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
            n += 1
    assert n > 20 and model.model.language_model.layers[CROSS].cross_attn.k_proj.weight.grad.abs().sum() > 0
    assert model.model.vision_model.patch_embedding.weight.grad.abs().sum() > 0
    handle.remove()


# ------------------------------------------------------------------------------------ pixel boxes
def _box_image(w, h, box):
    a = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a)


def _token_fill(proc, image, patch):
    """Per vision token in the model's order (tile by tile, CLS first, then patches in raster order), from the
    processor's own pixel_values: the white fraction of its patch and of the 2x2 pixels at the patch's centre."""
    def pv(img):
        return proc.image_processor(images=[[img]], return_tensors="pt")["pixel_values"][0, 0]  # (T, 3, t, t)

    lo, hi = pv(Image.new("RGB", image.size, 0)), pv(Image.new("RGB", image.size, (255, 255, 255)))
    frac = ((pv(image) - lo) / (hi - lo)).nan_to_num(0.0).mean(1).clamp(0, 1)  # (T, t, t); padding -> 0
    sq = frac.unfold(1, patch, patch).unfold(2, patch, patch)  # (T, rows, cols, patch, patch)
    m = patch // 2
    area, centre = sq.mean((-1, -2)).flatten(1), sq[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2)).flatten(1)
    cls = torch.zeros(area.shape[0], 1)
    return torch.cat([cls, area], 1).flatten(), torch.cat([cls, centre], 1).flatten()


@pytest.mark.parametrize("size", [(130, 90), (40, 40), (90, 30), (30, 150), (84, 84), (200, 50)])
def test_mllama_boxes_match_processor_tiles(tiny, size):
    from transformers.models.mllama.image_processing_pil_mllama import get_all_supported_aspect_ratios

    from test_families import check_boxes_against_pixels, random_boxes

    _, proc = tiny
    w, h = size
    geo = MllamaAdapter().box_geometry(proc)
    out = proc.image_processor(images=[[random_image(w, h)]], return_tensors="pt")
    rows, cols, _, _ = geo.grid(h, w)
    ratios = get_all_supported_aspect_ratios(proc.image_processor.max_image_tiles)
    assert tuple(ratios[int(out["aspect_ratio_ids"][0, 0]) - 1]) == (rows, cols)  # the processor's tile layout
    assert int(out["aspect_ratio_mask"][0, 0].sum()) == rows * cols
    cells = geo.cells((h, w))
    assert len(cells) == geo.max_tiles * geo.tokens_per_tile
    for box in random_boxes(w, h):
        check_boxes_against_pixels(cells, _token_fill(proc, _box_image(w, h, box), geo.patch), box, (h, w))


def test_mllama_set_target_boxes_label_vision_tokens_only(tiny):
    model, _, proc = twins(tiny)
    boxes = [(20, 10, 90, 60), None]
    handle = attn_mod.patch(model, proc, backend="torch")
    handle.set_target(boxes=[[boxes[0]], None], images=HW)
    batch = batch_of(proc, QUESTIONS, SIZES)
    with torch.no_grad(), attn_mod.capture(model) as rec:
        model(**batch)
    assert not (rec.categories == TARGET).any()  # the <|image|> placeholder stays IMAGE
    geo = MllamaAdapter().box_geometry(proc, model.config)
    want = set(attn_mod.regions.select_cells(geo.cells((90, 130)), boxes[0], (90, 130)).tolist())
    assert set((rec.cross_categories[0] == TARGET).nonzero().flatten().tolist()) == want and want
    assert not (rec.cross_categories[1] == TARGET).any()
    seen = rows_seeing_image(batch)
    assert (rec.cross_mass(CROSS)[0, :, seen[0], TARGET] > 0).all()
    with pytest.raises(ValueError, match="image sizes"):
        handle.set_target(boxes=[[boxes[0]], None], images=HW[:1])
        model(**batch)
    handle.remove()


# ------------------------------------------------------------------------------------- labelling
def test_llama3_headers_found_by_token_ids_and_bad_template_refused(tiny):
    model, _, proc = twins(tiny)
    batch = batch_of(proc, QUESTIONS[:1], SIZES[:1], answers=["The answer is B."], system=None)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad():
        model(**batch)
    tok = proc.tokenizer
    n_answer = len(tok.encode("The answer is B.", add_special_tokens=False)) + 1  # + <|eot_id|>
    ids = batch["input_ids"][0]
    want = torch.full(ids.shape, TEXT, dtype=torch.long)
    want[ids == tok.convert_tokens_to_ids("<|image|>")] = IMAGE
    want[-n_answer:] = RESPONSE
    assert torch.equal(handle.categories[0].long(), want) and not (handle.categories == SYSTEM).any()
    handle.remove()
    import copy

    bad = copy.deepcopy(tok)
    bad.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError, match="categories='explicit'"):
        attn_mod.patch(model, bad)


def test_cross_mass_without_images_and_capture_of_cross_layer_only(tiny):
    model, _, proc = twins(tiny)
    handle = attn_mod.patch(model, proc, backend="torch")
    text = proc.tokenizer([chat_text(proc, QUESTIONS[0], image=False, system=SYSTEM_PROMPT)], return_tensors="pt")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        model(**text)
    assert rec.mass(0).shape[2] == text["input_ids"].shape[1]
    with pytest.raises(RuntimeError, match="skips the cross-attention layers"):
        rec.cross_mass(CROSS)
    batch = batch_of(proc, QUESTIONS, SIZES)
    with torch.no_grad(), attn_mod.capture(model, layers=[CROSS]) as rec:
        model(**batch)
    assert rec.layers == () and rec.query_categories().shape == batch["input_ids"].shape
    assert rec.cross_masses().shape == (1, 2, 4, batch["input_ids"].shape[1], NUM_CATEGORIES)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        model(**{k: v for k, v in batch.items() if k != "cross_attention_mask"})
    from attn_mod.attention_rows import record_rows

    with pytest.raises(NotImplementedError, match="cross-attention layers"):
        with record_rows(model, layers=[CROSS]):
            pass
    with record_rows(model, layers="all") as rows:
        assert rows.layers == (0, 2)
    handle.remove()


def test_gradient_checkpointing_records_cross_masses_once(tiny):
    """Recomputation in backward runs the cross-attention groups again but records nothing; gradients are the
    same as without checkpointing."""
    grads = []
    for ckpt in (False, True):
        model, _, proc = twins(tiny)
        model.train()
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        batch = batch_of(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
        state = attn_mod.patch(model, proc).state
        calls, inner = [], state.attend_cross
        state.attend_cross = lambda *a, **k: calls.append(1) or inner(*a, **k)
        with attn_mod.capture(model, detach=False) as rec:
            out = model(**batch, labels=batch["input_ids"])
        (out.loss - rec.cross_mass(CROSS)[..., IMAGE].mean()).backward()
        assert len(calls) == 1 + ckpt  # the recomputation really ran
        assert len(rec._cross_runs[-1][CROSS]) == 1 and len(rec._runs[-1][0]) == 1
        grads.append(model.model.language_model.layers[CROSS].cross_attn.q_proj.weight.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_save_and_load_tiny_round_trip(tmp_path):
    from attn_mod.loading import load_model
    from attn_mod.tiny import save_tiny

    save_tiny("mllama", tmp_path)
    model, proc = load_model(tmp_path)
    ref, ref_proc = build_tiny("mllama")
    batch = batch_of(proc, QUESTIONS[:1], SIZES[:1])
    assert torch.equal(batch["input_ids"], batch_of(ref_proc, QUESTIONS[:1], SIZES[:1])["input_ids"])
    handle = attn_mod.patch(model, proc)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    handle.remove()


def test_two_images_rows_see_the_images_before_them(tiny):
    """A sample with two images: rows between them see the first image's tiles only, later rows both (the
    processor's rule); every group of rows matches eager (logits and cross masses), padding image slots are PAD."""
    model, eager, proc = twins(tiny)
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image."}, {"type": "image"},
               {"type": "text", "text": "What color is the square?"}]
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
    texts = [proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
             chat_text(proc, QUESTIONS[1], system=SYSTEM_PROMPT)]
    images = [[random_image(130, 90, 3), random_image(40, 40, 4)], [random_image(90, 30, 5)]]
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    tiles = batch["cross_attention_mask"].bool().flatten(2)
    assert len({tuple(r) for r in tiles[0].tolist()}) == 3  # none / first image / both
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    assert torch.equal(rec.cross_categories.long(), vision_categories(batch, model.config.image_token_id))
    assert (rec.cross_categories[1, 40:] == PAD).all()  # sample 1 has no second image
    seen = rows_seeing_image(batch)
    want = torch.einsum("bhqk,bkc->bhqc", ref.attentions[CROSS].float(), onehot(rec.cross_categories))
    got = rec.cross_mass(CROSS).permute(0, 2, 1, 3)
    torch.testing.assert_close(got[seen], want.permute(0, 2, 1, 3)[seen], atol=1e-5, rtol=0)
    assert got[~seen].abs().max() == 0


def test_avar_visual_reward_layers_are_the_self_attention_layers(tiny):
    """r_vis (GRPO and the TRL reward) reads self-attention masses only: 'all' = the self-attention layers, a named
    cross-attention layer is refused with the layers to choose from."""
    from attn_mod.trainers.grpo import Scores, _self_attention_entries
    from attn_mod.trainers.trl import AvarVisualReward

    model, _, proc = twins(tiny)
    cross = sorted(MllamaAdapter().cross_attention_layers(model))
    n = model.config.text_config.num_hidden_layers
    selfs = [i for i in range(n) if i not in cross]
    assert cross and selfs
    handle = attn_mod.patch(model, proc)
    try:
        assert list(AvarVisualReward(model, proc).layer_indices) == selfs
        with pytest.raises(ValueError, match="cross-attention"):
            AvarVisualReward(model, proc, layers=[cross[0]])
    finally:
        handle.remove()
    g = torch.Generator().manual_seed(3)
    s = Scores(None, None, None, torch.rand(len(selfs), 1, 2, 5, NUM_CATEGORIES, generator=g), torch.ones(1, 5),
               torch.ones(1, 5, dtype=torch.bool), torch.rand(1, 5, generator=g), tuple(selfs))
    assert _self_attention_entries("all", s, n) == list(range(len(selfs)))
    assert _self_attention_entries([selfs[-1]], s, n) == [len(selfs) - 1]
    with pytest.raises(ValueError, match="cross-attention"):
        _self_attention_entries([cross[0]], s, n)

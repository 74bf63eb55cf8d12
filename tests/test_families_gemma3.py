"""Gemma3 (`Gemma3ForConditionalGeneration`): a patched tiny model (sliding layers with a window smaller than the
prompt, image blocks attending both ways) against the model's own eager attention, an independent eager formula
written here, and the real processor's pixels."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT
from helpers import chat_text, onehot, random_image, twin_models

SYS = "You are a helpful assistant."
QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (60, 84)]


def gemma3_inputs(proc, questions, sizes, *, system=SYS, answers=None, seed=0):
    """A left-padded batch, one image per prompt (Gemma3's processor takes the images nested per sample)."""
    answers = answers or [None] * len(questions)
    texts = [chat_text(proc, q, answer=a, system=system) for q, a in zip(questions, answers)]
    images = [[random_image(w, h, seed + i)] for i, (w, h) in enumerate(sizes)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True)


def gemma3_categories(proc, batch, system=SYS, labels=None):
    """From known positions: <bos> <start_of_turn> "user\\n" open the first user turn, then the system prefix is
    encode(system + "\\n\\n") tokens (SYSTEM); IMAGE = token_type_ids 1; RESPONSE = labels != -100; PAD = mask 0."""
    tok = proc.tokenizer
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    head = 2 + len(tok.encode("user\n", add_special_tokens=False))
    n_sys = len(tok.encode(system + "\n\n", add_special_tokens=False)) if system else 0
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    for b in range(ids.shape[0]):
        first = am[b].nonzero()[0].item()
        cats[b, first + head:first + head + n_sys] = SYSTEM
    cats[batch["token_type_ids"] == 1] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


def valid_logits(out, batch):
    return out.logits[batch["attention_mask"].bool()]


@pytest.fixture(scope="module")
def tiny():
    return twin_models("gemma3")


def test_tiny_config_has_sliding_layers_and_image_blocks_that_matter(tiny):
    """The masks are exercised: sliding and global layers alternate, the window is shorter than the prompt, and the
    model's own output changes when its image blocks become causal (token_type_ids dropped)."""
    _, eager, proc = tiny
    cfg = eager.config.text_config
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    assert cfg.sliding_window < batch["input_ids"].shape[1] // 4
    assert int((batch["token_type_ids"] == 1).sum(1).max()) == eager.config.mm_tokens_per_image
    with torch.no_grad():
        a = eager(**batch).logits
        b = eager(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits
    assert (a - b).abs().max() > 1e-2


# ------------------------------------------------------------------------------ identity / masses
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_identity_matches_eager_logits_and_masses(tiny, backend):
    model, eager, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    handle = attn_mod.patch(model, proc, backend=backend, system_text=SYS)
    try:
        with torch.no_grad(), attn_mod.capture(model) as rec:
            out = model(**batch)
        torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=2e-5, rtol=0)
        assert torch.equal(rec.categories.long(), gemma3_categories(proc, batch))
        oh = onehot(rec.categories)
        valid = batch["attention_mask"].bool()
        for layer, attn in enumerate(ref.attentions):
            want = torch.einsum("bhqk,bkc->bhqc", attn.float(), oh)
            got = rec.mass(layer)
            torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=2e-5,
                                       rtol=0)
            assert got[..., IMAGE].sum() > 0 and got[..., SYSTEM].sum() > 0
    finally:
        handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_without_token_type_ids_the_operator_is_causal_like_the_model(tiny):
    model, eager, proc = tiny
    batch = {k: v for k, v in gemma3_inputs(proc, QUESTIONS, SIZES).items() if k != "token_type_ids"}
    with attn_mod.patch(model, proc, backend="torch", system_text=SYS), torch.no_grad():
        got = model(**batch)
        assert model.model.language_model is not None
    with torch.no_grad():
        want = eager(**batch)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=2e-5, rtol=0)


# ------------------------------------------------------------------------ interventions vs formula
_REF: dict = {}


def gemma3_eager_formula(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """DESIGN's operator written out densely on top of the model's own float mask (eager_mask: Gemma3's
    AND(window, OR(causal, same image)) and padding): softmax(mul*s + absw*|s| + add + mask), then w-weighting."""
    cfg = _REF
    G = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    s = torch.matmul(query.double(), key.double().transpose(2, 3)) * scaling
    Q, K = s.shape[-2:]
    c = cfg["cats"][:, None, None, :].long()
    en = cfg["rows"][:, None, K - Q:, None] & torch.ones_like(s, dtype=torch.bool)
    t = torch.where(en, cfg["mul"][c] * s + cfg["absw"][c] * s.abs() + cfg["add"][c], s)
    p = torch.softmax(t + attention_mask.double(), dim=-1)
    p = p * torch.where(en, cfg["w"][c], torch.ones_like(p))
    if cfg["renorm"]:
        p = p / p.sum(-1, keepdim=True)
    out = torch.matmul(p, value.double()).to(value.dtype)
    return out.transpose(1, 2).contiguous(), p


AttentionInterface.register("test_gemma3_formula", gemma3_eager_formula)
AttentionMaskInterface.register("test_gemma3_formula", eager_mask)


def _set_reference(cats, *, mul=None, absw=None, add=None, w=None, renorm=True, rows=None):
    def table(values, default):
        t = torch.full((8,), float(default), dtype=torch.float64)
        for code, val in (values or {}).items():
            t[code] = val
        return t

    _REF.update(cats=cats, mul=table(mul, 1), absw=table(absw, 0), add=table(add, 0), w=table(w, 1), renorm=renorm,
                rows=torch.ones(cats.shape, dtype=torch.bool) if rows is None else rows)


@pytest.mark.parametrize("renorm", [True, False])
def test_avar_matches_independent_eager_formula(tiny, renorm):
    """AVAR alpha = 0.3, beta = 0.5: w[IMAGE] = w[TARGET] = 1.3, w[SYSTEM] = 0.5, all layers, heads and rows."""
    model, eager, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    iv = Intervention.avar(alpha=0.3, beta=0.5, renorm=renorm)
    with attn_mod.patch(model, proc, intervention=iv, backend="torch", system_text=SYS), torch.no_grad():
        got = model(**batch)
    with torch.no_grad():
        base = eager(**batch)
        _set_reference(gemma3_categories(proc, batch), w={IMAGE: 1.3, TARGET: 1.3, SYSTEM: 0.5}, renorm=renorm)
        eager.set_attn_implementation({"text_config": "test_gemma3_formula"})
        try:
            want = eager(**batch)
        finally:
            eager.set_attn_implementation({"text_config": "eager"})
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=2e-5, rtol=0)
    assert (valid_logits(got, batch) - valid_logits(base, batch)).abs().max() > 1e-2


def test_general_intervention_on_response_rows_matches_formula(tiny):
    model, eager, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -5:-1] = batch["input_ids"][:, -5:-1]
    iv = Intervention(mul={"text": 1.2}, absw={"visual": 0.3}, add={"system": -0.5}, w={"visual": 1.5}, renorm=True,
                      query=["response", "image"])
    with attn_mod.patch(model, proc, intervention=iv, backend="torch", system_text=SYS), torch.no_grad():
        got = model(**batch, labels=labels)
    cats = gemma3_categories(proc, batch, labels=labels)
    with torch.no_grad():
        _set_reference(cats, mul={TEXT: 1.2}, absw={IMAGE: 0.3, TARGET: 0.3}, add={SYSTEM: -0.5},
                       w={IMAGE: 1.5, TARGET: 1.5}, rows=(cats == RESPONSE) | (cats == IMAGE))
        eager.set_attn_implementation({"text_config": "test_gemma3_formula"})
        try:
            want = eager(**batch, labels=labels)
        finally:
            eager.set_attn_implementation({"text_config": "eager"})
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------- labels
def test_model_turn_is_response_and_system_needs_its_text(tiny):
    """Without labels the model-turn body (after '<start_of_turn>model\\n', through <end_of_turn>) is RESPONSE;
    without system_text (or a prompt without that system text) nothing is SYSTEM."""
    model, _, proc = tiny
    tok = proc.tokenizer
    batch = gemma3_inputs(proc, QUESTIONS[:1], SIZES[:1], answers=["The answer is B."])
    with attn_mod.patch(model, proc, backend="torch", system_text=SYS) as handle, torch.no_grad():
        model(**batch)
        cats = handle.categories.long()
    ids = batch["input_ids"][0].tolist()
    model_turn = max(i for i, t in enumerate(ids) if t == tok.convert_tokens_to_ids("<start_of_turn>"))
    body = model_turn + 1 + len(tok.encode("model\n", add_special_tokens=False))
    end = ids.index(tok.convert_tokens_to_ids("<end_of_turn>"), body)
    want = gemma3_categories(proc, batch)
    want[0, body:end + 1] = RESPONSE
    assert torch.equal(cats, want)
    assert tok.decode(batch["input_ids"][0][cats[0] == SYSTEM]) == SYS + "\n\n"
    with attn_mod.patch(model, proc, backend="torch") as handle, torch.no_grad():
        model(**batch)
        assert not (handle.categories == SYSTEM).any()
    other = gemma3_inputs(proc, QUESTIONS[:1], SIZES[:1], system=None)
    with attn_mod.patch(model, proc, backend="torch", system_text=SYS) as handle, torch.no_grad():
        model(**other)
        assert not (handle.categories == SYSTEM).any()
        assert torch.equal(handle.categories.long(), gemma3_categories(proc, other, system=None))


def test_system_text_found_by_ids_in_text_only_and_multi_paragraph_prompts(tiny):
    """A system text with its own blank line, and a first user turn that starts with text (no image)."""
    model, _, proc = tiny
    tok = proc.tokenizer
    system = "You are a helpful assistant.\n\nAnswer with a single letter."
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "What color is the square?"}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = tok([text], return_tensors="pt", add_special_tokens=False)
    with attn_mod.patch(model, proc, backend="torch", system_text=system) as handle, torch.no_grad():
        model(**enc)
        cats = handle.categories[0].long()
    sys_ids = enc["input_ids"][0][cats == SYSTEM].tolist()
    first = cats.tolist().index(SYSTEM)
    assert cats[first:first + len(sys_ids)].eq(SYSTEM).all()  # one contiguous span
    assert tok.decode(sys_ids) in (system + "\n\n", system)
    assert first == 2 + len(tok.encode("user\n", add_special_tokens=False))


def test_system_text_must_be_strings(tiny):
    model, _, proc = tiny
    for bad in (3, ["ok", 2], {"a": 1}):
        with pytest.raises(ValueError, match="system_text must be a string, a list of strings or None"):
            attn_mod.patch(model, proc, system_text=bad)


def test_rows_with_different_system_prompts_each_get_their_own_span(tiny):
    """system_text=[A, B] (a run whose samples use two system prompts, B extending A): each row's SYSTEM span is
    exactly its own prompt (the longer B is matched whole, not cut at A), a row without a system turn has none."""
    model, _, proc = tiny
    tok = proc.tokenizer
    a = SYS
    b = SYS + " Look at the picture carefully."
    systems = [a, b, None]
    texts = [chat_text(proc, q, system=sy) for q, sy in zip(QUESTIONS + QUESTIONS[:1], systems)]
    images = [[random_image(w, h, i)] for i, (w, h) in enumerate(SIZES + SIZES[:1])]
    batch = proc(text=texts, images=images, return_tensors="pt", padding=True)
    with attn_mod.patch(model, proc, backend="torch", system_text=[a, b, a]) as handle, torch.no_grad():
        model(**batch)
        cats = handle.categories.long()
    for row, sy in enumerate(systems):
        want = gemma3_categories(proc, {k: v[row:row + 1] for k, v in batch.items()}, system=sy)[0]
        assert torch.equal(cats[row], want), row
    assert tok.decode(batch["input_ids"][1][cats[1] == SYSTEM]) == b + "\n\n"
    assert tok.decode(batch["input_ids"][0][cats[0] == SYSTEM]) == a + "\n\n"
    assert not (cats[2] == SYSTEM).any()


# ------------------------------------------------------------------------------ generate / cache
@pytest.mark.parametrize("iv", [Intervention.identity(), Intervention.avar(0.3, 0.5)], ids=["identity", "avar"])
def test_left_padded_generate_equals_single_prompts(tiny, iv):
    """Decode steps see the sliding layers' truncated caches (window 8 < prompt): batched left-padded generation
    equals each prompt alone; with the identity it also equals the model's own eager generation."""
    model, eager, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with attn_mod.patch(model, proc, intervention=iv, backend="torch", system_text=SYS):
        together = model.generate(**batch, **kw)
        for i in range(2):
            alone = model.generate(**gemma3_inputs(proc, [QUESTIONS[i]], [SIZES[i]], seed=i), **kw)
            assert torch.equal(together.sequences[i, -10:], alone.sequences[0, -10:])
            for s_batch, s_alone in zip(together.scores, alone.scores):
                torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=0)
    if iv.transform().is_identity():
        ref = eager.generate(**batch, **kw)
        assert torch.equal(together.sequences, ref.sequences)
        for a, b in zip(together.scores, ref.scores):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_triton_generate_matches_torch(tiny):
    """The Triton kernels (decode path included, against the sliding layers' truncated caches) generate what the
    reference backend generates, with an AVAR intervention on."""
    model, _, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    res = {}
    for backend in ("torch", "triton"):
        with attn_mod.patch(model, proc, intervention=Intervention.avar(0.3, 0.5), backend=backend, system_text=SYS):
            res[backend] = model.generate(**batch, **kw)
    assert torch.equal(res["torch"].sequences, res["triton"].sequences)
    for a, b in zip(res["torch"].scores, res["triton"].scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_gradients_match_eager(backend):
    model, eager, proc = twin_models("gemma3")
    batch = gemma3_inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -6:] = batch["input_ids"][:, -6:]
    for m in (model, eager):
        m.train()
    eager(**batch, labels=labels).loss.backward()
    attn_mod.patch(model, proc, backend=backend, system_text=SYS)
    with attn_mod.capture(model, detach=False) as rec:
        loss = model(**batch, labels=labels).loss
    loss.backward()
    n = 0
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:  # relative to each gradient's scale (the random projector's reaches ~1e8)
            scale = float(pe.grad.abs().max().clamp_min(1.0))
            torch.testing.assert_close(p.grad, pe.grad, atol=2e-5 * scale, rtol=1e-4, msg=name)
            n += 1
    assert n > 10 and rec.masses()[..., IMAGE].requires_grad


# ------------------------------------------------------------------------------------ pixel boxes
def _box_image(w, h, box):
    a = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a)


def _token_fill(proc, image, cell):
    """Per image token (raster over the processor's own pixel_values, `cell`-px squares): the white fraction of
    its square and of the 2x2 pixels at its centre."""
    def pv(img):
        return proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]

    lo, hi = pv(Image.new("RGB", image.size, 0)), pv(Image.new("RGB", image.size, (255, 255, 255)))
    frac = ((pv(image) - lo) / (hi - lo)).nan_to_num(0.0).mean(1).clamp(0, 1)  # (1, S, S)
    squares = frac.unfold(1, cell, cell).unfold(2, cell, cell)
    m = cell // 2
    return squares.mean((-1, -2)).flatten(), squares[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2)).flatten()


@pytest.mark.parametrize("size", [(130, 90), (60, 84), (112, 112), (301, 47)])
def test_boxes_match_processor_pixels(tiny, size):
    """overlap selects every token whose square of the processor's resized image holds white pixels of the box and
    no token without; center selects the tokens whose square centre is white."""
    model, _, proc = tiny
    w, h = size
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    side = proc.image_processor.size["height"]
    cell = side // geo.tokens_per_side
    cells = geo.cells((h, w))
    assert len(cells) == model.config.mm_tokens_per_image
    gen = np.random.default_rng(w * h)
    for _ in range(6):
        x0, x1 = sorted(gen.choice(w + 1, 2, replace=False).tolist())
        y0, y1 = sorted(gen.choice(h + 1, 2, replace=False).tolist())
        box = (x0, y0, x1, y1)
        area, centre = _token_fill(proc, _box_image(w, h, box), cell)
        overlap = set(attn_mod.regions.select_cells(cells, box, (h, w), by="overlap").tolist())
        center = set(attn_mod.regions.select_cells(cells, box, (h, w), by="center").tolist())
        for n, (f, fc) in enumerate(zip(area.tolist(), centre.tolist())):
            if f > 0.6:
                assert n in center, (box, n, f)
            if n in overlap:
                assert f > 0.0, (box, n, f)
            else:
                assert f < 0.15, (box, n, f)
            if fc > 0.9:
                assert n in center, (box, n, fc)
            if fc < 0.1:
                assert n not in center, (box, n, fc)
    full = attn_mod.regions.select_cells(cells, (0, 0, w, h), (h, w))
    assert full.tolist() == list(range(model.config.mm_tokens_per_image))


def test_set_target_boxes_label_target_tokens(tiny):
    """A box over the left half of sample 0's image: TARGET = exactly the image tokens of the left half columns."""
    model, _, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    (w0, h0), (w1, h1) = SIZES
    t = model.config.mm_tokens_per_image
    side = int(round(t ** 0.5))
    with attn_mod.patch(model, proc, backend="torch", system_text=SYS) as handle, torch.no_grad():
        handle.set_target(boxes=[[(0, 0, w0 // 2, h0)], None], images=[(h0, w0), (h1, w1)])
        model(**batch)
        cats = handle.categories.long()
    img0 = (batch["token_type_ids"][0] == 1).nonzero().flatten()
    left = torch.tensor([n for n in range(t) if n % side < side // 2])
    assert torch.equal((cats[0] == TARGET).nonzero().flatten(), img0[left])
    assert not (cats[1] == TARGET).any() and (cats[1] == IMAGE).sum() == t


def test_pan_and_scan_geometry_is_refused(tiny):
    model, _, proc = tiny
    from attn_mod.tiny import build_gemma3_processor
    from transformers import Gemma3ImageProcessorPil

    pas = build_gemma3_processor(proc.tokenizer, Gemma3ImageProcessorPil(size={"height": 112, "width": 112},
                                                                        do_pan_and_scan=True))
    with pytest.raises(NotImplementedError, match="pan & scan"):
        attn_mod.models.get_adapter(model).box_geometry(pas, model.config)


# ------------------------------------------------------------------------------------ per-key rows
def test_record_rows_sum_to_masses_with_blocks_and_window(tiny):
    """Per-key rows (attention_rows) of a prefill go through the same block / window rule: summed by category they
    equal the captured masses, on a sliding and a global layer; an image row sees later keys of its image."""
    from attn_mod.attention_rows import record_rows

    model, _, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS[:1], SIZES[:1])
    with attn_mod.patch(model, proc, backend="torch", system_text=SYS), torch.no_grad(), \
            attn_mod.capture(model) as rec, record_rows(model, layers=[0, 1], rows="all", heads="all") as rows:
        model(**batch)
        cats = rec.categories.long()
        for layer in (0, 1):
            p = rows.rows(layer)  # (1, H, Q, K)
            per_cat = torch.einsum("bhqk,bkc->bhqc", p, onehot(cats))
            torch.testing.assert_close(per_cat, rec.mass(layer), atol=1e-5, rtol=0)
        first_img = int((batch["token_type_ids"][0] == 1).nonzero()[0])
        assert rows.rows(1)[0, :, first_img, first_img + 1:].sum() > 0  # bidirectional inside the image
        window = model.config.text_config.sliding_window
        last = cats.shape[1] - 1
        assert rows.rows(0)[0, :, last, : last - window + 1].abs().max() == 0  # outside the window
        assert rows.rows(1)[0, :, last, : last - window + 1].sum() > 0  # the global layer sees them


def test_record_rows_decode_past_the_window_equal_eager_attention(tiny):
    """Decode steps past the sliding window (the cache holds only the last window of slots on sliding layers): the
    recorded rows span every slot, 0 on the dropped ones, and equal the eager model's own attention probabilities
    of the same tokens (teacher forced) on sliding and global layers."""
    from attn_mod.attention_rows import record_rows

    model, eager, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS[:1], SIZES[:1], seed=int(torch.randint(0, 10**6, ())))
    S = batch["input_ids"].shape[1]
    window = model.config.text_config.sliding_window
    with attn_mod.patch(model, proc, backend="torch"), torch.no_grad(), \
            record_rows(model, layers="all", rows="last") as rows:
        seq = model.generate(**batch, max_new_tokens=4, do_sample=False).cpu()
    n = seq.shape[1] - S
    assert n >= 2 and S > window
    full = dict(batch, input_ids=seq[:, :-1],
                attention_mask=torch.ones(1, seq.shape[1] - 1, dtype=batch["attention_mask"].dtype),
                token_type_ids=torch.cat([batch["token_type_ids"], torch.zeros(1, n - 1, dtype=torch.long)], 1))
    with torch.no_grad():
        ref = eager(**full, output_attentions=True).attentions  # per layer (1, H, Q, K)
    assert torch.equal(rows.positions(), torch.arange(S - 1, S - 1 + n))
    for layer, probs in enumerate(ref):
        got = rows.rows(layer)[0, 0]  # (n, K): mean over heads
        torch.testing.assert_close(got, probs[0].mean(0)[S - 1:], atol=1e-5, rtol=1e-4, msg=f"layer {layer}")
        if model.config.text_config.layer_types[layer] == "sliding_attention":
            assert got[-1, : S + n - 1 - window].abs().max() == 0  # outside the window


def test_save_and_load_tiny_round_trip(tmp_path):
    """A saved tiny Gemma3 loads by path (attn_mod.loading) with a working processor, and patches."""
    from attn_mod.loading import load_model
    from attn_mod.tiny import build_tiny, save_tiny

    save_tiny("gemma3", tmp_path)
    model, proc = load_model(tmp_path)
    ref, ref_proc = build_tiny("gemma3")
    batch = gemma3_inputs(proc, QUESTIONS[:1], SIZES[:1])
    assert torch.equal(batch["input_ids"], gemma3_inputs(ref_proc, QUESTIONS[:1], SIZES[:1])["input_ids"])
    assert model.config.text_config.sliding_window == ref.config.text_config.sliding_window
    with attn_mod.patch(model, proc, system_text=SYS), torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)


def test_bidirectional_sliding_layers_are_refused():
    """use_bidirectional_attention=True gives symmetric windows (|q - k| < W), which the operator does not express."""
    from transformers import Gemma3ForConditionalGeneration

    from attn_mod.tiny import build_gemma3_processor, gemma3_config

    proc = build_gemma3_processor()
    cfg = gemma3_config(proc.tokenizer)
    cfg.text_config.use_bidirectional_attention = True
    model = Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    batch = gemma3_inputs(proc, QUESTIONS[:1], SIZES[:1])
    with attn_mod.patch(model, proc, backend="torch"), torch.no_grad():
        with pytest.raises(NotImplementedError, match="bidirectional sliding-window"):
            model(**batch)


def test_eval_labels_the_system_prompt_it_passes(tmp_path):
    """`attn-mod eval --system` on Gemma3 (whose template folds the system prompt into the first user turn): the
    sweep hands its prompt to the labels, so SYSTEM holds exactly its tokens and VAS is defined; the batched
    prompts nest their images per sample as Gemma3's processor needs."""
    import json
    import math

    from attn_mod.cli import main as cli_main
    from attn_mod.eval.datasets import make_synthetic_benchmark
    from attn_mod.tiny import build_processor, save_tiny

    model = save_tiny("gemma3", tmp_path / "m")
    n_sys = len(build_processor("gemma3").tokenizer.encode(SYS + "\n\n", add_special_tokens=False))
    tsv = make_synthetic_benchmark(tmp_path / "b.tsv", n=3, seed=1)
    assert cli_main(["eval", "--model", str(model), "--data", str(tsv), "--max-new-tokens", "2", "--batch-size", "2",
                     "--attention-metrics", "--no-progress", "--system", SYS, "--out", str(tmp_path / "ev")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and all(r["n_system"] == n_sys and math.isfinite(r["vas"]) for r in rows)


_MASKS: dict = {}


def _mask_spy(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """The model's own eager attention, keeping the float mask it built for each layer (window, blocks, padding)."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    _MASKS[module.layer_idx] = attention_mask.detach().clone()
    return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   **kwargs)


AttentionInterface.register("test_gemma3_mask_spy", _mask_spy)
AttentionMaskInterface.register("test_gemma3_mask_spy", eager_mask)


def test_visible_counts_follow_the_models_window_and_image_blocks(tiny):
    """n_X (SAYO a / v, AGTO m_X) counts the keys each row really sees: equal, on every layer, to the keys the
    model's own mask leaves visible (sliding layers cut the keys more than a window behind, image rows see their
    whole image); target_attention and agto_losses use those counts (checked against a float64 computation from
    the captured masses and the model's masks)."""
    from attn_mod.metrics import layer_visible_counts, target_attention
    from attn_mod.trainers.losses import agto_losses

    model, eager, proc = tiny
    batch = gemma3_inputs(proc, QUESTIONS, SIZES)
    _MASKS.clear()
    eager.set_attn_implementation({"text_config": "test_gemma3_mask_spy"})
    try:
        with torch.no_grad():
            eager(**batch)
    finally:
        eager.set_attn_implementation({"text_config": "eager"})
    with attn_mod.patch(model, proc, backend="torch", system_text=SYS), torch.no_grad():
        with attn_mod.capture(model) as rec:
            model(**batch)
    L, S = rec.num_layers, batch["input_ids"].shape[1]
    windows = rec.windows()
    assert len(_MASKS) == L and any(w is not None and w < S for w in windows) and None in windows
    assert rec.block_ids is not None and int(rec.block_ids.max()) == 1
    cats = rec.categories.long()
    valid = batch["attention_mask"].bool()  # compare non-pad rows
    counts = layer_visible_counts(rec.categories, S, L, windows=windows, block_ids=rec.block_ids)
    oh = onehot(cats).double()
    ref = []
    for layer in range(L):
        vis = (_MASKS[layer][:, 0] == 0).double()  # (B, Q, K): 0 = visible in the additive mask
        ref.append(torch.einsum("bqk,bkc->bqc", vis, oh))
    ref = torch.stack(ref)  # (L, B, S, C)
    keep = [c for c in range(8) if c != PAD]
    for layer in range(L):
        torch.testing.assert_close(counts[layer][valid][:, keep].double(), ref[layer][valid][:, keep], rtol=0, atol=0)
    # the window really bites: some row sees fewer image keys in a sliding layer than in a global one
    n_img = ref[..., IMAGE] + ref[..., TARGET]
    slid = [i for i, w in enumerate(windows) if w is not None]
    full = [i for i, w in enumerate(windows) if w is None]
    assert (n_img[slid[0]][valid] < n_img[full[0]][valid]).any()
    # consumers: v of SAYO and L_img with those counts
    m = rec.masses().double()  # (L, B, H, S, C)
    img = (m[..., IMAGE] + m[..., TARGET]).mean(2)  # (L, B, S)
    want_v = torch.where(n_img > 0, img / n_img.clamp_min(1), torch.tensor(float("nan"), dtype=torch.float64))
    ta = target_attention(rec, layers="all")
    torch.testing.assert_close(ta.v[:, valid].double(), want_v[:, valid], rtol=1e-5, atol=1e-9, equal_nan=True)
    rows = valid & (cats != IMAGE) & (cats != SYSTEM)  # every text row
    got = agto_losses(rec.masses(), rec.categories, rows, windows=windows, block_ids=rec.block_ids)
    per = (m[..., IMAGE] + m[..., TARGET]) / n_img.clamp_min(1)[:, :, None, :]  # (L, B, H, S)
    use = (rows[None] & (n_img > 0)).double()  # (L, B, S)
    mx = (per * use[:, :, None]).sum(-1) / use.sum(-1)[:, :, None]  # (L, B, H)
    torch.testing.assert_close(got.loss_img.double(), -torch.log(mx + 1e-6).mean(), rtol=1e-6, atol=1e-9)

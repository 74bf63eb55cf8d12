"""Idefics3 / SmolVLM (and LLaVA-OneVision): patched tiny models against the model's own eager attention and the
independent eager formula of tests/test_patch_models.py; pixel boxes against the real processor's pixels and
the model's own token order (its pixel shuffle / feature packing)."""

import numpy as np
import pytest
import torch
from PIL import Image

import attn_mod
import attn_mod.models
import attn_mod.regions
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT
from helpers import chat_text, onehot, random_image, twin_models
from test_families import _box_image, check_boxes_against_pixels, random_boxes
from test_patch_models import set_reference, valid_logits

QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (60, 84)]  # (W, H): split into sub-images + global image; a single frame (SmolVLM: split too)
SYSTEM_PROMPT = "You are a helpful assistant."


# ------------------------------------------------------------------ independent category oracles
def idefics3_categories(processor, batch, labels=None, system=True):
    """SYSTEM = first non-pad slot (BOS) through the first <end_of_utterance> (the system turn); IMAGE = <image>
    ids only (<fake_token_around_image>, <row_i_col_j>, <global-img>, newlines stay TEXT); RESPONSE = labels !=
    -100; PAD = mask 0; TEXT = the rest."""
    tok = processor.tokenizer
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    end = tok.convert_tokens_to_ids("<end_of_utterance>")
    if system:
        for b in range(ids.shape[0]):
            first = am[b].nonzero()[0].item()
            cats[b, first:(ids[b] == end).nonzero()[0].item() + 1] = SYSTEM
    cats[ids == tok.convert_tokens_to_ids("<image>")] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


ORACLES = {"idefics3": idefics3_categories, "smolvlm": idefics3_categories}
FAMILIES = list(ORACLES)


def inputs(proc, questions, sizes, *, answers=None, seed=0, system=SYSTEM_PROMPT):
    """A left-padded batch, one image per sample (nested per sample, as these processors expect)."""
    answers = answers or [None] * len(questions)
    texts = [chat_text(proc, q, answer=a, system=system) for q, a in zip(questions, answers)]
    images = [[random_image(w, h, seed + i)] for i, (w, h) in enumerate(sizes)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


# ------------------------------------------------------------------------------ identity / masses
def test_identity_matches_eager_logits_and_masses(family):
    model, eager, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS, SIZES)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    assert torch.equal(rec.categories.long(), ORACLES[family](proc, batch))
    oh = onehot(rec.categories)
    valid = batch["attention_mask"].bool()
    assert len(ref.attentions) == model.config.text_config.num_hidden_layers
    for layer, attn in enumerate(ref.attentions):
        want = torch.einsum("bhqk,bkc->bhqc", attn.float(), oh)
        got = rec.mass(layer)
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=0)
        assert got[..., IMAGE].sum() > 0 and got[..., SYSTEM].sum() > 0
    handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_marker_tokens_are_text(family):
    """Every marker of the split-image prompt is TEXT; IMAGE is exactly the <image> ids; no system turn -> no SYSTEM."""
    model, _, proc = twin_models(family)
    tok = proc.tokenizer
    batch = inputs(proc, QUESTIONS[:1], SIZES[:1], system=None)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad():
        model(**batch)
    cats, ids = handle.categories[0].long(), batch["input_ids"][0]
    markers = [tok.convert_tokens_to_ids(t) for t in ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                                                       "<row_2_col_2>")]
    for m in markers:
        assert (ids == m).any() and (cats[ids == m] == TEXT).all()
    assert torch.equal(cats == IMAGE, ids == model.config.image_token_id)
    assert not (cats == SYSTEM).any() and cats[0] == TEXT
    assert torch.equal(cats, idefics3_categories(proc, batch, system=False)[0])
    handle.remove()


def test_template_response_labels(family):
    """Without labels, the assistant body (after 'Assistant:', through <end_of_utterance>) is RESPONSE."""
    model, _, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS[:1], SIZES[:1], answers=["The answer is B."])
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad():
        model(**batch)
    tok = proc.tokenizer
    n_answer = len(tok.encode(" The answer is B.", add_special_tokens=False)) + 1  # + <end_of_utterance>
    ids = batch["input_ids"][0].tolist()
    assert ids[-1] == tok.convert_tokens_to_ids("\n") or tok.decode(ids[-1:]) == "\n"
    want = idefics3_categories(proc, batch)
    want[0, -1 - n_answer:-1] = RESPONSE  # the trailing "\n" after <end_of_utterance> stays TEXT
    assert torch.equal(handle.categories.long(), want)
    handle.remove()


def test_template_without_turns_is_refused(family):
    model, _, proc = twin_models(family)
    tok = proc.tokenizer
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    try:
        with pytest.raises(ValueError, match="categories='explicit'"):
            attn_mod.patch(model, proc)
    finally:
        tok.chat_template = saved


# ------------------------------------------------------------------------ interventions vs formula
@pytest.mark.parametrize("renorm", [True, False])
def test_avar_matches_eager_formula(family, renorm):
    model, eager, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS, SIZES)
    iv = Intervention.avar(alpha=0.3, beta=0.5, renorm=renorm)
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with torch.no_grad():
        got = model(**batch)
        base = eager(**batch)
        set_reference(iv, ORACLES[family](proc, batch), 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    assert (valid_logits(got, batch) - valid_logits(base, batch)).abs().max() > 1e-2
    handle.remove()


def test_generic_intervention_with_response_labels_matches_formula(family):
    model, eager, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -5:-1] = batch["input_ids"][:, -5:-1]
    iv = Intervention(mul={"text": 1.2}, absw={"visual": 0.3}, add={"system": -0.5},
                      w={"visual": 1.5, "response": 0.7}, renorm=True, layers=[1], heads=[0, 3],
                      query=["response", "text"])
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with torch.no_grad():
        got = model(**batch, labels=labels)
        set_reference(iv, ORACLES[family](proc, batch, labels), 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch, labels=labels)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    handle.remove()


# ------------------------------------------------------------------------------ generate / cache
@pytest.mark.parametrize("iv", [Intervention.identity(), Intervention.avar(0.3, 0.5)], ids=["identity", "avar"])
def test_left_padded_generate_equals_single_prompts(family, iv):
    model, eager, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS, SIZES)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    singles = [inputs(proc, [QUESTIONS[i]], [SIZES[i]], seed=i) for i in range(2)]
    if iv.transform().is_identity():  # the model's own eager implementation is consistent here too
        ref = eager.generate(**batch, **kw)
        for i in range(2):
            alone = eager.generate(**singles[i], **kw)
            assert torch.equal(ref.sequences[i, -6:], alone.sequences[0, -6:])
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    together = model.generate(**batch, **kw)
    if iv.transform().is_identity():
        assert torch.equal(together.sequences, ref.sequences)
    for i in range(2):
        alone = model.generate(**singles[i], **kw)
        assert torch.equal(together.sequences[i, -6:], alone.sequences[0, -6:])
        for s_batch, s_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=0)
    handle.remove()


# ----------------------------------------------------------------------------------- training
def test_training_gradients_match_eager(family):
    model, eager, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -6:] = batch["input_ids"][:, -6:]
    for m in (model, eager):
        m.train()
    eager(**batch, labels=labels).loss.backward()
    attn_mod.patch(model, proc)
    with attn_mod.capture(model, detach=False) as rec:
        loss = model(**batch, labels=labels).loss
    loss.backward()
    n = 0
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(p.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
            n += 1
    assert n > 10 and rec.masses()[..., IMAGE].requires_grad
    assert model.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ pixel boxes
def _frame_fills(proc, model, image, cell):
    """Per <image> token of `image`, from the processor's own pixel_values (its frames, in its order): the white
    fraction of the token's square and of the 2x2 pixels at the square's centre, in raster order per frame;
    the area fractions are checked against the model's own connector.pixel_shuffle of per-patch fractions."""
    def pv(img):
        return proc.image_processor(images=[[img]], return_tensors="pt")["pixel_values"][0]

    lo, hi = pv(Image.new("RGB", image.size, 0)), pv(Image.new("RGB", image.size, (255, 255, 255)))
    frac = ((pv(image) - lo) / (hi - lo)).nan_to_num(0.0).mean(1).clamp(0, 1)  # (frames, M, M)
    squares = frac.unfold(1, cell, cell).unfold(2, cell, cell)  # (frames, n, n, cell, cell)
    m = cell // 2
    area, centre = squares.mean((-1, -2)).flatten(), squares[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2)).flatten()
    patch = model.config.vision_config.patch_size
    per_patch = frac.unfold(1, patch, patch).unfold(2, patch, patch).mean((-1, -2))  # (frames, P, P) raster
    shuffled = model.model.connector.pixel_shuffle(per_patch.flatten(1)[..., None], model.config.scale_factor)
    torch.testing.assert_close(shuffled.mean(-1).flatten(), area, atol=1e-6, rtol=0)
    return area, centre


@pytest.mark.parametrize("size", [(130, 90), (60, 84), (84, 84), (301, 47), (90, 200), (40, 30)])
def test_boxes_match_processor_sub_images_and_global_image(family, size):
    """Every sub-image the box overlaps and the global image, token by token against the processor's frames."""
    model, _, proc = twin_models(family)
    w, h = size
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    cells = geo.cells((h, w))
    enc = inputs(proc, QUESTIONS[:1], [size], system=None)
    assert len(cells) == int((enc["input_ids"] == model.config.image_token_id).sum())
    assert len(cells) == enc["pixel_values"].shape[1] * proc.image_seq_len
    rows, cols = geo.grid(h, w)
    text = proc.tokenizer.decode(enc["input_ids"][0])
    assert text.count("<row_") == rows * cols and text.count("<global-img>") == 1
    for box in random_boxes(w, h):
        check_boxes_against_pixels(cells, _frame_fills(proc, model, _box_image(w, h, box), geo.cell), box, (h, w))
    full = attn_mod.regions.select_cells(cells, (0, 0, w, h), (h, w))
    assert full.tolist() == list(range(len(cells)))


@pytest.mark.parametrize("variant", ["no_splitting", "longest_edge_is_frame"])
def test_boxes_single_frame(family, variant):
    """One frame per image: splitting off, or splitting on with size longest_edge = the frame size."""
    from attn_mod.tiny import build_processor

    model, _, proc = twin_models(family)
    tile = proc.image_processor.max_image_size["longest_edge"]
    change = {"do_image_splitting": False} if variant == "no_splitting" else {"size": {"longest_edge": tile}}
    ip = type(proc.image_processor)(**{**proc.image_processor.to_dict(), **change})
    proc2 = build_processor(family, tokenizer=proc.tokenizer, image_processor=ip)
    geo = attn_mod.models.get_adapter(model).box_geometry(proc2, model.config)
    w, h = 130, 90
    cells = geo.cells((h, w))
    assert geo.grid(h, w) == (0, 0) and len(cells) == proc2.image_seq_len
    for box in random_boxes(w, h):
        check_boxes_against_pixels(cells, _frame_fills(proc2, model, _box_image(w, h, box), geo.cell), box, (h, w))


def test_point_box_selects_one_token_per_frame(family):
    model, _, proc = twin_models(family)
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    h, w = 90, 130
    rows, cols = geo.grid(h, w)
    assert rows * cols > 1
    cells = geo.cells((h, w))
    gen = np.random.default_rng(0)
    for _ in range(20):
        x, y = int(gen.integers(0, w + 1)), int(gen.integers(0, h + 1))
        for by in ("overlap", "center"):
            idx = attn_mod.regions.select_cells(cells, (x, y, x, y), (h, w), by=by)
            assert idx.numel() == 2  # one sub-image token + one global-image token
            assert idx[-1] >= rows * cols * proc.image_seq_len > idx[0]


def test_set_target_boxes_label_target_tokens(family):
    model, _, proc = twin_models(family)
    batch = inputs(proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc, backend="torch")
    boxes = [[(10, 5, 60, 40)], [(5, 50, 40, 84)]]
    sizes_hw = [(90, 130), (84, 60)]
    handle.set_target(boxes=boxes, images=sizes_hw)
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    geo = handle.state.adapter.box_geometry(proc, model.config)
    want = idefics3_categories(proc, batch)
    for b in range(2):
        idx = attn_mod.regions.select_cells(geo.cells(sizes_hw[b]), boxes[b][0], sizes_hw[b])
        img_pos = (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        assert 0 < idx.numel() < img_pos.numel()
        want[b, img_pos[idx]] = TARGET
    assert torch.equal(handle.categories[:, :batch["input_ids"].shape[1]].long(), want)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match="resized"):
        handle.set_target(boxes=boxes, images=sizes_hw, convention="resized")
        model(**batch)
    handle.remove()


def test_save_and_load_tiny_round_trip(family, tmp_path):
    """A saved tiny checkpoint loads by path (attn_mod.loading) with a working processor, and patches."""
    from attn_mod.loading import load_model
    from attn_mod.tiny import build_tiny, save_tiny

    save_tiny(family, tmp_path)
    model, proc = load_model(tmp_path)
    ref, ref_proc = build_tiny(family)
    batch = inputs(proc, QUESTIONS[:1], SIZES[:1])
    assert torch.equal(batch["input_ids"], inputs(ref_proc, QUESTIONS[:1], SIZES[:1])["input_ids"])
    handle = attn_mod.patch(model, proc)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    handle.remove()


# ======================================================================================= LLaVA-OneVision
OV_SIZES = [(130, 90), (60, 84)]


def ov_chat(proc, question, *, answer=None, system=SYSTEM_PROMPT, images=1):
    """llava-hf's OneVision template reads list contents only."""
    text = lambda t: [{"type": "text", "text": t}]  # noqa: E731
    messages = ([{"role": "system", "content": text(system)}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}] * images + text(question)}]
    if answer is not None:
        messages.append({"role": "assistant", "content": text(answer)})
    return proc.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)


def ov_inputs(proc, questions, sizes, *, answers=None, seed=0, system=SYSTEM_PROMPT):
    answers = answers or [None] * len(questions)
    texts = [ov_chat(proc, q, answer=a, system=system) for q, a in zip(questions, answers)]
    images = [[random_image(w, h, seed + i)] for i, (w, h) in enumerate(sizes)]
    return proc(text=texts, images=images, return_tensors="pt", padding=True)


def onevision_categories(processor, batch, labels=None):
    """SYSTEM = first non-pad slot through the first <|im_end|> (the system turn); IMAGE = every <image>
    placeholder (newline slots included); RESPONSE = labels != -100; PAD = mask 0; TEXT = the rest."""
    tok = processor.tokenizer
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for b in range(ids.shape[0]):
        first = am[b].nonzero()[0].item()
        cats[b, first:(ids[b] == end).nonzero()[0].item() + 1] = SYSTEM
    cats[ids == tok.convert_tokens_to_ids("<image>")] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


def test_onevision_identity_matches_eager_logits_and_masses():
    model, eager, proc = twin_models("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS, OV_SIZES)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    assert torch.equal(rec.categories.long(), onevision_categories(proc, batch))
    oh = onehot(rec.categories)
    valid = batch["attention_mask"].bool()
    assert len(ref.attentions) == model.config.text_config.num_hidden_layers
    for layer, attn in enumerate(ref.attentions):
        want = torch.einsum("bhqk,bkc->bhqc", attn.float(), oh)
        got = rec.mass(layer)
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=0)
        assert got[..., IMAGE].sum() > 0 and got[..., SYSTEM].sum() > 0
    handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"


def test_onevision_template_roles():
    """The header "assistant \\n" (space after the role) is read from the template: the answer body is
    RESPONSE; without a system turn nothing is SYSTEM; a template without ChatML turns is refused."""
    model, _, proc = twin_models("llava_onevision")
    tok = proc.tokenizer
    batch = ov_inputs(proc, QUESTIONS[:1], OV_SIZES[:1], answers=["The answer is B."], system=None)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad():
        model(**batch)
    n_answer = len(tok.encode("The answer is B.", add_special_tokens=False)) + 1  # + <|im_end|>
    want = onevision_categories(proc, batch)
    want[want == SYSTEM] = TEXT  # no system turn: the oracle's span up to the first <|im_end|> is the user turn
    want[0, -n_answer:] = RESPONSE
    assert tok.decode(batch["input_ids"][0, :-n_answer]).endswith("<|im_start|>assistant \n")
    assert torch.equal(handle.categories.long(), want)
    handle.remove()
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'][0]['text'] }}{% endfor %}"
    try:
        with pytest.raises(ValueError, match="categories='explicit'"):
            attn_mod.patch(model, proc)
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("renorm", [True, False])
def test_onevision_avar_matches_eager_formula(renorm):
    model, eager, proc = twin_models("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS, OV_SIZES)
    iv = Intervention.avar(alpha=0.3, beta=0.5, renorm=renorm)
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with torch.no_grad():
        got = model(**batch)
        base = eager(**batch)
        set_reference(iv, onevision_categories(proc, batch), 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    assert (valid_logits(got, batch) - valid_logits(base, batch)).abs().max() > 1e-2
    handle.remove()


def test_onevision_generic_intervention_with_response_labels_matches_formula():
    model, eager, proc = twin_models("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS, OV_SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -5:-1] = batch["input_ids"][:, -5:-1]
    iv = Intervention(mul={"text": 1.2}, absw={"visual": 0.3}, add={"system": -0.5},
                      w={"visual": 1.5, "response": 0.7}, renorm=True, layers=[1], heads=[0, 3],
                      query=["response", "text"])
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    with torch.no_grad():
        got = model(**batch, labels=labels)
        set_reference(iv, onevision_categories(proc, batch, labels), 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch, labels=labels)
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    handle.remove()


@pytest.mark.parametrize("iv", [Intervention.identity(), Intervention.avar(0.3, 0.5)], ids=["identity", "avar"])
def test_onevision_left_padded_generate_equals_single_prompts(iv):
    model, eager, proc = twin_models("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS, OV_SIZES)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    singles = [ov_inputs(proc, [QUESTIONS[i]], [OV_SIZES[i]], seed=i) for i in range(2)]
    if iv.transform().is_identity():  # the model's own eager implementation is consistent here too
        ref = eager.generate(**batch, **kw)
        for i in range(2):
            alone = eager.generate(**singles[i], **kw)
            assert torch.equal(ref.sequences[i, -6:], alone.sequences[0, -6:])
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    together = model.generate(**batch, **kw)
    if iv.transform().is_identity():
        assert torch.equal(together.sequences, ref.sequences)
    for i in range(2):
        alone = model.generate(**singles[i], **kw)
        assert torch.equal(together.sequences[i, -6:], alone.sequences[0, -6:])
        for s_batch, s_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=0)
    handle.remove()


def test_onevision_training_gradients_match_eager():
    model, eager, proc = twin_models("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS, OV_SIZES, answers=["The answer is B.", "3"])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -6:] = batch["input_ids"][:, -6:]
    for m in (model, eager):
        m.train()
    eager(**batch, labels=labels).loss.backward()
    attn_mod.patch(model, proc)
    with attn_mod.capture(model, detach=False) as rec:
        loss = model(**batch, labels=labels).loss
    loss.backward()
    n = 0
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(p.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
            n += 1
    assert n > 10 and rec.masses()[..., IMAGE].requires_grad
    assert model.model.image_newline.grad.abs().sum() > 0  # the newline slots are IMAGE and get gradient


def _ov_packed(model, proc, images, features_of):
    """The model's own packing (`pack_image_features`, image_newline = -1 in every channel) of per-patch
    features computed from the processor's own crops: features_of(crops (N, 3, S, S) -> (N, P*P, C))."""
    enc = proc.image_processor(images=[images], return_tensors="pt")
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    multi = len(images) > 1
    out = []
    for k, size in enumerate(enc["image_sizes"]):
        n = 1 if multi else image_size_to_num_patches(size, model.config.image_grid_pinpoints,
                                                      model.config.vision_config.image_size)
        crops = enc["pixel_values"][0][:n] if not multi else enc["pixel_values"][0][k:k + 1]
        feats = features_of(crops)
        newline = torch.full((feats.shape[-1],), -1.0)
        packed, _ = model.model.pack_image_features([feats], size[None], image_newline=newline,
                                                       vision_aspect_ratio=model.config.vision_aspect_ratio)
        out.append(packed[0])
    return out


def _ov_fill_features(proc, image, patch):
    """features_of for `image` (a box image): per patch, its white fraction and that of its 2x2 centre pixels."""
    def pv(img):
        return proc.image_processor(images=[[img]], return_tensors="pt")["pixel_values"][0]

    lo, hi = pv(Image.new("RGB", image.size, 0)), pv(Image.new("RGB", image.size, (255, 255, 255)))

    def features_of(crops):
        n = crops.shape[0]
        frac = ((pv(image)[:n] - lo[:n]) / (hi[:n] - lo[:n])).nan_to_num(0.0).mean(1).clamp(0, 1)
        sq = frac.unfold(1, patch, patch).unfold(2, patch, patch)  # (N, P, P, patch, patch), SigLIP's raster
        m = patch // 2
        return torch.stack([sq.mean((-1, -2)), sq[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2))], -1).flatten(1, 2)

    return features_of


@pytest.mark.parametrize("size", [(130, 90), (60, 84), (56, 56), (301, 47), (90, 200), (40, 30), (150, 160)])
def test_onevision_boxes_match_processor_crops(size):
    """Base image + anyres grid (unpadded, newline per row), token by token against the processor's crops as
    the model itself packs them; newline slots are exactly the None cells."""
    model, _, proc = twin_models("llava_onevision")
    w, h = size
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    cells = geo.cells((h, w))
    enc = ov_inputs(proc, QUESTIONS[:1], [size], system=None)
    assert len(cells) == int((enc["input_ids"] == model.config.image_token_id).sum())
    patch = geo.patch
    for box in random_boxes(w, h):
        (packed,) = _ov_packed(model, proc, [_box_image(w, h, box)], _ov_fill_features(proc, _box_image(w, h, box),
                                                                                       patch))
        assert packed.shape[0] == len(cells)
        assert [c is None for c in cells] == (packed[:, 0] == -1).tolist()
        check_boxes_against_pixels(cells, (packed[:, 0], packed[:, 1]), box, (h, w))
    full = attn_mod.regions.select_cells(cells, (0, 0, w, h), (h, w))
    assert full.tolist() == [i for i, c in enumerate(cells) if c is not None]
    rows = sum(c is None for c in cells)
    assert rows == geo.feature_rows_cols(h, w)[4] > 0


@pytest.mark.parametrize("size", [(130, 90), (150, 160), (301, 47)])
def test_onevision_anyres_max_resized_grid_matches_model(size):
    """With anyres_max_1 the unpadded grid is bilinearly resized: each token's region (its cell) has, as its
    centre, the point the model's interpolation samples (exact for the linear per-patch canvas coordinates)."""
    from attn_mod.tiny import build_onevision_processor

    model, _, _ = twin_models("llava_onevision")
    model.config.vision_aspect_ratio = "anyres_max_1"
    proc = build_onevision_processor(vision_aspect_ratio="anyres_max_1")
    w, h = size
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    r0, r1, c0, c1, oh, ow = geo.feature_rows_cols(h, w)
    assert (oh, ow) != (r1 - r0, c1 - c0)  # the resize happens
    cells = geo.cells((h, w))
    enc = ov_inputs(proc, QUESTIONS[:1], [size], system=None)
    assert len(cells) == int((enc["input_ids"] == model.config.image_token_id).sum())
    bh, bw, nh, nw, top, left = geo.grid_shape(h, w)
    S, p = geo.crop, geo.patch
    npw = bw // S

    def features_of(crops):  # canvas centre (x, y) of every patch; crops after the base one in raster order
        P = S // p
        ys, xs = torch.meshgrid(torch.arange(P) * p + p / 2, torch.arange(P) * p + p / 2, indexing="ij")
        feats = [torch.zeros(P * P, 2)]  # base image: not interpolated, checked by the test above
        for k in range(crops.shape[0] - 1):
            oy, ox = (k // npw) * S, (k % npw) * S
            feats.append(torch.stack([xs + ox, ys + oy], -1).reshape(-1, 2))
        return torch.stack(feats)

    (packed,) = _ov_packed(model, proc, [random_image(w, h)], features_of)
    assert packed.shape[0] == len(cells)
    assert [c is None for c in cells] == (packed[:, 0] == -1).tolist()
    base = geo.side ** 2
    for n in range(base, len(cells)):
        if cells[n] is None:
            continue
        x0, y0, x1, y1 = cells[n]
        cx = float((x0 + x1) / 2) * nw / w + left  # cell centre in canvas pixels
        cy = float((y0 + y1) / 2) * nh / h + top
        assert abs(packed[n, 0].item() - cx) < 1e-3 and abs(packed[n, 1].item() - cy) < 1e-3, (n, cells[n])


def test_onevision_multi_image_sample_boxes():
    """Two images in one sample: each is padded to square and resized to one crop, P*P tokens + one newline,
    checked against the processor's crop of that image as the model packs it."""
    model, _, proc = twin_models("llava_onevision")
    sizes = [(130, 90), (40, 70)]
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    enc = proc(text=[ov_chat(proc, QUESTIONS[0], images=2)], images=[[random_image(w, h, i) for i, (w, h) in
                                                                      enumerate(sizes)]], return_tensors="pt")
    assert enc["batch_num_images"].tolist() == [2]
    cells = [geo.cells((h, w), multi_image=True) for w, h in sizes]
    assert sum(map(len, cells)) == int((enc["input_ids"] == model.config.image_token_id).sum())

    def pv(imgs):  # (images, 3, S, S): one crop per image of a multi-image sample
        return proc.image_processor(images=[imgs], return_tensors="pt")["pixel_values"][:, 0]

    lo = pv([Image.new("RGB", s, 0) for s in sizes])
    hi = pv([Image.new("RGB", s, (255, 255, 255)) for s in sizes])
    m = geo.patch // 2
    for k, (w, h) in enumerate(sizes):
        for box in random_boxes(w, h, 4):
            imgs = [_box_image(*s, box) if j == k else random_image(*s) for j, s in enumerate(sizes)]
            frac = ((pv(imgs)[k] - lo[k]) / (hi[k] - lo[k])).nan_to_num(0.0).mean(0).clamp(0, 1)  # padding -> 0
            sq = frac.unfold(0, geo.patch, geo.patch).unfold(1, geo.patch, geo.patch)
            feats = torch.stack([sq.mean((-1, -2)), sq[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2))], -1)
            (packed,), _ = model.model.pack_image_features([feats.flatten(0, 1)[None]], torch.tensor([[h, w]]),
                                                           image_newline=torch.full((2,), -1.0))
            assert [c is None for c in cells[k]] == (packed[:, 0] == -1).tolist()
            check_boxes_against_pixels(cells[k], (packed[:, 0], packed[:, 1]), box, (h, w))


def test_onevision_set_target_boxes_label_target_tokens():
    model, _, proc = twin_models("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS, OV_SIZES)
    handle = attn_mod.patch(model, proc, backend="torch")
    boxes = [[(10, 5, 60, 40)], [(5, 50, 40, 84)]]
    sizes_hw = [(90, 130), (84, 60)]
    handle.set_target(boxes=boxes, images=sizes_hw)
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    geo = handle.state.adapter.box_geometry(proc, model.config)
    want = onevision_categories(proc, batch)
    for b in range(2):
        cells = geo.cells(sizes_hw[b])
        idx = attn_mod.regions.select_cells(cells, boxes[b][0], sizes_hw[b])
        img_pos = (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
        assert 0 < idx.numel() < img_pos.numel() and all(cells[i] is not None for i in idx.tolist())
        want[b, img_pos[idx]] = TARGET
    assert torch.equal(handle.categories[:, :batch["input_ids"].shape[1]].long(), want)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    handle.remove()


def test_onevision_save_and_load_tiny_round_trip(tmp_path):
    from attn_mod.loading import load_model
    from attn_mod.tiny import build_tiny, save_tiny

    save_tiny("llava_onevision", tmp_path)
    model, proc = load_model(tmp_path)
    ref, ref_proc = build_tiny("llava_onevision")
    batch = ov_inputs(proc, QUESTIONS[:1], OV_SIZES[:1])
    assert torch.equal(batch["input_ids"], ov_inputs(ref_proc, QUESTIONS[:1], OV_SIZES[:1])["input_ids"])
    handle = attn_mod.patch(model, proc)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    handle.remove()


def test_onevision_multi_image_set_target_uses_batch_num_images():
    """A box on the second image of a two-image sample: TARGET lands on that image's tokens (its multi-image
    layout, read from the processor's batch_num_images), in a forward and through generate."""
    model, _, proc = twin_models("llava_onevision")
    sizes = [(130, 90), (40, 70)]
    enc = proc(text=[ov_chat(proc, QUESTIONS[0], images=2)], images=[[random_image(w, h, i) for i, (w, h) in
                                                                      enumerate(sizes)]], return_tensors="pt")
    handle = attn_mod.patch(model, proc, backend="torch")
    hw = [(h, w) for w, h in sizes]
    boxes = [[(1, (5, 10, 30, 50))]]
    geo = handle.state.adapter.box_geometry(proc, model.config)
    first = len(geo.cells(hw[0], multi_image=True))
    idx = attn_mod.regions.select_cells(geo.cells(hw[1], multi_image=True), boxes[0][0][1], hw[1])
    img_pos = (enc["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    want = onevision_categories(proc, enc)
    want[0, img_pos[first + idx]] = TARGET
    assert 0 < idx.numel() < len(img_pos) - first
    handle.set_target(boxes=boxes, images=hw)
    with torch.no_grad():
        model(**enc)
    assert torch.equal(handle.categories.long(), want)
    model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert torch.equal(handle.categories[:, :enc["input_ids"].shape[1]].long(), want)
    no_counts = {k: v for k, v in enc.items() if k != "batch_num_images"}
    with pytest.raises(ValueError, match="batch_num_images"):
        model(**no_counts)
    handle.remove()


@pytest.mark.parametrize("fam", ["idefics3", "smolvlm", "llava_onevision"])
def test_target_boxes_intervention_matches_eager_formula(fam):
    """Boxes -> TARGET (sub-images + global image / base image + grid) and a target-weighted intervention equal
    the independent eager formula on the oracle's categories with TARGET at the expected positions."""
    model, eager, proc = twin_models(fam)
    ov = fam == "llava_onevision"
    batch = (ov_inputs if ov else inputs)(proc, QUESTIONS, SIZES)
    sizes_hw = [(h, w) for w, h in SIZES]
    boxes = [[(20, 10, 90, 60)], [(0, 30, 45, 84)]]
    iv = Intervention(mul={"target": 1.5}, w={"target": 2.0, "system": 0.5}, add={"text": 0.2}, renorm=True)
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    handle.set_target(boxes=boxes, images=sizes_hw)
    geo = handle.state.adapter.box_geometry(proc, model.config)
    cats = (onevision_categories if ov else idefics3_categories)(proc, batch)
    for b in range(2):
        idx = attn_mod.regions.select_cells(geo.cells(sizes_hw[b]), boxes[b][0], sizes_hw[b])
        cats[b, (batch["input_ids"][b] == model.config.image_token_id).nonzero().flatten()[idx]] = TARGET
    with torch.no_grad():
        got = model(**batch)
        set_reference(iv, cats, 2, 4)
        eager.set_attn_implementation({"text_config": "test_eager_formula"})
        want = eager(**batch)
    assert torch.equal(handle.categories.long(), cats) and (cats == TARGET).sum() > 4
    torch.testing.assert_close(valid_logits(got, batch), valid_logits(want, batch), atol=1e-5, rtol=0)
    handle.remove()


def test_box_geometry_refuses_a_processor_that_does_not_fit():
    """Checked at set_target (before any forward), naming what does not match."""
    from attn_mod.tiny import build_onevision_processor, build_processor

    model, _, proc = twin_models("idefics3")
    handle = attn_mod.patch(model, proc, backend="torch")
    proc.image_seq_len = 16  # a processor of another checkpoint
    with pytest.raises(ValueError, match="image_seq_len=16"):
        handle.set_target(boxes=[[(0, 0, 5, 5)]], images=[(90, 130)])
    handle.remove()
    model, _, proc = twin_models("llava_onevision")
    ip = type(proc.image_processor)(**{**proc.image_processor.to_dict(), "image_grid_pinpoints": [[56, 56], [56, 112]]})
    handle = attn_mod.patch(model, build_onevision_processor(image_processor=ip), backend="torch")
    with pytest.raises(ValueError, match="image_grid_pinpoints"):
        handle.set_target(boxes=[[(0, 0, 5, 5)]], images=[(90, 130)])
    handle.remove()
    model.config.vision_feature_select_strategy = "default"
    handle = attn_mod.patch(model, build_processor("llava_onevision"), backend="torch")
    with pytest.raises(NotImplementedError, match="vision_feature_select_strategy"):
        handle.set_target(boxes=[[(0, 0, 5, 5)]], images=[(90, 130)])
    handle.remove()


@pytest.mark.parametrize("fam", ["idefics3", "llava_onevision"])
def test_video_boxes_are_not_implemented(fam):
    model, _, proc = twin_models(fam)
    batch = (ov_inputs if fam == "llava_onevision" else inputs)(proc, QUESTIONS[:1], SIZES[:1])
    handle = attn_mod.patch(model, proc, backend="torch")
    handle.set_target(boxes=[[("video", 0, (0, 0, 5, 5))]], videos=[(90, 130)])
    with pytest.raises(NotImplementedError, match="video boxes"), torch.no_grad():
        model(**batch)
    handle.remove()

"""Families beyond Qwen (LLaVA-1.5, ...): patched tiny models against the model's own eager attention and the
independent eager formula of tests/test_patch_models.py; pixel boxes against the real processor's pixels."""

import numpy as np
import pytest
import torch
from PIL import Image

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT
from attn_mod.tiny import LLAVA_SYSTEM
from helpers import onehot, random_image, twin_models, vlm_inputs
from test_patch_models import set_reference, valid_logits

QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (60, 84)]  # (W, H): landscape (resize + crop) and portrait


# ------------------------------------------------------------------ independent category oracles
def llava_categories(processor, batch, labels=None):
    """SYSTEM = the tokens of "<s>" + the default system prompt (tokenized on their own), counted from the
    first non-pad slot; IMAGE = `<image>` ids; RESPONSE = labels != -100; PAD = mask 0; TEXT = rest."""
    tok = processor.tokenizer
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    n_sys = len(tok.encode(tok.bos_token + LLAVA_SYSTEM, add_special_tokens=False))
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    for b in range(ids.shape[0]):
        first = am[b].nonzero()[0].item()
        cats[b, first:first + n_sys] = SYSTEM
    cats[ids == tok.convert_tokens_to_ids("<image>")] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


def internvl_categories(processor, batch, labels=None):
    """ChatML with an explicit system turn: SYSTEM = first non-pad slot through the first <|im_end|>;
    IMAGE = <IMG_CONTEXT> ids (the <img> / </img> delimiters stay TEXT); RESPONSE / PAD as above."""
    tok = processor.tokenizer
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for b in range(ids.shape[0]):
        first = am[b].nonzero()[0].item()
        cats[b, first:(ids[b] == end).nonzero()[0].item() + 1] = SYSTEM
    cats[ids == tok.convert_tokens_to_ids("<IMG_CONTEXT>")] = IMAGE
    if labels is not None:
        cats[labels != -100] = RESPONSE
    cats[~am] = PAD
    return cats


ORACLES = {"llava": llava_categories, "internvl": internvl_categories}
# InternVL3.5's template adds no default system turn: system quantities need an explicit one.
SYSTEMS = {"llava": None, "internvl": "You are a helpful assistant."}
FAMILIES = list(ORACLES)


def inputs(family, proc, questions, sizes, **kw):
    return vlm_inputs(proc, questions, sizes, system=SYSTEMS[family], **kw)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def text_attn(model):
    return model.config.text_config._attn_implementation


# ------------------------------------------------------------------------------ identity / masses
def test_identity_matches_eager_logits_and_masses(family):
    model, eager, proc = twin_models(family)
    batch = inputs(family, proc, QUESTIONS, SIZES)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad(), attn_mod.capture(model) as rec:
        out = model(**batch)
    torch.testing.assert_close(valid_logits(out, batch), valid_logits(ref, batch), atol=1e-5, rtol=0)
    assert torch.equal(rec.categories.long(), ORACLES[family](proc, batch))
    oh = onehot(rec.categories)
    valid = batch["attention_mask"].bool()
    for layer, attn in enumerate(ref.attentions):
        want = torch.einsum("bhqk,bkc->bhqc", attn.float(), oh)
        got = rec.mass(layer)
        torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid], atol=1e-5, rtol=0)
        assert got[..., IMAGE].sum() > 0 and got[..., SYSTEM].sum() > 0
    handle.remove()
    assert text_attn(model) == "sdpa"


# ------------------------------------------------------------------------ interventions vs formula
@pytest.mark.parametrize("renorm", [True, False])
def test_avar_matches_eager_formula(family, renorm):
    model, eager, proc = twin_models(family)
    batch = inputs(family, proc, QUESTIONS, SIZES)
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
    batch = inputs(family, proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
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


def test_llava_template_response_labels():
    """Without labels, the assistant body (after ' ASSISTANT:', through </s>) is RESPONSE."""
    model, _, proc = twin_models("llava")
    batch = vlm_inputs(proc, QUESTIONS[:1], SIZES[:1], answers=["The answer is B."])
    handle = attn_mod.patch(model, proc, backend="torch")
    with torch.no_grad():
        model(**batch)
    tok = proc.tokenizer
    n_answer = len(tok.encode(" The answer is B.", add_special_tokens=False)) + 1  # + </s>
    want = llava_categories(proc, batch)
    want[0, -n_answer:] = RESPONSE
    assert torch.equal(handle.categories.long(), want)
    handle.remove()


# ------------------------------------------------------------------------------ generate / cache
@pytest.mark.parametrize("iv", [Intervention.identity(), Intervention.avar(0.3, 0.5)], ids=["identity", "avar"])
def test_left_padded_generate_equals_single_prompts(family, iv):
    model, _, proc = twin_models(family)
    handle = attn_mod.patch(model, proc, intervention=iv, backend="torch")
    batch = inputs(family, proc, QUESTIONS, SIZES)
    assert (batch["attention_mask"] == 0).any()
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    together = model.generate(**batch, **kw)
    for i in range(2):
        alone = model.generate(**inputs(family, proc, [QUESTIONS[i]], [SIZES[i]], seed=i), **kw)
        assert torch.equal(together.sequences[i, -6:], alone.sequences[0, -6:])
        for s_batch, s_alone in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_batch[i], s_alone[0], atol=1e-4, rtol=0)
    handle.remove()


# ----------------------------------------------------------------------------------- training
def test_training_gradients_match_eager(family):
    model, eager, proc = twin_models(family)
    batch = inputs(family, proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
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


# ------------------------------------------------------------------------------------ pixel boxes
def _box_image(w, h, box):
    a = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a)


def _token_fill(proc, image, cell):
    """Per token, from the processor's own pixel_values (all crops / tiles of the image, in the order the
    processor emits them, raster inside each): the white fraction of its `cell`-px square and of the 2x2
    pixels around the square's centre."""
    def pv(img):
        return proc.image_processor(images=[img], return_tensors="pt")["pixel_values"]

    lo, hi = pv(Image.new("RGB", image.size, 0)), pv(Image.new("RGB", image.size, (255, 255, 255)))
    frac = ((pv(image) - lo) / (hi - lo)).mean(1).clamp(0, 1)  # (tiles, H, W)
    squares = frac.unfold(1, cell, cell).unfold(2, cell, cell)  # (tiles, rows, cols, cell, cell)
    m = cell // 2
    return squares.mean((-1, -2)).flatten(), squares[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2)).flatten()


def check_boxes_against_pixels(cells, fills, box, hw):
    """overlap: every token with white pixels in its square and no token without; center: the tokens whose
    square's centre pixels are white (resampling blur leaves ambiguous squares unchecked)."""
    area, centre = fills
    overlap = set(attn_mod.regions.select_cells(cells, box, hw, by="overlap").tolist())
    center = set(attn_mod.regions.select_cells(cells, box, hw, by="center").tolist())
    assert center <= overlap and len(area) == len(cells)
    for n, (f, fc) in enumerate(zip(area.tolist(), centre.tolist())):
        if f > 0.6:  # more than half of each axis covered: the centre is inside
            assert n in center, (box, n, f)
        if n in overlap:
            assert f > 0.0, (box, n, f)
        else:
            assert f < 0.15, (box, n, f)
        if fc > 0.9:
            assert n in center, (box, n, fc)
        if fc < 0.1:
            assert n not in center, (box, n, fc)


def random_boxes(w, h, n=6):
    gen = np.random.default_rng(w * h)
    for _ in range(n):
        x0, x1 = sorted(gen.choice(w + 1, 2, replace=False).tolist())
        y0, y1 = sorted(gen.choice(h + 1, 2, replace=False).tolist())
        yield (x0, y0, x1, y1)


@pytest.mark.parametrize("size", [(130, 90), (60, 84), (84, 84), (301, 47)])
def test_llava_boxes_match_processor_patches(size):
    model, _, proc = twin_models("llava")
    w, h = size
    adapter = attn_mod.models.get_adapter(model)
    geo = adapter.box_geometry(proc, model.config)
    for box in random_boxes(w, h):
        check_boxes_against_pixels(geo.cells((h, w)), _token_fill(proc, _box_image(w, h, box), proc.patch_size),
                                   box, (h, w))
    # full image selects every token; the labels of a patched forward put TARGET exactly there
    full = attn_mod.regions.select_cells(geo.cells((h, w)), (0, 0, w, h), (h, w))
    assert full.tolist() == list(range(model.config.image_seq_length))


def test_llava_set_target_boxes_label_target_tokens():
    model, _, proc = twin_models("llava")
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc, backend="torch")
    boxes = [[(10, 5, 60, 40)], None]
    handle.set_target(boxes=boxes, images=[(90, 130), (84, 60)])
    with torch.no_grad():
        model(**batch)
    geo = handle.state.adapter.box_geometry(proc, model.config)
    idx = attn_mod.regions.select_cells(geo.cells((90, 130)), boxes[0][0], (90, 130))
    img_pos = (batch["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    want = llava_categories(proc, batch)
    want[0, img_pos[idx]] = TARGET
    assert 0 < idx.numel() < img_pos.numel()
    assert torch.equal(handle.categories.long(), want)
    # and through generate (the hook sees the same prefill)
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert torch.equal(handle.categories[:, :batch["input_ids"].shape[1]].long(), want)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    with pytest.raises(ValueError, match="resized"):
        handle.set_target(boxes=[[(0, 0, 5, 5)], None], images=[(90, 130), (84, 60)], convention="resized")
        model(**batch)
    handle.remove()


def test_llava_template_without_user_turn_is_refused():
    model, _, proc = twin_models("llava")
    tok = proc.tokenizer
    saved = tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        with pytest.raises(ValueError, match="categories='explicit'"):
            attn_mod.patch(model, proc)
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize("size", [(130, 90), (60, 60), (300, 70), (90, 200), (200, 180)])
def test_internvl_boxes_match_processor_tiles(size):
    """Every tile the box overlaps and the thumbnail: checked against the processor's tiles, token by token."""
    model, _, proc = twin_models("internvl")
    w, h = size
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    cells = geo.cells((h, w))
    n_tiles = proc.image_processor(images=[random_image(w, h)], return_tensors="pt")["num_patches"][0]
    assert len(cells) == int(n_tiles) * model.config.image_seq_length
    for box in random_boxes(w, h):
        check_boxes_against_pixels(cells, _token_fill(proc, _box_image(w, h, box), geo.cell), box, (h, w))
    full = attn_mod.regions.select_cells(cells, (0, 0, w, h), (h, w))
    assert full.tolist() == list(range(len(cells)))


def test_internvl_set_target_boxes_label_target_tokens():
    model, _, proc = twin_models("internvl")
    batch = inputs("internvl", proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc, backend="torch")
    boxes = [None, [(5, 50, 40, 84)]]
    handle.set_target(boxes=boxes, images=[(90, 130), (84, 60)])
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    geo = handle.state.adapter.box_geometry(proc, model.config)
    idx = attn_mod.regions.select_cells(geo.cells((84, 60)), boxes[1][0], (84, 60))
    img_pos = (batch["input_ids"][1] == model.config.image_token_id).nonzero().flatten()
    want = internvl_categories(proc, batch)
    want[1, img_pos[idx]] = TARGET
    assert 0 < idx.numel() < img_pos.numel()
    assert torch.equal(handle.categories[:, :batch["input_ids"].shape[1]].long(), want)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2
    handle.remove()

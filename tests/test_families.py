"""Families beyond Qwen (LLaVA-1.5, ...): patched tiny models against the model's own eager attention and the
independent eager formula of tests/test_patch_models.py; pixel boxes against the real processor's pixels."""

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET, TEXT
from attn_mod.tiny import LLAVA_SYSTEM
from helpers import chat_text, onehot, random_image, twin_models, vlm_inputs
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
    frac = ((pv(image) - lo) / (hi - lo)).nan_to_num(0.0).mean(1).clamp(0, 1)  # (tiles, H, W); padding -> 0
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


# ------------------------------------------------------------ a family the library does not know
# The user's own LLaMA-based VLM: 24x24 px images cut into 8-px patches, embedded by a linear layer and
# written over the <|image_pad|> placeholders in COLUMN-major patch order (so the library cannot guess it).
# attn-mod knows nothing of it: labels come from the user (categories="explicit") and pixel boxes from the
# user's own geometry function through attn_mod.regions.cells_target_mask.
IMG_PX, PATCH = 24, 8
GRID = IMG_PX // PATCH


def _tiny_llama_vlm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from attn_mod.tiny import build_tokenizer

    class TinyLlamaVLM(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.patch_embed = torch.nn.Linear(3 * PATCH * PATCH, config.hidden_size)

        def forward(self, input_ids=None, pixel_values=None, inputs_embeds=None, **kwargs):
            if pixel_values is not None and input_ids is not None and (input_ids == self.config.image_token_id).any():
                p = pixel_values.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (N, 3, rows, cols, P, P)
                p = p.permute(0, 3, 2, 1, 4, 5).reshape(pixel_values.shape[0] * GRID * GRID, -1)  # column-major
                inputs_embeds = self.model.embed_tokens(input_ids).clone()
                inputs_embeds[input_ids == self.config.image_token_id] = self.patch_embed(p)
                input_ids = None
            return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)

    tok = build_tokenizer("qwen2_5_vl")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id)
    cfg.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
    torch.manual_seed(seed)
    model = TinyLlamaVLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8.0)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _user_preprocess(images):
    """The user's processor: resize to 24x24 (bilinear), scale to [0, 1]."""
    arrs = [np.asarray(im.convert("RGB").resize((IMG_PX, IMG_PX), Image.BILINEAR), dtype=np.float32) / 255
            for im in images]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def user_cells(image_size):
    """The user's geometry function: the original-pixel cell of each visual token, in the model's order."""
    h, w = image_size
    sx, sy = Fraction(w, IMG_PX), Fraction(h, IMG_PX)
    return [(c * PATCH * sx, r * PATCH * sy, (c + 1) * PATCH * sx, (r + 1) * PATCH * sy)
            for c in range(GRID) for r in range(GRID)]


def _custom_batch(tok, questions, sizes, seed=0):
    texts = [tok.apply_chat_template([{"role": "user", "content": "<|image_pad|>" * GRID * GRID + q}],
                                     add_generation_prompt=True, tokenize=False) for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True)
    images = [random_image(w, h, seed + i) for i, (w, h) in enumerate(sizes)]
    return dict(enc, pixel_values=_user_preprocess(images))


def _user_categories(tok, batch, image_token_id):
    """The user's labels: system turn (through the first <|im_end|>) SYSTEM, placeholders IMAGE, PAD, TEXT."""
    ids, am = batch["input_ids"], batch["attention_mask"].bool()
    cats = torch.full(ids.shape, TEXT, dtype=torch.long)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for b in range(ids.shape[0]):
        cats[b, am[b].nonzero()[0].item():(ids[b] == end).nonzero()[0].item() + 1] = SYSTEM
    cats[ids == image_token_id] = IMAGE
    cats[~am] = PAD
    return cats


def test_unknown_family_is_refused_with_the_escape_hatch():
    model, tok = _tiny_llama_vlm()
    with pytest.raises(attn_mod.UnsupportedModelError,
                       match=r"supported families: qwen2_5_vl, qwen3_vl, llava, internvl.*categories='explicit'"
                             r".*set_categories") as err:
        attn_mod.patch(model, tok)
    for fam in ("mllama", "idefics3", "smolvlm", "llava_onevision", "gemma3"):  # the families added since
        assert fam in str(err.value)


def test_unknown_family_explicit_labels_and_user_geometry():
    import copy

    model, tok = _tiny_llama_vlm()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    img = model.config.image_token_id
    sizes = [(130, 90), (50, 70)]
    batch = _custom_batch(tok, QUESTIONS, sizes)
    cats = _user_categories(tok, batch, img)
    handle = attn_mod.patch(model, categories="explicit", backend="torch")
    handle.set_categories(cats)
    # identity: the model's own eager logits; masses: eager attentions summed per category
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
        with attn_mod.capture(model) as rec:
            out = model(**batch)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=1e-5, rtol=0)
    for layer, attn in enumerate(ref.attentions):
        want = torch.einsum("bhqk,bkc->bhqc", attn.float(), onehot(cats))
        torch.testing.assert_close(rec.mass(layer).permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid],
                                   atol=1e-5, rtol=0)

    # pixel boxes through the user's geometry: checked against the user's own preprocessing and patch order
    for (w, h) in sizes:
        for box in random_boxes(w, h, 4):
            pv = lambda im: _user_preprocess([im])  # noqa: E731
            lo, hi = pv(Image.new("RGB", (w, h), 0)), pv(Image.new("RGB", (w, h), (255, 255, 255)))
            frac = ((pv(_box_image(w, h, box)) - lo) / (hi - lo)).mean(1).clamp(0, 1)
            sq = frac.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH).transpose(1, 2)  # column-major tokens
            m = PATCH // 2
            fills = sq.mean((-1, -2)).flatten(), sq[..., m - 1:m + 1, m - 1:m + 1].mean((-1, -2)).flatten()
            check_boxes_against_pixels(user_cells((h, w)), fills, box, (h, w))
    boxes = [[(0, 0, 60, 40)], None]
    mask = attn_mod.regions.cells_target_mask(batch["input_ids"], img, [user_cells((h, w)) for w, h in sizes],
                                              boxes, [(h, w) for w, h in sizes])
    idx = attn_mod.regions.select_cells(user_cells((90, 130)), boxes[0][0], (90, 130))
    want_mask = torch.zeros_like(mask)
    want_mask[0, (batch["input_ids"][0] == img).nonzero().flatten()[idx]] = True
    assert torch.equal(mask, want_mask) and 0 < idx.numel() < GRID * GRID
    tcats = cats.clone()
    tcats[mask] = TARGET

    # an intervention with TARGET equals the independent eager formula
    iv = Intervention(mul={"visual": 1.3}, w={"target": 2.0, "system": 0.5}, add={"text": 0.2}, renorm=True)
    handle.update(intervention=iv)
    handle.set_categories(tcats)
    with torch.no_grad():
        got = model(**batch).logits
        set_reference(iv, tcats, 2, 4)
        eager.set_attn_implementation("test_eager_formula")
        want = eager(**batch).logits
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=0)
    assert (got[valid] - out.logits[valid]).abs().max() > 1e-2

    # left-padded batched generate == one prompt at a time (explicit labels per prefill)
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    handle.set_categories(cats)
    together = model.generate(**batch, **kw)
    for i in range(2):
        single = _custom_batch(tok, [QUESTIONS[i]], [sizes[i]], seed=i)
        handle.set_categories(_user_categories(tok, single, img))
        alone = model.generate(**single, **kw)
        assert torch.equal(together.sequences[i, -5:], alone.sequences[0, -5:])
        for s_b, s_a in zip(together.scores, alone.scores):
            torch.testing.assert_close(s_b[i], s_a[0], atol=1e-4, rtol=0)
    handle.remove()


def test_unknown_family_training_gradients_match_eager():
    import copy

    model, tok = _tiny_llama_vlm()
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    batch = _custom_batch(tok, QUESTIONS, [(130, 90), (50, 70)])
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -4:] = batch["input_ids"][:, -4:]
    cats = _user_categories(tok, batch, model.config.image_token_id)
    cats[labels != -100] = RESPONSE
    for m in (model, eager):
        m.train()
    eager(**batch, labels=labels).loss.backward()
    attn_mod.patch(model, categories="explicit").set_categories(cats)
    model(**batch, labels=labels).loss.backward()
    n = 0
    for (name, p), (_, pe) in zip(model.named_parameters(), eager.named_parameters()):
        if pe.grad is not None:
            torch.testing.assert_close(p.grad, pe.grad, atol=1e-5, rtol=1e-4, msg=name)
            n += 1
    assert n > 10 and model.patch_embed.weight.grad.abs().sum() > 0


def test_readme_supported_models_table_cites_existing_tests():
    """README's table is generated from `tests/support_matrix.py` (`python tests/support_matrix.py --write`), every
    cell names a test that exists, and every adapter family has a row."""
    import ast
    from pathlib import Path

    import attn_mod.models
    import support_matrix as sm

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    a, b = sm.readme_table(readme)
    assert readme[a:b] == sm.render(), "README's table differs from tests/support_matrix.py: run it with --write"
    section = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    for key, name in sm.FILES.items():
        assert f"`{key}` = `tests/{name}`" in section, f"README's legend does not define {key}"
    defined = {k: {n.name for n in ast.walk(ast.parse((root / "tests" / f).read_text()))
                   if isinstance(n, ast.FunctionDef)} for k, f in sm.FILES.items()}
    cited = [c for _, cells in sm.MATRIX for cell in cells for c in sm.CITE.findall(cell)]
    assert len(cited) >= 25
    for key, name in cited:
        assert name in defined[key], f"the table cites {sm.FILES[key]}::{name}, which does not exist"
    for label, cells in sm.MATRIX:
        assert len(cells) == len(sm.FEATURES) and all(sm.CITE.search(c) for c in cells), label
    for fam in attn_mod.models.SUPPORTED_FAMILIES:
        assert any(f"(`{fam}`)" in label for label, _ in sm.MATRIX), f"the table has no row for {fam}"


def test_save_and_load_tiny_round_trip(family, tmp_path):
    """A saved tiny checkpoint loads by path (attn_mod.loading) with a working processor, and patches."""
    from attn_mod.loading import load_model
    from attn_mod.tiny import build_tiny, save_tiny

    save_tiny(family, tmp_path)
    model, proc = load_model(tmp_path)
    ref, ref_proc = build_tiny(family)
    batch = inputs(family, proc, QUESTIONS[:1], SIZES[:1])
    assert torch.equal(batch["input_ids"], inputs(family, ref_proc, QUESTIONS[:1], SIZES[:1])["input_ids"])
    handle = attn_mod.patch(model, proc)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref(**batch).logits, atol=1e-5, rtol=0)
    handle.remove()


LLAVA_HF_TEMPLATE = (  # llava-hf/llava-1.5-*-hf's template: no system text, images first, "USER: ... ASSISTANT:"
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_llava_system_span_variants():
    """A custom system message replaces the default one (SYSTEM = BOS + its tokens); llava-hf's template has
    no system text, so nothing is SYSTEM there (BOS alone is TEXT)."""
    model, _, proc = twin_models("llava")
    tok = proc.tokenizer
    handle = attn_mod.patch(model, proc, backend="torch")
    batch = vlm_inputs(proc, QUESTIONS[:1], SIZES[:1], system="You are a helpful assistant.")
    with torch.no_grad():
        model(**batch)
    n_sys = len(tok.encode("<s>You are a helpful assistant.", add_special_tokens=False))
    cats = handle.categories[0].long()
    assert (cats[:n_sys] == SYSTEM).all() and (cats[n_sys:] != SYSTEM).all() and cats[n_sys] == TEXT
    handle.remove()

    saved = tok.chat_template
    tok.chat_template = proc.chat_template = LLAVA_HF_TEMPLATE
    try:
        handle = attn_mod.patch(model, proc, backend="torch")
        text = tok.bos_token + chat_text(proc, QUESTIONS[0])
        assert text.startswith("<s>USER: <image>\n")
        batch = proc(text=[text], images=[random_image(*SIZES[0])], return_tensors="pt")
        with torch.no_grad():
            model(**batch)
        cats = handle.categories[0].long()
        ids = batch["input_ids"][0]
        assert not (cats == SYSTEM).any() and cats[0] == TEXT
        assert torch.equal(cats == IMAGE, ids == model.config.image_token_id)
        handle.remove()
    finally:
        tok.chat_template = proc.chat_template = saved



@pytest.mark.parametrize("size", [(130, 90), (60, 84), (301, 47)])
def test_llava_pad_to_square_boxes_match_processor(size):
    """LLaVA's own pad-to-square preprocessing (LlavaImageProcessor(do_pad=True)): cells shift by the padding
    offset and cells of the padding select nothing."""
    from transformers import LlavaImageProcessorPil

    from attn_mod.tiny import build_llava_processor

    model, _, _ = twin_models("llava")
    ip = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84})
    proc = build_llava_processor(image_processor=ip)
    w, h = size
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    assert geo.pad_to_square
    cells = geo.cells((h, w))
    for box in random_boxes(w, h):
        check_boxes_against_pixels(cells, _token_fill(proc, _box_image(w, h, box), proc.patch_size), box, (h, w))
    full = attn_mod.regions.select_cells(cells, (0, 0, w, h), (h, w))
    inside = [i for i, (x0, y0, x1, y1) in enumerate(cells) if min(x1, w) > max(x0, 0) and min(y1, h) > max(y0, 0)]
    assert full.tolist() == inside  # cells entirely in the padding are never selected
    if h * 3 < w:
        assert len(inside) < len(cells)


def test_llava_full_strategy_cls_token_is_no_cell():
    model, _, proc = twin_models("llava")
    proc.vision_feature_select_strategy = "full"
    geo = attn_mod.models.get_adapter(model).box_geometry(proc, model.config)
    cells = geo.cells((90, 130))
    assert cells[0] is None and len(cells) == model.config.image_seq_length + 1
    assert 0 not in attn_mod.regions.select_cells(cells, (0, 0, 130, 90), (90, 130)).tolist()


def test_point_boxes_select_one_cell_per_view():
    """A degenerate (point) box selects the one token containing it in each view of the image: one for LLaVA's
    crop (when the point is not cropped away), one per tile and one in the thumbnail for InternVL."""
    llava, _, lproc = twin_models("llava")
    ivl, _, iproc = twin_models("internvl")
    lgeo = attn_mod.models.get_adapter(llava).box_geometry(lproc, llava.config)
    igeo = attn_mod.models.get_adapter(ivl).box_geometry(iproc, ivl.config)
    gen = np.random.default_rng(0)
    h, w = 180, 200  # InternVL: 2 x 2 tiles + thumbnail
    icells = igeo.cells((h, w))
    lcells = lgeo.cells((h, w))
    for _ in range(20):
        x, y = int(gen.integers(0, w + 1)), int(gen.integers(0, h + 1))
        for by in ("overlap", "center"):
            assert attn_mod.regions.select_cells(icells, (x, y, x, y), (h, w), by=by).numel() == 2
            n = attn_mod.regions.select_cells(lcells, (x, y, x, y), (h, w), by=by).numel()
            cropped = not (lcells[0][0] <= x <= lcells[-1][2])
            assert n == (0 if cropped else 1), (x, y)

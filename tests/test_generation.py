"""eval.generation: batched left-padded generation equals one-by-one generation."""

import numpy as np
import pytest
import torch

import attn_mod
from attn_mod.eval.generation import Request, encode_batch, generate_batch, render_prompt
from helpers import random_image, twin_models


def test_batched_equals_single_and_prompt_order():
    model, _, proc = twin_models("qwen2_5_vl")
    attn_mod.patch(model, proc, intervention=attn_mod.Intervention.avar(0.2, 0.5))
    reqs = [Request("What color is the square?", [random_image(80, 60, 1)]),
            Request("How many?", [random_image(50, 70, 2), random_image(64, 64, 3)], system="Be brief."),
            Request("Text only question, no image.")]
    batch = encode_batch(proc, reqs, "cpu")
    assert (batch["attention_mask"][:, 0] == 0).any()  # left padded
    assert (batch["image_grid_thw"].shape[0]) == 3
    proc.tokenizer.padding_side = "right"
    outs = generate_batch(model, proc, reqs, max_new_tokens=5)
    assert proc.tokenizer.padding_side == "right"  # restored after left-padded encoding
    for r, o in zip(reqs, outs):
        alone = generate_batch(model, proc, [r], max_new_tokens=5)[0]
        assert alone.token_ids == o.token_ids and alone.text == o.text
        assert alone.num_prompt_tokens == o.num_prompt_tokens
        assert len(o.token_ids) <= 5
    eos = model.generation_config.eos_token_id
    assert all(eos not in o.token_ids for o in outs)
    assert generate_batch(model, proc, []) == []


# ------------------------------------------------------------------------------------------- interleaving

VS, VE, PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


def test_layout_places_images_at_markers():
    a, b, c = object(), object(), object()
    content, order = Request("Compare <image 2> with <image 1>.", [a, b]).layout()
    assert order == [1, 0]
    assert content == [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "text", "text": " with "},
                       {"type": "image"}, {"type": "text", "text": "."}]
    # an image no marker names comes first; a repeated marker repeats the image
    content, order = Request("<image 2> and again <image 2>", [a, b, c]).layout()
    assert order == [0, 2, 1, 1] and [x["type"] for x in content] == ["image", "image", "image", "text", "image"]
    assert Request("<image 2> and again <image 2>", [a, b, c]).placed_images() == [a, c, b, b]
    # no markers: images first (unchanged behaviour)
    content, order = Request("What is it?", [a, b]).layout()
    assert order == [0, 1] and content[-1] == {"type": "text", "text": "What is it?"}
    with pytest.raises(ValueError, match=r"<image 3> but the request has 2 image"):
        Request("see <image 3>", [a, b]).layout()


def test_interleaved_prompt_tokens_and_image_order():
    model, _, proc = twin_models("qwen2_5_vl")
    wide, tall = random_image(84, 56, 1), random_image(56, 84, 2)
    req = Request("Compare <image 2> with <image 1>. Which is wider?", [wide, tall])
    text = render_prompt(proc, req)
    image = VS + PAD + VE
    assert f"Compare {image} with {image}. Which is wider?" in text and "<image" not in text
    batch = encode_batch(proc, [req], "cpu")
    # independent construction: the message written by hand, images in prompt order (tall first)
    msg = [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                        {"type": "text", "text": " with "}, {"type": "image"},
                                        {"type": "text", "text": ". Which is wider?"}]}]
    ref = proc(text=[proc.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)],
               images=[tall, wide], return_tensors="pt", padding=True)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(batch["pixel_values"], ref["pixel_values"])
    assert batch["image_grid_thw"][0].tolist() != batch["image_grid_thw"][1].tolist()  # the order is visible
    # batched with a plain request, the interleaved one generates what it generates alone
    plain = Request("What color?", [random_image(64, 64, 3)])
    outs = generate_batch(model, proc, [plain, req], max_new_tokens=4)
    assert outs[1].token_ids == generate_batch(model, proc, [req], max_new_tokens=4)[0].token_ids
    assert outs[0].token_ids == generate_batch(model, proc, [plain], max_new_tokens=4)[0].token_ids


def test_vlmevalkit_messages_keep_image_positions(tmp_path):
    from attn_mod.eval.harness.vlmevalkit_adapter import AttnModVLMEval

    model, _, proc = twin_models("qwen2_5_vl")
    paths = []
    for i, (w, h) in enumerate([(84, 56), (56, 84)]):
        paths.append(str(tmp_path / f"im{i}.png"))
        random_image(w, h, seed=i).save(paths[-1])
    vlm = AttnModVLMEval(model, proc, max_new_tokens=3)
    from PIL import Image

    imgs = [Image.open(p).convert("RGB") for p in paths]
    want = generate_batch(model, proc, [Request("Left: <image 1> right: <image 2> same?", imgs)], max_new_tokens=3)[0]
    # interleaved items (what VLMEvalKit's split_MMMU produces)
    inter = [dict(type="text", value="Left: "), dict(type="image", value=paths[0]), dict(type="text", value=" right: "),
             dict(type="image", value=paths[1]), dict(type="text", value=" same?")]
    assert vlm.generate(inter, dataset="MMMU_DEV_VAL") == want.text and vlm.last_output.token_ids == want.token_ids
    # images first, markers in the text (MMMU's own TSV question)
    first = [dict(type="image", value=paths[0]), dict(type="image", value=paths[1]),
             dict(type="text", value="Left: <image 1> right: <image 2> same?")]
    vlm.generate(first, dataset="MMMU_DEV_VAL")
    assert vlm.last_output.token_ids == want.token_ids
    with pytest.raises(ValueError, match="one form"):
        vlm.generate([dict(type="text", value="see <image 1>"), dict(type="image", value=paths[0])], dataset="x")


@pytest.mark.parametrize("family", ["smolvlm", "llava_onevision"])
def test_encode_batch_keeps_system_and_one_image_per_sample(family):
    """A batch of two one-image requests equals each request alone (SmolVLM's processor reads a flat image list as
    one sample's images), and the system prompt is rendered (OneVision's template drops string content)."""
    from PIL import Image

    from attn_mod.tiny import build_tiny

    model, proc = build_tiny(family)
    rng = np.random.default_rng(4)
    ims = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((48, 64), (80, 40))]
    reqs = [Request("What colour is it?", [ims[0]], system="Be brief and exact."),
            Request("Which shape is it?", [ims[1]], system="Be brief and exact.")]
    batch = encode_batch(proc, reqs, "cpu")
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        for i, r in enumerate(reqs):
            alone = encode_batch(proc, [r], "cpu")
            assert "Be brief and exact." in proc.tokenizer.decode(alone["input_ids"][0])
            torch.testing.assert_close(logits[i], model(**alone).logits[0, -1], atol=1e-5, rtol=1e-5)

"""eval.generation: batched left-padded generation equals one-by-one generation."""

import torch

import attn_mod
from attn_mod.eval.generation import Request, encode_batch, generate_batch
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

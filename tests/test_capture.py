"""attn_mod.capture: per-layer masses for forwards and generate, with and without an intervention."""

import pytest
import torch

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE, PAD, RESPONSE, SYSTEM
from helpers import twin_models, vlm_inputs

QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (60, 60)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_generate_masses_equal_teacher_forced_masses(family):
    """Decode-step masses (KV cache, RESPONSE slots appended per step) equal one teacher-forced forward."""
    model, _, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    attn_mod.patch(model, proc, intervention=Intervention.avar(0.3, 0.5))
    new = 5
    with torch.no_grad(), attn_mod.capture(model) as rec:
        seqs = model.generate(**batch, max_new_tokens=new, do_sample=False)
    S = batch["input_ids"].shape[1]
    K = S + new - 1  # the last generated token is never fed back
    assert rec.num_runs == 1 and rec.categories.shape == (2, K)
    assert rec.categories[:, S:].eq(RESPONSE).all()
    for layer in range(2):
        assert rec.mass(layer).shape == (2, 4, K, 8)

    full = {k: v for k, v in batch.items()}
    full["input_ids"] = seqs[:, :K]
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(2, new - 1, dtype=torch.long)], 1)
    full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(2, new - 1, dtype=torch.long)], 1)
    labels = torch.full_like(full["input_ids"], -100)
    labels[:, S:] = full["input_ids"][:, S:]
    with torch.no_grad(), attn_mod.capture(model) as rec_tf:
        model(**full, labels=labels)
    assert torch.equal(rec_tf.categories, rec.categories)
    valid = full["attention_mask"].bool()
    for layer in range(2):
        a = rec.mass(layer).permute(0, 2, 1, 3)[valid]
        b = rec_tf.mass(layer).permute(0, 2, 1, 3)[valid]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert rec.query_categories().shape == (2, K)


def test_capture_unpatched_model_with_processor_and_runs():
    model, _, proc = twin_models("qwen2_5_vl")
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    with pytest.raises(ValueError, match="processor="):
        with attn_mod.capture(model):
            pass
    with torch.no_grad(), attn_mod.capture(model, layers=[1], processor=proc) as rec:
        model(**batch)
        model(**batch)
    assert model.config.text_config._attn_implementation == "sdpa"  # temporary patch removed
    assert rec.num_runs == 2
    torch.testing.assert_close(rec.mass(1, run=0), rec.mass(1, run=1))
    assert torch.equal(rec.mass(-1), rec.mass(1))
    with pytest.raises(KeyError, match="not captured"):
        rec.mass(0)
    with pytest.raises(IndexError, match="out of range"):
        rec.mass(5)
    with pytest.raises(IndexError, match="run 3"):
        rec.mass(1, run=3)
    m = rec.mass(1)
    valid = batch["attention_mask"].bool()
    sums = m.sum(-1).permute(0, 2, 1)[valid]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-5, rtol=0)
    assert m[..., PAD].abs().max() == 0


def test_intervention_shifts_mass_from_system_to_image():
    model, _, proc = twin_models("qwen2_5_vl")
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc)
    with torch.no_grad(), attn_mod.capture(model) as base:
        model(**batch)
    handle.update(intervention=Intervention.avar(alpha=1.0, beta=0.9))
    with torch.no_grad(), attn_mod.capture(model) as boosted:
        model(**batch)
    last = batch["attention_mask"].shape[1] - 1
    for layer in range(2):
        b0, b1 = base.mass(layer)[:, :, last], boosted.mass(layer)[:, :, last]
        assert (b1[..., IMAGE] > b0[..., IMAGE]).all()
        assert (b1[..., SYSTEM] < b0[..., SYSTEM]).all()
        torch.testing.assert_close(b1.sum(-1), torch.ones_like(b1.sum(-1)), atol=1e-5, rtol=0)
    handle.remove()


def test_nothing_recorded_outside_block_and_errors():
    model, _, proc = twin_models("qwen3_vl")
    handle = attn_mod.patch(model, proc)
    with attn_mod.capture(model) as rec:
        pass
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        rec.mass(0)
    batch = vlm_inputs(proc, QUESTIONS[:1], SIZES[:1])
    with torch.no_grad():
        model(**batch)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        rec.mass(0)
    with pytest.raises(ValueError, match="out of range"):
        with attn_mod.capture(model, layers=[3]):
            pass
    handle.remove()

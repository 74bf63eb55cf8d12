"""The patched-model path with backend="triton" (Triton interpreter on CPU) against the model's own eager
attention and the torch backend: logits, masses, KV-cache generate and gradients through masses."""

import os

import pytest
import torch

import attn_mod
from attn_mod import Intervention
from attn_mod.categories import IMAGE
from helpers import onehot, twin_models, vlm_inputs

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU Triton-interpreter test: run with TRITON_INTERPRET=1 (tests/conftest.py "
                                       "sets it on machines without an NVIDIA device)")

QUESTIONS = ["What color is the square?", "How many objects are there in the picture? Answer with a single letter."]
SIZES = [(130, 90), (60, 60)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_triton_identity_matches_eager_and_avar_matches_torch(family):
    model, eager, proc = twin_models(family)
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    valid = batch["attention_mask"].bool()
    handle = attn_mod.patch(model, proc, backend="triton")
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True)
        with attn_mod.capture(model) as rec:
            got = model(**batch)
    torch.testing.assert_close(got.logits[valid], ref.logits[valid], atol=1e-5, rtol=0)
    for layer, attn in enumerate(ref.attentions):
        want = torch.einsum("bhqk,bkc->bhqc", attn.float(), onehot(rec.categories))
        torch.testing.assert_close(rec.mass(layer).permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid],
                                   atol=1e-5, rtol=0)
    for renorm in (True, False):
        handle.update(intervention=Intervention.avar(0.3, 0.5, renorm=renorm))
        outs = {}
        for backend in ("torch", "triton"):
            handle.backend = backend
            with torch.no_grad():
                outs[backend] = model(**batch).logits[valid]
        torch.testing.assert_close(outs["triton"], outs["torch"], atol=1e-5, rtol=0)
    handle.remove()


def test_triton_generate_equals_torch_generate():
    model, _, proc = twin_models("qwen2_5_vl")
    batch = vlm_inputs(proc, QUESTIONS, SIZES)
    handle = attn_mod.patch(model, proc, intervention=Intervention.avar(0.3, 0.5), backend="torch")
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    want = model.generate(**batch, **kw)
    handle.backend = "triton"
    got = model.generate(**batch, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    handle.remove()


def test_triton_training_gradients_through_masses_match_torch():
    grads = {}
    for backend in ("torch", "triton"):
        model, _, proc = twin_models("qwen2_5_vl")
        batch = vlm_inputs(proc, QUESTIONS, SIZES, answers=["The answer is B.", "3"])
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, -6:] = batch["input_ids"][:, -6:]
        model.train()
        attn_mod.patch(model, proc, intervention=Intervention.avar(0.2, 0.4), backend=backend)
        with attn_mod.capture(model, detach=False) as rec:
            out = model(**batch, labels=labels)
        (out.loss - rec.masses()[..., IMAGE].mean()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None and "language_model" in n}
    assert grads["torch"].keys() == grads["triton"].keys() and grads["torch"]
    for name, g in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], g, atol=1e-5, rtol=1e-4, msg=name)

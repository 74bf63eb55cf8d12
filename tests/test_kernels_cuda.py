"""Triton kernels on a real GPU: bf16 (plus fp16 / fp32) at realistic sizes against the PyTorch reference.

Skipped without CUDA (the reason is printed by pytest -ra). Run on a GPU machine with
    python -m pytest tests/test_kernels_cuda.py -q -ra
Errors are relative: ||a - b|| / ||b|| over the tensor (bf16 rounds out and grads to 8 bits), plus absolute
bounds for lse and masses (fp32 outputs; the mass dots keep ~16 bits through a hi/lo split).
"""

import os

import pytest
import torch

from attn_mod.kernels.function import category_attention
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU and compiled kernels (TRITON_INTERPRET unset)")

REL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
ABS_LSE_MASS = {torch.bfloat16: 2e-3, torch.float16: 2e-3, torch.float32: 1e-4}


def vlm_categories(B, K, device):
    """system prefix, text, image block with a target region, response; sample 0 left-padded."""
    cat = torch.full((B, K), 2, dtype=torch.int8, device=device)
    cat[:, : K // 16] = 1
    cat[:, K // 8: K // 2] = 3
    cat[:, K // 4: K // 3] = 4
    cat[:, (3 * K) // 4:] = 5
    cat[0, : K // 10] = 0
    return cat


def transform(kind):
    if kind == "avar_renorm":
        return CategoryTransform.from_lists(w={1: 0.5, 3: 1.2, 4: 1.2}, renorm=True)
    if kind == "avar_raw_beta1":
        return CategoryTransform.from_lists(w={1: 0.0, 3: 1.3, 4: 1.3}, renorm=False)
    if kind == "all_kinds":
        return CategoryTransform.from_lists(mul={3: 1.15, 1: 0.95}, absw={3: 0.2, 4: 0.2}, add={5: -0.3},
                                            w={1: 0.0, 3: 1.2, 4: 1.4}, renorm=True)
    return CategoryTransform.identity()


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(B, Hq, Hkv, Q, K, D, causal, kind, dtype, grads=True, enables=True):
    dev = "cuda"
    torch.manual_seed(0)
    q = torch.randn(B, Hq, Q, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, K, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, K, D, device=dev, dtype=dtype)
    cat = vlm_categories(B, K, dev)
    row_en = (torch.rand(B, Q, device=dev) > 0.2) if enables else None
    head_en = (torch.arange(Hq, device=dev) % 3 != 1) if enables else None
    tr = transform(kind)
    g_out = torch.randn(B, Hq, Q, D, device=dev)
    g_mass = torch.randn(B, Hq, Q, NUM_CATEGORIES, device=dev)
    res = {}
    for backend in ("triton", "torch"):
        qs, ks, vs = (t.clone().requires_grad_(grads) for t in (q, k, v))
        r = category_attention(qs, ks, vs, cat, tr, causal=causal, row_enable=row_en, head_enable=head_en,
                               return_mass=True, backend=backend)
        if grads:
            ((r.out.float() * g_out).sum() + (r.mass * g_mass).sum()).backward()
            res[backend] = (r, (qs.grad, ks.grad, vs.grad))
        else:
            res[backend] = (r, ())
        del r
    (got, got_g), (want, want_g) = res["triton"], res["torch"]
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    fin = torch.isfinite(want.lse)
    assert torch.isfinite(got.out).all() and torch.isfinite(got.mass).all()
    assert rel(got.out, want.out) < REL[dtype]
    assert (got.lse[fin] - want.lse[fin]).abs().max().item() < ABS_LSE_MASS[dtype]
    assert (got.mass - want.mass).abs().max().item() < ABS_LSE_MASS[dtype]
    for a, b in zip(got_g, want_g):
        assert torch.isfinite(a).all()
        assert rel(a, b) < REL[dtype], rel(a, b)


@pytest.mark.parametrize("B,Hq,Hkv,N", [(1, 28, 4, 4096), (2, 8, 8, 2048), (2, 16, 2, 1024)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["avar_renorm", "avar_raw_beta1", "all_kinds"])
def test_bf16_realistic(B, Hq, Hkv, N, causal, kind):
    compare(B, Hq, Hkv, N, N, 128, causal, kind, torch.bfloat16)


@pytest.mark.parametrize("Q,K", [(1, 4096), (300, 2000), (1000, 1000)])
@pytest.mark.parametrize("D", [64, 80, 96, 128])
def test_bf16_decode_chunked_prefill_head_dims(Q, K, D):
    compare(2, 28, 4, Q, K, D, True, "all_kinds", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["identity", "avar_raw_beta1"])
def test_fp16_fp32(dtype, kind):
    compare(2, 8, 2, 1000, 1500, 128, True, kind, dtype)


def test_triton_matches_flex_on_cuda():
    torch.manual_seed(0)
    q = torch.randn(1, 28, 1024, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cat = vlm_categories(1, 1024, "cuda")
    tr = transform("all_kinds")
    a = category_attention(q, k, v, cat, tr, return_mass=True, backend="triton")
    b = category_attention(q, k, v, cat, tr, return_mass=True, backend="flex")
    assert rel(a.out, b.out) < 2e-2
    assert (a.mass - b.mass).abs().max().item() < 2e-3


def test_auto_backend_is_triton_on_cuda():
    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    cat = torch.ones(1, 64, dtype=torch.int8, device="cuda")
    a = category_attention(q, q[:, :1], q[:, :1], cat, return_mass=True)
    b = category_attention(q, q[:, :1], q[:, :1], cat, return_mass=True, backend="torch")
    assert rel(a.out, b.out) < 2e-2

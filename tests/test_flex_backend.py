"""The FlexAttention backend (score_mod + block_mask, masses via LSE differences) against the reference.

On CPU, FlexAttention in this torch runs forward only (eager); its backward is CUDA-only, so the gradient
tests below need a GPU and are skipped without one (the reason is printed by pytest -ra).
"""

import pytest
import torch

from attn_mod.kernels.function import category_attention
from attn_mod.kernels.reference import category_attention_reference
from attn_mod.kernels.spec import NUM_CATEGORIES
from test_triton_kernels import ALL_KINDS, Case, make_inputs, make_transform

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FLEX_CASES = {
    "causal_gqa2_renorm_pad_w0rows": Case(B=2, Hkv=1, G=2, Q=20, K=40, pad=25, w_zero_prefix=6),
    "noncausal_gqa4_raw_d80": Case(B=1, Hkv=1, G=4, Q=13, K=30, D=80, causal=False, renorm=False, pad=4),
    "raw_w0rows_causal": Case(B=1, Hkv=1, G=1, Q=24, K=24, renorm=False, w_zero_prefix=7),
    "identity_q_gt_k": Case(B=1, Hkv=2, G=1, Q=30, K=18, kinds=(), pad=3),
    "decode_q1": Case(B=2, Hkv=1, G=2, Q=1, K=33, renorm=True, pad=10),
}


def _check_forward(c, device):
    q, k, v, cat, row_en, head_en = (t.to(device) if t is not None else None for t in make_inputs(c))
    tr = make_transform(c.kinds, c.renorm)
    kw = dict(causal=c.causal, row_enable=row_en, head_enable=head_en, return_mass=True)
    got = category_attention(q, k, v, cat, tr, backend="flex", **kw)
    want = category_attention_reference(q.double(), k.double(), v.double(), cat, tr, **kw)
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    fin = torch.isfinite(want.lse)
    tol = 2e-5 if c.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.out.double(), want.out, atol=tol, rtol=0)
    torch.testing.assert_close(got.lse.double()[fin], want.lse[fin], atol=tol, rtol=0)
    torch.testing.assert_close(got.mass.double(), want.mass, atol=tol, rtol=0)
    assert got.mass.shape[-1] == NUM_CATEGORIES and torch.isfinite(got.out).all()


@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_flex_forward_cpu_matches_reference(name):
    _check_forward(FLEX_CASES[name], "cpu")


def test_flex_backward_on_cpu_raises_clearly():
    q, k, v, cat, _, _ = make_inputs(Case(Q=4, K=8, D=16))
    with pytest.raises(NotImplementedError, match="backward only on CUDA"):
        category_attention(q.requires_grad_(), k, v, cat, backend="flex")


@needs_cuda
@pytest.mark.parametrize("name", list(FLEX_CASES))
def test_flex_forward_cuda_matches_reference(name):
    _check_forward(FLEX_CASES[name], "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlexAttention backward is CUDA-only)")
@pytest.mark.parametrize("renorm", [True, False])
def test_flex_gradients_cuda_match_reference(renorm):
    c = Case(B=2, Hkv=1, G=2, Q=70, K=150, pad=23, renorm=renorm)
    q, k, v, cat, row_en, head_en = (t.cuda() if t is not None else None for t in make_inputs(c))
    tr = make_transform(ALL_KINDS, renorm)
    g_out = torch.randn_like(q)
    g_mass = torch.randn(*q.shape[:3], NUM_CATEGORIES, device="cuda")
    grads = []
    for backend in ("flex", "torch"):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        r = category_attention(qs, ks, vs, cat, tr, causal=c.causal, row_enable=row_en, head_enable=head_en,
                               return_mass=True, backend=backend)
        ((r.out * g_out).sum() + (r.mass * g_mass).sum()).backward()
        grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)

"""The PyTorch reference operator against an independent float64 oracle (tests/oracle.py)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_mod.kernels.reference import category_attention_reference
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform
from oracle import naive_attention


def random_case(draw_or_rng, B, Hkv, G, Q, K, D, pad_rows=True):
    Hq = Hkv * G
    q = torch.randn(B, Hq, Q, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, K, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, K, D, dtype=torch.float64)
    cat = torch.randint(1, 6, (B, K))
    if pad_rows and K > 1:
        cat[0, : torch.randint(0, K, ()).item()] = 0  # left padding on sample 0
    return q, k, v, cat


@st.composite
def operator_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2, 4]))
    K = draw(st.integers(1, 12))
    Q = draw(st.integers(1, K))
    D = draw(st.sampled_from([4, 8]))
    causal = draw(st.booleans())
    renorm = draw(st.booleans())
    kinds = draw(st.sets(st.sampled_from(["mul", "absw", "add", "w"])))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv, G, Q, K, D, causal, renorm, kinds, seed


def random_transform(kinds, renorm, gen):
    def tab(kind, lo, hi, default):
        if kind not in kinds:
            return [default] * NUM_CATEGORIES
        return (torch.rand(NUM_CATEGORIES, generator=gen, dtype=torch.float64) * (hi - lo) + lo).tolist()

    w = tab("w", 0.0, 2.0, 1.0)
    if "w" in kinds:
        w[1] = 0.0  # a removed category (beta = 1)
    return CategoryTransform.from_lists(
        mul=tab("mul", 0.5, 1.5, 1.0), absw=tab("absw", -0.5, 0.5, 0.0), add=tab("add", -1.0, 1.0, 0.0),
        w=w, renorm=renorm,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operator_case())
def test_matches_float64_oracle(case):
    B, Hkv, G, Q, K, D, causal, renorm, kinds, seed = case
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    q, k, v, cat = random_case(None, B, Hkv, G, Q, K, D)
    tr = random_transform(kinds, renorm, gen)
    row_enable = torch.rand(B, Q, generator=gen) > 0.3
    head_enable = torch.rand(Hkv * G, generator=gen) > 0.3
    scale = 1.0 / math.sqrt(D)
    got = category_attention_reference(q, k, v, cat, tr, scale=scale, causal=causal, row_enable=row_enable,
                                       head_enable=head_enable, return_mass=True, chunk_size=3)
    want = naive_attention(q, k, v, cat, tr.mul, tr.absw, tr.add, tr.w, renorm, scale=scale, causal=causal,
                           row_enable=row_enable, head_enable=head_enable)
    torch.testing.assert_close(got.out, want[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.lse, want[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.mass, want[2], atol=1e-10, rtol=1e-10)


def test_fp32_chunked_equals_unchunked_and_fully_written():
    q, k, v, cat = (t.float() if t.is_floating_point() else t for t in random_case(None, 2, 2, 2, 37, 53, 16))
    tr = CategoryTransform.from_lists(w={3: 1.3, 4: 1.3, 1: 0.5}, mul={2: 1.1})
    full = category_attention_reference(q, k, v, cat, tr, return_mass=True, chunk_size=10_000)
    chunked = category_attention_reference(q, k, v, cat, tr, return_mass=True, chunk_size=5)
    for a, b in zip(full, chunked):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(full.out).all() and torch.isfinite(full.mass).all()
    visible_rows = torch.isfinite(full.lse)
    assert visible_rows.any()


@pytest.mark.parametrize("renorm", [True, False])
def test_masses_sum(renorm):
    q, k, v, cat = random_case(None, 2, 2, 2, 9, 20, 8)
    tr = CategoryTransform.from_lists(w={1: 0.4, 3: 1.5, 4: 1.5}, renorm=renorm)
    res = category_attention_reference(q.float(), k.float(), v.float(), cat, tr, return_mass=True)
    total = res.mass.sum(-1)
    has_keys = torch.isfinite(res.lse)
    if renorm:
        torch.testing.assert_close(total[has_keys], torch.ones_like(total[has_keys]), atol=1e-5, rtol=0)
    else:
        # Raw: mass_c = w_c * softmax mass, so dividing by w recovers a distribution.
        unweighted = (res.mass / tr.w.clamp_min(1e-12)).sum(-1)
        torch.testing.assert_close(unweighted[has_keys], torch.ones_like(total[has_keys]), atol=1e-5, rtol=0)
        assert not torch.allclose(total[has_keys], torch.ones_like(total[has_keys]), atol=1e-3)
    assert (total[~has_keys] == 0).all()


def test_fully_padded_row_gives_zeros_not_nan():
    q, k, v, cat = random_case(None, 2, 1, 2, 4, 6, 8)
    cat[1] = 0
    res = category_attention_reference(q, k, v, cat, return_mass=True)
    assert (res.out[1] == 0).all() and (res.mass[1] == 0).all() and torch.isneginf(res.lse[1]).all()
    assert torch.isfinite(res.out[0]).all()


def test_all_visible_weights_zero_renorm_gives_zeros():
    q, k, v, _ = random_case(None, 1, 1, 1, 3, 5, 8)
    cat = torch.ones(1, 5, dtype=torch.long)  # all SYSTEM
    tr = CategoryTransform.from_lists(w={1: 0.0})
    res = category_attention_reference(q, k, v, cat, tr, return_mass=True)
    assert (res.out == 0).all() and (res.mass == 0).all()


@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_outputs_and_masses(renorm, causal):
    B, Hkv, G, Q, K, D = 1, 1, 2, 3, 6, 4
    q, k, v, cat = random_case(None, B, Hkv, G, Q, K, D)
    cat[0, :2] = torch.tensor([0, 1])
    tr = CategoryTransform.from_lists(mul={2: 1.2}, absw={3: 0.3}, add={5: 0.2}, w={1: 0.5, 3: 1.4, 4: 1.4},
                                      renorm=renorm)
    row_enable = torch.tensor([[True, False, True]])
    g_out = torch.randn(B, Hkv * G, Q, D, dtype=torch.float64)
    g_mass = torch.randn(B, Hkv * G, Q, NUM_CATEGORIES, dtype=torch.float64)

    def f(q, k, v):
        r = category_attention_reference(q, k, v, cat, tr, causal=causal, row_enable=row_enable,
                                         return_mass=True, chunk_size=2)
        return (r.out * g_out).sum() + (r.mass * g_mass).sum()

    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(f, inputs)


def test_gradients_finite_with_fully_masked_rows():
    q, k, v, cat = random_case(None, 2, 1, 1, 4, 4, 8)
    cat[1] = 0
    cat[0] = 1
    tr = CategoryTransform.from_lists(w={1: 0.0})
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    r = category_attention_reference(qs, ks, vs, cat, tr, return_mass=True)
    (r.out.sum() + r.mass.sum()).backward()
    for t in (qs, ks, vs):
        assert torch.isfinite(t.grad).all()


def test_identity_equals_sdpa():
    q, k, v, cat = random_case(None, 2, 2, 2, 7, 11, 16, pad_rows=False)
    q, k, v = q.float(), k.float(), v.float()
    res = category_attention_reference(q, k, v, cat, causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=torch.ones(7, 11, dtype=torch.bool).tril(11 - 7))
    torch.testing.assert_close(res.out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [dict(w=[1, -0.1]), dict(add=[0, float("inf")]), dict(mul=[float("nan")])])
def test_bad_tables_raise(bad):
    with pytest.raises(ValueError):
        CategoryTransform.from_lists(**bad)


def test_bad_shapes_raise():
    q, k, v, cat = random_case(None, 1, 2, 1, 3, 5, 8)
    with pytest.raises(ValueError, match="categories must have shape"):
        category_attention_reference(q, k, v, cat[:, :4])
    with pytest.raises(ValueError, match="multiple"):
        category_attention_reference(q[:, :1].expand(1, 3, 3, 8), k, v, cat)

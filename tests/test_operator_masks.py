"""Bidirectional blocks and sliding windows (Gemma3's masks) in the operator: every backend against the
independent float64 loop oracle (tests/oracle.py), masses included; gradients by finite differences."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_mod.kernels.function import category_attention
from attn_mod.kernels.reference import category_attention_reference, category_attention_rows
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform
from oracle import naive_attention


def random_blocks(B, K, gen, max_blocks=3):
    """(B, K) int32 block ids: a few contiguous runs with ids 1.. (some ids reused non-contiguously), 0 elsewhere."""
    block = torch.zeros(B, K, dtype=torch.int32)
    for b in range(B):
        for _ in range(int(torch.randint(0, max_blocks + 1, (), generator=gen))):
            start = int(torch.randint(0, K, (), generator=gen))
            length = int(torch.randint(1, max(2, K // 2), (), generator=gen))
            block[b, start:start + length] = int(torch.randint(1, 4, (), generator=gen))
    return block


def random_transform(gen, renorm):
    def tab(lo, hi):
        return (torch.rand(NUM_CATEGORIES, generator=gen, dtype=torch.float64) * (hi - lo) + lo).tolist()

    w = tab(0.0, 2.0)
    w[1] = 0.0
    return CategoryTransform.from_lists(mul=tab(0.5, 1.5), absw=tab(-0.3, 0.3), add=tab(-1, 1), w=w, renorm=renorm)


@st.composite
def mask_case(draw):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2]))
    K = draw(st.integers(1, 14))
    Q = draw(st.integers(1, K))
    window = draw(st.one_of(st.none(), st.integers(1, 8)))
    use_block = draw(st.booleans()) or window is None
    causal = draw(st.booleans())
    renorm = draw(st.booleans())
    identity = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hkv, G, Q, K, window, use_block, causal, renorm, identity, seed


def make_inputs(B, Hkv, G, Q, K, D, gen, dtype=torch.float64):
    q = torch.randn(B, Hkv * G, Q, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, K, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, K, D, generator=gen, dtype=torch.float64).to(dtype)
    cat = torch.randint(1, 6, (B, K), generator=gen)
    if K > 1:
        cat[0, : int(torch.randint(0, K, (), generator=gen))] = 0  # left padding on sample 0
    return q, k, v, cat


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_case())
def test_reference_matches_oracle(case):
    B, Hkv, G, Q, K, window, use_block, causal, renorm, identity, seed = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v, cat = make_inputs(B, Hkv, G, Q, K, 4, gen)
    block = random_blocks(B, K, gen) if use_block else None
    tr = CategoryTransform.identity() if identity else random_transform(gen, renorm)
    row_enable = torch.rand(B, Q, generator=gen) > 0.3
    head_enable = torch.rand(Hkv * G, generator=gen) > 0.3
    got = category_attention_reference(q, k, v, cat, tr, scale=0.5, causal=causal, row_enable=row_enable,
                                       head_enable=head_enable, return_mass=True, chunk_size=3, block=block,
                                       window=window)
    want = naive_attention(q, k, v, cat, tr.mul, tr.absw, tr.add, tr.w, tr.renorm, scale=0.5, causal=causal,
                           row_enable=row_enable, head_enable=head_enable, block=block, window=window)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    rows = torch.arange(Q)
    p = category_attention_rows(q, k, cat, tr, rows=rows, scale=0.5, causal=causal, row_enable=row_enable,
                                head_enable=head_enable, block=block, window=window)
    per_cat = torch.zeros_like(got.mass)
    per_cat.scatter_add_(3, cat[:, None, None, :].expand(B, Hkv * G, Q, K), p)
    torch.testing.assert_close(per_cat, got.mass, atol=1e-12, rtol=1e-12)


def test_masks_change_the_result_and_match_a_dense_mask():
    """The masks matter (bidirectional rows see later keys, windowed rows lose early ones) and equal a dense boolean
    mask built here from Gemma3's rule AND(window, OR(causal, same image))."""
    gen = torch.Generator().manual_seed(3)
    B, H, K, D, W = 2, 2, 12, 8, 4
    q, k, v, _ = make_inputs(B, H, 1, K, K, D, gen)
    cat = torch.full((B, K), 2)
    cat[1, :2] = 0
    block = torch.zeros(B, K, dtype=torch.int32)
    block[:, 3:8] = 1
    block[0, 9:11] = 2
    pos = torch.arange(K)
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] != 0)
    dense = ((pos[None, :, None] >= pos[None, None, :]) | same) & ((pos[:, None] - pos[None, :]) < W)[None]
    dense = dense & (cat != 0)[:, None, :]
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.3
    p = torch.softmax(s.masked_fill(~dense[:, None], -math.inf), -1).nan_to_num(0.0)
    got = category_attention_reference(q, k, v, cat, scale=0.3, block=block, window=W, return_mass=True)
    torch.testing.assert_close(got.out, torch.einsum("bhqk,bhkd->bhqd", p, v))
    plain = category_attention_reference(q, k, v, cat, scale=0.3)
    assert not torch.allclose(plain.out, got.out)
    only_block = category_attention_reference(q, k, v, cat, scale=0.3, block=block)
    assert not torch.allclose(only_block.out[:, :, 3], plain.out[:, :, 3])  # row 3 sees keys 4..7
    torch.testing.assert_close(only_block.out[:, :, :3], plain.out[:, :, :3])


@pytest.mark.parametrize("renorm", [True, False])
def test_gradients_by_finite_differences(renorm):
    gen = torch.Generator().manual_seed(11 + renorm)
    B, Hkv, G, Q, K, D = 1, 1, 2, 5, 9, 3
    q, k, v, cat = make_inputs(B, Hkv, G, Q, K, D, gen)
    block = torch.tensor([[0, 1, 1, 0, 0, 2, 2, 2, 0]], dtype=torch.int32)
    tr = random_transform(gen, renorm)
    row_enable = torch.tensor([[True, False, True, True, True]])
    g_mass = torch.randn(B, Hkv * G, Q, NUM_CATEGORIES, generator=gen, dtype=torch.float64)

    def f(q, k, v):
        res = category_attention_reference(q, k, v, cat, tr, scale=0.7, row_enable=row_enable, block=block,
                                           window=3, return_mass=True, chunk_size=2)
        return res.out, (res.mass * g_mass).sum()

    assert torch.autograd.gradcheck(f, tuple(t.clone().requires_grad_() for t in (q, k, v)), eps=1e-6, atol=1e-6)


def test_generation_step_sees_cached_window_and_blocks():
    """A decode row (Q=1) sits at the last key (bottom-right alignment): with window 4 it sees exactly the last 4
    keys, the same as attending a cache truncated to them (how a sliding-window cache layer hands them over)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v, cat = make_inputs(2, 1, 2, 1, 10, 4, gen)
    block = torch.zeros(2, 10, dtype=torch.int32)
    block[:, 2:6] = 1
    got = category_attention_reference(q, k, v, cat, scale=0.5, block=block, window=4, return_mass=True)
    ones, zeros = torch.ones(NUM_CATEGORIES), torch.zeros(NUM_CATEGORIES)
    want = naive_attention(q, k, v, cat, ones, zeros, zeros, ones, True, scale=0.5, causal=True, block=block,
                           window=4)
    torch.testing.assert_close(got.out, want[0])
    torch.testing.assert_close(got.mass, want[2])
    cut = category_attention_reference(q, k[:, :, 6:], v[:, :, 6:], cat[:, 6:], scale=0.5, block=block[:, 6:],
                                       window=4)
    torch.testing.assert_close(got.out, cut.out)


@pytest.mark.parametrize("causal", [True, False])
def test_flex_backend_matches_oracle(causal):
    gen = torch.Generator().manual_seed(21 + causal)
    B, Hkv, G, Q, K, D = 2, 1, 2, 6, 11, 16
    q, k, v, cat = make_inputs(B, Hkv, G, Q, K, D, gen, dtype=torch.float32)
    block = random_blocks(B, K, gen)
    block[0, 6:9] = 1  # a block spanning rows of the query span
    tr = random_transform(gen, renorm=False)
    row_enable = torch.rand(B, Q, generator=gen) > 0.3
    got = category_attention(q, k, v, cat, tr, scale=0.4, causal=causal, row_enable=row_enable, block=block,
                             window=4, return_mass=True, backend="flex")
    want = naive_attention(q, k, v, cat, tr.mul, tr.absw, tr.add, tr.w, tr.renorm, scale=0.4, causal=causal,
                           row_enable=row_enable, block=block, window=4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=2e-5)


def test_bad_block_and_window_are_rejected():
    q = torch.randn(1, 1, 3, 4)
    k = torch.randn(1, 1, 3, 4)
    cat = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="block ids"):
        category_attention_reference(q, k, k, cat, block=torch.zeros(1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="block ids"):
        category_attention_reference(q, k, k, cat, block=torch.zeros(1, 3))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="window"):
            category_attention_reference(q, k, k, cat, window=bad)

"""Bidirectional blocks and sliding windows in the Triton kernels (forward, decode forward, backward) against the
float64 reference (itself checked against the loop oracle in test_operator_masks.py) and the loop oracle, in the
interpreter. Tiles are small (16-32) and lengths short so several key / query tiles are skipped, masked and
unmasked: a window hides whole early key tiles, a block makes later key tiles visible."""

import os

import pytest
import torch

from attn_mod.kernels import triton_common
from attn_mod.kernels.function import triton_category_attention
from attn_mod.kernels.reference import category_attention_reference
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform
from oracle import naive_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU Triton-interpreter test: run with TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    monkeypatch.setattr(triton_common, "FILL_NAN", True)


def _inputs(B, Hkv, G, Q, K, D, seed, pad=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, Q, D, generator=gen)
    k = torch.randn(B, Hkv, K, D, generator=gen)
    v = torch.randn(B, Hkv, K, D, generator=gen)
    cat = torch.randint(1, 6, (B, K), generator=gen)
    cat[0, :pad] = 0
    return q, k, v, cat, gen


def _transform(gen, renorm):
    tab = lambda lo, hi: (torch.rand(NUM_CATEGORIES, generator=gen) * (hi - lo) + lo).tolist()  # noqa: E731
    return CategoryTransform.from_lists(mul=tab(0.7, 1.3), absw=tab(-0.2, 0.2), add=tab(-1, 1), w=tab(0.2, 2),
                                        renorm=renorm)


CASES = {
    # name: (B, Hkv, G, Q, K, block runs [(b, start, stop, id)], window, causal, tiles, renorm, rows/heads enabled)
    "blocks_square": (2, 1, 2, 70, 70, [(0, 5, 40, 1), (0, 50, 60, 2), (1, 20, 66, 1)], None, True, (16, 16), True),
    "window_square": (1, 1, 2, 80, 80, [], 20, True, (16, 32), False),
    "both_prefix": (2, 1, 2, 48, 75, [(0, 10, 35, 3), (1, 30, 70, 1), (1, 72, 75, 2)], 17, True, (16, 16), True),
    "window_noncausal": (1, 1, 1, 40, 64, [], 9, False, (16, 16), False),
    "window_tiny": (1, 1, 2, 50, 50, [(0, 3, 45, 1)], 1, True, (32, 16), True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_match_reference(name):
    B, Hkv, G, Q, K, runs, window, causal, (bm, bn), renorm = CASES[name]
    q, k, v, cat, gen = _inputs(B, Hkv, G, Q, K, 32, seed=len(name), pad=4)
    block = torch.zeros(B, K, dtype=torch.int32)
    for b, lo, hi, i in runs:
        block[b, lo:hi] = i
    tr = _transform(gen, renorm)
    row_en = torch.rand(B, Q, generator=gen) > 0.2
    head_en = torch.tensor([True, False][: Hkv * G] if Hkv * G > 1 else [True])
    g_out = torch.randn(B, Hkv * G, Q, 32, generator=gen)
    g_mass = torch.randn(B, Hkv * G, Q, NUM_CATEGORIES, generator=gen)
    results = []
    for run in ("triton", "reference"):
        qs, ks, vs = (t.clone().double().requires_grad_() if run == "reference" else t.clone().requires_grad_()
                      for t in (q, k, v))
        kw = dict(causal=causal, row_enable=row_en, head_enable=head_en, return_mass=True, block=block, window=window)
        if run == "triton":
            r = triton_category_attention(qs, ks, vs, cat, tr, _blocks=dict(block_m=bm, block_n=bn, decode=False), **kw)
        else:
            r = category_attention_reference(qs, ks, vs, cat, tr, **kw)
        ((r.out * g_out.to(r.out.dtype)).sum() + (r.mass * g_mass.to(r.mass.dtype)).sum()).backward()
        results.append((r.out, r.lse, r.mass, qs.grad, ks.grad, vs.grad))
    for got, want, what in zip(results[0], results[1], ("out", "lse", "mass", "dq", "dk", "dv")):
        assert torch.isfinite(got).all() or what == "lse", what
        torch.testing.assert_close(got.double(), want.detach(), atol=3e-5, rtol=1e-5, msg=what)
    oracle = naive_attention(q, k, v, cat, tr.mul, tr.absw, tr.add, tr.w, renorm, scale=32 ** -0.5, causal=causal,
                             row_enable=row_en, head_enable=head_en, block=block, window=window)
    torch.testing.assert_close(results[0][2].double(), oracle[2], atol=3e-5, rtol=0)


@pytest.mark.parametrize("Q", [1, 3])
def test_decode_forward_with_blocks_and_window(Q):
    """The split-K decode path (few rows against a long cache), with a block that covers the query rows."""
    B, Hkv, G, K = 2, 1, 4, 150
    q, k, v, cat, gen = _inputs(B, Hkv, G, Q, K, 16, seed=Q, pad=7)
    block = torch.zeros(B, K, dtype=torch.int32)
    block[0, 120:150] = 2  # sample 0: the query rows sit inside a block whose earlier keys are in the window
    block[1, 10:40] = 1
    tr = _transform(gen, renorm=False)
    kw = dict(row_enable=torch.ones(B, Q, dtype=torch.bool), return_mass=True, block=block, window=25)
    got = triton_category_attention(q, k, v, cat, tr, _blocks=dict(decode=True, n_split=3, block_n=16), **kw)
    want = category_attention_reference(q.double(), k.double(), v.double(), cat, tr, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=3e-5, rtol=1e-5)


def test_block_table_first_and_last_index():
    block = torch.tensor([[0, 2, 2, 0, 1, 1, 1, 0, 2], [3, 3, 0, 0, 0, 0, 0, 0, 3]], dtype=torch.int32)
    tab = triton_common.block_table(block)
    for b in range(2):
        for j in range(9):
            i = int(block[b, j])
            same = [t for t in range(9) if int(block[b, t]) == i] if i else [j]
            assert tab[0, b, j] == i and tab[1, b, j] == min(same) and tab[2, b, j] == max(same)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_mask_kernels_compile_for_h100(causal):
    """The interpreter accepts code a GPU compiler rejects: compile the block + window variants of the forward,
    dK/dV and dQ kernels for sm_90 for real (bundled ptxas; no GPU needed)."""
    import subprocess
    import sys

    code = ("from attn_mod.kernels import triton_aot\nimport torch\n"
            f"triton_aot.variants = lambda quick: [(torch.bfloat16, 128, {causal}, dict(w={{1: 0.5, 3: 1.2}}), "
            "True, True)]\n"
            "res = triton_aot.check(90, blocks=((128, 64),), block_ids=True, window=512)\n"
            "print(len(res), max(r['shared_bytes'] for r in res))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    n, shared = map(int, res.stdout.split()[-2:])
    assert n == 4 and 0 < shared <= 227 * 1024

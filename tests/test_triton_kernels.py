"""Triton kernels (forward + backward) against the PyTorch reference and the float64 oracle, in the interpreter.

Truth for every comparison is the reference evaluated in float64 on the same (dtype-rounded) inputs, with
autograd for the gradients; forward outputs are also checked against the independent loop oracle. Each case
runs one forward and one backward of loss = sum(out*g1) + sum(mass*g2) + sum(lse*g3) (finite lse only), so the
mass and LSE gradient terms are always exercised. Kernel outputs are NaN-filled before launch (FILL_NAN), so an
element a kernel fails to write fails the isfinite checks. Sizes stay small (N <= ~200, 64-wide blocks) because
the interpreter's cost grows with programs x loop steps.
"""

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_mod.kernels import triton_common
from attn_mod.kernels.function import category_attention, resolve_backend, triton_category_attention
from attn_mod.kernels.reference import category_attention_reference
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform
from oracle import naive_attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU Triton-interpreter test: run with TRITON_INTERPRET=1 (tests/conftest.py "
                                       "sets it on machines without an NVIDIA device)")

# Max abs error allowed against the float64 truth, per dtype. Measured maxima over CASES: fp32 out 2.2e-6,
# lse 1.8e-6, mass 4.9e-7, grads 2.7e-6; fp16 out 1.6e-3, lse 1.2e-6, mass 2.5e-4 (raw w up to 2), grads 3.7e-3 (fp16 / bf16 grads
# are rounded to the input dtype; with fp16 / bf16 dots a mixed-category tile adds its masses through one fp16
# one-hot dot (11 bits per P' element; the random categories here make every tile mixed), single-category tiles
# add the fp32 row sums; mass gradients keep ~fp32 accuracy through the hi/lo split).
TOL = {
    torch.float32: dict(out=1e-5, lse=1e-5, mass=5e-6, grad=2e-5),
    torch.float16: dict(out=5e-3, lse=1e-5, mass=6e-4, grad=1.5e-2),
    torch.bfloat16: dict(out=2e-2, lse=1e-5, mass=5e-6, grad=6e-2),  # interpreter: bf16 I/O (rounding), fp32 dots
}
ALL_KINDS = ("mul", "absw", "add", "w")


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    monkeypatch.setattr(triton_common, "FILL_NAN", True)


@dataclass
class Case:
    B: int = 1
    Hkv: int = 1
    G: int = 2
    Q: int = 40
    K: int = 64
    D: int = 64
    causal: bool = True
    renorm: bool = True
    kinds: tuple = ALL_KINDS
    pad: int = 0  # left padding (PAD keys) on sample 0
    w_zero_prefix: int = 0  # sample B-1 starts with this many SYSTEM keys (w[SYSTEM] = 0 when "w" in kinds)
    enables: bool = True  # random row / head enables (else everything on)
    dtype: torch.dtype = torch.float32
    return_mass: bool = True
    blocks: dict = field(default_factory=dict)


def make_transform(kinds, renorm, gen=None):
    """Random tables for `kinds`; w[SYSTEM] = 0 (a removed category) whenever w is random."""
    def tab(kind, lo, hi, default):
        if kind not in kinds:
            return [default] * NUM_CATEGORIES
        return (torch.rand(NUM_CATEGORIES, generator=gen) * (hi - lo) + lo).tolist()

    w = tab("w", 0.3, 2.0, 1.0)
    if "w" in kinds:
        w[1] = 0.0
    return CategoryTransform.from_lists(mul=tab("mul", 0.5, 1.5, 1.0), absw=tab("absw", -0.5, 0.5, 0.0),
                                        add=tab("add", -1.0, 1.0, 0.0), w=w, renorm=renorm)


def make_inputs(c: Case):
    Hq = c.Hkv * c.G
    q = torch.randn(c.B, Hq, c.Q, c.D).to(c.dtype)
    k = torch.randn(c.B, c.Hkv, c.K, c.D).to(c.dtype)
    v = torch.randn(c.B, c.Hkv, c.K, c.D).to(c.dtype)
    cat = torch.randint(1, 8, (c.B, c.K), dtype=torch.int8)
    cat[0, : c.pad] = 0
    cat[-1, : c.w_zero_prefix] = 1
    row_en = torch.rand(c.B, c.Q) > 0.3 if c.enables else None
    head_en = torch.rand(Hq) > 0.25 if c.enables else None
    if head_en is not None:
        head_en[0] = True  # at least one transformed head
    return q, k, v, cat, row_en, head_en


def run_with_grads(fn, q, k, v, g_out, g_mass, g_lse, return_mass):
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    res = fn(qs, ks, vs)
    lse_fin = torch.where(torch.isfinite(res.lse), res.lse, torch.zeros_like(res.lse))
    loss = (res.out.double() * g_out).sum() + (lse_fin.double() * g_lse).sum()
    if return_mass:
        loss = loss + (res.mass.double() * g_mass).sum()
    loss.backward()
    return res, (qs.grad, ks.grad, vs.grad)


def max_errors(c: Case):
    """Run the Triton operator and the float64 reference on one case; return {name: max abs error}."""
    q, k, v, cat, row_en, head_en = make_inputs(c)
    tr = make_transform(c.kinds, c.renorm)
    kw = dict(causal=c.causal, row_enable=row_en, head_enable=head_en, return_mass=c.return_mass)
    Hq = c.Hkv * c.G
    g_out = torch.randn(c.B, Hq, c.Q, c.D, dtype=torch.float64)
    g_mass = torch.randn(c.B, Hq, c.Q, NUM_CATEGORIES, dtype=torch.float64)
    g_lse = torch.randn(c.B, Hq, c.Q, dtype=torch.float64)
    got, got_g = run_with_grads(lambda a, b, d: triton_category_attention(a, b, d, cat, tr, _blocks=c.blocks, **kw),
                                q, k, v, g_out, g_mass, g_lse, c.return_mass)
    want, want_g = run_with_grads(lambda a, b, d: category_attention_reference(a, b, d, cat, tr, **kw),
                                  q.double(), k.double(), v.double(), g_out, g_mass, g_lse, c.return_mass)

    assert got.out.dtype == c.dtype and got.lse.dtype == torch.float32 and got.out.shape == q.shape
    for g, t in zip(got_g, (q, k, v)):
        assert g.dtype == c.dtype and g.shape == t.shape and torch.isfinite(g).all()
    assert torch.isfinite(got.out).all()
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse)), "empty rows differ"
    assert not torch.isnan(got.lse).any() and not torch.isposinf(got.lse).any()
    fin = torch.isfinite(want.lse)
    err = dict(out=(got.out.double() - want.out).abs().max().item(),
               lse=(got.lse.double()[fin] - want.lse[fin]).abs().max().item() if fin.any() else 0.0)
    if c.return_mass:
        assert got.mass.shape == (c.B, Hq, c.Q, NUM_CATEGORIES) and torch.isfinite(got.mass).all()
        err["mass"] = (got.mass.double() - want.mass).abs().max().item()
    else:
        assert got.mass is None
    for name, g, w in zip(("dq", "dk", "dv"), got_g, want_g):
        err[name] = (g.double() - w).abs().max().item()
    # empty rows give exactly zero output / mass
    empty = ~fin
    assert (got.out[empty] == 0).all()
    if c.return_mass:
        assert (got.mass[empty] == 0).all()
    return err


def assert_within(err, dtype):
    tol = TOL[dtype]
    bad = {k: v for k, v in err.items() if v > tol.get(k, tol["grad"])}
    assert not bad, f"errors above tolerance {tol}: {bad} (all: {err})"


CASES = {
    # GQA 2, causal, Q < K (chunked-prefill alignment), PAD prefix, every transform kind at once, renorm
    "causal_gqa2_renorm_pad": Case(B=2, Hkv=1, G=2, Q=70, K=150, pad=23),
    # GQA 4, non-causal, head dim 80 (padded to 128), Q not a multiple of the block, raw weights
    "noncausal_gqa4_raw_d80": Case(B=1, Hkv=1, G=4, Q=100, K=130, D=80, causal=False, renorm=False, pad=9),
    # decode: a single query row against a long cache
    "decode_q1_gqa2_raw": Case(B=2, Hkv=2, G=2, Q=1, K=150, renorm=False, pad=40),
    # self-attention with fully padded rows (PAD prefix) and rows whose visible keys all have w = 0 (renorm)
    "square_empty_rows_renorm": Case(B=2, Hkv=1, G=1, Q=130, K=130, pad=40, w_zero_prefix=12),
    # same in raw mode: rows whose visible keys all have w = 0 keep a finite lse and get out = mass = 0
    "square_w0_rows_raw": Case(B=1, Hkv=1, G=1, Q=96, K=96, renorm=False, w_zero_prefix=20, enables=False),
    # Q > K: the first Q-K rows see no key at all (bottom-right alignment)
    "q_gt_k_identity": Case(B=1, Hkv=2, G=1, Q=90, K=50, kinds=(), pad=5),
    # analysis only: identity transform with masses, GQA 1, no enables
    "identity_mass_gqa1": Case(B=2, Hkv=2, G=1, Q=64, K=100, kinds=(), enables=False),
    # without masses (RETURN_MASS / HAS_MASS_GRAD off)
    "no_mass_noncausal": Case(B=1, Hkv=1, G=2, Q=50, K=70, causal=False, return_mass=False),
    # unequal tiles (forward BLOCK_M != BLOCK_N; backward both ways), causal with Q < K
    "blocks_32x64": Case(Q=70, K=110, pad=7, blocks=dict(block_m=32, block_n=64)),
    "blocks_64x32": Case(Q=70, K=110, pad=7, renorm=False, blocks=dict(block_m=64, block_n=32)),
    # fp16 inputs (fp16 tensor-core dots, fp32 softmax)
    "fp16_causal_gqa2_renorm": Case(B=2, Hkv=1, G=2, Q=70, K=150, pad=23, dtype=torch.float16),
    "fp16_noncausal_gqa4_raw_d80": Case(Hkv=1, G=4, Q=100, K=130, D=80, causal=False, renorm=False,
                                        dtype=torch.float16),
    # bf16 inputs: in the interpreter the dots run in fp32 (bf16 arithmetic is broken there), bf16 I/O is real
    "bf16_io_causal_raw": Case(Q=70, K=100, renorm=False, pad=11, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    c = CASES[name]
    assert_within(max_errors(c), c.dtype)


@pytest.mark.parametrize("kind", ["mul", "absw", "add", "w_raw", "w_renorm"])
def test_each_transform_kind(kind):
    """One transform kind at a time (w kinds include a w = 0 category), fp32, causal, GQA 2."""
    kinds = ("w",) if kind.startswith("w") else (kind,)
    c = Case(Q=40, K=64, kinds=kinds, renorm=kind != "w_raw", pad=5, w_zero_prefix=0)
    assert_within(max_errors(c), torch.float32)


def _forward(c: Case, tr, q, k, v, cat, row_en, head_en):
    return triton_category_attention(q, k, v, cat, tr, causal=c.causal, row_enable=row_en, head_enable=head_en,
                                     return_mass=True, _blocks=c.blocks)


@pytest.mark.parametrize("renorm", [True, False])
def test_forward_matches_loop_oracle(renorm):
    """Forward out / lse / mass against the independent float64 loop oracle (tests/oracle.py)."""
    c = Case(B=2, Hkv=1, G=2, Q=20, K=70, D=64, renorm=renorm, pad=30, w_zero_prefix=6)
    q, k, v, cat, row_en, head_en = make_inputs(c)
    tr = make_transform(ALL_KINDS, renorm)
    got = _forward(c, tr, q, k, v, cat, row_en, head_en)
    out, lse, mass = naive_attention(q, k, v, cat, tr.mul, tr.absw, tr.add, tr.w, renorm, scale=1 / math.sqrt(c.D),
                                     causal=True, row_enable=row_en, head_enable=head_en)
    torch.testing.assert_close(got.out.double(), out, atol=2e-5, rtol=0)
    torch.testing.assert_close(got.lse.double(), lse, atol=2e-5, rtol=0)  # -inf rows must match too
    torch.testing.assert_close(got.mass.double(), mass, atol=2e-5, rtol=0)


@settings(max_examples=25, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(Q=st.integers(1, 90), K=st.integers(1, 90), causal=st.booleans(), renorm=st.booleans(),
       bm=st.sampled_from([32, 64]), bn=st.sampled_from([32, 64]), G=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes_and_tiles(Q, K, causal, renorm, bm, bn, G, seed):
    """Random lengths (Q > K included) and tile sizes: checks the causal loop splits and the boundary masks."""
    torch.manual_seed(seed)
    c = Case(B=1, Hkv=1, G=G, Q=Q, K=K, D=16, causal=causal, renorm=renorm, pad=int(torch.randint(0, K, ())),
             blocks=dict(block_m=bm, block_n=bn))
    assert_within(max_errors(c), torch.float32)


def test_mass_only_loss_and_gqa_grad_sum():
    """A loss on masses alone (no gradient reaches out): dq/dk/dv still match; dk/dv sum over the query group."""
    c = Case(B=1, Hkv=1, G=4, Q=64, K=64, pad=3)
    q, k, v, cat, row_en, head_en = make_inputs(c)
    tr = make_transform(ALL_KINDS, True)
    g_mass = torch.randn(1, 4, 64, NUM_CATEGORIES)
    grads = []
    for fn in (triton_category_attention, category_attention_reference):
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        r = fn(qs, ks, vs, cat, tr, row_enable=row_en, head_enable=head_en, return_mass=True)
        (r.mass * g_mass).sum().backward()
        grads.append(tuple(torch.zeros_like(t) if t.grad is None else t.grad for t in (qs, ks, vs)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][0].abs().max() > 0 and grads[0][2].abs().max() == 0  # masses do not depend on v


def test_noncontiguous_inputs_and_long_categories():
    """(B, N, H, D)-transposed q/k/v views (as transformers passes them) and int64 categories."""
    c = Case(B=2, Hkv=2, G=2, Q=33, K=80, pad=10)
    q, k, v, cat, row_en, head_en = make_inputs(c)
    tr = make_transform(ALL_KINDS, False)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    got = triton_category_attention(qt, kt, vt, cat.long(), tr, row_enable=row_en, head_enable=head_en,
                                    return_mass=True)
    want = category_attention_reference(q, k, v, cat, tr, row_enable=row_en, head_enable=head_en, return_mass=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)


def test_dispatch_and_errors(monkeypatch):
    q, k, v, cat, _, _ = make_inputs(Case(Q=8, K=16, D=16))
    monkeypatch.setenv("ATTN_MOD_BACKEND", "triton")
    assert resolve_backend("auto", q.device) == "triton"
    got = category_attention(q, k, v, cat, return_mass=True)  # auto -> env -> triton (interpreter)
    want = category_attention(q, k, v, cat, return_mass=True, backend="torch")
    torch.testing.assert_close(got.out, want.out, atol=2e-5, rtol=0)
    monkeypatch.delenv("ATTN_MOD_BACKEND")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"

    tr = CategoryTransform.from_lists(w={3: 1.5})
    tr = CategoryTransform(tr.mul, tr.absw, tr.add, tr.w.clone().requires_grad_(), True)
    with pytest.raises(NotImplementedError, match="transform tables"):
        category_attention(q, k, v, cat, tr, backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        category_attention(q.double(), k.double(), v.double(), cat, backend="triton")
    bad = cat.clone()
    bad[0, 0] = 9
    with pytest.raises(ValueError, match="categories"):
        category_attention(q, k, v, bad, backend="triton")


def test_cpu_without_interpreter_says_how_to_fix():
    """Without TRITON_INTERPRET, backend='triton' on a CPU tensor fails with an error naming the fix."""
    code = ("import torch\nfrom attn_mod.kernels.function import category_attention\n"
            "q = torch.randn(1, 1, 4, 16); c = torch.ones(1, 4, dtype=torch.int8)\n"
            "try:\n    category_attention(q, q, q, c, backend='triton')\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "TRITON_INTERPRET=1" in res.stdout and "backend='torch'" in res.stdout


def test_kernels_compile_for_h100():
    """The interpreter accepts code a GPU compiler rejects: compile the most complex variant for sm_90 for real
    (Triton -> PTX -> cubin with the bundled ptxas; no GPU needed). Full matrix: python -m attn_mod.kernels.triton_aot"""
    code = ("from attn_mod.kernels import triton_aot\nimport torch\n"
            "triton_aot.variants = lambda quick: [(torch.bfloat16, 80, True, dict(mul={3: 1.1}, absw={3: 0.2}, "
            "w={1: 0.0}, renorm=False), True, True)]\n"
            "res = triton_aot.check(90, blocks=((128, 64),))\n"
            "print(len(res), max(r['shared_bytes'] for r in res))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    n, shared = map(int, res.stdout.split()[-2:])
    assert n == 4 and 0 < shared <= 227 * 1024  # fits H100 shared memory

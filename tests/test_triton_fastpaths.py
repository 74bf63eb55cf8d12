"""Compile-time specialisations of the Triton kernels (interpreter) against the float64 reference.

Every transform kind (identity / bias / multiplicative / absolute / raw-w / general), with all rows enabled (the
constexpr fast path) and with row / head enables; masses through the single-category-tile fast path and the
mixed-tile dot (categories laid out in runs so both kinds of tile occur, plus the dot forced on every tile); the
split-K decode path with GQA packing; forward and backward (out, lse and mass gradients). Fresh random inputs.
"""

import os

import pytest
import torch

from attn_mod.kernels import triton_common
from attn_mod.kernels.function import triton_category_attention
from attn_mod.kernels.reference import category_attention_reference
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform, transform_kind

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU Triton-interpreter test: run with TRITON_INTERPRET=1 (tests/conftest.py "
                                       "sets it on machines without an NVIDIA device)")

TOL = dict(out=2e-5, lse=2e-5, mass=5e-6, grad=3e-5)  # fp32: measured maxima ~1e-6 .. 3e-6


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    monkeypatch.setattr(triton_common, "FILL_NAN", True)


def rand_table(lo, hi):
    return (torch.rand(NUM_CATEGORIES) * (hi - lo) + lo).tolist()


def kind_transform(kind: str) -> CategoryTransform:
    """Random tables of one kind (w[1] = 0: a removed category wherever w is random)."""
    w = rand_table(0.3, 2.0)
    w[1] = 0.0
    if kind == "identity":
        return CategoryTransform.identity()
    if kind == "bias":  # renorm w and add: one per-key bias
        return CategoryTransform.from_lists(add=rand_table(-1, 1), w=w, renorm=True)
    if kind == "multiplicative":
        return CategoryTransform.from_lists(mul=rand_table(0.5, 1.5), add=rand_table(-1, 1))
    if kind == "absolute":
        return CategoryTransform.from_lists(absw=rand_table(-0.5, 0.5))
    if kind == "raw_w":
        return CategoryTransform.from_lists(w=w, renorm=False)
    return CategoryTransform.from_lists(mul=rand_table(0.5, 1.5), absw=rand_table(-0.5, 0.5), add=rand_table(-1, 1),
                                        w=w, renorm=False)


def run_categories(B, K):
    """Key categories in runs (system prefix, text, a long image block, response) with a left-padded sample 0,
    so 32-key tiles are partly single-category and partly mixed; a few random keys inside the image block."""
    cat = torch.full((B, K), 2, dtype=torch.int8)
    cat[:, :K // 8] = 1
    cat[:, K // 4: (3 * K) // 4] = 3
    cat[:, (7 * K) // 8:] = 5
    cat[0, : K // 10] = 0
    noisy = torch.randint(K // 4, (3 * K) // 4, (3,))
    cat[-1, noisy] = 4
    return cat


def errors(q, k, v, cat, tr, *, causal=True, row_en=None, head_en=None, blocks=None):
    """Max abs errors of out / lse / mass and dq / dk / dv (loss on out, mass and finite lse) vs float64."""
    B, Hq, Q, D = q.shape
    g_out = torch.randn(B, Hq, Q, D, dtype=torch.float64)
    g_mass = torch.randn(B, Hq, Q, NUM_CATEGORIES, dtype=torch.float64)
    g_lse = torch.randn(B, Hq, Q, dtype=torch.float64)
    kw = dict(causal=causal, row_enable=row_en, head_enable=head_en, return_mass=True)

    def run(fn, tensors):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        r = fn(*ts)
        lse = torch.where(torch.isfinite(r.lse), r.lse, torch.zeros_like(r.lse))
        ((r.out.double() * g_out).sum() + (r.mass.double() * g_mass).sum() + (lse.double() * g_lse).sum()).backward()
        return r, [t.grad for t in ts]

    got, gg = run(lambda a, b, c: triton_category_attention(a, b, c, cat, tr, _blocks=blocks, **kw), (q, k, v))
    want, wg = run(lambda a, b, c: category_attention_reference(a, b, c, cat, tr, **kw),
                   (q.double(), k.double(), v.double()))
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    fin = torch.isfinite(want.lse)
    err = dict(out=(got.out.double() - want.out).abs().max().item(),
               lse=(got.lse.double()[fin] - want.lse[fin]).abs().max().item() if fin.any() else 0.0,
               mass=(got.mass.double() - want.mass).abs().max().item())
    for name, a, b in zip(("dq", "dk", "dv"), gg, wg):
        assert torch.isfinite(a).all()
        err[name] = (a.double() - b).abs().max().item()
    return err


def check(err):
    bad = {k: v for k, v in err.items() if v > TOL.get(k, TOL["grad"])}
    assert not bad, f"errors above {TOL}: {bad} (all: {err})"


KINDS = ["identity", "bias", "multiplicative", "absolute", "raw_w", "general"]


def test_kinds_are_classified():
    names = {kind: transform_kind(kind_transform(kind)).name for kind in KINDS}
    assert names == {k: k for k in KINDS}
    tr = kind_transform("general")
    moved = tr.to("cpu")
    assert moved.__dict__["_kernel_cache"]["kind"] == transform_kind(tr)  # travels with .to(), no re-read


@pytest.mark.parametrize("enables", ["all", "rows"])
@pytest.mark.parametrize("kind", KINDS)
def test_kind_fast_paths_fwd_bwd(kind, enables):
    """Each kind, all-enabled (constexpr path) or with row / head enables, masses per tile (single + mixed)."""
    B, Hkv, G, Q, K, D = 2, 1, 2, 48, 128, 16
    q, k, v = torch.randn(B, Hkv * G, Q, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    cat = run_categories(B, K)
    row_en = head_en = None
    if enables == "rows":
        row_en = torch.rand(B, Q) > 0.3
        head_en = torch.tensor([True, False])
    check(errors(q, k, v, cat, kind_transform(kind), row_en=row_en, head_en=head_en,
                 blocks=dict(block_m=32, block_n=32)))


def test_tile_paths_both_occur_and_forced_dot_agrees():
    """The run layout gives single-category and mixed 32-key tiles; the mass dot forced on every tile
    (mass_path=2) matches the reference as well."""
    cat = run_categories(2, 128)
    codes = triton_common.tile_codes(cat)[:, 2, :4]  # BLOCK_N = 32
    assert (codes >= 0).any() and (codes < 0).any()
    q, k, v = torch.randn(2, 2, 48, 16), torch.randn(2, 1, 128, 16), torch.randn(2, 1, 128, 16)
    for mass_path in (0, 2):
        check(errors(q, k, v, cat, kind_transform("raw_w"), row_en=torch.rand(2, 48) > 0.3,
                     blocks=dict(block_m=32, block_n=32, mass_path=mass_path)))


def test_tile_codes_match_a_loop():
    cat = torch.randint(0, 3, (2, 200), dtype=torch.int8)
    cat[0, 40:120] = 4
    cat[1, :64] = 0
    codes = triton_common.tile_codes(cat)
    for bn in (16, 32, 64, 128):
        for b in range(2):
            for t in range(-(-200 // bn)):
                keys = [int(c) for c in cat[b, t * bn:(t + 1) * bn] if c != 0]
                want = 0 if not keys else keys[0] if len(set(keys)) == 1 else -1
                assert int(codes[b, bn // 16, t]) == want, (bn, b, t)


@pytest.mark.parametrize("Q,n_split,kind", [(1, 3, "bias"), (1, 1, "general"), (3, 4, "raw_w"), (5, 2, "absolute")])
def test_decode_split_k(Q, n_split, kind):
    """Split-K decode with GQA 4 packed into one block of rows (Q * 4 rows), Q < K, masses, enables."""
    B, Hkv, G, K, D = 2, 2, 4, 150, 16
    q, k, v = torch.randn(B, Hkv * G, Q, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    cat = run_categories(B, K)
    row_en = torch.rand(B, Q) > 0.3
    head_en = torch.rand(Hkv * G) > 0.3
    check(errors(q, k, v, cat, kind_transform(kind), row_en=row_en, head_en=head_en,
                 blocks=dict(decode=True, n_split=n_split, block_n=32)))


def test_decode_noncausal_all_enabled_and_empty_rows():
    """Non-causal decode, all rows enabled, sample 0 fully padded (empty rows: lse -inf, out = mass = 0)."""
    B, Hkv, G, Q, K, D = 2, 1, 4, 2, 96, 16
    q, k, v = torch.randn(B, Hkv * G, Q, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    cat = run_categories(B, K)
    cat[0] = 0
    check(errors(q, k, v, cat, kind_transform("bias"), causal=False, blocks=dict(decode=True, n_split=3,
                                                                                   block_n=32)))


def test_pinned_configs_and_shape_pruning(monkeypatch):
    from attn_mod.kernels import triton_fwd

    prune = triton_common.prune_by_rows("BLOCK_M")
    configs = triton_fwd.FWD_CONFIGS
    assert prune(configs, {"Q_LEN": 4096}) == configs
    small = prune(configs, {"Q_LEN": 20})
    assert small and all(c.kwargs["BLOCK_M"] <= 32 for c in small)
    assert [c.kwargs["BLOCK_M"] for c in prune(configs, {"Q_LEN": 1})] == [16]
    monkeypatch.setenv("ATTN_MOD_TRITON_CONFIG", "pinned")
    assert prune(configs, {"Q_LEN": 4096}) == configs[:1]
    monkeypatch.setenv("ATTN_MOD_TRITON_CONFIG", "fastest")
    with pytest.raises(ValueError, match="ATTN_MOD_TRITON_CONFIG"):
        prune(configs, {"Q_LEN": 4096})


def test_operands_need_no_host_sync(monkeypatch):
    """Building the kernel operands (per-key values, tile codes, enables) of a transform moved with .to() reads no
    tensor value on the host: Tensor.__bool__ / item / tolist raise while it runs (a GPU would sync there)."""
    tr = kind_transform("general").to("cpu")
    cat = run_categories(2, 100)
    row_en, head_en = torch.rand(2, 7) > 0.5, torch.tensor([True, False, True])

    def boom(*a, **k):
        raise AssertionError("host read of a tensor value")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    ops = triton_common.kernel_operands(tr, cat, row_en, head_en, scale=0.25, Q=7, Hq=3, need_codes=True)
    ops2 = triton_common.kernel_operands(tr, cat, None, None, scale=0.25, Q=7, Hq=3, need_codes=False)
    ops3 = triton_common.kernel_operands(tr, cat, None, None, scale=0.25, Q=7, Hq=3, need_codes=False,
                                         block=(cat.long() == 3).to(torch.int32), window=5)
    monkeypatch.undo()
    assert ops.flags() == dict(TRANSFORM=True, ALL_EN=False, HAS_MUL=True, HAS_ABS=True, RAW_W=True, BLOCKS=False,
                               WINDOW=0)
    assert ops3.flags()["BLOCKS"] and ops3.flags()["WINDOW"] == 5 and ops3.blk.shape == (3, 2, 100)
    assert ops2.flags()["ALL_EN"] and ops.kv.shape == (triton_common.KV_ROWS, 2, 100)
    assert triton_common.key_table(tr, 0.25, "cpu") is triton_common.key_table(tr, 0.25, "cpu")  # cached
    want_bias = torch.where(cat.long() == 0, float("-inf"),
                            tr.add[cat.long()] * triton_common.LOG2E)  # raw mode: no log w in the bias
    torch.testing.assert_close(ops.kv[triton_common.KV_BIAS_ON], want_bias)

"""Pieces shared by the Triton forward (`triton_fwd.py`) and backward (`triton_bwd.py`) kernels.

Device helpers (element-wise on broadcastable tiles, fp32):
  `_key_vectors`     per-key values (bias on / off, slope, abs, w) of a key tile from the (KV_ROWS, B, K) table
  `_scores`          raw dot products -> exponent x in log2 units (the transform kind picks the terms)
  `_slope`, `_wpost` dx/dqk for the backward (mul / absw kinds) and the raw-mode post-softmax weight
  `_dot_fp32`        a @ b where one operand is fp32 data and the other a 0/1 one-hot tile, at ~fp32 accuracy
  `_visible`         the general visibility tile (causal / bidirectional blocks / sliding window, spec.py)
  `_window_rows_lo` etc. the key / row ranges a query / key tile must visit under a window or blocks
Host helpers: `kernel_operands` (per-key values, tile codes, enables, block table, kind flags: device ops only),
`key_table` (cached per transform, scale and device), `tile_codes`, config pruning / pinning, operand dtypes.

Units: every score inside the kernels is in log2 units, x = scale * log2(e) * q.k (+ transform), so exp2 replaces
exp; add, log w and the scale are folded into the per-key table. LSE is stored in natural-log units (spec.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .spec import NUM_CATEGORIES, CategoryTransform, TransformKind, transform_kind

LOG2E = 1.4426950408889634  # 1 / ln 2
LN2 = 0.6931471805599453
MASS_WIDTH = 16  # one-hot width for the mass / mass-gradient dots: NUM_CATEGORIES padded to tl.dot's minimum of 16

# Rows of the packed table (TABLE_ROWS, NUM_CATEGORIES) fp32 the kernels read.
ROW_MUL, ROW_ABSW, ROW_ADD2, ROW_LOGW2, ROW_W = range(5)
TABLE_ROWS = 5
# Rows of the per-key table the kernels read (`key_table` / `key_values`): per-category values with the scale folded in.
KV_BIAS_ON, KV_BIAS_OFF, KV_SLOPE, KV_ABS, KV_W = 0, 1, 2, 3, 4
KV_ROWS = 5


# Debug: fill every kernel output buffer with NaN before launch, so an element a kernel forgets to write shows up
# as NaN in the tests (they switch it on). Env var ATTN_MOD_TRITON_FILL_NAN=1 does the same outside the tests.
FILL_NAN = os.environ.get("ATTN_MOD_TRITON_FILL_NAN") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised contiguous kernel output (NaN-filled when FILL_NAN is set)."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    return t.fill_(float("nan")) if FILL_NAN else t


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_scores, InterpretedFunction)


def pack_tables(transform: CategoryTransform, device) -> torch.Tensor:
    """(TABLE_ROWS, NUM_CATEGORIES) fp32: mul, absw, add*log2(e), log2(w) (-inf where w == 0), w (a debugging view
    of the tables in log2 units; the kernels read `key_table` instead)."""
    tr = transform.to(device)
    with torch.no_grad():
        return torch.stack([tr.mul, tr.absw, tr.add * LOG2E, torch.log2(tr.w), tr.w]).contiguous()


def key_table(transform: CategoryTransform, scale: float, device) -> torch.Tensor:
    """(KV_ROWS, NUM_CATEGORIES) fp32 on `device`: the per-category values the kernels read per key, with the
    score scale folded in (rows KV_BIAS_ON, KV_BIAS_OFF, KV_SLOPE, KV_ABS, KV_W; PAD = code 0 has bias -inf).
    Built once per (transform, scale, device) and cached on the transform object (no per-call table copies)."""
    cache = transform.__dict__.setdefault("_kernel_cache", {})
    key = ("key_table", torch.device(device), float(scale))
    tab = cache.get(key)
    if tab is None:
        kind = transform_kind(transform)
        with torch.no_grad():
            mul, absw, add, w = (getattr(transform, n).detach().to(device=device, dtype=torch.float32)
                                 for n in ("mul", "absw", "add", "w"))
            qk_scale = float(scale) * LOG2E
            bias_on = add * LOG2E + (torch.log2(w) if kind.renorm else 0.0)
            bias_off = torch.zeros_like(add)
            pad = torch.arange(NUM_CATEGORIES, device=device) == 0
            bias_on = torch.where(pad, float("-inf"), bias_on)
            bias_off = torch.where(pad, float("-inf"), bias_off)
            tab = torch.stack([bias_on, bias_off, mul * qk_scale, absw * qk_scale, w]).contiguous()
        cache[key] = tab
    return tab


def key_values(table: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
    """(KV_ROWS, B, K) fp32 per-key values: `table` (from `key_table`) gathered by the (B, K) key categories.
    A category outside 0..7 fails inside index_select (a device-side assert on CUDA; no host sync here)."""
    B, K = cat.shape
    return table.index_select(1, cat.reshape(-1).long()).view(KV_ROWS, B, K)


def tile_codes(cat: torch.Tensor) -> torch.Tensor:
    """(B, 9, cdiv(K, 16)) int32: for a key tile of BLOCK_N = 16 * 2**l keys starting at t * BLOCK_N, row
    BLOCK_N // 16 (1, 2, 4 or 8) column t holds the tile's one category when all its non-PAD keys share it (0 for
    an all-PAD tile) and -1 for a mixed tile (the mass fast path: a single-category tile adds the row sum the
    softmax already has to that one category). Other rows are unused."""
    B, K = cat.shape
    T = triton.cdiv(max(K, 1), 128) * 8  # whole 128-key groups of 16-key chunks
    c = torch.zeros(B, T * 16, dtype=torch.int32, device=cat.device)
    c[:, :K] = cat.to(torch.int32)
    c = c.view(B, T, 16)
    cmax = c.amax(dim=2)
    cmin = torch.where(c == 0, 127, c).amin(dim=2)
    level = torch.where(cmin >= cmax, cmax, -1)  # 16-key chunks
    out = torch.full((B, 9, T), -1, dtype=torch.int32, device=cat.device)
    out[:, 1] = level
    for row in (2, 4, 8):
        a, b = level[:, 0::2], level[:, 1::2]
        level = torch.where(a == 0, b, torch.where((b == 0) | (a == b), a, -1))
        out[:, row, : level.shape[1]] = level
    return out


# Rows of the block table (`block_table`), (BLK_ROWS, B, K) int32 laid out like the per-key table (row stride B*K).
BLK_ID, BLK_FIRST, BLK_LAST = 0, 1, 2
BLK_ROWS = 3
# MASK_CAUSAL values of the inner loops: 0 no mask, 1 causal, 2 general causal (causal or same block, and window),
# 3 window only (non-causal with a window)
MASK_NONE, MASK_CAUSAL_ONLY, MASK_GENERAL, MASK_WINDOW = 0, 1, 2, 3


def block_table(block: torch.Tensor) -> torch.Tensor:
    """(BLK_ROWS, B, K) int32 from (B, K) block ids (0 = no block): the id, and the first / last key index holding
    the same nonzero id (the key itself for id 0). Device ops only (sort + scatter, no host sync): the kernels read
    the last index to extend a query tile's key range and the first index to extend a key tile's query range."""
    B, K = block.shape
    ids = block.to(torch.int64)
    pos = torch.arange(K, device=block.device).expand(B, K)
    vals, order = torch.sort(ids, dim=1, stable=True)
    new_run = torch.ones_like(vals, dtype=torch.bool)
    new_run[:, 1:] = vals[:, 1:] != vals[:, :-1]
    run = torch.cumsum(new_run.to(torch.int64), dim=1) - 1  # run index (< K) of each sorted slot
    first = torch.full((B, K), K, dtype=torch.int64, device=block.device).scatter_reduce(1, run, order, "amin")
    last = torch.full((B, K), -1, dtype=torch.int64, device=block.device).scatter_reduce(1, run, order, "amax")
    run_of = torch.empty_like(run).scatter_(1, order, run)  # run index of each original key
    first_k = torch.where(ids != 0, first.gather(1, run_of), pos)
    last_k = torch.where(ids != 0, last.gather(1, run_of), pos)
    return torch.stack([ids, first_k, last_k]).to(torch.int32).contiguous()


@dataclass
class KernelOperands:
    """Device tensors and compile-time flags one operator call hands to the kernels (`kernel_operands`).

    cat (B, K) int8/int32 key categories (stride 1 along K), kv (KV_ROWS, B, K) fp32 per-key values, tc tile codes
    (`tile_codes`, or a 1-element dummy without masses), wtab (NUM_CATEGORIES,) fp32 weights w, row_en (B, Q) int8
    and head_en (Hq,) int8 (1-element dummies when all_en), blk (BLK_ROWS, B, K) int32 block table (`block_table`;
    a 1-element dummy without blocks), window the sliding window (0 = none; a compile-time constant)."""

    kind: TransformKind
    all_en: bool
    cat: torch.Tensor
    kv: torch.Tensor
    tc: torch.Tensor
    wtab: torch.Tensor
    row_en: torch.Tensor
    head_en: torch.Tensor
    blk: torch.Tensor | None = None
    blocks: bool = False
    window: int = 0

    def flags(self) -> dict:
        k = self.kind
        return dict(TRANSFORM=k.transform, ALL_EN=self.all_en or not k.transform, HAS_MUL=k.has_mul,
                    HAS_ABS=k.has_abs, RAW_W=k.raw_w, BLOCKS=self.blocks, WINDOW=self.window)

    def tensors(self) -> tuple:
        return self.cat, self.kv, self.tc, self.wtab, self.row_en, self.head_en, self.blk

    def with_tensors(self, tensors) -> KernelOperands:
        return KernelOperands(self.kind, self.all_en, *tensors, blocks=self.blocks, window=self.window)


def kernel_operands(transform: CategoryTransform, cat: torch.Tensor, row_enable, head_enable, *, scale: float,
                    Q: int, Hq: int, need_codes: bool, block: torch.Tensor | None = None,
                    window: int | None = None) -> KernelOperands:
    """Everything but q/k/v the kernels read, built with device ops only (no host sync, no host->device copy after
    the first call with a transform: its key table is cached on it). row_enable (B, Q) / head_enable (Hq,) bool or
    None (None for both, or an identity transform, selects the all-enabled fast path); block (B, K) ids / window
    as in spec.py (None: none)."""
    dev = cat.device
    kind = transform_kind(transform)
    table = key_table(transform, scale, dev)
    if cat.dtype == torch.bool:
        cat = cat.to(torch.int8)
    if cat.shape[1] and cat.stride(1) != 1:
        cat = cat.contiguous()
    all_en = row_enable is None and head_enable is None
    dummy = torch.ones(1, dtype=torch.int8, device=dev)
    B = cat.shape[0]
    row_en = dummy if all_en else (torch.ones(B, Q, dtype=torch.int8, device=dev) if row_enable is None
                                   else row_enable.to(device=dev, dtype=torch.int8).contiguous())
    head_en = dummy if all_en else (torch.ones(Hq, dtype=torch.int8, device=dev) if head_enable is None
                                    else head_enable.to(device=dev, dtype=torch.int8).contiguous())
    tc = tile_codes(cat) if need_codes else torch.zeros(1, 1, 1, dtype=torch.int32, device=dev)
    blk = block_table(block.to(dev)) if block is not None else torch.zeros(1, dtype=torch.int32, device=dev)
    return KernelOperands(kind, all_en, cat, key_values(table, cat), tc, table[KV_W], row_en, head_en, blk,
                          block is not None, int(window or 0))


def pinned_configs() -> bool:
    """ATTN_MOD_TRITON_CONFIG=pinned: use each kernel's first fitting config instead of autotuning (tests, quick
    benchmarks, the one-shot GPU check)."""
    val = os.environ.get("ATTN_MOD_TRITON_CONFIG", "autotune")
    if val not in ("autotune", "pinned"):
        raise ValueError(f"ATTN_MOD_TRITON_CONFIG={val!r}: use 'autotune' (default) or 'pinned'")
    return val == "pinned"


def prune_by_rows(block_name: str, length_arg: str = "Q_LEN"):
    """An autotune `early_config_prune`: drop configs whose `block_name` exceeds the padded `length_arg` (never
    more rows per program than the problem has; keeps the smallest such block when all exceed it); with
    ATTN_MOD_TRITON_CONFIG=pinned keep only the first survivor."""

    def prune(configs, named_args, **kwargs):
        n = triton.next_power_of_2(max(int(named_args[length_arg]), 1))
        fit = [c for c in configs if c.kwargs[block_name] <= max(n, 16)]
        if not fit:
            smallest = min(c.kwargs[block_name] for c in configs)
            fit = [c for c in configs if c.kwargs[block_name] == smallest]
        return fit[:1] if pinned_configs() else fit

    return prune


def mass_dtype(ddt):
    """Operand dtype of the mixed-tile mass dot: fp16 on tensor cores (P' in [0, 1] keeps 11 bits, better than
    bf16's 8), fp32 where the dots are fp32 (interpreter / fp32 inputs)."""
    return tl.float32 if ddt == tl.float32 else tl.float16


def dot_dtype(dtype: torch.dtype):
    """The tl.dot operand dtype for inputs of `dtype`.

    bf16 arithmetic is wrong in the Triton interpreter, so there bf16 inputs are loaded and computed in fp32
    (the bf16 load/store path is still exercised); on a GPU the dots run in the input dtype."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def dot_precision(dtype) -> str:
    """fp32 operands use exact ('ieee') products so the fp32 path matches the reference; others ignore it."""
    return "ieee" if dtype == tl.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (masked loads fill the padding with zeros)."""
    return max(16, triton.next_power_of_2(head_dim))


def length_bucket(n: int) -> int:
    """Autotune key for a sequence length: next power of two, so decode steps do not re-tune per length."""
    return triton.next_power_of_2(max(int(n), 1))


def check_triton_device(t: torch.Tensor) -> None:
    """Raise unless `t` can run Triton kernels: a CUDA tensor, or any tensor under TRITON_INTERPRET=1."""
    if t.device.type == "cuda" or interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs a CUDA tensor (got device {t.device}). To run the kernels on CPU in the Triton "
        "interpreter, set TRITON_INTERPRET=1 in the environment before triton is imported "
        f"(it is {os.environ.get('TRITON_INTERPRET')!r} now), or use backend='torch'."
    )


assert NUM_CATEGORIES <= MASS_WIDTH and math.log2(MASS_WIDTH).is_integer()


@triton.jit
def _key_vectors(KV, KVS, offs_n, n_in, TRANSFORM: tl.constexpr, ALL_EN: tl.constexpr, HAS_MUL: tl.constexpr,
                 HAS_ABS: tl.constexpr, RAW_W: tl.constexpr):
    """Per-key values of keys `offs_n` from the (KV_ROWS, K) rows of one sample (row stride KVS), each shaped like
    offs_n: (bias_on, bias_off, slope_on, abs_on, w). Keys past the end (n_in False) get bias -inf. Rows a kind
    does not use are not loaded (zeros, removed by the compiler)."""
    b_off = tl.load(KV + KVS * 1 + offs_n, mask=n_in, other=float("-inf"))
    zero = tl.zeros_like(b_off)
    b_on = b_off
    ks = zero
    ka = zero
    kw = zero
    if TRANSFORM:
        b_on = tl.load(KV + KVS * 0 + offs_n, mask=n_in, other=float("-inf"))
        if HAS_MUL:
            ks = tl.load(KV + KVS * 2 + offs_n, mask=n_in, other=0.0)
        if HAS_ABS:
            ka = tl.load(KV + KVS * 3 + offs_n, mask=n_in, other=0.0)
        if RAW_W:
            kw = tl.load(KV + KVS * 4 + offs_n, mask=n_in, other=0.0)
    return b_on, b_off, ks, ka, kw


@triton.jit
def _scores(qk, en, b_on, b_off, ks, ka, qk_scale, TRANSFORM: tl.constexpr, ALL_EN: tl.constexpr,
            HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr):
    """Exponent tile x (log2 units, -inf for PAD / out-of-range keys) from raw dot products qk; every argument
    broadcasts against qk (en: rows, the others: keys).

        x = qk*slope + |qk|*absk + bias,  slope = scale*log2(e)*mul[c], absk = scale*log2(e)*absw[c],
        bias = log2(e)*add[c] (+ log2 w[c] with renorm)             on enabled rows,
        x = qk*scale*log2(e) + 0                                     elsewhere (identity),
    so the bias kind (mul = 1, absw = 0) costs one FFMA per element, as identity does."""
    if TRANSFORM:
        if ALL_EN:
            bias = b_on
        else:
            bias = tl.where(en, b_on, b_off)
        if HAS_MUL:
            if ALL_EN:
                x = qk * ks + bias
            else:
                x = qk * tl.where(en, ks, qk_scale) + bias
        else:
            x = qk * qk_scale + bias
        if HAS_ABS:
            if ALL_EN:
                x = x + tl.abs(qk) * ka
            else:
                x = x + tl.abs(qk) * tl.where(en, ka, 0.0)
    else:
        x = qk * qk_scale + b_off
    return x


@triton.jit
def _slope(qk, en, ks, ka, qk_scale, ALL_EN: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr):
    """dx/dqk = scale*log2(e)*(mul[c] + absw[c]*sign(qk)) on enabled rows, scale*log2(e) elsewhere
    (only for kinds with mul or absw; the backward multiplies by ln 2 at the end)."""
    if HAS_MUL:
        sl = ks
    else:
        sl = tl.zeros_like(ka) + qk_scale
    if HAS_ABS:
        sl = sl + tl.where(qk > 0, ka, tl.where(qk < 0, -ka, 0.0))
    if not ALL_EN:
        sl = tl.where(en, sl, qk_scale)
    return sl


@triton.jit
def _wpost(en, kw, ALL_EN: tl.constexpr):
    """Raw-mode post-softmax weight w[c] on enabled rows, 1 elsewhere (P' = wpost * P)."""
    if ALL_EN:
        wp = kw
    else:
        wp = tl.where(en, kw, 1.0)
    return wp


@triton.jit
def _dot_fp32(a, b, A_IS_DATA: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """a @ b where one operand is fp32 data (A_IS_DATA selects which) and the other holds only 0/1.

    With fp16/bf16 tensor cores the data is split hi + lo (two dots), so the result keeps ~16-22 mantissa bits
    instead of the 8-11 of one rounding; with fp32 operands it is one exact ('ieee') dot."""
    if DOT_DTYPE == tl.float32:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        if A_IS_DATA:
            hi = a.to(DOT_DTYPE)
            lo = (a - hi.to(tl.float32)).to(DOT_DTYPE)
            oh = b.to(DOT_DTYPE)
            res = tl.dot(lo, oh, tl.dot(hi, oh))
        else:
            hi = b.to(DOT_DTYPE)
            lo = (b - hi.to(tl.float32)).to(DOT_DTYPE)
            oh = a.to(DOT_DTYPE)
            res = tl.dot(oh, lo, tl.dot(oh, hi))
    return res


@triton.jit
def _visible(qp, kp, qb, kb, MASK: tl.constexpr, BLOCKS: tl.constexpr, WINDOW: tl.constexpr):
    """Visibility of keys at positions kp from queries at key positions qp (broadcastable tiles; qb / kb their block
    ids, read only with BLOCKS): MASK 1 causal kp <= qp; 2 (kp <= qp or qb == kb != 0) and qp - kp < WINDOW
    (WINDOW 0: no window); 3 qp - kp < WINDOW only (non-causal). PAD comes from the per-key bias, not from here."""
    if MASK == 1:
        vis = kp <= qp
    elif MASK == 2:
        vis = kp <= qp
        if BLOCKS:
            vis = vis | ((kb == qb) & (qb != 0))
        if WINDOW > 0:
            vis = vis & (qp - kp < WINDOW)
    else:
        vis = qp - kp < WINDOW
    return vis


@triton.jit
def _query_tile_keys(start_m, causal_offset, K_LEN, diag_lo, diag_hi, qlast_max, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, WINDOW: tl.constexpr):
    """Key ranges of one causal query tile (rows start_m .., at key positions + causal_offset) under blocks / window:
    [lo, mid) masked, [mid, diag_lo) unmasked, [diag_lo, hi) masked (all multiples of BLOCK_N but hi).
    A window hides every key before the first row's position - WINDOW + 1 (lo) and is satisfied by every row from
    the last row's position - WINDOW + 1 on (mid); a block extends hi to one past the furthest key sharing a block
    with a row (qlast_max: the largest BLK_LAST over the tile's rows)."""
    lo = 0
    mid = 0
    if WINDOW > 0:
        lo = (tl.maximum(start_m + causal_offset - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        mid = ((tl.maximum(start_m + BLOCK_M - 1 + causal_offset - WINDOW + 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
        lo = tl.minimum(lo, diag_lo)
        mid = tl.minimum(tl.maximum(mid, lo), diag_lo)
    hi = diag_hi
    if BLOCKS:
        hi = tl.minimum(tl.maximum(hi, qlast_max + 1), K_LEN)
    return lo, mid, hi

"""Pieces shared by the Triton forward (`triton_fwd.py`) and backward (`triton_bwd.py`) kernels.

Device helpers (all element-wise on broadcastable tiles, fp32):
  `_key_tables`      per-key transform values gathered from the (5, NUM_CAT) table by key category
  `_transform`       s2 -> (exponent x, post-softmax weight, dt/ds); the operator's transform in log2 units
  `_dot_fp32`        a @ b where one operand is fp32 data and the other a 0/1 one-hot tile, at ~fp32 accuracy
Host helpers: the packed table layout, interpreter detection and operand dtypes.

Units: every score inside the kernels is in log2 units, s2 = scale * log2(e) * q.k, so exp2 replaces exp;
add and log w are pre-multiplied by log2(e) in the table. LSE is stored in natural-log units (spec.py).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .spec import NUM_CATEGORIES, CategoryTransform

LOG2E = 1.4426950408889634  # 1 / ln 2
LN2 = 0.6931471805599453
MASS_WIDTH = 16  # one-hot width for the mass / mass-gradient dots: NUM_CATEGORIES padded to tl.dot's minimum of 16

# Rows of the packed table (TABLE_ROWS, NUM_CATEGORIES) fp32 the kernels read.
ROW_MUL, ROW_ABSW, ROW_ADD2, ROW_LOGW2, ROW_W = range(5)
TABLE_ROWS = 5


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

    return isinstance(_transform, InterpretedFunction)


def pack_tables(transform: CategoryTransform, device) -> torch.Tensor:
    """(TABLE_ROWS, NUM_CATEGORIES) fp32: mul, absw, add*log2(e), log2(w) (-inf where w == 0), w."""
    tr = transform.to(device)
    with torch.no_grad():
        return torch.stack([tr.mul, tr.absw, tr.add * LOG2E, torch.log2(tr.w), tr.w]).contiguous()


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
def _key_tables(TAB, cat, NUM_CAT: tl.constexpr, TRANSFORM: tl.constexpr, RENORM: tl.constexpr):
    """Gather the transform values of keys with categories `cat` (any int tile) from TAB (5, NUM_CAT) fp32.

    Returns (mul, absw, add2, logw2, w) shaped like `cat`; unneeded entries are 0 (TRANSFORM off) or unused."""
    if TRANSFORM:
        mul = tl.load(TAB + 0 * NUM_CAT + cat)
        absw = tl.load(TAB + 1 * NUM_CAT + cat)
        add2 = tl.load(TAB + 2 * NUM_CAT + cat)
        if RENORM:
            logw2 = tl.load(TAB + 3 * NUM_CAT + cat)
            w = tl.zeros(cat.shape, dtype=tl.float32)
        else:
            logw2 = tl.zeros(cat.shape, dtype=tl.float32)
            w = tl.load(TAB + 4 * NUM_CAT + cat)
    else:
        mul = tl.zeros(cat.shape, dtype=tl.float32)
        absw = tl.zeros(cat.shape, dtype=tl.float32)
        add2 = tl.zeros(cat.shape, dtype=tl.float32)
        logw2 = tl.zeros(cat.shape, dtype=tl.float32)
        w = tl.zeros(cat.shape, dtype=tl.float32)
    return mul, absw, add2, logw2, w


@triton.jit
def _transform(s2, en, mul, absw, add2, logw2, w, TRANSFORM: tl.constexpr, RENORM: tl.constexpr):
    """The operator's transform on a score tile (log2 units); all arguments broadcast against s2.

    s2 = scale*log2(e)*q.k; en: True where the (row, head) has the transform on.
    Returns x   exponent: t2 (+ log2 w on enabled renorm rows), where t2 = mul*s2 + absw*|s2| + add2 on enabled
                rows and s2 elsewhere;  P'_ij = wpost * exp2(x - lse2_i),
            wpost  w on enabled raw rows, else 1 (only meaningful when TRANSFORM and not RENORM),
            dtds   dt/ds = mul + absw*sign(s) on enabled rows, else 1.
    """
    if TRANSFORM:
        t2 = mul * s2 + absw * tl.abs(s2) + add2
        x = tl.where(en, t2, s2)
        sign = tl.where(s2 > 0, 1.0, tl.where(s2 < 0, -1.0, 0.0))
        dtds = tl.where(en, mul + absw * sign, 1.0)
        if RENORM:
            x = x + tl.where(en, logw2, 0.0)
            wpost = tl.where(en, 1.0, 1.0)
        else:
            wpost = tl.where(en, w, 1.0)
    else:
        x = s2
        dtds = tl.where(en, 1.0, 1.0)
        wpost = dtds
    return x, wpost, dtds


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

"""Triton decode forward (few query rows, long cache): GQA heads packed into one block of rows, split-K.

One program = all GROUP * Q query rows of one (batch, kv head) — row r is query head hkv*GROUP + r // Q, query
position r % Q — against one chunk of the keys; each chunk's unnormalised (acc, row max m, row sum l, masses) go to
a fp32 workspace and `_decode_reduce` merges the chunks:

    m = max_s m_s,  l = sum_s 2^(m_s - m) l_s,  out = sum_s 2^(m_s - m) acc_s / l,  mass = sum_s 2^(m_s - m) mass_s / l
    lse = (m + log2 l) ln 2   (log2 units inside, as in triton_fwd.py; empty rows: out = mass = 0, lse = -inf)

The per-chunk loop is the forward's own `_attn_fwd_inner` (same transform kinds, masses and fast paths), so the
decode path computes exactly the operator of reference.py. Used by `function.py` when Q <= DECODE_MAX_Q and
GROUP * Q <= DECODE_MAX_ROWS; the backward is the general one (triton_bwd.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common
from .spec import NUM_CATEGORIES
from .triton_common import (
    MASK_CAUSAL_ONLY,
    MASK_GENERAL,
    MASK_NONE,
    MASK_WINDOW,
    MASS_WIDTH,
    KernelOperands,
    block_d,
    dot_dtype,
    dot_precision,
    interpreting,
    mass_dtype,
)
from .triton_fwd import _attn_fwd_inner

DECODE_MAX_Q = 16
DECODE_MAX_ROWS = 128
DECODE_BLOCK_N = 64
DECODE_WARPS = 4
DECODE_STAGES = 3


@triton.jit
def _decode_split(Q, K, V, CAT, KV, TC, WTAB, ROW_EN, HEAD_EN, BLK, ACC, ML, MASS_P,  #
                  sm_scale,  #
                  stride_qb, stride_qh, stride_qm, stride_qd,  #
                  stride_kb, stride_kh, stride_kn, stride_kd,  #
                  stride_vb, stride_vh, stride_vn, stride_vd,  #
                  stride_cb, stride_kvr, stride_tcb, stride_tcr,  #
                  H_KV, Q_LEN, K_LEN, CHUNK, N_SPLIT,  #
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,  #
                  BLOCK_N: tl.constexpr, MASS_W: tl.constexpr, CAUSAL: tl.constexpr, MASK_CAUSAL: tl.constexpr,  #
                  TRANSFORM: tl.constexpr, ALL_EN: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr,  #
                  RAW_W: tl.constexpr, RETURN_MASS: tl.constexpr, MASS_PATH: tl.constexpr,  #
                  DOT_DTYPE: tl.constexpr, MASS_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,  #
                  BLOCKS: tl.constexpr, WINDOW: tl.constexpr):
    """Partial softmax state of BLOCK_M packed rows over keys [split*CHUNK, (split+1)*CHUNK).

    Blocks / window (spec.py): MASK_CAUSAL is then the general mask (2, or 3 non-causal with a window); with blocks
    the chunk range is not cut at the diagonal (a row may see later keys of its block), with a window the keys
    before the first row's window are skipped.

    Writes ACC (B*Hkv, N_SPLIT, BLOCK_M, BLOCK_D), ML (B*Hkv, N_SPLIT, 2, BLOCK_M) = (m, l) and
    MASS_P (B*Hkv, N_SPLIT, BLOCK_M, MASS_W), all fp32 and unnormalised."""
    split = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H_KV
    off_hkv = off_bh % H_KV
    rows = tl.arange(0, BLOCK_M)
    r_in = rows < GROUP * Q_LEN
    off_hq = off_hkv * GROUP + rows // Q_LEN
    qpos = rows % Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < HEAD_DIM
    q_ptr = (Q + off_b.to(tl.int64) * stride_qb + off_hq.to(tl.int64)[:, None] * stride_qh
             + qpos[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptr, mask=r_in[:, None] & d_in[None, :], other=0.0).to(DOT_DTYPE)
    if ALL_EN:
        en = r_in
    else:
        en = ((tl.load(ROW_EN + off_b * Q_LEN + qpos, mask=r_in, other=0) != 0)
              & (tl.load(HEAD_EN + off_hq, mask=r_in, other=0) != 0))
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    cat_base = CAT + off_b.to(tl.int64) * stride_cb
    kv_base = KV + off_b.to(tl.int64) * K_LEN
    tc_base = TC + off_b.to(tl.int64) * stride_tcb + (BLOCK_N // 16) * stride_tcr
    causal_offset = K_LEN - Q_LEN
    blk_base = BLK + off_b.to(tl.int64) * K_LEN
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, K_LEN)
    if CAUSAL and not BLOCKS:
        hi = tl.minimum(hi, tl.maximum(Q_LEN - 1 + causal_offset + 1, 0))  # the last row's last visible key + 1
        hi = tl.maximum(hi, lo)
    if WINDOW > 0:  # key blocks wholly before the first row's window hold nothing visible
        lo = tl.maximum(lo, (tl.maximum(causal_offset - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N)
        hi = tl.maximum(hi, lo)
    if BLOCKS:
        kpos = qpos + causal_offset
        qblk = tl.load(blk_base + kpos, mask=r_in & (kpos >= 0) & (kpos < K_LEN), other=0)
    else:
        qblk = qpos * 0

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass_acc = tl.zeros([BLOCK_M, MASS_W], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    acc, l_i, m_i, mass_acc = _attn_fwd_inner(
        acc, l_i, m_i, mass_acc, q, en, qpos, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB, blk_base,
        qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN, causal_offset, lo, hi,  #
        HEAD_DIM, BLOCK_N, MASS_W, MASK_CAUSAL, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
        DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
    part = off_bh.to(tl.int64) * N_SPLIT + split
    tl.store(ACC + (part * BLOCK_M + rows[:, None]) * BLOCK_D + offs_d[None, :], acc)
    tl.store(ML + (part * 2) * BLOCK_M + rows, m_i)
    tl.store(ML + (part * 2 + 1) * BLOCK_M + rows, l_i)
    if RETURN_MASS:
        offs_c = tl.arange(0, MASS_W)
        tl.store(MASS_P + (part * BLOCK_M + rows[:, None]) * MASS_W + offs_c[None, :], mass_acc)


@triton.jit
def _decode_reduce(ACC, ML, MASS_P, Out, LSE, MASS,  #
                   stride_ob, stride_oh, stride_om, stride_od,  #
                   H_KV, H_Q, Q_LEN, N_SPLIT,  #
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,  #
                   NUM_CAT: tl.constexpr, MASS_W: tl.constexpr, RETURN_MASS: tl.constexpr):
    """Merge the N_SPLIT partial states of one (batch, kv head) and write out / lse / mass of its packed rows."""
    off_bh = tl.program_id(0)
    off_b = off_bh // H_KV
    off_hkv = off_bh % H_KV
    rows = tl.arange(0, BLOCK_M)
    r_in = rows < GROUP * Q_LEN
    off_hq = off_hkv * GROUP + rows // Q_LEN
    qpos = rows % Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, MASS_W)
    base = off_bh.to(tl.int64) * N_SPLIT
    m = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    for s in range(N_SPLIT):
        m = tl.maximum(m, tl.load(ML + ((base + s) * 2) * BLOCK_M + rows))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass = tl.zeros([BLOCK_M, MASS_W], dtype=tl.float32)
    for s in range(N_SPLIT):
        part = base + s
        scale = tl.math.exp2(tl.load(ML + (part * 2) * BLOCK_M + rows) - m_safe)
        l += scale * tl.load(ML + (part * 2 + 1) * BLOCK_M + rows)
        acc += scale[:, None] * tl.load(ACC + (part * BLOCK_M + rows[:, None]) * BLOCK_D + offs_d[None, :])
        if RETURN_MASS:
            mass += scale[:, None] * tl.load(MASS_P + (part * BLOCK_M + rows[:, None]) * MASS_W + offs_c[None, :])
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    lse = tl.where(empty, float("-inf"), (m + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_out = (off_b * H_Q + off_hq).to(tl.int64) * Q_LEN + qpos  # index into (B, Hq, Q)
    tl.store(LSE + row_out, lse, mask=r_in)
    o_ptr = (Out + off_b.to(tl.int64) * stride_ob + off_hq.to(tl.int64)[:, None] * stride_oh
             + qpos[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptr, (acc / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=r_in[:, None] & (offs_d[None, :] < HEAD_DIM))
    if RETURN_MASS:
        tl.store(MASS + row_out[:, None] * NUM_CAT + offs_c[None, :], mass / l_safe[:, None],
                 mask=r_in[:, None] & (offs_c[None, :] < NUM_CAT))


def use_decode(Q: int, group: int) -> bool:
    """The decode path serves few query rows whose packed GQA group fits one block."""
    return 0 < Q <= DECODE_MAX_Q and group * Q <= DECODE_MAX_ROWS


_SM_COUNT: dict = {}


def num_splits(B: int, Hkv: int, K: int, device, block_n: int = DECODE_BLOCK_N) -> int:
    """Key chunks per (batch, kv head): about 4 programs per SM in total, at least one key block per chunk."""
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        target = 4 * _SM_COUNT[device]
    else:
        target = 3 * B * Hkv  # interpreter: a few chunks, enough to exercise the merge
    return max(1, min(triton.cdiv(target, B * Hkv), triton.cdiv(K, block_n)))


def decode_forward(q, k, v, ops: KernelOperands, *, scale: float, causal: bool, return_mass: bool,
                   block_n: int | None = None, n_split: int | None = None, mass_path: int = 0):
    """out (B,Hq,Q,D) q.dtype, lse (B,Hq,Q) fp32, mass (B,Hq,Q,NUM_CATEGORIES) fp32 or None, as
    `triton_fwd.attention_forward`. n_split / block_n force the split count / key tile (tests)."""
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dev = q.device
    out = triton_common.new_output(q.shape, q.dtype, dev)
    lse = triton_common.new_output((B, Hq, Q), torch.float32, dev)
    mass = triton_common.new_output((B, Hq, Q, NUM_CATEGORIES), torch.float32, dev) if return_mass else None
    if B * Hq * Q == 0:
        return out, lse, mass
    bn = block_n or DECODE_BLOCK_N
    splits = n_split or num_splits(B, Hkv, max(K, 1), dev, bn)
    chunk = triton.cdiv(triton.cdiv(max(K, 1), splits), bn) * bn
    splits = triton.cdiv(max(K, 1), chunk)
    bm = max(16, triton.next_power_of_2(group * Q))
    bd = block_d(D)
    acc_p = torch.empty(B * Hkv, splits, bm, bd, dtype=torch.float32, device=dev)
    ml_p = torch.empty(B * Hkv, splits, 2, bm, dtype=torch.float32, device=dev)
    mass_p = torch.empty(B * Hkv, splits, bm, MASS_WIDTH, dtype=torch.float32, device=dev) if return_mass else ml_p
    ddt = dot_dtype(q.dtype)
    flags = ops.flags()
    if causal and (ops.blocks or ops.window):
        mask = MASK_GENERAL
    elif ops.window:
        mask = MASK_WINDOW
    else:
        mask = MASK_CAUSAL_ONLY if causal and Q > 1 else MASK_NONE
    meta = dict(GROUP=group, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, MASS_W=MASS_WIDTH, CAUSAL=bool(causal),
                MASK_CAUSAL=mask, **flags, RETURN_MASS=bool(return_mass),
                MASS_PATH=int(mass_path), DOT_DTYPE=ddt, MASS_DTYPE=mass_dtype(ddt), DOT_PRECISION=dot_precision(ddt))
    launch = {} if interpreting() else dict(num_warps=DECODE_WARPS, num_stages=DECODE_STAGES)
    _decode_split[(splits, B * Hkv)](
        q, k, v, ops.cat, ops.kv, ops.tc, ops.wtab, ops.row_en, ops.head_en, ops.blk, acc_p, ml_p, mass_p,
        float(scale),
        *q.stride(), *k.stride(), *v.stride(), ops.cat.stride(0), ops.kv.stride(0), ops.tc.stride(0),
        ops.tc.stride(1), Hkv, Q, K, chunk, splits, **meta, **launch)
    _decode_reduce[(B * Hkv,)](
        acc_p, ml_p, mass_p, out, lse, lse if mass is None else mass, *out.stride(), Hkv, Hq, Q, splits,
        GROUP=group, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm, NUM_CAT=NUM_CATEGORIES, MASS_W=MASS_WIDTH,
        RETURN_MASS=bool(return_mass), **({} if interpreting() else dict(num_warps=4)))
    return out, lse, mass


__all__ = ["decode_forward", "use_decode", "DECODE_MAX_Q"]

"""Triton forward of the category attention operator (FlashAttention-2 style; math in reference.py).

One program = BLOCK_M query rows of one (batch, query head). K/V blocks stream through an online softmax in
fp32 and log2 units (exp2, with scale*log2(e) folded into the scores). Causal: keys left of the block's
diagonal run unmasked (`_attn_fwd_inner` with MASK_CAUSAL=0), the diagonal band runs masked. PAD comes from
the key categories (never an N x N mask); out-of-range key/row/head-dim lanes are masked loads.
Bidirectional blocks / sliding window (spec.py): a window skips the key blocks wholly before the first row's window
and masks the band at its edge; a block extends the key range past the diagonal to the last key sharing a block with
a row of the tile (those future key blocks are NOT skipped), masked; everything else is skipped as before.

    q (B, Hq, Q, D), k / v (B, Hkv, K, D) in fp16 / bf16 / fp32, cat (B, K) int, D in {16..256}
 -> out (B, Hq, Q, D) q.dtype, lse (B, Hq, Q) fp32 natural log (spec.py convention), mass (B, Hq, Q, 8) fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common
from .spec import NUM_CATEGORIES
from .triton_common import (
    LN2,
    LOG2E,
    MASS_WIDTH,
    _key_vectors,
    _query_tile_keys,
    _scores,
    _visible,
    _wpost,
    KernelOperands,
    block_d,
    dot_dtype,
    dot_precision,
    interpreting,
    length_bucket,
    mass_dtype,
    prune_by_rows,
)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d,  #
                    K_ptr, V_ptr, KV_ptr, CAT_ptr, TC_ptr, WTAB, BLK_ptr, qblk,  #
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr,  #
                    qk_scale, K_LEN, causal_offset, lo, hi,  #
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASS_W: tl.constexpr,  #
                    MASK_CAUSAL: tl.constexpr, TRANSFORM: tl.constexpr, ALL_EN: tl.constexpr,  #
                    HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, RAW_W: tl.constexpr,  #
                    RETURN_MASS: tl.constexpr, MASS_PATH: tl.constexpr, DOT_DTYPE: tl.constexpr,  #
                    MASS_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCKS: tl.constexpr,
                    WINDOW: tl.constexpr):
    """Fold key blocks [lo, hi) into the running (acc, l_i, m_i, mass_acc) of one query block.

    MASK_CAUSAL (triton_common.MASK_*): 0 none, 1 causal, 2 general causal, 3 window only; BLK_ptr the block ids of
    this sample's keys and qblk the rows' own block ids (read with BLOCKS only)."""
    d_in = offs_d < HEAD_DIM
    offs_c = tl.arange(0, MASS_W)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < K_LEN
        kT = tl.load(K_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0)
        qk = tl.dot(q, kT.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        # per-key values in the score tile's layout (PAD and keys past K_LEN: bias -inf)
        b_on, b_off, ks, ka, kw = _key_vectors(KV_ptr, stride_kvr, offs_n, n_in, TRANSFORM, ALL_EN, HAS_MUL,
                                               HAS_ABS, RAW_W)
        x = _scores(qk, en[:, None], b_on[None, :], b_off[None, :], ks[None, :], ka[None, :], qk_scale, TRANSFORM,
                    ALL_EN, HAS_MUL, HAS_ABS)
        if MASK_CAUSAL == 1:
            x = tl.where(offs_n[None, :] <= offs_m[:, None] + causal_offset, x, float("-inf"))
        elif MASK_CAUSAL >= 2:
            if BLOCKS:
                kb = tl.load(BLK_ptr + offs_n, mask=n_in, other=0)
            else:
                kb = offs_n * 0
            x = tl.where(_visible(offs_m[:, None] + causal_offset, offs_n[None, :], qblk[:, None], kb[None, :],
                                  MASK_CAUSAL, BLOCKS, WINDOW), x, float("-inf"))
        # -- online softmax; m_safe keeps exp2 finite while a row has seen nothing visible yet
        m_ij = tl.maximum(m_i, tl.max(x, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(x - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        row_sum = tl.sum(p, 1)
        l_i = l_i * alpha + row_sum
        if RAW_W:
            p = p * _wpost(en[:, None], kw[None, :], ALL_EN)  # raw mode: P' = w * P, the denominator stays unweighted
        v = tl.load(V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_in[:, None] & d_in[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        if RETURN_MASS:
            mass_acc = mass_acc * alpha[:, None]
            if MASS_PATH == 1:  # static report only: every tile single-category
                mass_acc = _mass_single(mass_acc, row_sum, en, tl.load(TC_ptr + start_n // BLOCK_N), WTAB, offs_c,
                                        ALL_EN, RAW_W)
            elif MASS_PATH == 2:  # always the one-hot dot (tests: the mixed-tile path on any tile)
                mass_acc = _mass_mixed(mass_acc, p, CAT_ptr, offs_n, n_in, offs_c, MASS_DTYPE)
            else:
                code = tl.load(TC_ptr + start_n // BLOCK_N)
                if code >= 0:
                    mass_acc = _mass_single(mass_acc, row_sum, en, code, WTAB, offs_c, ALL_EN, RAW_W)
                else:
                    mass_acc = _mass_mixed(mass_acc, p, CAT_ptr, offs_n, n_in, offs_c, MASS_DTYPE)
        m_i = m_ij
    return acc, l_i, m_i, mass_acc


@triton.jit
def _mass_single(mass_acc, row_sum, en, code, WTAB, offs_c, ALL_EN: tl.constexpr, RAW_W: tl.constexpr):
    """A tile whose non-PAD keys all have category `code`: its P' row sums (the softmax's own row sums, times w[code]
    on enabled raw-mode rows) go to that one category; no per-element work."""
    if RAW_W:
        wc = tl.load(WTAB + code)
        if ALL_EN:
            row_sum = row_sum * wc
        else:
            row_sum = row_sum * tl.where(en, wc, 1.0)
    return mass_acc + tl.where(offs_c[None, :] == code, row_sum[:, None], 0.0)


@triton.jit
def _mass_mixed(mass_acc, p, CAT_ptr, offs_n, n_in, offs_c, MASS_DTYPE: tl.constexpr):
    """A tile with several categories: one dot of P' with the keys' one-hot categories (MASS_DTYPE fp16 on a GPU:
    P' in [0, 1] keeps 11 bits; fp32 'ieee' in the interpreter). PAD / out-of-range keys have P' = 0."""
    cat = tl.load(CAT_ptr + offs_n, mask=n_in, other=0).to(tl.int32)
    onehot = (cat[:, None] == offs_c[None, :]).to(MASS_DTYPE)
    return tl.dot(p.to(MASS_DTYPE), onehot, mass_acc, input_precision="ieee" if MASS_DTYPE == tl.float32 else "tf32")


@triton.jit
def _category_attn_fwd(Q, K, V, CAT, KV, TC, WTAB, ROW_EN, HEAD_EN, BLK, Out, LSE, MASS,  #
                       sm_scale,  #
                       stride_qb, stride_qh, stride_qm, stride_qd,  #
                       stride_kb, stride_kh, stride_kn, stride_kd,  #
                       stride_vb, stride_vh, stride_vn, stride_vd,  #
                       stride_ob, stride_oh, stride_om, stride_od,  #
                       stride_cb, stride_kvr, stride_tcb, stride_tcr,  #
                       H_Q, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET,  #
                       GROUP: tl.constexpr,  # query heads per kv head (Hq // Hkv)
                       HEAD_DIM: tl.constexpr,  # D
                       BLOCK_D: tl.constexpr,  # D padded to a power of two
                       BLOCK_M: tl.constexpr,  # query rows per program
                       BLOCK_N: tl.constexpr,  # keys per inner step
                       NUM_CAT: tl.constexpr,  # categories (8)
                       MASS_W: tl.constexpr,  # one-hot width for the mass dot (16)
                       CAUSAL: tl.constexpr,  # bottom-right aligned causal mask
                       TRANSFORM: tl.constexpr,  # False: identity everywhere (PAD masking only)
                       ALL_EN: tl.constexpr,  # every row and head enabled: no per-row selects
                       HAS_MUL: tl.constexpr,  # some mul != 1
                       HAS_ABS: tl.constexpr,  # some absw != 0
                       RAW_W: tl.constexpr,  # raw (not renormalised) weights with some w != 1
                       RETURN_MASS: tl.constexpr,  # also write MASS
                       MASS_PATH: tl.constexpr,  # 0: per tile (single-category fast path / one dot), 2: always the dot
                       DOT_DTYPE: tl.constexpr,  # tl.dot operand dtype (fp16 / bf16 / fp32)
                       MASS_DTYPE: tl.constexpr,  # mass dot operand dtype (fp16 / fp32)
                       DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands
                       BLOCKS: tl.constexpr,  # bidirectional block ids in BLK (triton_common.block_table)
                       WINDOW: tl.constexpr,  # sliding window (0: none)
                       ):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H_Q
    off_hq = off_bh % H_Q
    off_hkv = off_hq // GROUP
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_hq.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_hq.to(tl.int64) * stride_oh
    cat_base = CAT + off_b.to(tl.int64) * stride_cb
    kv_base = KV + off_b.to(tl.int64) * K_LEN  # (KV_ROWS, B, K) contiguous
    blk_base = BLK + off_b.to(tl.int64) * K_LEN  # (BLK_ROWS, B, K) contiguous, row stride = stride_kvr
    tc_base = TC + off_b.to(tl.int64) * stride_tcb + (BLOCK_N // 16) * stride_tcr
    row_base = off_bh.to(tl.int64) * Q_LEN  # LSE (B, Hq, Q) and MASS (B, Hq, Q, NUM_CAT) are contiguous

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Q_LEN
    d_in = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_in[:, None] & d_in[None, :], other=0.0).to(DOT_DTYPE)
    if ALL_EN:
        en = m_in
    else:
        en = (tl.load(ROW_EN + off_b * Q_LEN + offs_m, mask=m_in, other=0) != 0) & (tl.load(HEAD_EN + off_hq) != 0)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mass_acc = tl.zeros([BLOCK_M, MASS_W], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)

    causal_offset = K_LEN - Q_LEN  # query row i sits at key position i + causal_offset
    qblk = offs_m * 0
    if BLOCKS:
        qpos = offs_m + causal_offset
        q_ok = m_in & (qpos >= 0) & (qpos < K_LEN)
        qblk = tl.load(blk_base + qpos, mask=q_ok, other=0)
        qlast = tl.max(tl.load(blk_base + 2 * stride_kvr + qpos, mask=q_ok, other=0), 0)
    else:
        qlast = 0
    if CAUSAL:
        # keys [0, diag_lo) are visible to every row of the block; [diag_lo, diag_hi) need the causal mask
        diag_lo = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        diag_hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), K_LEN)
        diag_lo = tl.minimum(diag_lo, diag_hi)
        if BLOCKS or WINDOW > 0:
            # window: keys before lo are hidden from every row, [lo, mid) straddle the window edge (masked);
            # blocks: keys [diag_hi, hi) are visible only through a shared block (masked); keys past hi: skipped
            lo, mid, hi = _query_tile_keys(start_m, causal_offset, K_LEN, diag_lo, diag_hi, qlast, BLOCK_M, BLOCK_N,
                                           BLOCKS, WINDOW)
            acc, l_i, m_i, mass_acc = _attn_fwd_inner(
                acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, lo, mid,  #
                HEAD_DIM, BLOCK_N, MASS_W, 2, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
                DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            acc, l_i, m_i, mass_acc = _attn_fwd_inner(
                acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, mid, diag_lo,  #
                HEAD_DIM, BLOCK_N, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
                DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            acc, l_i, m_i, mass_acc = _attn_fwd_inner(
                acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, diag_lo, hi,  #
                HEAD_DIM, BLOCK_N, MASS_W, 2, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
                DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
        else:
            acc, l_i, m_i, mass_acc = _attn_fwd_inner(
                acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, 0, diag_lo,  #
                HEAD_DIM, BLOCK_N, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
                DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            acc, l_i, m_i, mass_acc = _attn_fwd_inner(
                acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, diag_lo, diag_hi,  #
                HEAD_DIM, BLOCK_N, MASS_W, 1, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
                DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
    elif WINDOW > 0:  # non-causal with a window: keys before the first row's window are skipped, the rest masked
        lo = (tl.maximum(start_m + causal_offset - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        acc, l_i, m_i, mass_acc = _attn_fwd_inner(
            acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
            blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN, causal_offset,
            tl.minimum(lo, K_LEN), K_LEN,  #
            HEAD_DIM, BLOCK_N, MASS_W, 3, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
            DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
    else:
        acc, l_i, m_i, mass_acc = _attn_fwd_inner(
            acc, l_i, m_i, mass_acc, q, en, offs_m, offs_d, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
            blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN, causal_offset,
            0, K_LEN,  #
            HEAD_DIM, BLOCK_N, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, RETURN_MASS, MASS_PATH,
            DOT_DTYPE, MASS_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)

    # epilogue: rows that saw no key (l == 0) give out = 0, mass = 0, lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    tl.store(LSE + row_base + offs_m, lse, mask=m_in)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, acc.to(Out.dtype.element_ty),
             mask=m_in[:, None] & d_in[None, :])
    if RETURN_MASS:
        offs_c = tl.arange(0, MASS_W)
        mass = mass_acc / l_safe[:, None]
        tl.store(MASS + (row_base + offs_m[:, None]) * NUM_CAT + offs_c[None, :], mass,
                 mask=m_in[:, None] & (offs_c[None, :] < NUM_CAT))


# Autotune space (sm_90, checked spill-free and within shared memory by bench/kernel_static.py); the first config
# that fits the shape is the pinned default (ATTN_MOD_TRITON_CONFIG=pinned). Small Q (< 64 rows) gets the decode
# tiles; decode proper (Q <= DECODE_MAX_Q) runs the split-K kernel (triton_decode.py).
FWD_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=2, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=4, num_warps=8),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=2, num_warps=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=3, num_warps=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_stages=3, num_warps=4),
]

_FWD_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "GROUP", "CAUSAL", "TRANSFORM", "ALL_EN", "HAS_MUL", "HAS_ABS",
                 "RAW_W", "RETURN_MASS", "DOT_DTYPE", "BLOCKS", "WINDOW"]
_category_attn_fwd_tuned = triton.autotune(configs=FWD_CONFIGS, key=_FWD_TUNE_KEY,
                                           prune_configs_by={"early_config_prune": prune_by_rows("BLOCK_M")})(
    _category_attn_fwd)

INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}  # few, large blocks: interpreter cost ~ programs x steps


def forward_launch(q, k, v, ops: KernelOperands, out, lse, mass, *, scale: float, causal: bool, mass_path: int = 0):
    """(positional args, constexpr meta without BLOCK_M/BLOCK_N) of `_category_attn_fwd`; mass None: no masses.
    `ops` from `triton_common.kernel_operands`; mass_path 0 = per-tile fast path, 2 = always the one-hot dot."""
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    ddt = dot_dtype(q.dtype)
    args = (q, k, v, ops.cat, ops.kv, ops.tc, ops.wtab, ops.row_en, ops.head_en, ops.blk, out, lse,
            lse if mass is None else mass, float(scale),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), ops.cat.stride(0), ops.kv.stride(0),
            ops.tc.stride(0), ops.tc.stride(1), Hq, Q, K, length_bucket(Q), length_bucket(K))
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), NUM_CAT=NUM_CATEGORIES, MASS_W=MASS_WIDTH,
                CAUSAL=bool(causal), **ops.flags(), RETURN_MASS=mass is not None, MASS_PATH=int(mass_path),
                DOT_DTYPE=ddt, MASS_DTYPE=mass_dtype(ddt), DOT_PRECISION=dot_precision(ddt))
    return args, meta


def attention_forward(q, k, v, ops: KernelOperands, *, scale: float, causal: bool, return_mass: bool,
                      block_m: int | None = None, block_n: int | None = None, mass_path: int = 0):
    """Launch the forward kernel.

    q (B,Hq,Q,D), k/v (B,Hkv,K,D) with last-dim stride 1; `ops` (`triton_common.kernel_operands`) carries the key
    categories, per-key values, tile codes, enables and the kind flags. block_m/block_n force a tile size (tests);
    otherwise the autotuner picks on a GPU and INTERPRETER_BLOCKS are used in the interpreter.
    Returns out (B,Hq,Q,D) q.dtype, lse (B,Hq,Q) fp32, mass (B,Hq,Q,NUM_CATEGORIES) fp32 or None.
    """
    B, Hq, Q, D = q.shape
    out = triton_common.new_output(q.shape, q.dtype, q.device)
    lse = triton_common.new_output((B, Hq, Q), torch.float32, q.device)
    mass = triton_common.new_output((B, Hq, Q, NUM_CATEGORIES), torch.float32, q.device) if return_mass else None
    if B * Hq * Q == 0:
        return out, lse, mass
    args, meta = forward_launch(q, k, v, ops, out, lse, mass, scale=scale, causal=causal, mass_path=mass_path)
    if block_m is None and not interpreting():
        grid = lambda META: (triton.cdiv(Q, META["BLOCK_M"]), B * Hq)  # noqa: E731
        _category_attn_fwd_tuned[grid](*args, **meta)
    else:
        bm = block_m or INTERPRETER_BLOCKS["BLOCK_M"]
        bn = block_n or INTERPRETER_BLOCKS["BLOCK_N"]
        _category_attn_fwd[(triton.cdiv(Q, bm), B * Hq)](*args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    return out, lse, mass


__all__ = ["attention_forward", "forward_launch", "LOG2E", "LN2"]

"""Triton backward of the category attention operator (FlashAttention-2 style, no atomics).

With upstream dO (B,Hq,Q,D), optional mass gradient g (B,Hq,Q,8) and optional LSE gradient dlse (B,Hq,Q):

    P'_ij  = wpost_ij * exp(x_ij - lse_i),  Phat_ij = exp(x_ij - lse_i)     (x, wpost: triton_common._scores / _wpost)
    dP'_ij = dO_i . v_j + g_{c_j}(i)
    Delta_i = dO_i . o_i + sum_c g_c(i) mass_c(i) - dlse_i                   (`_attn_bwd_preprocess`)
    dt_ij  = P'_ij dP'_ij - Phat_ij Delta_i    (renorm / identity: Phat = P', i.e. P'(dP' - Delta);
                                                raw: Phat = P = softmax(t), the unweighted probabilities)
    ds_ij  = dt_ij * (mul[c] + absw[c] sign(s_ij)) on enabled rows, dt_ij elsewhere (only the mul / absw kinds
             multiply; the kernels carry dx/dqk = scale log2(e) dt/ds and rescale by ln 2 at the end)
    mass gradient: a single-category key tile folds g_c into the row's Delta (Delta - wpost g_c); a mixed tile adds
             g_{c_j}(i) to dP' through the one-hot dot
    dq_i = scale sum_j ds_ij k_j   (`_attn_bwd_dq`: one program per query block, loops over keys)
    dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i P'_ij dO_i, summed over the GROUP query heads of the kv head
                                   (`_attn_bwd_dkdv`: one program per key block, loops over heads and queries)

Empty rows (lse = -inf) are given lse2 = +inf so every probability of the row is exactly 0.
Bidirectional blocks / sliding window (spec.py): dq visits the forward's key ranges; dk/dv of a key block also visit
the earlier query rows that share a block with one of its keys (the block's first index, `block_table`) and skip
the rows past the window of its last key.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common
from .spec import NUM_CATEGORIES
from .triton_common import (
    LOG2E,
    MASS_WIDTH,
    KernelOperands,
    _dot_fp32,
    _key_vectors,
    _query_tile_keys,
    _scores,
    _visible,
    _slope,
    _wpost,
    block_d,
    dot_dtype,
    dot_precision,
    interpreting,
    length_bucket,
    prune_by_rows,
)


@triton.jit
def _attn_bwd_preprocess(O, DO, LSE, MASS, G, DLSE, DELTA, LSE2,  #
                         stride_ob, stride_oh, stride_om, stride_od,  #
                         stride_dob, stride_doh, stride_dom, stride_dod,  #
                         H_Q, Q_LEN,  #
                         HEAD_DIM: tl.constexpr,  # D
                         BLOCK_D: tl.constexpr,  # D padded to a power of two
                         BLOCK_M: tl.constexpr,  # rows per program
                         NUM_CAT: tl.constexpr,  # categories (8)
                         HAS_MASS_GRAD: tl.constexpr,  # add sum_c g_c mass_c
                         HAS_LSE_GRAD: tl.constexpr,  # subtract dlse
                         ):
    """DELTA = rowsum(dO * O) + sum_c G*MASS - DLSE and LSE2 = LSE*log2(e) (+inf for empty rows); (B,Hq,Q) fp32."""
    off_bh = tl.program_id(1)
    off_b = off_bh // H_Q
    off_h = off_bh % H_Q
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Q_LEN
    md_in = m_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=md_in, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=md_in, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    rows = off_bh.to(tl.int64) * Q_LEN + offs_m
    if HAS_MASS_GRAD:
        offs_c = tl.arange(0, NUM_CAT)
        mc_ptr = rows[:, None] * NUM_CAT + offs_c[None, :]
        delta += tl.sum(tl.load(MASS + mc_ptr, mask=m_in[:, None], other=0.0)
                        * tl.load(G + mc_ptr, mask=m_in[:, None], other=0.0), axis=1)
    if HAS_LSE_GRAD:
        delta -= tl.load(DLSE + rows, mask=m_in, other=0.0)
    lse = tl.load(LSE + rows, mask=m_in, other=0.0)
    tl.store(DELTA + rows, delta, mask=m_in)
    tl.store(LSE2 + rows, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=m_in)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, CAT_b, n_in, code, wc, b_on, b_off, ks, ka, kw, head_en, BLK_b, kblk,  #
                         q_base, do_base, ROW_EN_b, LSE2_bh, DELTA_bh, G_bh,  #
                         stride_qm, stride_qd, stride_dom, stride_dod,  #
                         qk_scale, Q_LEN, causal_offset, offs_n, offs_d, lo, hi,  #
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NUM_CAT: tl.constexpr,  #
                         MASS_W: tl.constexpr, MASK_CAUSAL: tl.constexpr, TRANSFORM: tl.constexpr,  #
                         ALL_EN: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, RAW_W: tl.constexpr,  #
                         HAS_MASS_GRAD: tl.constexpr, MASS_PATH: tl.constexpr, DOT_DTYPE: tl.constexpr,  #
                         DOT_PRECISION: tl.constexpr, BLOCKS: tl.constexpr, WINDOW: tl.constexpr):
    """Accumulate dk, dv (BLOCK_N, BLOCK_D) of one key block over query rows [lo, hi) of one query head.

    Tiles are transposed (keys x queries) as in the Triton tutorial: key vectors broadcast as [:, None].
    MASK_CAUSAL as in triton_fwd._attn_fwd_inner; kblk the key block's block ids, BLK_b this sample's ids."""
    d_in = offs_d < HEAD_DIM
    offs_c = tl.arange(0, MASS_W)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < Q_LEN
        qT = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=m_in[None, :] & d_in[:, None], other=0.0).to(DOT_DTYPE)
        # rows past Q_LEN get lse2 = +inf, hence probability 0
        lse2 = tl.load(LSE2_bh + offs_m, mask=m_in, other=float("inf"))
        if ALL_EN:
            en = m_in
        else:
            en = (tl.load(ROW_EN_b + offs_m, mask=m_in, other=0) != 0) & head_en
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        xT = _scores(qkT, en[None, :], b_on[:, None], b_off[:, None], ks[:, None], ka[:, None], qk_scale, TRANSFORM,
                     ALL_EN, HAS_MUL, HAS_ABS)
        if MASK_CAUSAL == 1:
            xT = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, xT, float("-inf"))
        elif MASK_CAUSAL >= 2:
            qpos = offs_m + causal_offset
            if BLOCKS:
                qb = tl.load(BLK_b + qpos, mask=m_in & (qpos >= 0), other=0)
            else:
                qb = offs_m * 0
            xT = tl.where(_visible(qpos[None, :], offs_n[:, None], qb[None, :], kblk[:, None], MASK_CAUSAL, BLOCKS,
                                   WINDOW), xT, float("-inf"))
        phatT = tl.math.exp2(xT - lse2[None, :])
        if RAW_W:
            ppT = phatT * _wpost(en[None, :], kw[:, None], ALL_EN)
        else:
            ppT = phatT
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=m_in[:, None] & d_in[None, :], other=0.0).to(DOT_DTYPE)
        dv = tl.dot(ppT.to(DOT_DTYPE), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta = tl.load(DELTA_bh + offs_m, mask=m_in, other=0.0)
        if HAS_MASS_GRAD:
            if MASS_PATH == 1:  # static report only: the single-category branch alone
                delta = _fold_mass_grad(delta, G_bh, offs_m, m_in, code, wc, en, ALL_EN, RAW_W, NUM_CAT)
            elif MASS_PATH == 2:
                dpT += _mass_grad_mixed_t(CAT_b, offs_n, n_in, G_bh, offs_m, m_in, offs_c, NUM_CAT, DOT_DTYPE)
            elif code >= 0:  # single-category key block: g_c folds into the row's delta
                delta = _fold_mass_grad(delta, G_bh, offs_m, m_in, code, wc, en, ALL_EN, RAW_W, NUM_CAT)
            else:
                dpT += _mass_grad_mixed_t(CAT_b, offs_n, n_in, G_bh, offs_m, m_in, offs_c, NUM_CAT, DOT_DTYPE)
        dsT = ppT * dpT - phatT * delta[None, :]
        if HAS_MUL or HAS_ABS:
            dsT = dsT * _slope(qkT, en[None, :], ks[:, None], ka[:, None], qk_scale, ALL_EN, HAS_MUL, HAS_ABS)
        dk = tl.dot(dsT.to(DOT_DTYPE), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _fold_mass_grad(delta, G_bh, offs_m, m_in, code, wc, en, ALL_EN: tl.constexpr, RAW_W: tl.constexpr,
                    NUM_CAT: tl.constexpr):
    """Single-category tile (every non-PAD key has category `code`): dP' gains the row constant g_code, and
    P' dP' - Phat Delta = Phat (wpost dP - (Delta - wpost g_code)), so it folds into the row's delta."""
    g = tl.load(G_bh + offs_m * NUM_CAT + code, mask=m_in, other=0.0)
    if RAW_W:
        if ALL_EN:
            g = g * wc
        else:
            g = g * tl.where(en, wc, 1.0)
    return delta - g


@triton.jit
def _mass_grad_mixed_t(CAT_b, offs_n, n_in, G_bh, offs_m, m_in, offs_c, NUM_CAT: tl.constexpr,
                       DOT_DTYPE: tl.constexpr):
    """(BLOCK_N, BLOCK_M) g_{c_j}(i) for a mixed key block: one-hot (BLOCK_N, MASS_W) @ g^T at ~fp32 accuracy
    (the one-hot is rebuilt here, in the rare mixed branch, rather than held in registers across the loop)."""
    cat = tl.load(CAT_b + offs_n, mask=n_in, other=0).to(tl.int32)
    onehot = cat[:, None] == offs_c[None, :]
    gT = tl.load(G_bh + offs_m[None, :] * NUM_CAT + offs_c[:, None],
                 mask=m_in[None, :] & (offs_c[:, None] < NUM_CAT), other=0.0)  # (MASS_W, BLOCK_M)
    return _dot_fp32(onehot, gT, False, DOT_DTYPE)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, CAT, KV, TC, WTAB, ROW_EN, HEAD_EN, BLK, DO, LSE2, DELTA, G, DK, DV,  #
                   sm_scale,  #
                   stride_qb, stride_qh, stride_qm, stride_qd,  #
                   stride_kb, stride_kh, stride_kn, stride_kd,  #
                   stride_vb, stride_vh, stride_vn, stride_vd,  #
                   stride_dob, stride_doh, stride_dom, stride_dod,  #
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,  #
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,  #
                   stride_cb, stride_kvr, stride_tcb, stride_tcr,  #
                   H_Q, H_KV, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET,  #
                   GROUP: tl.constexpr,  # query heads per kv head
                   HEAD_DIM: tl.constexpr,  # D
                   BLOCK_D: tl.constexpr,  # D padded to a power of two
                   BLOCK_M: tl.constexpr,  # query rows per inner step
                   BLOCK_N: tl.constexpr,  # keys per program
                   NUM_CAT: tl.constexpr,  # categories (8)
                   MASS_W: tl.constexpr,  # one-hot width (16)
                   CAUSAL: tl.constexpr,  # bottom-right aligned causal mask
                   TRANSFORM: tl.constexpr,  # False: identity, PAD masking only
                   ALL_EN: tl.constexpr,  # every row and head enabled
                   HAS_MUL: tl.constexpr,  # some mul != 1
                   HAS_ABS: tl.constexpr,  # some absw != 0
                   RAW_W: tl.constexpr,  # raw weights with some w != 1
                   HAS_MASS_GRAD: tl.constexpr,  # G holds a mass gradient
                   MASS_PATH: tl.constexpr,  # 0: per key block (fold / dot), 2: always the dot
                   DOT_DTYPE: tl.constexpr,  # tl.dot operand dtype
                   DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands
                   BLOCKS: tl.constexpr,  # bidirectional block ids in BLK (triton_common.block_table)
                   WINDOW: tl.constexpr,  # sliding window (0: none)
                   ):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = off_bh // H_KV
    off_hkv = off_bh % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < K_LEN
    nd_in = n_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn
                + offs_d[None, :] * stride_kd, mask=nd_in, other=0.0).to(DOT_DTYPE)
    v = tl.load(V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :] * stride_vd, mask=nd_in, other=0.0).to(DOT_DTYPE)
    b_on, b_off, ks, ka, kw = _key_vectors(KV + off_b.to(tl.int64) * K_LEN, stride_kvr, offs_n, n_in, TRANSFORM,
                                           ALL_EN, HAS_MUL, HAS_ABS, RAW_W)
    CAT_b = CAT + off_b.to(tl.int64) * stride_cb
    if HAS_MASS_GRAD:
        code = tl.load(TC + off_b.to(tl.int64) * stride_tcb + (BLOCK_N // 16) * stride_tcr + start_n // BLOCK_N)
        wc = tl.load(WTAB + tl.maximum(code, 0))
    else:
        code = 0
        wc = 1.0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    causal_offset = K_LEN - Q_LEN

    BLK_b = BLK + off_b.to(tl.int64) * K_LEN  # (BLK_ROWS, B, K) contiguous, row stride = stride_kvr
    if BLOCKS:
        kblk = tl.load(BLK_b + offs_n, mask=n_in, other=0)
    else:
        kblk = offs_n * 0
    # row ranges: [m_start, m_mid) masked, [m_mid, m_full) unmasked, [m_full, m_hi) masked
    if CAUSAL:
        # rows [m_lo, m_mid) cross the diagonal of this key block (masked); rows [m_mid, Q_LEN) see all of it
        m_lo = (tl.maximum(start_n - causal_offset, 0) // BLOCK_M) * BLOCK_M
        m_lo = tl.minimum(m_lo, Q_LEN)
        diag_end = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), Q_LEN)
        m_mid = m_lo + ((tl.maximum(diag_end - m_lo, 0) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        m_start = m_lo
        if BLOCKS:  # earlier rows sharing a block with a key of this block see it too (not skipped)
            kfirst = tl.min(tl.load(BLK_b + 1 * stride_kvr + offs_n, mask=n_in, other=K_LEN), 0)
            m_start = tl.minimum(m_lo, (tl.maximum(kfirst - causal_offset, 0) // BLOCK_M) * BLOCK_M)
    else:
        m_start = 0
        m_mid = 0
    m_full = Q_LEN
    m_hi = Q_LEN
    if WINDOW > 0:  # rows past the window of the block's last key are skipped; rows seeing its first key are unmasked
        m_hi = tl.minimum(Q_LEN, tl.maximum(start_n + BLOCK_N - 1 + WINDOW - causal_offset, 0))
        full_end = start_n + WINDOW - causal_offset
        m_full = m_mid + (tl.maximum(full_end - m_mid, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.minimum(m_full, m_hi)
        if not CAUSAL:
            m_full = 0
    ROW_EN_b = ROW_EN + off_b * Q_LEN
    for g in range(GROUP):
        off_hq = off_hkv * GROUP + g
        bh = (off_b * H_Q + off_hq).to(tl.int64)
        q_base = Q + off_b.to(tl.int64) * stride_qb + off_hq.to(tl.int64) * stride_qh
        do_base = DO + off_b.to(tl.int64) * stride_dob + off_hq.to(tl.int64) * stride_doh
        if ALL_EN:
            head_en = True
        else:
            head_en = tl.load(HEAD_EN + off_hq) != 0
        if CAUSAL:
            if BLOCKS or WINDOW > 0:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, CAT_b, n_in, code, wc, b_on, b_off, ks, ka, kw, head_en, BLK_b, kblk,  #
                    q_base, do_base, ROW_EN_b, LSE2 + bh * Q_LEN, DELTA + bh * Q_LEN, G + bh * Q_LEN * NUM_CAT,  #
                    stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, Q_LEN, causal_offset, offs_n, offs_d,  #
                    m_start, m_mid,  #
                    HEAD_DIM, BLOCK_M, NUM_CAT, MASS_W, 2, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W,
                    HAS_MASS_GRAD, MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            else:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, CAT_b, n_in, code, wc, b_on, b_off, ks, ka, kw, head_en, BLK_b, kblk,  #
                    q_base, do_base, ROW_EN_b, LSE2 + bh * Q_LEN, DELTA + bh * Q_LEN, G + bh * Q_LEN * NUM_CAT,  #
                    stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, Q_LEN, causal_offset, offs_n, offs_d,  #
                    m_start, m_mid,  #
                    HEAD_DIM, BLOCK_M, NUM_CAT, MASS_W, 1, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W,
                    HAS_MASS_GRAD, MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, CAT_b, n_in, code, wc, b_on, b_off, ks, ka, kw, head_en, BLK_b, kblk,  #
            q_base, do_base, ROW_EN_b, LSE2 + bh * Q_LEN, DELTA + bh * Q_LEN, G + bh * Q_LEN * NUM_CAT,  #
            stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, Q_LEN, causal_offset, offs_n, offs_d,  #
            m_mid, m_full,  #
            HEAD_DIM, BLOCK_M, NUM_CAT, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W,
            HAS_MASS_GRAD, MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
        if WINDOW > 0:
            if CAUSAL:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, CAT_b, n_in, code, wc, b_on, b_off, ks, ka, kw, head_en, BLK_b, kblk,  #
                    q_base, do_base, ROW_EN_b, LSE2 + bh * Q_LEN, DELTA + bh * Q_LEN, G + bh * Q_LEN * NUM_CAT,  #
                    stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, Q_LEN, causal_offset, offs_n, offs_d,  #
                    tl.maximum(m_full, m_mid), m_hi,  #
                    HEAD_DIM, BLOCK_M, NUM_CAT, MASS_W, 2, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W,
                    HAS_MASS_GRAD, MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            else:
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, CAT_b, n_in, code, wc, b_on, b_off, ks, ka, kw, head_en, BLK_b, kblk,  #
                    q_base, do_base, ROW_EN_b, LSE2 + bh * Q_LEN, DELTA + bh * Q_LEN, G + bh * Q_LEN * NUM_CAT,  #
                    stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, Q_LEN, causal_offset, offs_n, offs_d,  #
                    tl.maximum(m_full, m_mid), m_hi,  #
                    HEAD_DIM, BLOCK_M, NUM_CAT, MASS_W, 3, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W,
                    HAS_MASS_GRAD, MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)

    if HAS_MUL or HAS_ABS:
        dk = dk * 0.6931471805599453  # ds carried dx/dqk = scale*log2(e)*dt/ds: ln 2 turns it into scale*dt/ds
    else:
        dk = dk * sm_scale
    tl.store(DK + off_b.to(tl.int64) * stride_dkb + off_hkv.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=nd_in)
    tl.store(DV + off_b.to(tl.int64) * stride_dvb + off_hkv.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=nd_in)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in,  #
                       K_ptr, V_ptr, KV_ptr, CAT_ptr, TC_ptr, WTAB, G_rows, BLK_ptr, qblk,  #
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr,  #
                       qk_scale, K_LEN, causal_offset, lo, hi,  #
                       HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_CAT: tl.constexpr,  #
                       MASS_W: tl.constexpr, MASK_CAUSAL: tl.constexpr, TRANSFORM: tl.constexpr,  #
                       ALL_EN: tl.constexpr, HAS_MUL: tl.constexpr, HAS_ABS: tl.constexpr, RAW_W: tl.constexpr,  #
                       HAS_MASS_GRAD: tl.constexpr, MASS_PATH: tl.constexpr, DOT_DTYPE: tl.constexpr,  #
                       DOT_PRECISION: tl.constexpr, BLOCKS: tl.constexpr, WINDOW: tl.constexpr):
    """Accumulate dq (BLOCK_M, BLOCK_D) of one query block over key blocks [lo, hi) (MASK_CAUSAL, BLK_ptr, qblk as
    in triton_fwd._attn_fwd_inner)."""
    d_in = offs_d < HEAD_DIM
    offs_c = tl.arange(0, MASS_W)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < K_LEN
        kT = tl.load(K_ptr + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0).to(DOT_DTYPE)
        vT = tl.load(V_ptr + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                     mask=n_in[None, :] & d_in[:, None], other=0.0).to(DOT_DTYPE)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
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
        phat = tl.math.exp2(x - lse2[:, None])
        if RAW_W:
            pp = phat * _wpost(en[:, None], kw[None, :], ALL_EN)
        else:
            pp = phat
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        delta_t = delta
        if HAS_MASS_GRAD:
            if MASS_PATH == 1:  # static report only: the single-category branch alone
                code = tl.load(TC_ptr + start_n // BLOCK_N)
                delta_t = _fold_mass_grad(delta, G_rows, offs_m, m_in, code, tl.load(WTAB + code), en, ALL_EN,
                                          RAW_W, NUM_CAT)
            elif MASS_PATH == 2:
                dp += _mass_grad_mixed(g, CAT_ptr, offs_n, n_in, offs_c, DOT_DTYPE)
            else:
                code = tl.load(TC_ptr + start_n // BLOCK_N)
                if code >= 0:
                    delta_t = _fold_mass_grad(delta, G_rows, offs_m, m_in, code, tl.load(WTAB + code), en, ALL_EN,
                                              RAW_W, NUM_CAT)
                else:
                    dp += _mass_grad_mixed(g, CAT_ptr, offs_n, n_in, offs_c, DOT_DTYPE)
        ds = pp * dp - phat * delta_t[:, None]
        if HAS_MUL or HAS_ABS:
            ds = ds * _slope(qk, en[:, None], ks[None, :], ka[None, :], qk_scale, ALL_EN, HAS_MUL, HAS_ABS)
        dq = tl.dot(ds.to(DOT_DTYPE), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _mass_grad_mixed(g, CAT_ptr, offs_n, n_in, offs_c, DOT_DTYPE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) g_{c_j}(i) for a mixed key block: g (BLOCK_M, MASS_W) @ one-hot^T at ~fp32 accuracy."""
    cat = tl.load(CAT_ptr + offs_n, mask=n_in, other=0).to(tl.int32)
    onehotT = offs_c[:, None] == cat[None, :]  # (MASS_W, BLOCK_N)
    return _dot_fp32(g, onehotT, True, DOT_DTYPE)


@triton.jit
def _attn_bwd_dq(Q, K, V, CAT, KV, TC, WTAB, ROW_EN, HEAD_EN, BLK, DO, LSE2, DELTA, G, DQ,  #
                 sm_scale,  #
                 stride_qb, stride_qh, stride_qm, stride_qd,  #
                 stride_kb, stride_kh, stride_kn, stride_kd,  #
                 stride_vb, stride_vh, stride_vn, stride_vd,  #
                 stride_dob, stride_doh, stride_dom, stride_dod,  #
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,  #
                 stride_cb, stride_kvr, stride_tcb, stride_tcr,  #
                 H_Q, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET,  #
                 GROUP: tl.constexpr,  # query heads per kv head
                 HEAD_DIM: tl.constexpr,  # D
                 BLOCK_D: tl.constexpr,  # D padded to a power of two
                 BLOCK_M: tl.constexpr,  # query rows per program
                 BLOCK_N: tl.constexpr,  # keys per inner step
                 NUM_CAT: tl.constexpr,  # categories (8)
                 MASS_W: tl.constexpr,  # one-hot width (16)
                 CAUSAL: tl.constexpr,  # bottom-right aligned causal mask
                 TRANSFORM: tl.constexpr,  # False: identity, PAD masking only
                 ALL_EN: tl.constexpr,  # every row and head enabled
                 HAS_MUL: tl.constexpr,  # some mul != 1
                 HAS_ABS: tl.constexpr,  # some absw != 0
                 RAW_W: tl.constexpr,  # raw weights with some w != 1
                 HAS_MASS_GRAD: tl.constexpr,  # G holds a mass gradient
                 MASS_PATH: tl.constexpr,  # 0: per key block (fold / dot), 2: always the dot
                 DOT_DTYPE: tl.constexpr,  # tl.dot operand dtype
                 DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 operands
                 BLOCKS: tl.constexpr,  # bidirectional block ids in BLK (triton_common.block_table)
                 WINDOW: tl.constexpr,  # sliding window (0: none)
                 ):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // H_Q
    off_hq = off_bh % H_Q
    off_hkv = off_hq // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Q_LEN
    md_in = m_in[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_hq.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=md_in, other=0.0).to(DOT_DTYPE)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_hq.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=md_in, other=0.0).to(DOT_DTYPE)
    rows = off_bh.to(tl.int64) * Q_LEN + offs_m
    lse2 = tl.load(LSE2 + rows, mask=m_in, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=m_in, other=0.0)
    if ALL_EN:
        en = m_in
    else:
        en = (tl.load(ROW_EN + off_b * Q_LEN + offs_m, mask=m_in, other=0) != 0) & (tl.load(HEAD_EN + off_hq) != 0)
    if HAS_MASS_GRAD:
        offs_c = tl.arange(0, MASS_W)
        g = tl.load(G + rows[:, None] * NUM_CAT + offs_c[None, :], mask=m_in[:, None] & (offs_c[None, :] < NUM_CAT),
                    other=0.0)  # (BLOCK_M, MASS_W)
    else:
        g = tl.zeros([BLOCK_M, MASS_W], dtype=tl.float32)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_hkv.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_hkv.to(tl.int64) * stride_vh
    cat_base = CAT + off_b.to(tl.int64) * stride_cb
    kv_base = KV + off_b.to(tl.int64) * K_LEN
    tc_base = TC + off_b.to(tl.int64) * stride_tcb + (BLOCK_N // 16) * stride_tcr
    g_rows = G + off_bh.to(tl.int64) * Q_LEN * NUM_CAT
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e)
    causal_offset = K_LEN - Q_LEN

    blk_base = BLK + off_b.to(tl.int64) * K_LEN  # (BLK_ROWS, B, K) contiguous, row stride = stride_kvr
    qblk = offs_m * 0
    if BLOCKS:
        qpos = offs_m + causal_offset
        q_ok = m_in & (qpos >= 0) & (qpos < K_LEN)
        qblk = tl.load(blk_base + qpos, mask=q_ok, other=0)
        qlast = tl.max(tl.load(blk_base + 2 * stride_kvr + qpos, mask=q_ok, other=0), 0)
    else:
        qlast = 0
    if CAUSAL:  # key ranges as in the forward (triton_fwd._category_attn_fwd)
        diag_lo = (tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N) * BLOCK_N
        diag_hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_offset, 0), K_LEN)
        diag_lo = tl.minimum(diag_lo, diag_hi)
        if BLOCKS or WINDOW > 0:
            lo, mid, hi = _query_tile_keys(start_m, causal_offset, K_LEN, diag_lo, diag_hi, qlast, BLOCK_M, BLOCK_N,
                                           BLOCKS, WINDOW)
            dq = _attn_bwd_dq_inner(
                dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, lo, mid,  #
                HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 2, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
                MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            dq = _attn_bwd_dq_inner(
                dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, mid, diag_lo,  #
                HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
                MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            dq = _attn_bwd_dq_inner(
                dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, diag_lo, hi,  #
                HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 2, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
                MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
        else:
            dq = _attn_bwd_dq_inner(
                dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, 0, diag_lo,  #
                HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
                MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
            dq = _attn_bwd_dq_inner(
                dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
                g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
                causal_offset, diag_lo, diag_hi,  #
                HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 1, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
                MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
    elif WINDOW > 0:
        lo = (tl.maximum(start_m + causal_offset - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        dq = _attn_bwd_dq_inner(
            dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
            g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
            causal_offset, tl.minimum(lo, K_LEN), K_LEN,  #
            HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 3, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
            MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)
    else:
        dq = _attn_bwd_dq_inner(
            dq, q, do, en, lse2, delta, g, offs_m, offs_d, m_in, k_base, v_base, kv_base, cat_base, tc_base, WTAB,
            g_rows, blk_base, qblk, stride_kn, stride_kd, stride_vn, stride_vd, stride_kvr, qk_scale, K_LEN,
            causal_offset, 0, K_LEN,  #
            HEAD_DIM, BLOCK_N, NUM_CAT, MASS_W, 0, TRANSFORM, ALL_EN, HAS_MUL, HAS_ABS, RAW_W, HAS_MASS_GRAD,
            MASS_PATH, DOT_DTYPE, DOT_PRECISION, BLOCKS, WINDOW)

    if HAS_MUL or HAS_ABS:
        dq = dq * 0.6931471805599453  # see _attn_bwd_dkdv
    else:
        dq = dq * sm_scale
    tl.store(DQ + off_b.to(tl.int64) * stride_dqb + off_hq.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=md_in)


# Autotune spaces (sm_90: spill-free and within shared memory per bench/kernel_static.py). The program's own
# dimension is the larger one, as in the tutorial's backward; the first fitting config is the pinned default.
DKDV_CONFIGS = [  # 128 keys x 16 rows: dk + dv (128 x 128 fp32 each) already take 128 registers per thread at
    # 8 warps; 32-row steps spill 4-52 B (bench/RESULTS.md), so they are left out
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 16}, num_stages=2, num_warps=8),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 16}, num_stages=3, num_warps=8),
]
DQ_CONFIGS = [  # (64 x 32 / 4 warps spills 4 B for the general kind: left out)
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_stages=2, num_warps=8),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_stages=3, num_warps=8),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_stages=2, num_warps=4),
]

_BWD_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "GROUP", "CAUSAL", "TRANSFORM", "ALL_EN", "HAS_MUL", "HAS_ABS",
                 "RAW_W", "HAS_MASS_GRAD", "DOT_DTYPE", "BLOCKS", "WINDOW"]
_attn_bwd_dkdv_tuned = triton.autotune(configs=DKDV_CONFIGS, key=_BWD_TUNE_KEY, prune_configs_by={
    "early_config_prune": prune_by_rows("BLOCK_N", "K_LEN")})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(configs=DQ_CONFIGS, key=_BWD_TUNE_KEY, prune_configs_by={
    "early_config_prune": prune_by_rows("BLOCK_M", "Q_LEN")})(_attn_bwd_dq)

INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}
PREPROCESS_BLOCK_M = 64


def backward_launch(do, q, k, v, ops: KernelOperands, out, lse, mass, dmass, dlse, delta, lse2, dq, dk, dv, *,
                    scale: float, causal: bool, mass_path: int = 0):
    """Launch arguments of the three backward kernels: ((pre_args, pre_meta), (dkdv_args, meta), (dq_args, meta)).

    `meta` lacks BLOCK_M / BLOCK_N (autotuned or pinned by the caller); delta, lse2 (B,Hq,Q) fp32 are outputs of
    the preprocess kernel; dmass / dlse None mean no gradient reaches mass / lse."""
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    has_mass_grad = dmass is not None
    g = dmass if has_mass_grad else lse  # placeholder pointer when unused
    bd = block_d(D)
    pre_args = (out, do, lse, mass if has_mass_grad else lse, g, lse if dlse is None else dlse, delta, lse2,
                *out.stride(), *do.stride(), Hq, Q)
    pre_meta = dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=PREPROCESS_BLOCK_M, NUM_CAT=NUM_CATEGORIES,
                    HAS_MASS_GRAD=has_mass_grad, HAS_LSE_GRAD=dlse is not None)
    ddt = dot_dtype(q.dtype)
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=bd, NUM_CAT=NUM_CATEGORIES, MASS_W=MASS_WIDTH,
                CAUSAL=bool(causal), **ops.flags(), HAS_MASS_GRAD=has_mass_grad, MASS_PATH=int(mass_path),
                DOT_DTYPE=ddt, DOT_PRECISION=dot_precision(ddt))
    common = (q, k, v, ops.cat, ops.kv, ops.tc, ops.wtab, ops.row_en, ops.head_en, ops.blk, do, lse2, delta, g)
    op_strides = (ops.cat.stride(0), ops.kv.stride(0), ops.tc.stride(0), ops.tc.stride(1))
    dkdv_args = (*common, dk, dv, float(scale), *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
                 *dv.stride(), *op_strides, Hq, Hkv, Q, K, length_bucket(Q), length_bucket(K))
    dq_args = (*common, dq, float(scale), *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
               *op_strides, Hq, Q, K, length_bucket(Q), length_bucket(K))
    return (pre_args, pre_meta), (dkdv_args, meta), (dq_args, meta)


def attention_backward(do, q, k, v, ops: KernelOperands, out, lse, mass, dmass, dlse, *, scale: float, causal: bool,
                       block_m: int | None = None, block_n: int | None = None, mass_path: int = 0):
    """Gradients (dq, dk, dv) shaped and typed like (q, k, v).

    do (B,Hq,Q,D) upstream of out; dmass (B,Hq,Q,NUM_CATEGORIES) or None (mass unused); dlse (B,Hq,Q) or None.
    The other arguments are the forward's inputs and outputs (`triton_fwd.attention_forward`); a mass gradient
    needs `ops` built with tile codes.
    """
    B, Hq, Q, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    dq = triton_common.new_output(q.shape, q.dtype, q.device)
    dk = triton_common.new_output(k.shape, k.dtype, k.device)
    dv = triton_common.new_output(v.shape, v.dtype, v.device)
    if B * Hq * Q == 0 or K == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = do if do.stride(-1) == 1 else do.contiguous()
    dmass = None if dmass is None else dmass.to(torch.float32).contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    delta = triton_common.new_output(lse.shape, torch.float32, lse.device)
    lse2 = triton_common.new_output(lse.shape, torch.float32, lse.device)
    (pre_args, pre_meta), (dkdv_args, meta), (dq_args, _) = backward_launch(
        do, q, k, v, ops, out, lse, mass, dmass, dlse, delta, lse2, dq, dk, dv, scale=scale, causal=causal,
        mass_path=mass_path)
    _attn_bwd_preprocess[(triton.cdiv(Q, PREPROCESS_BLOCK_M), B * Hq)](*pre_args, **pre_meta)
    if block_m is None and not interpreting():
        _attn_bwd_dkdv_tuned[lambda META: (triton.cdiv(K, META["BLOCK_N"]), B * Hkv)](*dkdv_args, **meta)
        _attn_bwd_dq_tuned[lambda META: (triton.cdiv(Q, META["BLOCK_M"]), B * Hq)](*dq_args, **meta)
    else:
        bm = block_m or INTERPRETER_BLOCKS["BLOCK_M"]
        bn = block_n or INTERPRETER_BLOCKS["BLOCK_N"]
        _attn_bwd_dkdv[(triton.cdiv(K, bn), B * Hkv)](*dkdv_args, BLOCK_M=bm, BLOCK_N=bn, **meta)
        _attn_bwd_dq[(triton.cdiv(Q, bm), B * Hq)](*dq_args, BLOCK_M=bm, BLOCK_N=bn, **meta)
    return dq, dk, dv


__all__ = ["attention_backward", "backward_launch", "LOG2E"]

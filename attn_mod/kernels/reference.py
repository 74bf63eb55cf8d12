"""The attention operator in plain PyTorch: the spec in code (CPU path and oracle for every backend).

For an enabled (row i, head h) and a visible key j of category c = cat[j]  (see `spec.py` for shapes):

    s_ij  = scale * q_i . k_j
    s'_ij = mul[c] * s_ij + absw[c] * |s_ij| + add[c]             # pre-softmax transform
    P_ij  = softmax_j(s'_ij)
    P'_ij = w[c] * P_ij                          (renorm=False)  # raw post-softmax scaling
          = w[c] * P_ij / sum_k w[c_k] P_ik      (renorm=True)   # == softmax_j(s'_ij + log w[c])
    o_i   = sum_j P'_ij v_j
    mass_c(i) = sum_{j in c} P'_ij

Disabled rows/heads use the identity transform. Visible (spec.py), with p_i = K - Q + i (bottom-right alignment):
category != PAD, and when causal j <= p_i or (block[j] != 0 and block[j] == block[p_i]) (bidirectional blocks),
and with a window p_i - j < window (sliding window). Rows with nothing visible give zeros.

Differentiable by autograd (outputs, LSE and masses). Query rows are processed in chunks so inference
memory is O(chunk * K), never O(Q * K); under autograd each chunk is checkpointed (recomputed in backward), so
training memory is O(Q) plus one chunk.

`category_attention_rows` returns the per-key P'_ij themselves for a few selected query rows (for
pictures of where a row looks); it runs the same code path, so summing its rows by category gives `mass`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils.checkpoint

from .spec import NUM_CATEGORIES, AttentionOutput, CategoryTransform, check_inputs, default_scale

_CHUNK_ELEMENTS = 1 << 20  # score elements per query chunk (x ~5 temporaries of the compute dtype)


class _Prepared(NamedTuple):
    """Inputs of one operator call laid out for the row passes (GQA groups kept, never expanded)."""

    qg: torch.Tensor  # (B, Hkv, G, Q, D)
    kc: torch.Tensor  # (B, Hkv, K, D) in the compute dtype
    enable: torch.Tensor  # (B, Hkv, G, Q, 1) bool: transform applies
    key_visible: torch.Tensor  # (B, 1, 1, 1, K) bool: category != PAD
    tables: tuple  # per-key (mul, absw, add, w, log w), each (B, 1, 1, 1, K) or None when trivial
    renorm: bool
    scale: float
    cdtype: torch.dtype
    block: torch.Tensor | None  # (B, K) long block ids (0 = none) or None
    window: int | None


def _prepare(q, k, cat, transform, scale, row_enable, head_enable, block=None, window=None) -> _Prepared:
    B, Hq, Q, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = default_scale(D) if scale is None else float(scale)
    transform = CategoryTransform.identity() if transform is None else transform
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    tr = transform.to(dev)
    cat = cat.to(device=dev, dtype=torch.long)
    if cat.numel() and (cat.min() < 0 or cat.max() >= NUM_CATEGORIES):
        raise ValueError(f"key categories must lie in 0..{NUM_CATEGORIES - 1}, got {cat.min().item()}..{cat.max().item()}")

    # Per-key tables, shaped to broadcast against scores (B, Hkv, G, q, K); trivial tables are skipped.
    def per_key(table):
        return table.to(cdtype)[cat][:, None, None, None, :]

    mul_k = per_key(tr.mul) if bool((tr.mul != 1).any()) else None
    absw_k = per_key(tr.absw) if bool((tr.absw != 0).any()) else None
    add_k = per_key(tr.add) if bool((tr.add != 0).any()) else None
    w_k = per_key(tr.w) if bool((tr.w != 1).any()) else None
    logw_k = torch.log(w_k) if w_k is not None and transform.renorm else None  # -inf where w == 0

    enable = torch.ones(B, Hq, Q, dtype=torch.bool, device=dev)
    if row_enable is not None:
        enable = enable & row_enable.to(dev, torch.bool)[:, None, :]
    if head_enable is not None:
        enable = enable & head_enable.to(dev, torch.bool)[None, :, None]
    return _Prepared(q.reshape(B, Hkv, G, Q, D), k.to(cdtype), enable.view(B, Hkv, G, Q, 1),
                     (cat != 0)[:, None, None, None, :], (mul_k, absw_k, add_k, w_k, logw_k), transform.renorm,
                     scale, cdtype, None if block is None else block.to(device=dev, dtype=torch.long), window)


def _on_enabled(new, old, en, en_all):
    return new if en_all else torch.where(en, new, old)


def _row_pass(pre: _Prepared, rows, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """P' (B, Hkv, G, r, K) and lse (B, Hkv, G, r, 1) of the query rows `rows` (a slice or index tensor into Q)."""
    Q, K = pre.qg.shape[3], pre.kc.shape[2]
    cdtype, dev = pre.cdtype, pre.qg.device
    mul_k, absw_k, add_k, w_k, logw_k = pre.tables
    en = pre.enable[:, :, :, rows]
    en_all = bool(en.all())
    s = pre.scale * torch.einsum("bhgqd,bhkd->bhgqk", pre.qg[:, :, :, rows].to(cdtype), pre.kc)
    t = s
    if mul_k is not None or absw_k is not None or add_k is not None:  # s' = mul*s + absw*|s| + add
        t = s * mul_k if mul_k is not None else s
        if absw_k is not None:
            t = t + absw_k * s.abs()
        if add_k is not None:
            t = t + add_k
        t = _on_enabled(t, s, en, en_all)
    if logw_k is not None:  # renorm: softmax(s' + log w)
        t = t + _on_enabled(logw_k, torch.zeros((), dtype=cdtype, device=dev), en, en_all)
    visible = pre.key_visible & _position_visible(pre, rows, causal, Q, K)
    ex = t.masked_fill(~visible, float("-inf"))
    # Safe softmax / log-sum-exp: finite values and gradients even for rows with nothing visible.
    m = ex.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(ex - m)
    sumexp = e.sum(dim=-1, keepdim=True)
    nonempty = sumexp > 0
    sumexp = torch.where(nonempty, sumexp, torch.ones_like(sumexp))
    p = e / sumexp
    if w_k is not None and not pre.renorm:  # raw: P' = w * softmax(s')
        p = p * _on_enabled(w_k, torch.ones((), dtype=cdtype, device=dev), en, en_all)
    lse = torch.where(nonempty, m + torch.log(sumexp), torch.full_like(m, float("-inf")))
    return p, lse


def _position_visible(pre: _Prepared, rows, causal: bool, Q: int, K: int):
    """(B or 1, 1, 1, r, K) bool: causal / block / window visibility of the keys from the rows `rows` (spec.py)."""
    dev = pre.qg.device
    row_pos = torch.arange(Q, device=dev)[rows] + (K - Q)  # (r,) key position of each row
    keys = torch.arange(K, device=dev)
    vis = torch.ones(1, row_pos.numel(), K, dtype=torch.bool, device=dev)
    if causal:
        vis = vis & (keys[None, :] <= row_pos[:, None])[None]
        if pre.block is not None:
            qblk = torch.where(row_pos >= 0, pre.block[:, row_pos.clamp(min=0)], 0)  # (B, r)
            vis = vis | ((pre.block[:, None, :] == qblk[:, :, None]) & (qblk[:, :, None] != 0))
    if pre.window is not None:
        vis = vis & ((row_pos[:, None] - keys[None, :]) < pre.window)[None]
    return vis[:, None, None]


def category_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cat: torch.Tensor,
    transform: CategoryTransform | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    row_enable: torch.Tensor | None = None,
    head_enable: torch.Tensor | None = None,
    return_mass: bool = False,
    chunk_size: int | None = None,
    block: torch.Tensor | None = None,
    window: int | None = None,
) -> AttentionOutput:
    """Category-transformed attention. Shapes, LSE convention, block ids and window: `attn_mod.kernels.spec`."""
    check_inputs(q, k, v, cat, row_enable, head_enable, block, window)
    B, Hq, Q, D = q.shape
    K = k.shape[2]
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    if Q == 0:
        mass = q.new_zeros(B, Hq, 0, NUM_CATEGORIES, dtype=cdtype) if return_mass else None
        return AttentionOutput(q.new_zeros(B, Hq, 0, D), q.new_zeros(B, Hq, 0, dtype=cdtype), mass)
    pre = _prepare(q, k, cat, transform, scale, row_enable, head_enable, block, window)
    vc = v.to(cdtype)
    onehot = (torch.nn.functional.one_hot(cat.to(device=q.device, dtype=torch.long), NUM_CATEGORIES).to(cdtype)
              if return_mass else None)

    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * K))

    def rows_of(r0: int):
        p, lse = _row_pass(pre, slice(r0, min(Q, r0 + chunk_size)), causal)
        o = torch.einsum("bhgqk,bhkd->bhgqd", p, vc)
        return (o, lse.squeeze(-1), torch.einsum("bhgqk,bkc->bhgqc", p, onehot)) if return_mass else (o, lse.squeeze(-1))

    # Training: each chunk's P is recomputed in backward instead of saved (non-reentrant checkpoint), so the
    # memory kept for backward is O(Q) outputs plus one chunk's O(chunk * K) at a time, never O(Q * K).
    grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v)) or (
        transform is not None and any(getattr(transform, n).requires_grad for n in ("mul", "absw", "add", "w"))))
    outs, lses, masses = [], [], []
    for r0 in range(0, Q, chunk_size):
        res = (torch.utils.checkpoint.checkpoint(rows_of, r0, use_reentrant=False) if grad and Q > chunk_size
               else rows_of(r0))
        outs.append(res[0])
        lses.append(res[1])
        if return_mass:
            masses.append(res[2])

    out = torch.cat(outs, dim=3).reshape(B, Hq, Q, D).to(q.dtype)
    lse = torch.cat(lses, dim=3).reshape(B, Hq, Q)
    mass = torch.cat(masses, dim=3).reshape(B, Hq, Q, NUM_CATEGORIES) if return_mass else None
    return AttentionOutput(out, lse, mass)


def category_attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    cat: torch.Tensor,
    transform: CategoryTransform | None = None,
    *,
    rows: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    row_enable: torch.Tensor | None = None,
    head_enable: torch.Tensor | None = None,
    block: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """P'_ij for the selected query rows: (B, Hq, R, K) fp32 (fp64 for fp64 q); zero on PAD / hidden keys.

    Same arguments as `category_attention_reference` (v is not needed); `rows` (R,) int indices into the
    Q query rows (row i sits at key position K - Q + i when causal). Memory O(B * Hq * R * K). Summing
    a row over the keys of category c gives exactly that row's `mass[..., c]` of the operator.
    """
    check_inputs(q, k, k, cat, row_enable, head_enable, block, window)
    B, Hq, Q, _ = q.shape
    K = k.shape[2]
    rows = torch.as_tensor(rows, dtype=torch.long, device=q.device).reshape(-1)
    if rows.numel() and (rows.min() < 0 or rows.max() >= Q):
        raise ValueError(f"rows must index the {Q} query rows (0..{Q - 1}), got {rows.tolist()}")
    if Q == 0 or rows.numel() == 0:
        return q.new_zeros(B, Hq, rows.numel(), K, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    p, _ = _row_pass(_prepare(q, k, cat, transform, scale, row_enable, head_enable, block, window), rows, causal)
    return p.reshape(B, Hq, rows.numel(), K)

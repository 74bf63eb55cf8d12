"""The category attention operator on FlexAttention (`torch.nn.attention.flex_attention`): an independent check.

Same contract as reference.py. How each part maps onto FlexAttention:
  transform        score_mod: t = mul[c]*s + absw[c]*|s| + add[c] on enabled (row, head), plus log w[c] for renorm
  PAD / causal     mask_mod -> block_mask (never a dense N x N mask); renorm keys with w = 0 are masked too,
  block / window   in the same mask_mod: (causal or same nonzero block id) and p - j < window (spec.py)
                   so a row whose every visible key has w = 0 is empty (lse = -inf, out = 0), as in the reference
  LSE              flex's own log-sum-exp of the score_mod scores = the spec's LSE in both modes
  raw mode         out = Z * out_w, with out_w the attention under t + log w and Z = exp(lse_w - lse) = sum_j w_j P_ij
  masses           one call per category c masked to keys of c: mass_c = exp(lse_c - lse) (times w_c on enabled
                   raw rows), i.e. masses via LSE differences; costs NUM_CATEGORIES - 1 extra calls

CPU: FlexAttention runs forward-only (eager, unfused; torch raises for inputs that require grad). CUDA: compiled
with torch.compile, gradients to q, k, v through out, lse and mass (flex differentiates its LSE).
"""

from __future__ import annotations

import warnings

import torch

from .spec import NUM_CATEGORIES, AttentionOutput, CategoryTransform, check_inputs, default_scale

_COMPILED = {}


def _flex():
    from torch.nn.attention import flex_attention as fa

    return fa


def _flex_call(q, k, v, score_mod, block_mask, scale):
    """(out, lse) of one FlexAttention call; compiled on CUDA, eager (warning silenced) elsewhere."""
    fa = _flex()
    if q.device.type == "cuda":
        fn = _COMPILED.setdefault("flex", torch.compile(fa.flex_attention, dynamic=False))
    else:
        fn = fa.flex_attention
    kw = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        if hasattr(fa, "AuxRequest"):
            out, aux = fn(q, k, v, return_aux=fa.AuxRequest(lse=True), **kw)
            return out, aux.lse
        return fn(q, k, v, return_lse=True, **kw)


def flex_category_attention(
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
    block: torch.Tensor | None = None,
    window: int | None = None,
) -> AttentionOutput:
    """Category attention on FlexAttention; shapes, LSE convention, block ids and window of `spec.py`."""
    check_inputs(q, k, v, cat, row_enable, head_enable, block, window)
    if q.device.type != "cuda" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            f"backend='flex' has no backward on {q.device.type}: FlexAttention in torch {torch.__version__} supports "
            "backward only on CUDA. Use backend='torch' (or detach the inputs for a forward-only check).")
    fa = _flex()
    B, Hq, Q, D = q.shape
    K = k.shape[2]
    dev = q.device
    scale = default_scale(D) if scale is None else float(scale)
    tr = (CategoryTransform.identity() if transform is None else transform)
    tr.validate()
    tr = tr.to(dev)
    renorm = tr.renorm
    transform_on = not tr.is_identity()
    if Q == 0 or K == 0:
        from .reference import category_attention_reference

        return category_attention_reference(q, k, v, cat, transform, scale=scale, causal=causal,
                                            row_enable=row_enable, head_enable=head_enable, return_mass=return_mass,
                                            block=block, window=window)
    cat = cat.to(device=dev, dtype=torch.long)
    if cat.min() < 0 or cat.max() >= NUM_CATEGORIES:
        raise ValueError(f"key categories must lie in 0..{NUM_CATEGORIES - 1}")
    row_en = (torch.ones(B, Q, dtype=torch.bool, device=dev) if row_enable is None
              else row_enable.to(dev, torch.bool))
    head_en = (torch.ones(Hq, dtype=torch.bool, device=dev) if head_enable is None
               else head_enable.to(dev, torch.bool))
    mul, absw, add, w = tr.mul, tr.absw, tr.add, tr.w
    logw = torch.where(w > 0, torch.log(w.clamp_min(1e-30)), torch.zeros_like(w))  # w == 0 keys are masked
    offset = K - Q
    if block is not None:
        blk = block.to(device=dev, dtype=torch.long)
        # the block id of each query row's own key position (0 for rows before the first key)
        qpos = torch.arange(Q, device=dev) + offset
        qblk = torch.where(qpos >= 0, blk[:, qpos.clamp(min=0)], torch.zeros((), dtype=torch.long, device=dev))

    def transformed(score, b, h, q_idx, kv_idx, with_logw):
        c = cat[b, kv_idx]
        t = mul[c] * score + absw[c] * torch.abs(score) + add[c]
        if with_logw:
            t = t + logw[c]
        return torch.where(row_en[b, q_idx] & head_en[h], t, score)

    def score_lse(score, b, h, q_idx, kv_idx):  # the scores whose log-sum-exp is the spec's LSE
        return transformed(score, b, h, q_idx, kv_idx, renorm)

    def score_w(score, b, h, q_idx, kv_idx):  # raw mode: t + log w, whose softmax is w P / sum(w P)
        return transformed(score, b, h, q_idx, kv_idx, True)

    def make_mask(only_cat=None, drop_zero_w=renorm):
        def mask_mod(b, h, q_idx, kv_idx):
            c = cat[b, kv_idx]
            keep = c != 0
            if causal:
                seen = kv_idx <= q_idx + offset
                if block is not None:
                    qb = qblk[b, q_idx]
                    seen = seen | ((blk[b, kv_idx] == qb) & (qb != 0))
                keep = keep & seen
            if window is not None:
                keep = keep & (q_idx + offset - kv_idx < window)
            if only_cat is not None:
                keep = keep & (c == only_cat)
            if transform_on and drop_zero_w:
                keep = keep & ~((w[c] == 0) & row_en[b, q_idx] & head_en[h])
            return keep

        return fa.create_block_mask(mask_mod, B, Hq, Q, K, device=dev)

    smod = score_lse if transform_on else None
    out, lse = _flex_call(q, k, v, smod, make_mask(), scale)
    finite = torch.isfinite(lse)
    en = row_en[:, None, :] & head_en[None, :, None]  # (B, Hq, Q)
    raw_rows = en & (not renorm) & transform_on
    if transform_on and not renorm:
        out_w, lse_w = _flex_call(q, k, v, score_w, make_mask(drop_zero_w=True), scale)
        ok = finite & torch.isfinite(lse_w)
        z = torch.exp(torch.where(ok, lse_w - lse, torch.full_like(lse, float("-inf"))))
        out = torch.where(raw_rows[..., None], (z[..., None] * out_w.float()).to(out.dtype), out)

    mass = None
    if return_mass:
        cols = [torch.zeros_like(lse)]  # PAD never receives mass
        for c in range(1, NUM_CATEGORIES):
            _, lse_c = _flex_call(q, k, v, smod, make_mask(only_cat=c), scale)
            ok = finite & torch.isfinite(lse_c)
            m_c = torch.exp(torch.where(ok, lse_c - lse, torch.full_like(lse, float("-inf"))))
            if transform_on and not renorm:
                m_c = m_c * torch.where(raw_rows, w[c], torch.ones_like(w[c]))
            cols.append(m_c)
        mass = torch.stack(cols, dim=-1).float()
    return AttentionOutput(out, lse.float(), mass)

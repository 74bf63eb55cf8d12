"""AVAR attention-guided training objectives (AGTO) on captured masses. The formulas live here and only here.

Inputs come from `attn_mod.capture(model, layers=..., detach=False)` around a teacher-forced forward:
masses (L, B, Hq, S, C) (query rows = the last S key slots), key-slot categories (B, K) and a (B, S) bool
query-row set Q. "Image" mass is IMAGE + TARGET; n_X(l, i) = number of keys of set X visible to row i in
layer l (causal, padding excluded; within the layer's sliding window and with Gemma3's bidirectional image
blocks where the model has them: `windows` / `block_ids`; `attn_mod.metrics.visible_counts`).

For every layer l in the captured set, head h in `heads`, sample b:

    m_X(l, h, b) = mean_{i in Q_b, n_X(l, i) > 0}  mass_X(l, h, b, i) / n_X(l, i)        X in {img, sys}

    L_img = - mean_{(l, b) in B_img, h}  log(m_img(l, h, b) + eps)
    L_sys = + mean_{(l, b) in B_sys, h}  log(m_sys(l, h, b) + eps)
    L     =   L_LM + lambda_img L_img + lambda_sys L_sys          (lambda_img = lambda_sys = 0.15, eps = 1e-6)

B_X (coverage) = the (layer, sample) pairs with at least one row of Q that sees a key of X in that layer (with
full attention in every layer: the samples with such a row, in all layers). A sample without image keys (or
without a system turn) adds nothing to that term; with no covered pair the term is exactly 0. Rows of Q that see
no key of X (e.g. prompt rows before the image, or past a sliding window) are left out of m_X. `samples_X` in
the logs counts the samples covered in at least one layer.

Q ("query" option): "response" (default) = rows whose tokens carry LM loss (labels != -100: the assistant
reply, its end-of-turn token included; RESPONSE category when no labels are given); "prompt" = non-pad rows
before the first response row (the released AVAR code's prompt span).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..categories import IMAGE, PAD, RESPONSE, SYSTEM, TARGET
from ..kernels.spec import NUM_CATEGORIES
from ..metrics import layer_visible_counts

AGTO_EPS = 1e-6
AGTO_LAMBDA = 0.15
QUERY_SETS = ("response", "prompt")


@dataclass(frozen=True)
class AGTOResult:
    """The two AGTO terms (0-dim tensors, differentiable) and how many samples each covered."""

    loss_img: torch.Tensor
    loss_sys: torch.Tensor
    samples_img: int
    samples_sys: int


def agto_rows(query_cats: torch.Tensor, labels: torch.Tensor | None = None, query: str = "response") -> torch.Tensor:
    """(B, S) bool query-row set Q from query-row categories (B, S) and HF labels (B, S) (-100 = no loss)."""
    if query_cats.dim() != 2:
        raise ValueError(f"query categories must be (B, S), got shape {tuple(query_cats.shape)}")
    if labels is not None and labels.shape != query_cats.shape:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the query rows are {tuple(query_cats.shape)}; "
                         "pass the unshifted labels aligned with input_ids")
    cats = query_cats.long()
    valid = cats != PAD
    response = (labels != -100) if labels is not None else cats == RESPONSE
    response = response.to(cats.device) & valid
    if query == "response":
        return response
    if query == "prompt":
        S = cats.shape[1]
        pos = torch.arange(S, device=cats.device).expand_as(cats)
        first = torch.where(response, pos, torch.full_like(pos, S)).amin(dim=1, keepdim=True)
        return valid & (pos < first)
    raise ValueError(f"query must be one of {QUERY_SETS}, got {query!r}")


def _head_mask(heads, num_heads: int, device) -> torch.Tensor:
    """(Hq,) bool from None (all heads), a sequence of head indices or an (Hq,) bool tensor."""
    if heads is None or (isinstance(heads, str) and heads == "all"):
        return torch.ones(num_heads, dtype=torch.bool, device=device)
    if isinstance(heads, torch.Tensor) and heads.dtype == torch.bool:
        if heads.shape != (num_heads,):
            raise ValueError(f"head mask must have shape ({num_heads},), got {tuple(heads.shape)}")
        mask = heads.to(device)
    else:
        from ..intervention import _resolve_indices

        idx = _resolve_indices(heads, num_heads, "head", "query heads")
        mask = torch.zeros(num_heads, dtype=torch.bool, device=device)
        mask[list(idx)] = True
    if not mask.any():
        raise ValueError("heads selects no head; pass None for all heads or a non-empty list")
    return mask


def _check_masses(masses: torch.Tensor, rows: torch.Tensor, key_cats: torch.Tensor | None) -> None:
    if masses.dim() != 5 or masses.shape[-1] != NUM_CATEGORIES:
        raise ValueError(f"masses must be (L, B, Hq, S, {NUM_CATEGORIES}) (rec.masses()), got {tuple(masses.shape)}")
    _, B, _, S, _ = masses.shape
    if rows.shape != (B, S):
        raise ValueError(f"rows have shape {tuple(rows.shape)}, expected (B, S) = {(B, S)}")
    if key_cats is not None and (key_cats.dim() != 2 or key_cats.shape[0] != B or key_cats.shape[1] < S):
        raise ValueError(f"key categories have shape {tuple(key_cats.shape)}, expected (B, K >= {S}) with B = {B}")


def _term(per_row: torch.Tensor, usable: torch.Tensor, eps: float, sign: float) -> tuple[torch.Tensor, int]:
    """per_row (L, B, H, S) = mass_X / n_X; usable (L, B, S) rows of Q seeing X in that layer
    -> (sign * mean over covered (l, b) and h of log(m_X + eps), #samples covered in some layer)."""
    n = usable.sum(dim=-1)  # (L, B)
    covered = n > 0
    count = int(covered.any(dim=0).sum())
    if count == 0:
        return per_row.new_zeros(()), 0
    u = usable.to(per_row.dtype)
    m = (per_row * u[:, :, None, :]).sum(-1) / n.clamp_min(1).to(per_row.dtype)[:, :, None]  # (L, B, H)
    logs = torch.log(m + eps)
    return sign * logs[covered[:, :, None].expand_as(logs)].mean(), count


def agto_losses(masses: torch.Tensor, key_cats: torch.Tensor, rows: torch.Tensor, *, heads=None,
                eps: float = AGTO_EPS, windows=None, block_ids: torch.Tensor | None = None) -> AGTOResult:
    """L_img, L_sys (module docstring) from masses (L, B, Hq, S, C), key categories (B, K), rows Q (B, S) bool.
    windows (one per layer of masses, None = full) / block_ids (B, K): sliding windows and image blocks (Gemma3;
    `rec.windows()`, `rec.block_ids`) so that n_X counts the keys each row sees; default causal, full."""
    _check_masses(masses, rows, key_cats)
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    m = masses.to(torch.promote_types(masses.dtype, torch.float32))
    m = m[:, :, _head_mask(heads, m.shape[2], m.device)]
    S = m.shape[3]
    counts = layer_visible_counts(key_cats.to(m.device), S, m.shape[0], windows=windows,
                                  block_ids=block_ids).to(m.dtype)  # (L, B, S, C)
    n_img = counts[..., IMAGE] + counts[..., TARGET]
    n_sys = counts[..., SYSTEM]
    q = rows.to(m.device).bool()
    img = (m[..., IMAGE] + m[..., TARGET]) / n_img.clamp_min(1)[:, :, None, :]
    sys_ = m[..., SYSTEM] / n_sys.clamp_min(1)[:, :, None, :]
    loss_img, samples_img = _term(img, q & (n_img > 0), eps, -1.0)
    loss_sys, samples_sys = _term(sys_, q & (n_sys > 0), eps, +1.0)
    return AGTOResult(loss_img, loss_sys, samples_img, samples_sys)


def sft_objective(loss_lm: torch.Tensor, agto: AGTOResult, *, lambda_img: float = AGTO_LAMBDA,
                  lambda_sys: float = AGTO_LAMBDA) -> torch.Tensor:
    """L = L_LM + lambda_img L_img + lambda_sys L_sys (in the wider dtype of the terms)."""
    return loss_lm + lambda_img * agto.loss_img + lambda_sys * agto.loss_sys


__all__ = ["AGTOResult", "AGTO_EPS", "AGTO_LAMBDA", "QUERY_SETS", "agto_losses", "agto_rows", "sft_objective"]

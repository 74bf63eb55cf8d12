"""PRIVATE test stand-in for attn_mod.trainers.losses (OBJECTIVES_API.md) until the `objectives` branch is merged.

Installed only by tests/train_helpers.install_losses_standin() when the real module is missing; never used once
attn_mod/trainers/losses.py exists."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attn_mod.categories import IMAGE, PAD, SYSTEM, TARGET
from attn_mod.metrics import visible_counts


@dataclass(frozen=True)
class AGTOResult:
    loss_img: torch.Tensor
    loss_sys: torch.Tensor
    samples_img: int
    samples_sys: int


def agto_rows(query_cats, labels=None, query="response"):
    if query == "response":
        return labels != -100
    pos = torch.arange(query_cats.shape[1], device=query_cats.device).expand_as(query_cats)
    first = torch.where(labels != -100, pos, torch.full_like(pos, query_cats.shape[1])).amin(1, keepdim=True)
    return (query_cats != PAD) & (pos < first)


def agto_losses(masses, key_cats, rows, *, heads=None, eps=1e-6):
    L, B, H, S, C = masses.shape
    if heads is not None:
        masses = masses[:, :, list(heads)]
    counts = visible_counts(key_cats.to(masses.device), S).to(masses.dtype)
    out = []
    for codes in ((IMAGE, TARGET), (SYSTEM,)):
        n = sum(counts[..., c] for c in codes)  # (B, S)
        m = sum(masses[..., c] for c in codes)  # (L, B, H, S)
        use = rows & (n > 0)
        ratio = torch.where(use[None, :, None], m / n.clamp_min(1)[None, :, None], torch.zeros_like(m))
        k = use.sum(1)
        mean = ratio.sum(-1) / k.clamp_min(1)[None, :, None]
        has = k > 0
        lg = torch.log(mean + eps)[:, has]
        out.append((lg.mean() if has.any() else masses.new_zeros(()), int(has.sum())))
    (li, ni), (ls, ns) = out
    return AGTOResult(-li, ls, ni, ns)


def sft_objective(loss_lm, agto, *, lambda_img=0.15, lambda_sys=0.15):
    return loss_lm + lambda_img * agto.loss_img + lambda_sys * agto.loss_sys

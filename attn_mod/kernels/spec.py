"""The operator's data contract, shared by every backend (reference, Triton, Flex).

    q (B, Hq, Q, D), k / v (B, Hkv, K, D) with Hq % Hkv == 0 (GQA, never expanded)
    cat (B, K) integer key categories in [0, NUM_CATEGORIES), 0 = PAD (never attended)
    transform: per-category tables mul / absw / add / w (NUM_CATEGORIES,) fp32 and a renorm flag
    row_enable (B, Q) bool, head_enable (Hq,) bool: where the transform applies (identity elsewhere)

Outputs (`AttentionOutput`): out (B, Hq, Q, D) in q's dtype, lse (B, Hq, Q) fp32, and with
`return_mass` the per-category attention mass (B, Hq, Q, NUM_CATEGORIES) fp32.

LSE convention (what backward needs): for every (row, head), with t = transformed scores over visible keys,
    lse = logsumexp_j(t_ij + log w[c_j])   if the transform is enabled and renorm
    lse = logsumexp_j(t_ij)                otherwise (raw weights, or identity)
so that in both modes  P'_ij = w[c_j] * exp(t_ij - lse_i)  (w = 1 for identity rows).
A row with no visible key has lse = -inf, out = 0 and mass = 0. With renorm, a row whose visible keys all
have w = 0 is empty too (lse = -inf); in raw mode such a row keeps lse = logsumexp(t) (finite) and gets
out = 0, mass = 0 because every P' = w * P is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

NUM_CATEGORIES = 8  # codes 0..7; 0..5 are named in attn_mod.categories, 6..7 are free for users


class AttentionOutput(NamedTuple):
    out: torch.Tensor
    lse: torch.Tensor
    mass: torch.Tensor | None


@dataclass(frozen=True)
class CategoryTransform:
    """Per-category score transform and post-softmax weights.

    For key j of category c:  s' = mul[c]*s + absw[c]*|s| + add[c];  P' = w[c]*softmax(s') (renormalised
    to sum 1 when `renorm`). Tensors are fp32 of length NUM_CATEGORIES.
    """

    mul: torch.Tensor
    absw: torch.Tensor
    add: torch.Tensor
    w: torch.Tensor
    renorm: bool = True

    @staticmethod
    def identity() -> CategoryTransform:
        return CategoryTransform.from_lists()

    @staticmethod
    def from_lists(mul=None, absw=None, add=None, w=None, renorm: bool = True) -> CategoryTransform:
        """Build from sequences/dicts {code: value}; unspecified entries are the identity."""

        def table(values, default):
            t = torch.full((NUM_CATEGORIES,), float(default), dtype=torch.float32)
            if values is None:
                return t
            items = values.items() if isinstance(values, dict) else enumerate(values)
            for code, val in items:
                if not 0 <= int(code) < NUM_CATEGORIES:
                    raise ValueError(f"category code {code} is outside 0..{NUM_CATEGORIES - 1}")
                t[int(code)] = float(val)
            return t

        tr = CategoryTransform(table(mul, 1.0), table(absw, 0.0), table(add, 0.0), table(w, 1.0), bool(renorm))
        tr.validate()
        return tr

    def validate(self) -> None:
        for name in ("mul", "absw", "add", "w"):
            t = getattr(self, name)
            if t.shape != (NUM_CATEGORIES,):
                raise ValueError(f"transform table {name!r} must have shape ({NUM_CATEGORIES},), got {tuple(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"transform table {name!r} has non-finite entries {t.tolist()}; use finite values")
        if (self.w < 0).any():
            raise ValueError(f"post-softmax weights w must be >= 0, got {self.w.tolist()}")

    def is_identity(self) -> bool:
        return bool((self.mul == 1).all() and (self.absw == 0).all() and (self.add == 0).all() and (self.w == 1).all())

    def to(self, device) -> CategoryTransform:
        return CategoryTransform(*(getattr(self, n).to(device=device, dtype=torch.float32)
                                   for n in ("mul", "absw", "add", "w")), self.renorm)


def check_inputs(q, k, v, cat, row_enable=None, head_enable=None) -> None:
    """Raise ValueError with the offending shapes when the inputs break the contract above."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Q, D = q.shape
    Bk, Hkv, K, Dk = k.shape
    if (Bk, Dk) != (B, D) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not agree on B / H / D")
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of key/value heads {Hkv}")
    if cat.shape != (B, K):
        raise ValueError(f"key categories must have shape (B, K) = {(B, K)}, got {tuple(cat.shape)}")
    if cat.is_floating_point():
        raise ValueError("key categories must be an integer tensor")
    if row_enable is not None and row_enable.shape != (B, Q):
        raise ValueError(f"row_enable must have shape (B, Q) = {(B, Q)}, got {tuple(row_enable.shape)}")
    if head_enable is not None and head_enable.shape != (Hq,):
        raise ValueError(f"head_enable must have shape (Hq,) = ({Hq},), got {tuple(head_enable.shape)}")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

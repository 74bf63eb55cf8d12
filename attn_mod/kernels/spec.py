"""The operator's data contract, shared by every backend (reference, Triton, Flex).

    q (B, Hq, Q, D), k / v (B, Hkv, K, D) with Hq % Hkv == 0 (GQA, never expanded)
    cat (B, K) integer key categories in [0, NUM_CATEGORIES), 0 = PAD (never attended)
    transform: per-category tables mul / absw / add / w (NUM_CATEGORIES,) fp32 and a renorm flag
    row_enable (B, Q) bool, head_enable (Hq,) bool: where the transform applies (identity elsewhere)
    block (B, K) integer block ids or None, window int >= 1 or None: the visibility extensions below

Visibility of key j from query row i (which sits at key position p_i = K - Q + i, bottom-right aligned):
    cat[j] != PAD
    and (not causal or j <= p_i or (block[j] != 0 and block[j] == block[p_i]))   # bidirectional blocks
    and (window is None or p_i - j < window)                                     # sliding window
A query row with p_i < 0 belongs to no block. The window limits only keys behind the query; keys ahead are
visible only through a shared block (Gemma3: AND(window, OR(causal, same image))). No N x N mask is ever built.

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
        """A copy on `device`; the kernels' kind analysis (read on the host) travels with it, so the device copy
        never needs a host sync to be classified (`triton_common.transform_kind`)."""
        moved = CategoryTransform(*(getattr(self, n).to(device=device, dtype=torch.float32)
                                    for n in ("mul", "absw", "add", "w")), self.renorm)
        if self.mul.device.type == "cpu" or "_kernel_cache" in self.__dict__:
            moved.__dict__["_kernel_cache"] = {"kind": transform_kind(self)}
        return moved


@dataclass(frozen=True)
class TransformKind:
    """What the kernels specialise on at compile time (the constexpr flags), read from the transform tables.

    transform  any table math at all (False: identity, PAD masking only)
    has_mul    some mul != 1 (multiplicative kind)       has_abs  some absw != 0 (absolute kind, e.g. PAI)
    raw_w      not renorm and some w != 1 (raw-w kind: P' = w * P, denominator unweighted)
    renorm     the renorm flag (only meaningful with transform)
    Everything else (add, renormalised w) is the bias kind: one per-key bias, no extra work per element."""

    transform: bool
    has_mul: bool
    has_abs: bool
    raw_w: bool
    renorm: bool

    @property
    def name(self) -> str:
        if not self.transform:
            return "identity"
        extra = [n for n, on in (("multiplicative", self.has_mul), ("absolute", self.has_abs),
                                 ("raw_w", self.raw_w)) if on]
        return "bias" if not extra else extra[0] if len(extra) == 1 else "general"


def transform_kind(transform: CategoryTransform) -> TransformKind:
    """The kind of `transform` (validates its tables). Cached on the object and carried by `transform.to()`, so a
    transform built on the CPU and moved to the GPU once never syncs the device here. The cache assumes the tables
    are not edited in place after the first kernel call (build a new transform instead, as `handle.update` does)."""
    cache = transform.__dict__.setdefault("_kernel_cache", {})
    kind = cache.get("kind")
    if kind is None:
        cpu = CategoryTransform(*(getattr(transform, n).detach().cpu() for n in ("mul", "absw", "add", "w")),
                                transform.renorm)
        cpu.validate()
        has_mul = bool((cpu.mul != 1).any())
        has_abs = bool((cpu.absw != 0).any())
        raw_w = not cpu.renorm and bool((cpu.w != 1).any())
        on = has_mul or has_abs or raw_w or bool((cpu.add != 0).any()) or bool((cpu.w != 1).any())
        kind = TransformKind(on, has_mul and on, has_abs and on, raw_w and on, bool(cpu.renorm))
        cache["kind"] = kind
    return kind


def check_inputs(q, k, v, cat, row_enable=None, head_enable=None, block=None, window=None) -> None:
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
    if block is not None:
        if not isinstance(block, torch.Tensor) or block.shape != (B, K) or block.is_floating_point():
            raise ValueError(f"block ids must be an integer tensor of shape (B, K) = {(B, K)} (0 = no block), got "
                             f"{type(block).__name__} {tuple(getattr(block, 'shape', ()))}")
    check_window(window)


def check_window(window) -> None:
    """A sliding window is None (full attention) or an int >= 1 (key j visible from position p iff p - j < window)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an int >= 1 (key j is visible from position p iff p - j < window), "
                         f"got {window!r}")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

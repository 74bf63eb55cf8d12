"""Backend dispatch for the category attention operator (the one entry point the patch calls).

`category_attention(q, k, v, cat, transform, ..., backend="auto")` with the shapes of `spec.py`.
Backends: "torch" (reference.py, exact, CPU default), "triton" (CUDA; CPU only under TRITON_INTERPRET=1),
"flex" (FlexAttention, independent GPU check). "auto": triton on CUDA, torch otherwise. The
ATTN_MOD_BACKEND environment variable overrides "auto".
"""

from __future__ import annotations

import os

import torch

from .reference import category_attention_reference
from .spec import AttentionOutput, CategoryTransform

BACKENDS = ("auto", "torch", "triton", "flex")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on `device` (raises ValueError for unknown names)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        backend = os.environ.get("ATTN_MOD_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"ATTN_MOD_BACKEND={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def category_attention(
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
    backend: str = "auto",
) -> AttentionOutput:
    """Dispatch to a backend. Every backend computes the operator of `reference.py`."""
    name = resolve_backend(backend, q.device)
    kwargs = dict(scale=scale, causal=causal, row_enable=row_enable, head_enable=head_enable, return_mass=return_mass)
    if name == "torch":
        return category_attention_reference(q, k, v, cat, transform, **kwargs)
    raise NotImplementedError(f"the {name!r} backend is not implemented yet (see the Triton kernels issue); use backend='torch'")

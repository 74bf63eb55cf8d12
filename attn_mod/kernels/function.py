"""Backend dispatch for the category attention operator (the one entry point the patch calls).

`category_attention(q, k, v, cat, transform, ..., backend="auto")` with the shapes of `spec.py`.
Backends: "torch" (reference.py, exact, CPU default), "triton" (CUDA; CPU only under TRITON_INTERPRET=1),
"flex" (FlexAttention, independent GPU check; forward-only on CPU). "auto": triton on CUDA, torch otherwise.
The ATTN_MOD_BACKEND environment variable overrides "auto".

The Triton path is one `torch.autograd.Function` (`TritonCategoryAttention`): forward launches
`triton_fwd.attention_forward` (or `triton_decode.decode_forward` for few query rows) and saves q, k, v, out, lse
(and mass) plus the kernel operands (`triton_common.KernelOperands`: categories, per-key values, tile codes,
enables, compile-time kind flags); backward launches `triton_bwd.attention_backward`. Gradients flow to q, k, v from out, mass and lse;
the transform tables get no gradient on this path (use backend="torch" for that).
"""

from __future__ import annotations

import os

import torch

from .reference import category_attention_reference
from .spec import NUM_CATEGORIES, AttentionOutput, CategoryTransform, check_inputs, default_scale

BACKENDS = ("auto", "torch", "triton", "flex")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256
_IDENTITY = CategoryTransform.identity()  # one object, so its cached device tables are reused by every call


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
    block: torch.Tensor | None = None,
    window: int | None = None,
) -> AttentionOutput:
    """Dispatch to a backend. Every backend computes the operator of `reference.py` (block ids and sliding window:
    `spec.py`)."""
    name = resolve_backend(backend, q.device)
    kwargs = dict(scale=scale, causal=causal, row_enable=row_enable, head_enable=head_enable, return_mass=return_mass,
                  block=block, window=window)
    if name == "torch":
        return category_attention_reference(q, k, v, cat, transform, **kwargs)
    if name == "triton":
        return triton_category_attention(q, k, v, cat, transform, **kwargs)
    from .flex import flex_category_attention

    return flex_category_attention(q, k, v, cat, transform, **kwargs)


class TritonCategoryAttention(torch.autograd.Function):
    """out, lse, mass = f(q, k, v) with the Triton kernels; differentiable in q, k, v (from out, lse and mass).

    `ops` (`triton_common.KernelOperands`: key categories, per-key values, tile codes, enables, kind flags) and the
    Python flags are non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, ops, scale, causal, return_mass, blocks):
        from .triton_decode import decode_forward, use_decode
        from .triton_fwd import attention_forward

        tiles = {n: blocks[n] for n in ("block_m", "block_n", "mass_path") if n in blocks}
        decode = blocks.get("decode")
        if decode is None:
            decode = use_decode(q.shape[2], q.shape[1] // k.shape[1])
        if decode:
            out, lse, mass = decode_forward(q, k, v, ops, scale=scale, causal=causal, return_mass=return_mass,
                                            block_n=blocks.get("block_n"), n_split=blocks.get("n_split"),
                                            mass_path=blocks.get("mass_path", 0))
        else:
            out, lse, mass = attention_forward(q, k, v, ops, scale=scale, causal=causal, return_mass=return_mass,
                                               **tiles)
        ctx.save_for_backward(q, k, v, out, lse, mass, *ops.tensors())
        ctx.ops = ops.with_tensors((None,) * 7)  # the kind flags; tensors come back through saved_tensors
        ctx.flags = dict(scale=scale, causal=causal, **tiles)
        ctx.set_materialize_grads(False)
        return out, lse, mass

    @staticmethod
    def backward(ctx, dout, dlse, dmass):
        from .triton_bwd import attention_backward

        q, k, v, out, lse, mass, *op_tensors = ctx.saved_tensors
        if dout is None and dlse is None and dmass is None:
            return (None,) * 8
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, ctx.ops.with_tensors(op_tensors), out, lse, mass, dmass, dlse,
                                        **ctx.flags)
        return (dq, dk, dv) + (None,) * 5


def triton_category_attention(
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
    _blocks: dict | None = None,
) -> AttentionOutput:
    """The operator on the Triton kernels (same contract as `category_attention_reference`).

    q/k/v must share one dtype among fp16/bf16/fp32 and a head dim <= 256. No host sync: the transform's kind is
    read once on the host and cached with its device table (`spec.transform_kind`, `triton_common.key_table`);
    categories are range-checked here only on the CPU (interpreter) — on CUDA they are validated where they are
    built (`categories.validate_categories`, the labeler) and an out-of-range code fails the device-side gather.
    Few query rows (Q <= triton_decode.DECODE_MAX_Q) run the split-K decode forward with GQA heads packed.
    `_blocks` ({"block_m", "block_n", "mass_path", "decode", "n_split"}) pins tiles, the mass path (0 per tile,
    2 always the one-hot dot), the decode path (True / False / None = auto) and its split count (tests only)."""
    check_inputs(q, k, v, cat, row_enable, head_enable, block, window)
    from .triton_common import check_triton_device, kernel_operands

    check_triton_device(q)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' needs q, k, v of one dtype among {TRITON_DTYPES}; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype} (use backend='torch' for float64)")
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head dims up to {MAX_TRITON_HEAD_DIM}, got {q.shape[-1]}")
    transform = _IDENTITY if transform is None else transform
    if torch.is_grad_enabled() and any(getattr(transform, n).requires_grad for n in ("mul", "absw", "add", "w")):
        raise NotImplementedError("backend='triton' computes no gradient for the transform tables (mul/absw/add/w "
                                  "require grad); use backend='torch', or detach the tables")
    B, Hq, Q, D = q.shape
    dev = q.device
    cat = cat.to(dev)
    if cat.device.type == "cpu" and cat.numel() and bool(((cat < 0) | (cat >= NUM_CATEGORIES)).any()):
        raise ValueError(f"key categories must lie in 0..{NUM_CATEGORIES - 1}, got {cat.min().item()}..{cat.max().item()}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = default_scale(D) if scale is None else float(scale)
    ops = kernel_operands(transform, cat, row_enable, head_enable, scale=scale, Q=Q, Hq=Hq,
                          need_codes=bool(return_mass), block=block, window=window)
    out, lse, mass = TritonCategoryAttention.apply(q, k, v, ops, scale, bool(causal), bool(return_mass),
                                                   dict(_blocks or {}))
    return AttentionOutput(out, lse, mass)

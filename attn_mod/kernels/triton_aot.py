"""Compile the Triton kernels for a GPU target on a machine without a GPU (a build check, not a runtime path).

The interpreter accepts programs a GPU compiler rejects; this runs the real Triton -> PTX -> cubin pipeline
(ptxas ships with triton) for chosen variants and reports shared memory per kernel, so a CPU-only session can
still catch code that would not compile on the H100. Needs TRITON_INTERPRET unset (jit functions, not
interpreted ones):

    python -m attn_mod.kernels.triton_aot [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int8: "*i8",
        torch.int32: "*i32", torch.int64: "*i64"}


def _specialize(kernel, args, constexprs):
    """(signature, constexprs, attrs) as a real launch would build them: ints equal to 1 become constexprs,
    pointers and ints divisible by 16 get the tt.divisibility=16 hint (Triton's default specialisation)."""
    names = kernel.arg_names
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, (name, val) in enumerate(zip(names, args)):
        if isinstance(val, torch.Tensor):
            sig[name] = _PTR[val.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, bool):
            sig[name] = "i1"
        elif isinstance(val, int):
            if val == 1:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32"
            if val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(val, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: cannot type {type(val)}")
    for name in names[len(args):]:
        if name not in constexprs:
            raise ValueError(f"{kernel.__name__}: no value for {name}")
        sig[name] = "constexpr"
    return sig, consts, attrs


def compile_kernel(kernel, args, constexprs, arch: int = 90, num_warps: int = 4, num_stages: int = 3):
    """triton.compile `kernel` (a JITFunction) for cuda sm_`arch`; returns the CompiledKernel (asm incl. cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    sig, consts, attrs = _specialize(fn, args, constexprs)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def variants(quick: bool):
    """(dtype, head_dim, causal, tables, row_enables, mass) combinations to compile: every head dim x causal with
    the heaviest path (general transform, raw weights, row enables + masses), plus renorm / identity / fp16 / fp32
    representatives. `tables` are CategoryTransform.from_lists keyword arguments."""
    general = dict(mul={3: 1.1}, absw={3: 0.2}, add={5: -0.3}, w={1: 0.0, 3: 1.2}, renorm=False)
    avar = dict(w={1: 0.5, 3: 1.2, 4: 1.2})
    if quick:
        return [(torch.bfloat16, 128, True, avar, False, True), (torch.float16, 80, False, general, True, True),
                (torch.bfloat16, 64, True, {}, False, False)]
    heavy = [(torch.bfloat16, d, c, general, True, True) for d in (64, 80, 96, 128) for c in (True, False)]
    return heavy + [(torch.bfloat16, 128, True, avar, False, True), (torch.bfloat16, 128, True, {}, False, False),
                    (torch.float16, 128, True, avar, True, True), (torch.float32, 64, True, general, True, True)]


def check(arch: int = 90, quick: bool = False, blocks=((128, 64), (64, 32)), block_ids: bool = False,
          window: int | None = None):
    """Compile forward, preprocess, dK/dV, dQ and decode kernels for every variant; returns a list of result dicts.
    `blocks` = (BLOCK_M, BLOCK_N) of the forward / dQ programs (dK/dV uses them swapped); block_ids / window compile
    the bidirectional-block / sliding-window variants (spec.py)."""
    from . import triton_bwd, triton_fwd
    from .spec import NUM_CATEGORIES, CategoryTransform
    from .triton_common import kernel_operands

    results = []
    B, Hq, Hkv, Q, K = 2, 4, 2, 200, 200  # lengths off the 16 grid, strides on it (as in real use)
    for dtype, D, causal, tables, rows, mass in variants(quick):
        q = torch.empty(B, Hq, Q, D, dtype=dtype)
        k = torch.empty(B, Hkv, K, D, dtype=dtype)
        cat = torch.zeros(B, K, dtype=torch.int8)
        lse = torch.empty(B, Hq, Q)
        m = torch.empty(B, Hq, Q, NUM_CATEGORIES) if mass else None
        tr = CategoryTransform.from_lists(**tables)
        ops = kernel_operands(tr, cat, torch.ones(B, Q, dtype=torch.bool) if rows else None, None, scale=0.1, Q=Q,
                              Hq=Hq, need_codes=mass, block=torch.zeros(B, K, dtype=torch.int32) if block_ids else None,
                              window=window)
        fargs, fmeta = triton_fwd.forward_launch(q, k, k, ops, q, lse, m, scale=0.1, causal=causal)
        (pargs, pmeta), (kargs, kmeta), (qargs, qmeta) = triton_bwd.backward_launch(
            q, q, k, k, ops, q, lse, m, m, None, lse, lse, q, k, k, scale=0.1, causal=causal)
        for bm, bn in blocks:
            jobs = [("fwd", triton_fwd._category_attn_fwd, fargs, dict(fmeta, BLOCK_M=bm, BLOCK_N=bn)),
                    ("dkdv", triton_bwd._attn_bwd_dkdv, kargs, dict(kmeta, BLOCK_M=bn, BLOCK_N=bm)),
                    ("dq", triton_bwd._attn_bwd_dq, qargs, dict(qmeta, BLOCK_M=bm, BLOCK_N=bn))]
            if (bm, bn) == blocks[0]:
                jobs.append(("preprocess", triton_bwd._attn_bwd_preprocess, pargs, dict(pmeta)))
            for name, kern, a, meta in jobs:
                ck = compile_kernel(kern, a, dict(meta), arch)
                results.append(dict(kernel=name, dtype=str(dtype).split(".")[-1], head_dim=D, causal=causal,
                                    kind=ops.kind.name, rows=rows, mass=mass, block=(bm, bn),
                                    shared_bytes=ck.metadata.shared, cubin_bytes=len(ck.asm["cubin"])))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    from .triton_common import interpreting

    if interpreting():
        sys.exit("unset TRITON_INTERPRET: the AOT check compiles real GPU code")
    res = check(a.arch, a.quick)
    for r in res:
        print(json.dumps(r))
    print(f"compiled {len(res)} kernels for sm_{a.arch}; max shared memory {max(r['shared_bytes'] for r in res)} B")


if __name__ == "__main__":
    main()

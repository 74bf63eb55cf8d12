"""Static report of the Triton kernels for sm_90 (H100/H200), computed on a CPU machine without a GPU.

For every kernel (forward, dK/dV, dQ), transform variant and config of the autotune spaces, compile with Triton's
bundled ptxas (`attn_mod.kernels.triton_aot.compile_kernel`) and record
    regs            registers per thread (ptxas -v)          spill   spill-store bytes (ptxas -v)
    smem            shared memory per CTA (cubin metadata; H100 limit 232448 B = 227 KiB)
    inst/elem       SASS instructions of the first innermost score loop (nvdisasm; the loop holding MUFU.EX2)
                    divided by the score elements one thread handles per iteration, BLOCK_M*BLOCK_N/(32*warps)
    hgmma/ex2/lds/bar per iteration of that loop
Shape: B = 1, Hq = 28, Hkv = 4, N = 4096, D = 128, bf16, causal (the Qwen2.5-VL-7B-like shape of the goals).
Static instruction counts are a proxy for the softmax-side cost per element, not a speed measurement.

    python bench/kernel_static.py            # every config of every space: all variants at the pinned config, the
                                             # heavy ones at every config (~75 compiles; run with nice)
    python bench/kernel_static.py --quick    # the pinned (first) config per kernel only
Results are cached in bench/out/kernel_static.jsonl (keyed by the kernel sources' hash, so edits recompile) and the
table is written between markers in bench/RESULTS.md. Needs TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

SHAPE = dict(B=1, Hq=28, Hkv=4, N=4096, D=128)
SMEM_LIMIT = 232448  # sm_90 max dynamic shared memory per block (227 KiB)
MARK_BEGIN, MARK_END = "<!-- kernel-static:begin -->", "<!-- kernel-static:end -->"

# variant -> (transform tables, row enables, masses, mass_path). mass_path 1 (report only) compiles the
# single-category-tile branch alone, 2 the mixed-tile (one-hot dot) branch alone, 0 the per-tile choice (both).
VARIANTS = {
    "identity": (dict(), False, False, 0),
    "avar": (dict(w={1: 0.5, 3: 1.2, 4: 1.2}), False, False, 0),
    "avar_rows": (dict(w={1: 0.5, 3: 1.2, 4: 1.2}), True, False, 0),
    "avar_raw": (dict(w={1: 0.0, 3: 1.3, 4: 1.3}, renorm=False), False, False, 0),
    "pai_rows": (dict(absw={3: 0.2, 4: 0.2}), True, False, 0),
    "general_rows": (dict(mul={3: 1.1}, absw={3: 0.2}, add={5: -0.3}, w={1: 0.0, 3: 1.2}, renorm=False), True, False,
                     0),
    "identity+mass": (dict(), False, True, 0),
    "avar+mass": (dict(w={1: 0.5, 3: 1.2, 4: 1.2}), False, True, 0),
    "avar+mass:single": (dict(w={1: 0.5, 3: 1.2, 4: 1.2}), False, True, 1),
    "avar+mass:mixed": (dict(w={1: 0.5, 3: 1.2, 4: 1.2}), False, True, 2),
    "avar_raw+mass:single": (dict(w={1: 0.0, 3: 1.3, 4: 1.3}, renorm=False), False, True, 1),
}
HEAVY = ("identity", "avar+mass", "general_rows")  # variants compiled for every config (the others: pinned only)
KERNELS = ("fwd", "dkdv", "dq", "decode")  # decode: the split-K pass at Q = 1 (7 GQA heads packed into 16 rows)
TARGETS = {  # (kernel, variant, reference variant, max ratio of inst/elem at the pinned config)
    ("fwd", "avar", "identity", 1.15),
    ("fwd", "avar+mass:single", "identity", 1.25),
    ("fwd", "avar+mass", "identity", 1.25),
    ("dkdv", "avar", "identity", 1.3),
    ("dq", "avar", "identity", 1.3),
}


PRESENTATION = ("source_hash", "load_cache", "append", "ratios", "markdown", "write_results", "main")


def source_hash() -> str:
    """Cache key of the measured code: the kernel modules and this script as ASTs without docstrings (so comments
    and docstrings do not invalidate the cache), without the autotune-space lists (a config's row depends on the
    config, not on which other configs the space holds) and without the presentation functions (PRESENTATION)."""
    import ast

    h = hashlib.sha256()
    files = [ROOT / "attn_mod" / "kernels" / n for n in ("triton_fwd.py", "triton_bwd.py", "triton_decode.py",
                                                         "triton_common.py", "spec.py", "triton_aot.py")]
    for path in files + [Path(__file__)]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        tree.body = [n for n in tree.body
                     if not (isinstance(n, ast.Assign) and any(getattr(t, "id", "").endswith("_CONFIGS")
                                                               for t in n.targets))
                     and not (isinstance(n, ast.FunctionDef) and n.name in PRESENTATION)]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def spaces():
    """{kernel: [(label, kwargs, num_warps, num_stages)]} from the autotune spaces (pinned config first)."""
    from attn_mod.kernels import triton_bwd, triton_decode, triton_fwd

    out = {"decode": [(f"M16 N{triton_decode.DECODE_BLOCK_N} w{triton_decode.DECODE_WARPS} "
                       f"s{triton_decode.DECODE_STAGES}", dict(BLOCK_M=16, BLOCK_N=triton_decode.DECODE_BLOCK_N),
                       triton_decode.DECODE_WARPS, triton_decode.DECODE_STAGES)]}
    for kern, configs in (("fwd", triton_fwd.FWD_CONFIGS), ("dkdv", triton_bwd.DKDV_CONFIGS),
                          ("dq", triton_bwd.DQ_CONFIGS)):
        out[kern] = [(f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}", dict(c.kwargs),
                      c.num_warps, c.num_stages) for c in configs]
    return out


def launch(kernel: str, variant: str):
    """(jit function, positional args, constexpr meta) for one kernel and variant at SHAPE (CPU placeholders)."""
    import torch

    from attn_mod.kernels import triton_bwd, triton_fwd
    from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform
    from attn_mod.kernels.triton_common import kernel_operands

    tables, rows, mass, mass_path = VARIANTS[variant]
    B, Hq, Hkv, N, D = (SHAPE[k] for k in ("B", "Hq", "Hkv", "N", "D"))
    dt = torch.bfloat16
    q = torch.empty(B, Hq, N, D, dtype=dt)
    k = torch.empty(B, Hkv, N, D, dtype=dt)
    lse = torch.empty(B, Hq, N)
    m = torch.empty(B, Hq, N, NUM_CATEGORIES) if mass else None
    cat = torch.zeros(B, N, dtype=torch.int8)
    tr = CategoryTransform.from_lists(**tables)
    row_en = torch.ones(B, N, dtype=torch.bool) if rows else None
    ops = kernel_operands(tr, cat, row_en, None, scale=D ** -0.5, Q=N, Hq=Hq, need_codes=mass)
    if kernel == "decode":
        return triton_decode_launch(q, k, ops, mass, mass_path)
    if kernel == "fwd":
        args, meta = triton_fwd.forward_launch(q, k, k, ops, q, lse, m, scale=D ** -0.5, causal=True,
                                               mass_path=mass_path)
        return triton_fwd._category_attn_fwd, args, meta
    (_, _), (kargs, kmeta), (qargs, qmeta) = triton_bwd.backward_launch(
        q, q, k, k, ops, q, lse, m, m, None, lse, lse, q, k, k, scale=D ** -0.5, causal=True, mass_path=mass_path)
    if kernel == "dkdv":
        return triton_bwd._attn_bwd_dkdv, kargs, kmeta
    return triton_bwd._attn_bwd_dq, qargs, qmeta


def triton_decode_launch(q, k, ops, mass, mass_path):
    """The split-K decode kernel at Q = 1 (BLOCK_M / BLOCK_N come from the config)."""
    import torch

    from attn_mod.kernels import triton_decode
    from attn_mod.kernels.triton_common import MASS_WIDTH, block_d, dot_dtype, dot_precision, mass_dtype

    B, Hq, _, D = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    q1 = q[:, :, :1]
    ws = torch.empty(16, dtype=torch.float32)
    ddt = dot_dtype(q.dtype)
    args = (q1, k, k, ops.cat, ops.kv, ops.tc, ops.wtab, ops.row_en, ops.head_en, ops.blk, ws, ws, ws, D ** -0.5,
            *q1.stride(), *k.stride(), *k.stride(), ops.cat.stride(0), ops.kv.stride(0), ops.tc.stride(0),
            ops.tc.stride(1), Hkv, 2, K, 512, 8)  # Q_LEN placeholder 2 (1 would become a constexpr)
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d(D), MASS_W=MASS_WIDTH, CAUSAL=True, MASK_CAUSAL=0,
                **ops.flags(), RETURN_MASS=mass, MASS_PATH=mass_path, DOT_DTYPE=ddt, MASS_DTYPE=mass_dtype(ddt),
                DOT_PRECISION=dot_precision(ddt))
    return triton_decode._decode_split, args, meta


def parse_sass(sass: str):
    """Instructions of the first innermost loop that holds MUFU.EX2 (the score loop), as a list of opcodes."""
    labels, ins = {}, []
    for line in sass.splitlines():
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
            continue
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
    loops = []
    for i, text in enumerate(ins):
        m = re.search(r"\bBRA\b.*?(\.L_x_\d+)", text)
        if m and labels.get(m.group(1), len(ins)) <= i:
            loops.append((labels[m.group(1)], i))
    score = [(a, b) for a, b in loops if any("MUFU.EX2" in t for t in ins[a:b + 1])]
    inner = [lp for lp in score if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in score)]
    if not inner:
        raise RuntimeError("no score loop (backward branch around MUFU.EX2) found in the SASS")
    a, b = min(inner)
    return ins[a:b + 1]


def measure(job):
    """Compile one (kernel, variant, config) and return its row (runs in a worker process)."""
    kernel, variant, (label, kw, warps, stages) = job
    from triton import knobs

    from attn_mod.kernels.triton_aot import compile_kernel

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its register log
    fn, args, meta = launch(kernel, variant)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ck = compile_kernel(fn, args, dict(meta, **kw), 90, num_warps=warps, num_stages=stages)
    log = buf.getvalue()
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = int(re.search(r"(\d+) bytes spill stores", log).group(1))
    spill_ld = int(re.search(r"(\d+) bytes spill loads", log).group(1))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    loop = parse_sass(sass)
    elems = kw["BLOCK_M"] * kw["BLOCK_N"] / (32 * warps)
    count = lambda op: sum(1 for t in loop if re.search(rf"\b{op}", t))  # noqa: E731
    return dict(kernel=kernel, variant=variant, config=label, regs=regs, spill=spill_st, spill_loads=spill_ld,
                smem=ck.metadata.shared, loop_inst=len(loop), inst_per_elem=round(len(loop) / elems, 2),
                hgmma=count("HGMMA"), ex2=count("MUFU.EX2"), lds=count("LDS"), bar=count("BAR"))


def load_cache(path: Path, key: str) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if r.get("source") == key:
                rows[(r["kernel"], r["variant"], r["config"])] = r
    return rows


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ratios(rows, pinned):
    """[(kernel, variant, ref, ratio, limit, ok)] at each kernel's pinned config."""
    by = {(r["kernel"], r["variant"], r["config"]): r for r in rows}
    out = []
    for kernel, variant, ref, limit in sorted(TARGETS):
        a, b = by.get((kernel, variant, pinned[kernel])), by.get((kernel, ref, pinned[kernel]))
        if a and b:
            ratio = a["inst_per_elem"] / b["inst_per_elem"]
            out.append((kernel, variant, ref, round(ratio, 3), limit, ratio <= limit))
    return out


def markdown(rows, pinned, key) -> str:
    lines = [f"Source hash `{key}`; shape B={SHAPE['B']}, Hq={SHAPE['Hq']}, Hkv={SHAPE['Hkv']}, N={SHAPE['N']}, "
             f"D={SHAPE['D']}, bf16, causal; sm_90 via Triton's bundled ptxas (no GPU). Pinned configs: "
             + ", ".join(f"{k} {v}" for k, v in pinned.items()) + ".", "",
             "| kernel | variant | config | regs | spill B | smem B | inst/elem | HGMMA | EX2 | LDS | BAR |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(KERNELS)}
    vorder = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (order[r["kernel"]], vorder.get(r["variant"], 99), r["config"])):
        flag = " **over**" if r["smem"] > SMEM_LIMIT else ""
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['config']} | {r['regs']} | {r['spill']} | "
                     f"{r['smem']}{flag} | {r['inst_per_elem']} | {r['hgmma']} | {r['ex2']} | {r['lds']} | {r['bar']} |")
    real = [r for r in rows if ":" not in r["variant"]]  # ':single' / ':mixed' force one mass branch (report only)
    bad = [r for r in real if r["spill"] or r["smem"] > SMEM_LIMIT]
    forced = [r for r in rows if ":" in r["variant"] and (r["spill"] or r["smem"] > SMEM_LIMIT)]
    lines += ["", f"Kernels as launched (every variant without ':'), configs that spill or exceed shared memory: "
              f"{len(bad)} of {len(real)}"
              + ("" if not bad else ": " + ", ".join(f"{r['kernel']} {r['variant']} {r['config']}" for r in bad)),
              "", f"Report-only compiles with one mass branch forced (MASS_PATH 1 / 2; the tests also use 2) that "
              f"spill: {len(forced)}" + ("" if not forced else ": " + ", ".join(
                  f"{r['kernel']} {r['variant']} {r['config']} ({r['spill']} B)" for r in forced)), ""]
    lines += ["| target (pinned config) | ratio | limit | met |", "|---|---|---|---|"]
    for kernel, variant, ref, ratio, limit, ok in ratios(rows, pinned):
        lines.append(f"| {kernel} {variant} / {ref} inst/elem | {ratio} | {limit} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def write_results(md: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{MARK_BEGIN}\n{md}\n{MARK_END}"
    if MARK_BEGIN in text:
        a, b = text.index(MARK_BEGIN), text.index(MARK_END) + len(MARK_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n## Static kernel report for sm_90 (bench/kernel_static.py)\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pinned (first) config of each kernel only")
    ap.add_argument("--all-variants", action="store_true",
                    help="every variant at every config (default: every variant at the pinned config, the heavy "
                         "ones identity / avar+mass / general_rows at every config)")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    ap.add_argument("--extra", default="", help="try configs outside the spaces: 'dkdv:16,128,8,2;fwd:128,64,8,2' "
                                                 "(BLOCK_M, BLOCK_N, warps, stages)")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "out" / "kernel_static.jsonl")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the static report compiles real GPU code")
    kernels = [k for k in a.kernels.split(",") if k]
    variants = [v for v in a.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"unknown variant {v!r}; choose from {list(VARIANTS)}")
    for k in kernels:
        if k not in KERNELS:
            sys.exit(f"unknown kernel {k!r}; choose from {KERNELS}")
    from tqdm import tqdm

    space = spaces()
    pinned = {k: space[k][0][0] for k in KERNELS}
    for item in filter(None, a.extra.split(";")):
        kern, nums = item.split(":")
        bm, bn, w, st = (int(x) for x in nums.split(","))
        space[kern].append((f"M{bm} N{bn} w{w} s{st} (extra)", dict(BLOCK_M=bm, BLOCK_N=bn), w, st))
    key = source_hash()
    cache = load_cache(a.cache, key)
    def configs(k, v):
        if a.quick:
            return [c for c in space[k] if c is space[k][0] or "extra" in c[0]]
        return space[k] if (a.all_variants or v in HEAVY) else space[k][:1]

    jobs = [(k, v, cfg) for k in kernels for v in variants for cfg in configs(k, v)]
    todo = [j for j in jobs if (j[0], j[1], j[2][0]) not in cache]
    with ProcessPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        for row in tqdm(pool.map(measure, todo), total=len(todo), desc="compile sm_90"):
            row["source"] = key
            append(a.cache, row)
            cache[(row["kernel"], row["variant"], row["config"])] = row
    rows = [cache[(k, v, cfg[0])] for k, v, cfg in jobs]
    md = markdown(rows, pinned, key)
    print(md)
    if not a.no_write:
        write_results(md, a.results)
        # the rows, for bench/gpu_check.py's static-vs-measured register table
        (ROOT / "bench" / "kernel_static.json").write_text(json.dumps(rows, indent=0) + "\n")


if __name__ == "__main__":
    main()

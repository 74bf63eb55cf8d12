"""Speed and memory of the category attention kernels against the usual baselines.

    python bench/attention.py                       # GPU: the full shape sweep below, bf16
    python bench/attention.py --shapes qwen --n 4096 8192 --causal 1
    TRITON_INTERPRET=1 python bench/attention.py --smoke --out-dir /tmp/b --results-md /tmp/b/RESULTS.md

Providers (same q, k, v; the attn_mod ones apply the AVAR transform w[IMAGE, TARGET] = 1.2, w[SYSTEM] = 0.5):
  attn_mod_triton   this repo's Triton kernels (masses on / off)
  sdpa_flash        torch SDPA, FLASH backend (FlashAttention-2 in torch; no transform, no masses: the speed anchor)
  sdpa_cudnn        torch SDPA, cuDNN backend (same)
  flex              this repo's FlexAttention backend: score_mod transform, block_mask, masses via LSE differences
  eager             output_attentions-style: the full (B, H, Q, K) probability matrix, masses from it
Modes: fwd, bwd (backward only, forward graph retained), fwd_bwd. FLOPs: 4*B*H*Q*K*D forward (halved when
causal), backward = 2.5 x forward. Peak memory: torch.cuda.max_memory_allocated over one call (inputs included).
Results: a table on stdout, rows merged into <out-dir>/attention.json and .csv, and the table section of
bench/RESULTS.md rewritten between its markers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attn_mod.kernels.function import category_attention  # noqa: E402
from attn_mod.kernels.spec import NUM_CATEGORIES, CategoryTransform  # noqa: E402

BEGIN, END = "<!-- attention-bench:begin -->", "<!-- attention-bench:end -->"
PROVIDERS = ("attn_mod_triton", "sdpa_flash", "sdpa_cudnn", "flex", "eager")
MODES = ("fwd", "bwd", "fwd_bwd")
TOKENS = 16384


def shape_grid(which: str, ns, smoke: bool):
    """(label, B, Hq, Hkv, N, D) rows: B*N = 16k tokens; H*D = 2048 (D = 64, 128) and Qwen2.5-VL-7B-like heads."""
    if smoke:
        return [("smoke", 1, 2, 1, 64, 64)]
    rows = []
    for n in ns:
        b = max(1, TOKENS // n)
        if which in ("all", "hd2048"):
            rows += [("hd2048_d64", b, 32, 32, n, 64), ("hd2048_d128", b, 16, 16, n, 128)]
        if which in ("all", "qwen"):
            rows.append(("qwen2.5vl7b", b, 28, 4, n, 128))
    return rows


def avar_transform():
    return CategoryTransform.from_lists(w={1: 0.5, 3: 1.2, 4: 1.2}, renorm=True)


def make_categories(B, N, device):
    """system prefix, text, a block of image tokens (with a target region), then response: a VLM-like layout."""
    cat = torch.full((B, N), 2, dtype=torch.int8, device=device)
    s, i0, i1 = N // 16, N // 8, N // 8 + N // 2
    cat[:, :s] = 1
    cat[:, i0:i1] = 3
    cat[:, i0 + N // 8: i0 + N // 4] = 4
    cat[:, i1 + N // 8:] = 5
    return cat


def eager_attention(q, k, v, cat, tr, causal, return_mass):
    """Transformers-eager-like: full probability matrix (B, H, Q, K), then masses = P @ onehot(cat)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    Q, K = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    idx = cat.long()
    logw = torch.log(tr.w.to(q.device))[idx][:, None, None, :]
    vis = (idx != 0)[:, None, None, :]
    if causal:
        vis = vis & torch.ones(Q, K, dtype=torch.bool, device=q.device).tril(K - Q)
    p = torch.softmax((s + logw).masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.matmul(p.to(v.dtype), v)
    mass = torch.matmul(p, torch.nn.functional.one_hot(idx, NUM_CATEGORIES).float()[:, None]) if return_mass else None
    return out, mass


def make_provider(name, device, causal, return_mass):
    """fn(q, k, v, cat) -> (out, mass_or_None), or a string saying why the provider cannot run here."""
    tr = avar_transform()
    if name == "attn_mod_triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA or TRITON_INTERPRET=1"
        return lambda q, k, v, cat: category_attention(q, k, v, cat, tr, causal=causal, return_mass=return_mass,
                                                       backend="triton")[::2]
    if name == "flex":
        return lambda q, k, v, cat: category_attention(q, k, v, cat, tr, causal=causal, return_mass=return_mass,
                                                       backend="flex")[::2]
    if name == "eager":
        return lambda q, k, v, cat: eager_attention(q, k, v, cat, tr, causal, return_mass)
    if return_mass:
        return "SDPA returns no masses"
    if device.type != "cuda":
        return "FLASH / cuDNN SDPA backends need CUDA"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if name == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

    def sdpa(q, k, v, cat):
        G = q.shape[1] // k.shape[1]
        if G > 1:  # expand GQA (enable_gqa is not accepted by every backend); counted in time and memory
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal), None

    return sdpa


def timed(fn, device, reps):
    """(median ms, peak bytes) of fn()."""
    if device.type == "cuda":
        import triton.testing

        fn()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        ms = triton.testing.do_bench(fn, warmup=25, rep=reps * 10)
        return ms, peak
    fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], float("nan")


def bench_one(provider, shape, causal, return_mass, mode, dtype, device, reps):
    label, B, Hq, Hkv, N, D = shape
    row = dict(provider=provider, shape=label, B=B, Hq=Hq, Hkv=Hkv, N=N, D=D, causal=causal, mass=return_mass,
               mode=mode, dtype=str(dtype).split(".")[-1], device=device.type, ms=None, tflops=None,
               peak_mib=None, note="")
    fn = make_provider(provider, device, causal, return_mass)
    if isinstance(fn, str):
        row["note"] = fn
        return row
    if mode != "fwd" and provider == "flex" and device.type != "cuda":
        row["note"] = "FlexAttention backward is CUDA-only"
        return row
    torch.manual_seed(0)
    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype, requires_grad=mode != "fwd")
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=mode != "fwd")
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, requires_grad=mode != "fwd")
    cat = make_categories(B, N, device)

    def loss_of(out, mass):
        loss = out.float().square().mean()
        return loss + mass.square().mean() if mass is not None else loss

    try:
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(q, k, v, cat)
        elif mode == "bwd":
            loss = loss_of(*fn(q, k, v, cat))

            def run():
                for t in (q, k, v):
                    t.grad = None
                loss.backward(retain_graph=True)
        else:
            def run():
                for t in (q, k, v):
                    t.grad = None
                loss_of(*fn(q, k, v, cat)).backward()
        ms, peak = timed(run, device, reps)
    except torch.OutOfMemoryError:
        row["note"] = "OOM"
        return row
    except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        return row
    flops = 4.0 * B * Hq * N * N * D * (0.5 if causal else 1.0)
    flops *= {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
    row.update(ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 3),
               peak_mib=None if math.isnan(peak) else round(peak / 2**20, 1))
    return row


def _key(r):
    return (r["provider"], r["shape"], r["B"], r["N"], r["D"], r["causal"], r["mass"], r["mode"], r["dtype"],
            r["device"])


def add_ratios(rows):
    """ratio = this provider's time / sdpa_flash's time on the same shape, mode and causality (lower is better)."""
    anchor = {(r["shape"], r["N"], r["causal"], r["mode"], r["dtype"], r["device"]): r["ms"]
              for r in rows if r["provider"] == "sdpa_flash" and r["ms"]}
    for r in rows:
        a = anchor.get((r["shape"], r["N"], r["causal"], r["mode"], r["dtype"], r["device"]))
        r["vs_flash"] = round(r["ms"] / a, 3) if (a and r["ms"]) else None
    return rows


def table(rows):
    cols = ["provider", "shape", "B", "Hq", "Hkv", "N", "D", "causal", "mass", "mode", "dtype", "device", "ms",
            "tflops", "vs_flash", "peak_mib", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_outputs(new_rows, out_dir: Path, results_md: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "attention.json"
    rows = {}
    if store.exists():
        rows = {_key(r): r for r in json.loads(store.read_text())}
    for r in new_rows:
        rows[_key(r)] = r
    merged = add_ratios(sorted(rows.values(), key=lambda r: (r["device"], r["shape"], r["N"], r["causal"], r["mode"],
                                                             r["mass"], r["provider"])))
    store.write_text(json.dumps(merged, indent=1))
    with open(out_dir / "attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(merged[0].keys()))
        w.writeheader()
        w.writerows(merged)
    section = f"{BEGIN}\n{table(merged)}\n{END}"
    text = results_md.read_text() if results_md.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Attention kernels (bench/attention.py)\n\n" + section + "\n"
    results_md.parent.mkdir(parents=True, exist_ok=True)
    results_md.write_text(text)
    return merged


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter); checks the script")
    ap.add_argument("--shapes", choices=("all", "hd2048", "qwen"), default="all")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", type=int, nargs="+", default=[1, 0], choices=(0, 1))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--results-md", type=Path, default=ROOT / "bench" / "RESULTS.md")
    a = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype = getattr(torch, a.dtype)
    if a.smoke:
        dtype, reps = torch.float32, 1
    else:
        reps = a.reps
        if device.type != "cuda":
            sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on CPU")
    rows = []
    for shape in shape_grid(a.shapes, a.n, a.smoke):
        for causal in map(bool, a.causal):
            for mode in a.modes:
                for return_mass in (False, True):
                    for p in a.providers:
                        r = bench_one(p, shape, causal, return_mass, mode, dtype, device, reps)
                        rows.append(r)
                        print(f"{r['provider']:16s} {r['shape']:12s} N={r['N']:<6d} causal={int(causal)} "
                              f"mass={int(return_mass)} {mode:8s} ms={r['ms']} TFLOP/s={r['tflops']} "
                              f"peak={r['peak_mib']}MiB {r['note']}", flush=True)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
    merged = write_outputs(rows, a.out_dir, a.results_md)
    print(table([r for r in merged if _key(r) in {_key(x) for x in rows}]))


if __name__ == "__main__":
    main()

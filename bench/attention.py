"""Speed of the category attention kernels against fair baselines (GPU), one row per measurement.

    python bench/attention.py                 # prefill N = 1k..32k and decode Q = 1, K = 4k..32k, bf16
    python bench/attention.py --quick         # a small subset (the one-shot GPU check runs this)
    TRITON_INTERPRET=1 python bench/attention.py --smoke --out-dir /tmp/b --results-md /tmp/b/RESULTS.md

Shape: Qwen2.5-VL-7B-like, B = 1, Hq = 28, Hkv = 4, D = 128, causal (bottom-right aligned), a VLM-like category
layout (system prefix, text, a long image block with a target region, response). Variants (what the kernel does):
  identity      no transform (PAD masking only)            avar          AVAR renorm: w[IMAGE, TARGET] = 1.2, w[SYSTEM] = 0.5
  avar_raw      AVAR raw weights (w[SYSTEM] = 0)          pai           PAI-like: absw[IMAGE] = 0.2 (s + 0.2|s| on image keys)
  avar+mass     AVAR renorm with per-category masses returned (and their gradient in bwd modes)
Providers:
  attn_mod_triton  this repo's Triton kernels (ATTN_MOD_TRITON_CONFIG=pinned skips autotuning)
  sdpa_flash / sdpa_cudnn  torch SDPA with that backend and enable_gqa=True (no K/V expansion); identity only
  flex             torch FlexAttention with enable_gqa, its block mask (causal + PAD) built ONCE outside the timed
                   region, and the same transform as a score_mod (identity / avar / pai; no masses, no raw mode)
  eager            full (B, H, Q, K) probabilities in fp32 (transformers-eager-like); only where they fit in memory
Modes: fwd, bwd (backward of a retained graph), fwd_bwd; decode rows are fwd only.
FLOPs: 4*B*Hq*Q*K*D per forward (x 0.5 for causal prefill: the causal half), backward = 2.5 x forward;
decode rows also give GB/s of K + V read. `vs_flash` = time / sdpa_flash time for the same shape and mode.
Rows stream to <out-dir>/attention.jsonl as they finish (a timeout keeps what finished); at the end
<out-dir>/attention.csv, attention.md and the table between the markers of --results-md are written.
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
VARIANTS = ("identity", "avar", "avar_raw", "pai", "avar+mass")
MODES = ("fwd", "bwd", "fwd_bwd")
HEADS = dict(Hq=28, Hkv=4, D=128)
EAGER_MAX_BYTES = 8 * 2**30  # skip eager when the fp32 probability matrix alone exceeds this
COLUMNS = ["kind", "provider", "variant", "mode", "B", "Hq", "Hkv", "Q", "K", "D", "causal", "dtype", "device", "ms",
           "tflops", "gbps", "vs_flash", "peak_mib", "note"]


def transform(variant: str) -> CategoryTransform:
    if variant in ("avar", "avar+mass"):
        return CategoryTransform.from_lists(w={1: 0.5, 3: 1.2, 4: 1.2}, renorm=True)
    if variant == "avar_raw":
        return CategoryTransform.from_lists(w={1: 0.0, 3: 1.3, 4: 1.3}, renorm=False)
    if variant == "pai":
        return CategoryTransform.from_lists(absw={3: 0.2})
    return CategoryTransform.identity()


def make_categories(B, K, device):
    """system prefix, text, a block of image tokens (with a target region), then response: a VLM-like layout."""
    cat = torch.full((B, K), 2, dtype=torch.int8, device=device)
    s, i0, i1 = K // 16, K // 8, K // 8 + K // 2
    cat[:, :s] = 1
    cat[:, i0:i1] = 3
    cat[:, i0 + K // 8: i0 + K // 4] = 4
    cat[:, i1 + K // 8:] = 5
    return cat


def eager_attention(q, k, v, cat, tr, causal, return_mass):
    """Full probability matrix (B, H, Q, K) in fp32 with the transform, then masses = P @ onehot(cat)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    Q, K = q.shape[2], k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    idx = cat.long()
    pick = lambda t: t.to(q.device)[idx][:, None, None, :]  # noqa: E731
    t = pick(tr.mul) * s + pick(tr.absw) * s.abs() + pick(tr.add)
    vis = (idx != 0)[:, None, None, :]
    if causal:
        vis = vis & torch.ones(Q, K, dtype=torch.bool, device=q.device).tril(K - Q)
    t = t.masked_fill(~vis, float("-inf"))
    if tr.renorm:
        p = torch.softmax(t + torch.log(pick(tr.w)), dim=-1).nan_to_num(0.0)
    else:
        p = torch.softmax(t, dim=-1).nan_to_num(0.0) * pick(tr.w)
    out = torch.matmul(p.to(v.dtype), v)
    mass = torch.matmul(p, torch.nn.functional.one_hot(idx, NUM_CATEGORIES).float()[:, None]) if return_mass else None
    return out, mass


def make_provider(name, variant, device, causal, B, Hq, Q, K, cat):
    """fn(q, k, v) -> (out, mass_or_None) with all setup (block masks, tables) done here, outside the timing;
    or a string saying why the provider does not run this row."""
    tr = transform(variant)
    mass = variant.endswith("+mass")
    if name == "attn_mod_triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA or TRITON_INTERPRET=1"
        tr = tr.to(device)
        return lambda q, k, v: category_attention(q, k, v, cat, tr, causal=causal, return_mass=mass,
                                                  backend="triton")[::2]
    if name == "eager":
        if B * Hq * Q * K * 4 * 3 > EAGER_MAX_BYTES:
            return f"skipped: (B, H, Q, K) fp32 probabilities need > {EAGER_MAX_BYTES // 2**30} GiB"
        return lambda q, k, v: eager_attention(q, k, v, cat, tr, causal, mass)
    if mass:
        return "returns no masses"
    if name in ("sdpa_flash", "sdpa_cudnn"):
        if variant != "identity":
            return "no transform (speed anchor: identity rows only)"
        if device.type != "cuda":
            return "FLASH / cuDNN SDPA backends need CUDA"
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if name == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        is_causal = causal and Q > 1  # torch's is_causal is top-left aligned; a single query row sees every key

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                                        enable_gqa=True), None

        return sdpa
    # flex
    if variant == "avar_raw":
        return "raw weights are not a score_mod"
    if device.type != "cuda":
        return "FlexAttention kernels need CUDA here"
    from torch.nn.attention import flex_attention as fa

    cat_l = cat.long()
    offset = K - Q

    def mask_mod(b, h, q_idx, kv_idx):
        keep = cat_l[b, kv_idx] != 0
        return keep & (kv_idx <= q_idx + offset) if causal else keep

    block_mask = fa.create_block_mask(mask_mod, B, None, Q, K, device=device)  # once, outside the timing
    logw = torch.log(tr.w).to(device)
    absw = tr.absw.to(device)
    score_mod = None
    if variant == "avar":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + logw[cat_l[b, kv_idx]]
    elif variant == "pai":
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + absw[cat_l[b, kv_idx]] * score.abs()
    compiled = _compiled_flex()
    return lambda q, k, v: (compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True), None)


_FLEX = []


def _compiled_flex():
    """One torch.compile'd flex_attention for the whole run (recompiles per shape / score_mod stay under the
    raised cache limit instead of falling back to the unfused eager path)."""
    if not _FLEX:
        import torch._dynamo
        from torch.nn.attention import flex_attention as fa

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _FLEX.append(torch.compile(fa.flex_attention, dynamic=False))
    return _FLEX[0]


def timed(fn, device, reps):
    """(median ms, peak bytes) of fn(); compile / autotune happen in the untimed first call."""
    if device.type == "cuda":
        import triton.testing

        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return triton.testing.do_bench(fn, warmup=10, rep=max(20, reps * 10)), peak
    fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2], float("nan")


def bench_one(kind, provider, variant, mode, B, Q, K, dtype, device, reps, heads=HEADS):
    Hq, Hkv, D = heads["Hq"], heads["Hkv"], heads["D"]
    causal = True
    row = dict(kind=kind, provider=provider, variant=variant, mode=mode, B=B, Hq=Hq, Hkv=Hkv, Q=Q, K=K, D=D,
               causal=causal, dtype=str(dtype).split(".")[-1], device=device.type, ms=None, tflops=None, gbps=None,
               vs_flash=None, peak_mib=None, note="")
    grad = mode != "fwd"
    torch.manual_seed(0)
    q = torch.randn(B, Hq, Q, D, device=device, dtype=dtype, requires_grad=grad)
    k = torch.randn(B, Hkv, K, D, device=device, dtype=dtype, requires_grad=grad)
    v = torch.randn(B, Hkv, K, D, device=device, dtype=dtype, requires_grad=grad)
    cat = make_categories(B, K, device)
    try:
        fn = make_provider(provider, variant, device, causal, B, Hq, Q, K, cat)
        if isinstance(fn, str):
            row["note"] = fn
            return row

        def loss_of(out, mass):
            loss = out.float().square().mean()
            return loss + mass.square().mean() if mass is not None else loss

        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(q, k, v)
        elif mode == "bwd":
            loss = loss_of(*fn(q, k, v))

            def run():
                for t in (q, k, v):
                    t.grad = None
                loss.backward(retain_graph=True)
        else:
            def run():
                for t in (q, k, v):
                    t.grad = None
                loss_of(*fn(q, k, v)).backward()
        ms, peak = timed(run, device, reps)
    except torch.OutOfMemoryError:
        row["note"] = "OOM"
        return row
    except Exception as e:  # a baseline that cannot run this row is reported, not fatal
        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return row
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    flops = 4.0 * B * Hq * Q * K * D * (0.5 if causal and Q > 1 else 1.0)
    flops *= {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
    row.update(ms=round(ms, 4), tflops=round(flops / (ms * 1e-3) / 1e12, 2),
               peak_mib=None if math.isnan(peak) else round(peak / 2**20, 1))
    if kind == "decode":
        row["gbps"] = round(2 * B * Hkv * K * D * q.element_size() / (ms * 1e-3) / 1e9, 1)
    return row


def plan(quick: bool, smoke: bool, providers, variants, modes):
    """[(kind, provider, variant, mode, B, Q, K)] rows to measure."""
    if smoke:
        prefill, decode = [64], [96]
    elif quick:
        prefill, decode = [1024, 4096], [4096, 32768]
    else:
        prefill, decode = [1024, 2048, 4096, 8192, 16384, 32768], [4096, 8192, 16384, 32768]
    rows = []
    for n in prefill:
        for mode in modes:
            for variant in variants:
                for p in providers:
                    rows.append(("prefill", p, variant, mode, 1, n, n))
    for kk in decode:
        for variant in variants:
            for p in providers:
                rows.append(("decode", p, variant, "fwd", 1, 1, kk))
    if quick and not smoke:  # the quick subset drops the slow eager rows and keeps one decode variant per provider
        rows = [r for r in rows if r[1] != "eager" and (r[0] == "prefill" or r[2] in ("identity", "avar"))]
    return rows


def add_ratios(rows):
    anchor = {(r["kind"], r["mode"], r["Q"], r["K"], r["dtype"], r["device"]): r["ms"]
              for r in rows if r["provider"] == "sdpa_flash" and r["ms"]}
    for r in rows:
        a = anchor.get((r["kind"], r["mode"], r["Q"], r["K"], r["dtype"], r["device"]))
        r["vs_flash"] = round(r["ms"] / a, 3) if (a and r["ms"]) else None
    return rows


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_outputs(rows, out_dir: Path, results_md: Path | None, header: str = ""):
    rows = add_ratios(rows)
    with open(out_dir / "attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    md = (header + "\n\n" if header else "") + table(rows)
    (out_dir / "attention.md").write_text(md + "\n")
    if results_md is not None:
        section = f"{BEGIN}\n{md}\n{END}"
        text = results_md.read_text() if results_md.exists() else "# Benchmarks\n\n"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n## Attention kernels (bench/attention.py)\n\n" + section + "\n"
        results_md.write_text(text)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="prefill N = 1k, 4k and decode K = 4k, 32k; no eager")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter); checks the script")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--results-md", type=Path, default=None,
                    help="also rewrite the table between the markers of this file (e.g. bench/RESULTS.md)")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    dtype, reps, heads = getattr(torch, a.dtype), a.reps, HEADS
    if a.smoke:
        dtype, reps, heads = torch.float32, 1, dict(Hq=4, Hkv=2, D=64)
    elif device.type != "cuda":
        sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on CPU")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stream = a.out_dir / "attention.jsonl"
    stream.write_text("")
    header = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (smoke: times meaningless)'}; torch "
              f"{torch.__version__}; ATTN_MOD_TRITON_CONFIG={os.environ.get('ATTN_MOD_TRITON_CONFIG', 'autotune')}; "
              f"command: python bench/attention.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    rows = []
    for kind, p, variant, mode, B, Q, K in plan(a.quick, a.smoke, a.providers, a.variants, a.modes):
        r = bench_one(kind, p, variant, mode, B, Q, K, dtype, device, reps, heads)
        rows.append(r)
        append_row(stream, r)
        print(f"{kind:7s} {p:16s} {variant:10s} {mode:7s} Q={Q:<6d} K={K:<6d} ms={r['ms']} TFLOP/s={r['tflops']} "
              f"GB/s={r['gbps']} {r['note']}", flush=True)
    rows = write_outputs(rows, a.out_dir, a.results_md, header)
    print(table([r for r in rows if r["ms"]]))


if __name__ == "__main__":
    main()

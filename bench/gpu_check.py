"""One-shot GPU check of the Triton kernels (one H200/H100, <= 8 minutes including compiles, no installs).

    python bench/gpu_check.py --out-dir "$OUT"          # or: make gpu-check OUT=/some/dir

Runs with whatever torch / triton / transformers the machine has (written for torch 2.11, triton 3.6,
transformers 5.17) and pinned kernel configs (ATTN_MOD_TRITON_CONFIG=pinned: no autotuning). Steps, each
streamed as one JSON line to <out-dir>/gpu_check.jsonl as soon as it finishes (a timeout keeps what finished):
  env        versions, device, SM count
  parity     bf16 kernels vs the float64 reference on the same inputs (GPU): out (relative), LSE and masses
             (absolute), dq / dk / dv (relative) for GQA 28/4 prefill, Q < K, Q = 1 decode (split-K), the
             transform kinds and row / head enables; one line per case with pass / fail
  registers  registers / spills / shared memory of the pinned configs as compiled here vs the static report
             (bench/kernel_static.json, computed on CPU with triton's bundled ptxas)
  bench      bench/attention.py --quick (its rows stream to <out-dir>/bench/attention.jsonl)
  train_memory  bench/train_memory.py --device cuda --width real: peak memory of one SFT step with the attention
             losses, attn-mod (Triton, bf16) vs eager output_attentions, at 8k / 16k / 32k tokens, 2 real-width
             layers (rows in <out-dir>/train_memory.json, table in <out-dir>/train_memory.md)
  pytest     tests/test_kernels_cuda.py if time is left
A summary table goes to <out-dir>/gpu_check.md. Exit status 1 if a parity case fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ATTN_MOD_TRITON_CONFIG", "pinned")
CPU_SMOKE = "--cpu-smoke" in sys.argv  # tiny parity cases in the Triton interpreter: checks this script on CPU
if CPU_SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

REL = 2e-2  # bf16: relative error of out and gradients
ABS = 2e-3  # bf16 inputs: absolute error of LSE and masses (fp32 outputs)
TRANSFORMS = {
    "identity": {},
    "avar": dict(w={1: 0.5, 3: 1.2, 4: 1.2}),
    "avar_raw": dict(w={1: 0.0, 3: 1.3, 4: 1.3}, renorm=False),
    "pai": dict(absw={3: 0.2, 4: 0.2}),
    "general": dict(mul={3: 1.1, 1: 0.95}, absw={3: 0.2}, add={5: -0.3}, w={1: 0.0, 3: 1.2, 4: 1.4}, renorm=False),
}
# (name, B, Hq, Hkv, Q, K, transform, enables, mass)
CASES = [
    ("prefill_gqa28_4_avar_mass", 1, 28, 4, 1024, 1024, "avar", False, True),
    ("prefill_gqa28_4_identity", 1, 28, 4, 1024, 1024, "identity", False, False),
    ("q_lt_k_general_rows_mass", 1, 28, 4, 256, 1024, "general", True, True),
    ("q_lt_k_pai_rows", 2, 28, 4, 200, 700, "pai", True, False),
    ("prefill_raw_rows_mass", 1, 28, 4, 512, 512, "avar_raw", True, True),
    ("decode_q1_avar_mass", 2, 28, 4, 1, 4096, "avar", True, True),
    ("decode_q1_general_mass", 1, 28, 4, 1, 3000, "general", True, True),
    ("decode_q4_raw", 1, 28, 4, 4, 2048, "avar_raw", False, True),
]


class Stream:
    def __init__(self, path: Path):
        self.path = path
        path.write_text("")
        self.rows = []

    def put(self, row: dict) -> None:
        row = dict(row, t=round(time.time() - T0, 1))
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(json.dumps(row), flush=True)


T0 = time.time()


def vlm_categories(B, K, device):
    import torch

    cat = torch.full((B, K), 2, dtype=torch.int8, device=device)
    cat[:, : K // 16] = 1
    cat[:, K // 8: K // 2] = 3
    cat[:, K // 4: K // 3] = 4
    cat[:, (3 * K) // 4:] = 5
    cat[0, : K // 10] = 0
    if K > 64:
        cat[-1, K // 8 + 5: K // 2: 97] = 4  # a few mixed tiles inside the image block
    return cat


def parity_case(name, B, Hq, Hkv, Q, K, tname, enables, mass):
    import torch

    from attn_mod.kernels.function import category_attention
    from attn_mod.kernels.spec import CategoryTransform

    dev, D, dt = "cuda", 128, torch.bfloat16
    if CPU_SMOKE:  # same code path on tiny shapes (fp32: bf16 arithmetic is broken in the interpreter)
        dev, D, dt, Hq, Hkv = "cpu", 16, torch.float32, 4, 2
        Q, K = min(Q, 24), min(K, 80)
    g = torch.Generator(device=dev).manual_seed(zlib.crc32(name.encode()))
    q = torch.randn(B, Hq, Q, D, device=dev, generator=g).to(dt)
    k = torch.randn(B, Hkv, K, D, device=dev, generator=g).to(dt)
    v = torch.randn(B, Hkv, K, D, device=dev, generator=g).to(dt)
    cat = vlm_categories(B, K, dev)
    tr = CategoryTransform.from_lists(**TRANSFORMS[tname]).to(dev)
    row_en = (torch.rand(B, Q, device=dev, generator=g) > 0.2) if enables else None
    head_en = (torch.arange(Hq, device=dev) % 3 != 1) if enables else None
    g_out = torch.randn(B, Hq, Q, D, device=dev, generator=g, dtype=torch.float64)
    g_mass = torch.randn(B, Hq, Q, 8, device=dev, generator=g, dtype=torch.float64)
    g_lse = torch.randn(B, Hq, Q, device=dev, generator=g, dtype=torch.float64)

    def run(backend, dtype):
        ts = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        r = category_attention(*ts, cat, tr, causal=True, row_enable=row_en, head_enable=head_en, return_mass=mass,
                               backend=backend)
        lse = torch.where(torch.isfinite(r.lse), r.lse, torch.zeros_like(r.lse))
        loss = (r.out.double() * g_out).sum() + (lse.double() * g_lse).sum()
        if mass:
            loss = loss + (r.mass.double() * g_mass).sum()
        loss.backward()
        return r, [t.grad for t in ts]

    t = time.time()
    got, gg = run("triton", dt)
    if dev == "cuda":
        torch.cuda.synchronize()
    first_s = time.time() - t
    want, wg = run("torch", torch.float64)
    rel = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731
    fin = torch.isfinite(want.lse)
    err = dict(out=rel(got.out, want.out),
               lse=(got.lse.double()[fin] - want.lse[fin]).abs().max().item() if fin.any() else 0.0,
               empty_rows_match=bool(torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))))
    if mass:
        err["mass"] = (got.mass.double() - want.mass).abs().max().item()
    for n, a, b in zip(("dq", "dk", "dv"), gg, wg):
        err[n] = rel(a, b) if b.norm() > 0 else a.abs().max().item()
    ok = (err["empty_rows_match"] and err["out"] <= REL and err["lse"] <= ABS and err.get("mass", 0) <= ABS
          and all(err[n] <= REL for n in ("dq", "dk", "dv")))
    return dict(step="parity", case=name, shape=[B, Hq, Hkv, Q, K, D], transform=tname, enables=enables, with_mass=mass,
                ok=bool(ok), first_call_s=round(first_s, 2), **{k: (round(v, 7) if isinstance(v, float) else v)
                                                                  for k, v in err.items()})


def register_rows():
    """Compile the pinned configs here (triton's own ptxas on this machine) and compare with the static report."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import kernel_static as ks

    static = {}
    path = ROOT / "bench" / "kernel_static.json"
    if path.exists():
        static = {(r["kernel"], r["variant"], r["config"]): r for r in json.loads(path.read_text())}
    space = ks.spaces()
    rows = []
    for kernel in ks.KERNELS:
        label, kw, warps, stages = space[kernel][0]
        for variant in ("identity", "avar", "avar+mass", "general_rows"):
            fn, args, meta = ks.launch(kernel, variant)
            args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
            row = dict(step="registers", kernel=kernel, variant=variant, config=label)
            try:
                ck = fn.warmup(*args, grid=(1,), num_warps=warps, num_stages=stages, **meta, **kw)
                if hasattr(ck, "_init_handles"):
                    ck._init_handles()
                row.update(regs=getattr(ck, "n_regs", None), spills=getattr(ck, "n_spills", None),
                           smem=getattr(ck.metadata, "shared", None))
            except Exception as e:  # report, keep going
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            s = static.get((kernel, variant, label))
            if s:
                row.update(static_regs=s["regs"], static_spill_bytes=s["spill"], static_smem=s["smem"])
            rows.append(row)
    return rows


def summary(rows) -> str:
    lines = ["# GPU check", "", "| step | item | result |", "|---|---|---|"]
    for r in rows:
        if r["step"] == "parity":
            res = ("PASS" if r["ok"] else "FAIL") + " " + ", ".join(
                f"{k}={r[k]:.2e}" for k in ("out", "lse", "mass", "dq", "dk", "dv") if k in r)
            lines.append(f"| parity | {r['case']} | {res} |")
        elif r["step"] == "registers":
            lines.append(f"| registers | {r['kernel']} {r['variant']} {r['config']} | regs {r.get('regs')} "
                         f"(static {r.get('static_regs')}), spills {r.get('spills')} (static B "
                         f"{r.get('static_spill_bytes')}), smem {r.get('smem')} (static {r.get('static_smem')}) "
                         f"{r.get('error', '')} |")
        else:
            lines.append(f"| {r['step']} | | {json.dumps({k: v for k, v in r.items() if k != 'step'})[:300]} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out" / "gpu_check")))
    ap.add_argument("--budget-s", type=float, default=470.0, help="stop starting new steps after this many seconds")
    ap.add_argument("--skip", nargs="*", default=[], choices=("parity", "registers", "bench", "train_memory", "pytest"))
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU only: tiny parity cases in the interpreter")
    a = ap.parse_args(argv)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = Stream(a.out_dir / "gpu_check.jsonl")
    import torch
    import triton

    env = dict(step="env", python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
               cuda=torch.cuda.is_available(), config=os.environ["ATTN_MOD_TRITON_CONFIG"])
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
    out.put(env)
    if a.cpu_smoke:
        a.skip = ["registers", "bench", "train_memory", "pytest"]
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: the GPU check needs one (CPU checks: pytest with TRITON_INTERPRET=1, "
                 "bench/kernel_static.py)")
    failed = False
    left = lambda: a.budget_s - (time.time() - T0)  # noqa: E731
    if "parity" not in a.skip:
        for case in CASES:
            if left() < 60:
                out.put(dict(step="parity", case=case[0], ok=False, skipped="budget"))
                continue
            try:
                row = parity_case(*case)
            except Exception as e:
                row = dict(step="parity", case=case[0], ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            failed |= not row["ok"]
            out.put(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if "registers" not in a.skip and left() > 60:
        try:
            for row in register_rows():
                out.put(row)
        except Exception as e:
            out.put(dict(step="registers", error=f"{type(e).__name__}: {str(e)[:300]}"))
    def script_step(step, cmd, *, timeout, note):
        t = time.time()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            out.put(dict(step=step, rc=res.returncode, seconds=round(time.time() - t, 1),
                         tail=res.stdout[-1500:] + res.stderr[-1500:]))
        except subprocess.TimeoutExpired:
            out.put(dict(step=step, rc="timeout", seconds=round(time.time() - t, 1), note=note))

    if "bench" not in a.skip and left() > 45:
        script_step("bench", [sys.executable, str(ROOT / "bench" / "attention.py"), "--quick", "--reps", "5",
                              "--out-dir", str(a.out_dir / "bench")],
                    timeout=max(30, left() - 40), note="rows that finished are in bench/attention.jsonl")
    if "train_memory" not in a.skip and left() > 150:
        script_step("train_memory", [
            sys.executable, str(ROOT / "bench" / "train_memory.py"), "--device", "cuda", "--width", "real", "--dtype",
            "bfloat16", "--backend", "triton", "--layers", "2", "--seqs", "8192", "16384", "32768", "--out",
            str(a.out_dir / "train_memory.json"), "--results-md", str(a.out_dir / "train_memory.md"), "--timeout-s",
            "120"], timeout=max(60, left() - 100), note="rows that finished are in train_memory.json")
    if "pytest" not in a.skip and left() > 90:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_kernels_cuda.py"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=left() - 10, cwd=ROOT)
            out.put(dict(step="pytest", rc=res.returncode, tail=res.stdout[-1500:]))
            failed |= res.returncode != 0
        except subprocess.TimeoutExpired:
            out.put(dict(step="pytest", rc="timeout"))
    (a.out_dir / "gpu_check.md").write_text(summary(out.rows))
    print(summary(out.rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

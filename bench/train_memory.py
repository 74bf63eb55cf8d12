"""Peak memory of one SFT step with the attention losses: attn-mod masses vs eager `output_attentions`.

One optimizer-free SFT step (forward, L = L_LM + 0.15 L_img + 0.15 L_sys, backward) on a Qwen2.5-VL built from a
config (`--layers` text layers; `--width tiny`: hidden 64, 4 heads, 2 KV heads; `--width real`: the attention
widths of Qwen2.5-VL-7B, hidden 3584, 28 heads, 4 KV heads, head dim 128, with a narrow MLP of 2 x hidden and the
tiny vision tower) with one sample of `--seq` tokens (an image, filler text, a short answer), in a fresh
subprocess per (mode, length):

* `attn_mod`: the SFT recipe's own step (`SFTRecipe.train_step`): masses from the patched model's operator
  (`--backend`: torch on CPU, triton on a GPU), captured with gradients in the same forward, AGTO losses from
  `attn_mod.trainers.losses`.
* `eager`: the same recipe step with the HF eager attention and `output_attentions=True`; masses are the
  attention matrices summed by key category, then the same AGTO losses (what the released code does).

Peak memory, after a warm-up step on a 256-token sample:
* CPU (`--device cpu`): process RSS high-water mark (ru_maxrss) after the step minus the mark before it. Children
  run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors return to the OS (RSS then tracks live memory, not
  glibc free lists; see bench/capture_memory.py).
* GPU (`--device cuda`): torch.cuda.max_memory_allocated() during the step minus memory_allocated() before it
  (weights and the warm-up's caches excluded); an out-of-memory step is reported as OOM.

    python bench/train_memory.py --seqs 1024 2048 4096 8192 --layers 2                       # CPU table
    python bench/train_memory.py --device cuda --width real --dtype bfloat16 --seqs 8192 16384 32768   # GPU

Prints a Markdown table, writes bench/out/train_memory.json and appends the table to bench/RESULTS.md
(`--no-results` to skip, `--results-md FILE` elsewhere). `make gpu-check` runs the GPU line (bench/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("attn_mod", "eager")
WIDTHS = {"tiny": dict(hidden=64, heads=4, kv_heads=2), "real": dict(hidden=3584, heads=28, kv_heads=4)}
ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _data(folder: Path, seq: int) -> Path:
    import numpy as np
    from PIL import Image

    from attn_mod.data.samples import write_samples

    Image.fromarray((np.random.default_rng(0).random((112, 112, 3)) * 255).astype("uint8")).save(folder / "im.png")
    rows = []
    for i, n in enumerate((256, seq)):
        # "the " is one token of the tiny BPE; ~70 tokens of template, image (16) and answer besides
        text = "the " * max(1, n - 70)
        rows.append({"id": f"x{i}", "images": ["im.png"], "boxes": [[0, 0, 56, 56]], "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": "The answer is A."}]})
    return write_samples(rows, folder / "train.jsonl")


def child(mode: str, seq: int, layers: int, *, device: str = "cpu", width: str = "tiny", dtype: str = "float32",
          backend: str = "torch") -> dict:
    import torch

    from attn_mod.trainers.config import build_train_config
    from attn_mod.trainers.sft import SFTRecipe

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="train_memory_"))
    cfg = build_train_config({
        "recipe": "sft", "output_dir": str(folder / "out"),
        "model": {"tiny": "qwen2_5_vl", "backend": backend, "dtype": dtype,
                  "tiny_kwargs": {"layers": layers, **WIDTHS[width]}},
        "data": {"train": str(_data(folder, seq)), "cutoff": seq + 512, "shuffle": False},
        "schedule": {"batch_size": 1, "max_steps": 1}, "logging": {"progress": False},
        "objective": {"lambda_img": 0.15, "lambda_sys": 0.15}})
    recipe = EagerSFT(cfg) if mode == "eager" else SFTRecipe(cfg)
    recipe.setup()
    if recipe.accelerator.device.type != device:
        raise SystemExit(f"asked for --device {device} but accelerate placed the model on {recipe.accelerator.device}")
    cuda = device == "cuda"

    def step(i: int) -> tuple[float, int]:
        batch = recipe.collator.collate([recipe.dataset[i]]).to(recipe.accelerator.device)
        out = recipe.train_step(batch)
        out.loss.backward()
        recipe.optimizer.zero_grad(set_to_none=True)
        return float(out.loss), int(batch.labels.shape[1])

    step(0)  # warm-up: lazily loaded kernels and thread pools are not the step's memory
    row = dict(mode=mode, seq=seq, layers=layers, device=device, width=width, dtype=dtype, backend=backend)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _maxrss_mib()
    t0 = time.perf_counter()
    try:
        loss, n = step(1)
    except torch.OutOfMemoryError:
        return {**row, "oom": True, "peak_delta_mib": None, "seconds": None, "loss": None}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mib()
    return {**row, "seq": n, "oom": False, "peak_delta_mib": round(peak - before, 1), "seconds": round(seconds, 3),
            "loss": round(loss, 5)}


def _eager_recipe():
    import torch

    from attn_mod.kernels.spec import NUM_CATEGORIES
    from attn_mod.trainers.data import IGNORE
    from attn_mod.trainers.sft import SFTRecipe

    class EagerSFT(SFTRecipe):
        """The SFT step with masses from eager `output_attentions` (N x N per layer) instead of the operator."""

        def setup(self):
            super().setup()
            self.labeler = self.handle.state.labeler
            self.handle.remove()
            self.model.set_attn_implementation({"text_config": "eager"})

        def forward(self, batch):
            keep = torch.zeros_like(batch.labels, dtype=torch.bool)
            keep[:, :-1] = batch.labels[:, 1:] != IGNORE
            x = batch.model_inputs
            cats = self.labeler(x["input_ids"], attention_mask=x["attention_mask"],
                                mm_token_type_ids=x.get("mm_token_type_ids"), target_mask=batch.target_mask)
            out = self.model(**x, use_cache=False, logits_to_keep=keep, output_attentions=True)
            onehot = torch.nn.functional.one_hot(cats.long(), NUM_CATEGORIES).to(out.attentions[0].dtype)
            masses = torch.stack([torch.einsum("bhqk,bkc->bhqc", a, onehot) for a in out.attentions])
            rows = self.losses.agto_rows(cats, batch.labels)
            return out.logits, keep, self.losses.agto_losses(masses, cats, rows)

    return EagerSFT


EagerSFT = None


def _cell(r: dict | None, key: str) -> str:
    if r is None:
        return "-"
    return "OOM" if r.get("oom") else str(r[key])


def table(rows: list[dict], layers: int) -> list[str]:
    out = ["| tokens | layers | attn-mod peak (MiB) | eager peak (MiB) | attn-mod s | eager s | loss equal |",
           "|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["seq"]): r for r in rows}
    for seq in sorted({r["seq"] for r in rows}):
        a, e = by.get(("attn_mod", seq)), by.get(("eager", seq))
        ok = a and e and not a.get("oom") and not e.get("oom")
        tol = 2e-2 if rows[0].get("dtype") in ("bfloat16", "float16") else 1e-4
        same = ("yes" if abs(a["loss"] - e["loss"]) <= tol * max(1.0, abs(a["loss"])) else "no") if ok else "-"
        out.append(f"| {seq} | {layers} | {_cell(a, 'peak_delta_mib')} | {_cell(e, 'peak_delta_mib')} | "
                   f"{_cell(a, 'seconds')} | {_cell(e, 'seconds')} | {same} |")
    return out


def main() -> None:
    global EagerSFT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--width", choices=tuple(WIDTHS), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                    help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--backend", choices=("torch", "triton"), default=None,
                    help="attn-mod operator backend (default: torch on CPU, triton on CUDA)")
    ap.add_argument("--timeout-s", type=float, default=None, help="per (mode, length) child")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_memory.json"))
    ap.add_argument("--no-results", action="store_true", help="do not append the table to bench/RESULTS.md")
    ap.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.backend = args.backend or ("triton" if cuda else "torch")
    opts = dict(device=args.device, width=args.width, dtype=args.dtype, backend=args.backend)
    if args.child:
        if args.child == "eager":
            EagerSFT = _eager_recipe()
        print(json.dumps(child(args.child, args.seqs[0], args.layers, **opts)))
        return
    from attn_mod.jsonl import write_text_atomic

    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seq in args.seqs:
        for mode in args.modes:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            if not cuda:
                env["CUDA_VISIBLE_DEVICES"] = ""
            cmd = [sys.executable, __file__, "--child", mode, "--seqs", str(seq), "--layers", str(args.layers),
                   *(x for k, v in opts.items() for x in (f"--{k}", v))]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
            except subprocess.TimeoutExpired:
                raise SystemExit(f"{mode} at {seq} ran past --timeout-s {args.timeout_s}; rows so far in {out}")
            if proc.returncode:
                raise SystemExit(f"{mode} at {seq} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            write_text_atomic(out, json.dumps(rows, indent=2))  # after every child: a crash keeps the rows so far
            print(f"done: {mode} {seq}: {rows[-1]}", file=sys.stderr)
    lines = table(rows, args.layers)
    print("\n".join(lines))
    if not args.no_results:
        cmd = "python bench/train_memory.py " + " ".join(sys.argv[1:])
        w = WIDTHS[args.width]
        where = ("peak = torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
                 if cuda else "peak = RSS high-water mark of the step minus the mark before it "
                 "(MALLOC_MMAP_THRESHOLD_=65536)")
        with Path(args.results_md).open("a") as f:
            f.write(f"\n## SFT step memory: attention losses from attn-mod masses vs eager output_attentions "
                    f"({args.device})\n\n"
                    f"`{cmd.strip()}`, {time.strftime('%Y-%m-%d')}: one forward + backward of "
                    f"L_LM + 0.15 L_img + 0.15 L_sys, batch 1, Qwen2.5-VL from a config ({args.width} width: hidden "
                    f"{w['hidden']}, {w['heads']} heads, {w['kv_heads']} KV heads), {args.dtype}, {args.backend} "
                    f"backend; {where}.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

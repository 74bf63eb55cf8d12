"""Peak memory of one SFT step with the attention losses: attn-mod masses vs eager `output_attentions` (CPU).

One optimizer-free SFT step (forward, L = L_LM + 0.15 L_img + 0.15 L_sys, backward) on a tiny-width Qwen2.5-VL
(hidden 64, 4 heads, 2 KV heads, `--layers` layers) with one sample of `--seq` tokens (an image, filler text,
a short answer), in a fresh subprocess per (mode, length):

* `attn_mod`: the SFT recipe's own step (`SFTRecipe.train_step`): masses from the patched model's operator
  (torch backend), captured with gradients in the same forward, AGTO losses from `attn_mod.trainers.losses`.
* `eager`: the same recipe step with the HF eager attention and `output_attentions=True`; masses are the
  attention matrices summed by key category, then the same AGTO losses (what the released code does).

Peak memory = process RSS high-water mark (ru_maxrss) after the step minus the mark before it, after a warm-up
step on a 256-token sample. Children run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors return to the OS
(RSS then tracks live memory, not glibc free lists; see bench/capture_memory.py).

    python bench/train_memory.py --seqs 1024 2048 4096 8192 --layers 2

Prints a Markdown table, writes bench/out/train_memory.json and appends the table to bench/RESULTS.md
(`--no-results` to skip).
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


def child(mode: str, seq: int, layers: int) -> dict:
    import torch

    from attn_mod.trainers.config import build_train_config
    from attn_mod.trainers.sft import SFTRecipe

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="train_memory_"))
    cfg = build_train_config({
        "recipe": "sft", "output_dir": str(folder / "out"),
        "model": {"tiny": "qwen2_5_vl", "backend": "torch", "tiny_kwargs": {"layers": layers}},
        "data": {"train": str(_data(folder, seq)), "cutoff": seq + 512, "shuffle": False},
        "schedule": {"batch_size": 1, "max_steps": 1}, "logging": {"progress": False},
        "objective": {"lambda_img": 0.15, "lambda_sys": 0.15}})
    recipe = EagerSFT(cfg) if mode == "eager" else SFTRecipe(cfg)
    recipe.setup()

    def step(i: int) -> tuple[float, int]:
        batch = recipe.collator.collate([recipe.dataset[i]]).to(recipe.accelerator.device)
        out = recipe.train_step(batch)
        out.loss.backward()
        recipe.optimizer.zero_grad(set_to_none=True)
        return float(out.loss), int(batch.labels.shape[1])

    step(0)  # warm-up: lazily loaded kernels and thread pools are not the step's memory
    before = _maxrss_mib()
    t0 = time.perf_counter()
    loss, n = step(1)
    seconds = time.perf_counter() - t0
    return dict(mode=mode, seq=n, layers=layers, peak_delta_mib=round(_maxrss_mib() - before, 1),
                seconds=round(seconds, 2), loss=round(loss, 5))


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


def main() -> None:
    global EagerSFT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "train_memory.json"))
    ap.add_argument("--no-results", action="store_true", help="do not append the table to bench/RESULTS.md")
    ap.add_argument("--results-md", default=str(ROOT / "bench" / "RESULTS.md"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "eager":
            EagerSFT = _eager_recipe()
        print(json.dumps(child(args.child, args.seqs[0], args.layers)))
        return
    rows = []
    for seq in args.seqs:
        for mode in args.modes:
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536",
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            proc = subprocess.run([sys.executable, __file__, "--child", mode, "--seqs", str(seq), "--layers",
                                   str(args.layers)], capture_output=True, text=True, env=env)
            if proc.returncode:
                raise SystemExit(f"{mode} at {seq} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"done: {mode} {seq}: {rows[-1]}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    table = ["| tokens | layers | attn-mod peak (MiB) | eager peak (MiB) | attn-mod s | eager s | loss equal |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["mode"], r["seq"]): r for r in rows}
    for seq in sorted({r["seq"] for r in rows}):
        a, e = by.get(("attn_mod", seq)), by.get(("eager", seq))
        same = "yes" if a and e and abs(a["loss"] - e["loss"]) <= 1e-4 * max(1.0, abs(a["loss"])) else "-"
        table.append(f"| {seq} | {args.layers} | {a['peak_delta_mib'] if a else '-'} | "
                     f"{e['peak_delta_mib'] if e else '-'} | {a['seconds'] if a else '-'} | "
                     f"{e['seconds'] if e else '-'} | {same} |")
    print("\n".join(table))
    if not args.no_results:
        cmd = "python bench/train_memory.py " + " ".join(sys.argv[1:])
        with Path(args.results_md).open("a") as f:
            f.write("\n## SFT step memory: attention losses from attn-mod masses vs eager output_attentions (CPU)\n\n"
                    f"`{cmd.strip()}`, {time.strftime('%Y-%m-%d')}: one forward + backward of "
                    "L_LM + 0.15 L_img + 0.15 L_sys, batch 1, tiny-width Qwen2.5-VL (hidden 64, 4 heads, 2 KV "
                    "heads), fp32, torch backend; peak = RSS high-water mark of the step minus the mark before "
                    "it (MALLOC_MMAP_THRESHOLD_=65536).\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()

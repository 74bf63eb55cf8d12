"""Peak memory of capturing all-layer attention masses vs eager `output_attentions=True` (CPU).

Each mode runs in a fresh subprocess on a tiny-width Qwen2.5-VL (hidden 64, 4 heads, 2 KV heads,
`--layers` layers) with one prompt of `--seq` tokens (an image plus filler text). After a warm-up
forward on the first 256 tokens, peak memory is the process's resident-set high-water mark
(ru_maxrss) after the full forward minus the same mark before it. Children run with
MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensor memory to the OS (otherwise RSS also
counts allocator free lists, which grow with the number of chunk-sized allocations).

    python bench/capture_memory.py --seq 4096 --layers 4

Prints a Markdown table and writes bench/out/capture_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("sdpa", "eager_output_attentions", "attn_mod_capture")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(mode: str, seq: int, layers: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    import attn_mod
    from attn_mod.tiny import build_tiny

    torch.manual_seed(0)
    model, proc = build_tiny("qwen2_5_vl", layers=layers, attn_implementation="eager" if mode.startswith("eager") else "sdpa")
    img = Image.fromarray((np.random.default_rng(0).random((224, 224, 3)) * 255).astype("uint8"))
    words = "the answer is a red circle left of the blue square " * (seq // 4)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[img], return_tensors="pt")
    cut = batch["input_ids"].shape[1] - seq
    if cut < 0:
        raise SystemExit(f"prompt too short ({batch['input_ids'].shape[1]} < {seq})")
    # keep the system turn, image and header; drop filler text from the middle
    keep = torch.cat([torch.arange(0, 200), torch.arange(200 + cut, batch["input_ids"].shape[1])])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        batch[key] = batch[key][:, keep]
    if mode == "attn_mod_capture":
        attn_mod.patch(model, proc, backend="torch")

    def forward(inputs):
        with torch.no_grad():
            if mode == "attn_mod_capture":
                with attn_mod.capture(model, layers="all") as rec:
                    model(**inputs)
                return sum(rec.mass(layer).numel() * 4 for layer in range(layers))
            if mode == "eager_output_attentions":
                out = model(**inputs, output_attentions=True)
                return sum(a.numel() * a.element_size() for a in out.attentions)
            model(**inputs)
            return 0

    # Warm-up on the first 256 tokens (image included): lazily loaded kernels and thread pools are not
    # counted as the forward's memory.
    forward({k: (v[:, :256] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
             for k, v in batch.items()})
    before = _maxrss_mib()
    t0 = time.perf_counter()
    kept = forward(batch)
    seconds = time.perf_counter() - t0
    return dict(mode=mode, seq=int(batch["input_ids"].shape[1]), layers=layers,
                peak_delta_mib=round(_maxrss_mib() - before, 1), retained_mib=round(kept / 2**20, 2),
                seconds=round(seconds, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "capture_memory.json"))
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.layers)))
        return
    rows = []
    for mode in MODES:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, "--seq", str(args.seq),
                               "--layers", str(args.layers)], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                                   # fixed mmap threshold: freed tensors go back to the OS, so RSS tracks
                                   # live memory instead of glibc's retained free lists
                                   "MALLOC_MMAP_THRESHOLD_": "65536"})
        if proc.returncode:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done: {mode}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"| mode | seq | layers | peak memory above model (MiB) | retained outputs (MiB) | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seq']} | {r['layers']} | {r['peak_delta_mib']} | {r['retained_mib']} | {r['seconds']} |")


if __name__ == "__main__":
    main()

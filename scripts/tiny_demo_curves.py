"""Learning curves of the demo checkpoints trained by scripts/train_tiny_demo.sh, and shipping them.

    python scripts/tiny_demo_curves.py                       # evaluate every checkpoint -> ROOT/curves.json, curves.png
    python scripts/tiny_demo_curves.py --ship attn_mod/assets/tiny_demo   # + copy the final models and curves

Held-out accuracy of a checkpoint = the share of held-out 4-way multiple-choice questions whose greedy first
answer token (argmax of the last prompt row, the same prompt as `attn-mod eval`) is the gold letter. Steps are
counted over the whole recipe (curriculum1 + curriculum2 + qa).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

STAGES = ("curriculum1", "curriculum2", "qa")


def heldout_accuracy(model, processor, samples, batch_size: int = 50) -> float:
    from attn_mod.eval.generation import Request, encode_batch

    tok = processor.tokenizer
    ok = 0
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            reqs = [Request(s.messages[0]["content"][1]["text"], s.load_images()) for s in chunk]
            batch = encode_batch(processor, reqs, "cpu")
            pred = model(**batch).logits[:, -1].argmax(-1).tolist()
            ok += sum(tok.decode([p]).strip() == s.target_text() for p, s in zip(pred, chunk))
    return ok / len(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/tiny_demo")
    ap.add_argument("--variants", nargs="+", default=["plain", "agto"])
    ap.add_argument("--ship", default=None, metavar="DIR", help="copy final models + curves here")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from attn_mod import report
    from attn_mod.jsonl import append_jsonl, read_jsonl
    from attn_mod.data.samples import read_samples
    from attn_mod.loading import load_model

    root = Path(a.root)
    held = read_samples(root / "data" / "heldout.jsonl", require_assistant=True)
    model, processor = load_model(root / "init")
    t_init = (root / "init" / "config.json").stat().st_mtime  # wall-clock origin of the curves
    cache = root / "curves_cache.jsonl"  # one row per evaluated checkpoint, appended as it is measured
    done = {r["key"]: r["accuracy"] for r in read_jsonl(cache, required=("key", "accuracy"))}
    curves, training = {}, {}
    for variant in a.variants:
        model, processor = load_model(root / "init")  # fresh: the loop below loads checkpoints into it
        pts, offset = [{"step": 0, "stage": "init", "accuracy": heldout_accuracy(model.eval(), processor, held)}], 0
        for stage in STAGES:
            out = root / variant / stage
            if not (out / "metrics.jsonl").is_file():
                break
            rows = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl", required=("step",), repair=False)}
            for ck in sorted((out / "checkpoints").glob("step-*")):
                step = int(ck.name.split("-")[1])
                key = f"{variant}/{stage}/{step}"
                if key not in done:
                    model.load_state_dict(load_file(ck / "weights.safetensors"), strict=False)
                    done[key] = heldout_accuracy(model.eval(), processor, held)
                    append_jsonl(cache, [{"key": key, "accuracy": done[key]}])
                    print(key, done[key], flush=True)
                r = rows.get(step, {})
                pts.append({"step": offset + step, "stage": stage, "accuracy": done[key],
                            "minutes": round((ck.stat().st_mtime - t_init) / 60, 2), "loss": r.get("loss"),
                            "loss_lm": r.get("loss_lm"), "loss_img": r.get("loss_img"), "loss_sys": r.get("loss_sys")})
            offset += max(rows) if rows else 0
        curves[variant] = pts
        walls = {}  # scripts/train_tiny_demo.sh logs each stage's wall time; a rerun stage's last line counts
        wall_file = root / variant / "wall.jsonl"  # a missing file reads as no rows
        for r in read_jsonl(wall_file, required=("stage", "wall_s"), repair=False):
            walls[r["stage"]] = r["wall_s"]
        training[variant] = {"stage_wall_s": walls, "wall_minutes": round(sum(walls.values()) / 60, 1),
                             "final_accuracy": pts[-1]["accuracy"], "steps": offset}
    (root / "curves.json").write_text(json.dumps(curves, indent=1))
    report.curves_plot(curves, path=root / "curves.png")
    print(json.dumps(training, indent=1))
    if a.ship:
        ship = Path(a.ship)
        ship.mkdir(parents=True, exist_ok=True)
        shipped = {}
        for variant in a.variants:
            final = root / variant / "qa" / "final"
            shutil.rmtree(ship / variant, ignore_errors=True)
            if (final / "config.json").is_file():
                shipped[variant] = "qa/final"
                shutil.copytree(final, ship / variant)
            else:  # the qa stage was stopped early: its latest checkpoint on top of the previous stage's model
                cks = sorted((root / variant / "qa" / "checkpoints").glob("step-*"))
                if not cks:
                    sys.exit(f"{final} is missing and there is no qa checkpoint: train {variant} first")
                from attn_mod.tiny import save_checkpoint

                base, proc = load_model(root / variant / "curriculum2" / "final")
                base.load_state_dict(load_file(cks[-1] / "weights.safetensors"), strict=False)
                save_checkpoint(base, proc, ship / variant)
                shipped[variant] = f"qa/checkpoints/{cks[-1].name}"
            (ship / variant / "attn_mod_tiny.json").write_text(json.dumps({"family": "qwen2_5_vl"}))
        shutil.copy(root / "curves.json", ship / "curves.json")
        meta = {"reproduce": "ROOT=runs/tiny_demo scripts/train_tiny_demo.sh plain && "
                             "ROOT=runs/tiny_demo scripts/train_tiny_demo.sh agto && "
                             f"python scripts/tiny_demo_curves.py --ship {a.ship}",
                "heldout": "python -m attn_mod.data.synthetic (HELDOUT: 150 images, 300 questions, seed 10000)",
                "shipped_from": shipped, **training}
        (ship / "training.json").write_text(json.dumps(meta, indent=1))
        print(f"shipped to {ship}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

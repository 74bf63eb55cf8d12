"""`attn-mod demo`: the main job on the embedded default, with no downloads.

1. writes a tiny random Qwen2.5-VL (with tokenizer and image processor) to OUT/model,
2. writes the synthetic benchmark (coloured shapes, target boxes) to OUT/data/synthetic.tsv,
3. runs an AVAR alpha x beta sweep with per-sample VAS / target attention -> OUT/sweep,
4. inspects one sample (answer, metrics, attention pictures) -> OUT/inspect.

The model is random, so accuracies are near chance: the demo shows the pipeline, not a result.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "qwen3_vl"])
    p.add_argument("--samples", type=int, default=12, help="synthetic benchmark size")
    p.add_argument("--system", default=None, help="system prompt for the sweep and the inspection (default: the "
                   "chat template's own; qwen3_vl has none, so beta does nothing and VAS is undefined without it)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the sweep rows already in OUT/sweep/results.jsonl (default); --no-resume starts over")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from .eval.datasets import load_benchmark, make_synthetic_benchmark
    from .eval.sweep import run_sweep
    from .eval.sweep_config import DatasetConfig, GenerationConfig, GridConfig, SweepConfig
    from .tiny import save_tiny

    out = Path(args.out)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        save_tiny(args.family, model_dir)
    data = make_synthetic_benchmark(out / "data" / "synthetic.tsv", n=args.samples, seed=0)
    cfg = SweepConfig(model=str(model_dir), datasets=[DatasetConfig(path=str(data), name="synthetic")],
                      grid=GridConfig(preset="avar", alpha=[0.0, 0.5], beta=[0.0, 0.5]),
                      generation=GenerationConfig(max_new_tokens=8, batch_size=4), attention_metrics=True,
                      system=args.system,
                      output_dir=str(out / "sweep"))
    cfg.validate()
    result = run_sweep(cfg, resume=args.resume, progress=not args.no_progress)
    print(result.paths["markdown"].read_text())
    print(f"sweep results: {result.output_dir}/ (results.jsonl, summary.csv, results.md, heatmap_synthetic.png)")

    sample = next(iter(load_benchmark(data, name="synthetic")))
    image_path = out / "data" / "example.png"
    sample.load_image().save(image_path)
    from . import inspect as inspect_cmd

    inspect_args = [str(model_dir), "--image", str(image_path), "--question", sample.question,
                    "--preset", "avar", "--alpha", "0.5", "--beta", "0.5", "--max-new-tokens", "8",
                    "--out", str(out / "inspect")]
    if args.system:
        inspect_args += ["--system", args.system]
    if sample.bbox:
        inspect_args += ["--box", *map(str, sample.bbox[0])]
    parser = argparse.ArgumentParser()
    inspect_cmd.add_arguments(parser)
    code = inspect_cmd.run(parser.parse_args(inspect_args))
    print(f"inspection of one sample: {out / 'inspect'}/ (answer.txt, metrics.json, tokens.jsonl, *.png, tokens.html)")
    return code

"""`attn-mod demo`: the whole toolkit on a tiny VLM that has learnt something, in one HTML report.

    attn-mod demo                      # shipped tiny checkpoints (plain + AGTO-trained) on the synthetic held-out set
    attn-mod demo --quick              # small numbers (the test)
    attn-mod demo --model mine=/path/to/qwen2.5-vl --benchmark LMUData/MMStar.tsv --out runs/demo_real

Into --out (default runs/demo):
1. data/heldout.tsv - the synthetic grounded-VQA held-out split (`attn_mod.data.synthetic`; images never seen in
   training), unless --benchmark is given;
2. eval/<checkpoint>/ - accuracy, VAS and SAYO target attention a per held-out question (`attn_mod.eval.sweep`,
   identity cell, attention metrics on);
3. sweep/ - an AVAR alpha x beta sweep on the first checkpoint (results.md table, heatmap PNG);
4. examples/<checkpoint>/<k>/ - `attn-mod inspect` of a few held-out questions (image heatmap with the target
   box, token-coloured answer, per-layer curves);
5. accuracy_by_attention.png (accuracy per target-attention quantile), comparison.png (checkpoint vs
   checkpoint), curves.png (the shipped checkpoints' learning curves), summary.json and index.html.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

ASSETS = Path(__file__).parent / "assets" / "tiny_demo"
DEFAULT_CHECKPOINTS = (("plain", ASSETS / "plain"), ("agto", ASSETS / "agto"))
CAPTIONS = {
    "plain": "SFT only (one object -> one to three -> three or four objects)",
    "agto": "same recipe + AGTO attention losses",
}


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--model", action="append", metavar="NAME=PATH", default=None,
                   help="a checkpoint to report on (repeatable; a local HF directory); default: the shipped "
                        "tiny 'plain' and 'agto' checkpoints. The first one gets the alpha x beta sweep.")
    p.add_argument("--benchmark", default=None, metavar="PATH",
                   help="a local benchmark (TSV / JSONL / folder, see attn_mod.eval.datasets) instead of the "
                        "synthetic held-out split; bbox columns give target attention")
    p.add_argument("--samples", type=int, default=None, help="held-out questions evaluated per checkpoint "
                                                              "(default 200; --quick 16)")
    p.add_argument("--sweep-samples", type=int, default=None, help="questions per sweep cell (default 60; --quick 8)")
    p.add_argument("--alpha", type=float, nargs="+", default=None, help="sweep alpha values (default 0 1 3)")
    p.add_argument("--beta", type=float, nargs="+", default=None, help="sweep beta values (default 0 0.5 0.9)")
    p.add_argument("--examples", type=int, default=None, help="held-out questions inspected per checkpoint "
                                                               "(default 3; --quick 1)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="answer length (default 4: a letter + end)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="small numbers everywhere (for tests)")
    p.add_argument("--system", default=None, help="system prompt for the sweeps and the inspections (default: the "
                   "chat template's own; qwen3_vl has none, so beta does nothing and VAS is undefined without it)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the sweep rows already in OUT (default); --no-resume starts over")
    p.add_argument("--no-progress", action="store_true")


def _checkpoints(args) -> list[tuple[str, Path]]:
    if not args.model:
        missing = [str(p) for _, p in DEFAULT_CHECKPOINTS if not (p / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"the shipped demo checkpoints are missing ({', '.join(missing)}); reinstall "
                                    "attn-mod, or pass --model NAME=PATH")
        return list(DEFAULT_CHECKPOINTS)
    out = []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or "model", spec
        if not name or "/" in name:
            raise ValueError(f"--model {spec!r}: give NAME=PATH with a simple NAME (no '/')")
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"--model {spec!r}: {path} is not a Hugging Face model directory (no config.json)")
        if name in {n for n, _ in out}:
            raise ValueError(f"--model names must be distinct; {name!r} is given twice")
        out.append((name, Path(path)))
    return out


def _settings(args) -> dict:
    q = args.quick
    s = {"samples": args.samples if args.samples is not None else (16 if q else 200),
         "sweep_samples": args.sweep_samples if args.sweep_samples is not None else (8 if q else 60),
         "alpha": args.alpha or ([0.0, 1.0] if q else [0.0, 1.0, 3.0]),
         "beta": args.beta or ([0.0, 0.5] if q else [0.0, 0.5, 0.9]),
         "examples": args.examples if args.examples is not None else (1 if q else 3)}
    for key in ("samples", "sweep_samples", "examples"):
        if s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {s[key]}")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1")
    return s


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _sweep(model_dir: Path, data: Path, out: Path, *, alpha=None, beta=None, limit: int, args) -> dict:
    """Run `attn_mod.eval.sweep` (baseline, plus an AVAR grid when alpha/beta are given) -> result."""
    from .eval.sweep import run_sweep
    from .eval.sweep_config import DatasetConfig, GenerationConfig, GridConfig, SweepConfig

    grid = GridConfig(preset="avar", alpha=list(alpha), beta=list(beta)) if alpha else None
    cfg = SweepConfig(model=str(model_dir),
                      datasets=[DatasetConfig(path=str(data), name="heldout", limit=limit)], system=args.system,
                      grid=grid, generation=GenerationConfig(max_new_tokens=args.max_new_tokens,
                                                             batch_size=args.batch_size),
                      attention_metrics=True, output_dir=str(out))
    cfg.validate()
    return run_sweep(cfg, resume=args.resume, progress=not args.no_progress)


def _records(path: Path, cell: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["cell"] == cell]


def _inspect(model_dir: Path, sample, out: Path, args) -> dict:
    from . import inspect as inspect_cmd
    from .eval.generation import Request  # noqa: F401  (same prompt path as the sweep)
    from .eval.prompts import build_prompt

    out.mkdir(parents=True, exist_ok=True)
    image_path = out / "image.png"
    sample.load_image().save(image_path)
    argv = [str(model_dir), "--image", str(image_path), "--question", build_prompt(sample),
            "--max-new-tokens", str(args.max_new_tokens), "--out", str(out)]
    if args.system:
        argv += ["--system", args.system]
    for box in sample.bbox or ():
        argv += ["--box", *map(str, box)]
    parser = argparse.ArgumentParser()
    inspect_cmd.add_arguments(parser)
    inspect_cmd.run(parser.parse_args(argv))
    return json.loads((out / "metrics.json").read_text())


def run(args) -> int:
    from . import report
    from .eval.datasets import load_benchmark

    t0 = time.perf_counter()
    s = _settings(args)  # everything validated before any work
    checkpoints = _checkpoints(args)
    if args.benchmark is not None and not Path(args.benchmark).exists():
        raise FileNotFoundError(f"--benchmark {args.benchmark!r} does not exist")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. held-out data
    if args.benchmark is None:
        from .data.synthetic import HELDOUT, make_split, write_tsv

        n_images = max(1, math.ceil(s["samples"] / 2))  # two questions (colour, shape) per image
        items, _ = make_split(**dict(HELDOUT, n_images=min(HELDOUT["n_images"], n_images)))
        data = write_tsv(items, out / "data" / "heldout.tsv")
    else:
        data = Path(args.benchmark)
    bench = load_benchmark(data, name="heldout", limit=s["samples"])
    n_questions = len(bench)
    print(f"held-out benchmark: {data} ({n_questions} questions)")

    # 2. evaluation of each checkpoint; 3. the sweep on the first
    summary: dict = {"benchmark": str(data), "questions": n_questions, "checkpoints": {}, "settings": s}
    quantiles: dict[str, list[dict]] = {}
    for name, path in checkpoints:
        res = _sweep(path, data, out / "eval" / name, limit=s["samples"], args=args)
        base = res.summary["baseline"]
        row = next(r for r in res.summary["rows"] if r["cell"] == base)
        recs = _records(res.paths["results"], base)
        summary["checkpoints"][name] = {"path": str(path), "accuracy": row["accuracy"], "n": row["n"],
                                        "vas": _finite(row.get("vas")), "target_a": _finite(row.get("target_a")),
                                        "target_R_a": _finite(row.get("target_R_a")),
                                        "by_category": row.get("by_category", {})}
        try:
            quantiles[name] = report.accuracy_by_quantile([r.get("target_a") for r in recs],
                                                          [r["correct"] for r in recs], bins=4)
        except ValueError as e:  # a benchmark without boxes
            print(f"{name}: no accuracy-by-attention plot ({e})")
        c = summary["checkpoints"][name]
        print(f"{name}: accuracy {100 * c['accuracy']:.1f}% on {c['n']} questions, VAS {_g(c['vas'])}, "
              f"target attention a {_g(c['target_a'])}")
    first_name, first_path = checkpoints[0]
    sweep = _sweep(first_path, data, out / "sweep", alpha=s["alpha"], beta=s["beta"], limit=s["sweep_samples"],
                   args=args)
    table = sweep.paths["markdown"].read_text()
    summary["sweep"] = {"checkpoint": first_name, "rows": [
        {k: r.get(k) for k in ("cell", "alpha", "beta", "accuracy", "vas", "target_a")} for r in sweep.summary["rows"]]}
    print(f"alpha x beta sweep on {first_name} ({s['sweep_samples']} questions per cell):\n{table}")

    # 4. attention pictures of a few held-out questions
    examples = []
    picked = [bench[i] for i in range(min(s["examples"], n_questions))]
    for name, path in checkpoints:
        for k, sample in enumerate(picked):
            m = _inspect(path, sample, out / "examples" / name / str(k), args)
            examples.append({"checkpoint": name, "k": k, "question": sample.question, "gold": sample.answer,
                             "answer": m["answer"], "vas": m["vas"]["value"],
                             "target_a": m["target_attention"].get("a_mean")})

    # 5. report figures and page
    figures = []
    if quantiles:
        report.quantile_plot(quantiles, path=out / "accuracy_by_attention.png",
                             title=f"accuracy by target-attention quantile ({n_questions} held-out questions)")
        figures.append(("accuracy_by_attention.png",
                        "Accuracy per quartile of target attention a (answer rows, last layer): does looking at the "
                        "asked-about object go with answering right?"))
    summary["accuracy_by_attention"] = quantiles
    report.comparison_plot(summary["checkpoints"], path=out / "comparison.png")
    figures.append(("comparison.png", "Each checkpoint without intervention: accuracy, mean VAS and mean target "
                                      "attention on the same held-out questions."))
    curves_file = ASSETS / "curves.json"
    if not args.model and curves_file.is_file():
        curves = json.loads(curves_file.read_text())
        report.curves_plot(curves, path=out / "curves.png", x="step")
        figures.append(("curves.png", "How the shipped checkpoints were trained: held-out accuracy and loss per "
                                      "step, with and without the AGTO losses."))
        summary["training"] = json.loads((ASSETS / "training.json").read_text()) if (
            ASSETS / "training.json").is_file() else None
    sweep_figs = [(p.relative_to(out).as_posix(), "Accuracy (and mean VAS) of every alpha x beta cell of AVAR on "
                                                   f"{first_name}: alpha boosts image attention, beta cuts system.")
                  for p in sorted((out / "sweep").glob("heatmap_*.png"))]
    ex_figs = []
    for e in examples:
        d = f"examples/{e['checkpoint']}/{e['k']}"
        tag = f"{e['checkpoint']}, question {e['k']} ({e['question']!r}; gold {e['gold']}, answered {e['answer']!r})"
        ex_figs += [(f"{d}/heatmap.png", f"{tag}: attention of the answer rows over the image; box = target object."),
                    (f"{d}/tokens.png", f"{tag}: each answer token coloured by its target attention a."),
                    (f"{d}/layers.png", f"{tag}: per-layer VAS and attention mass by category.")]
    summary["examples"] = examples
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    ck = "\n".join(["| checkpoint | accuracy % | mean VAS | mean target a | training |", "|---|---|---|---|---|"] +
                   [f"| {n} | {_pct(c['accuracy'])} | {_f(c['vas'])} | {_f(c['target_a'])} | "
                    f"{CAPTIONS.get(n, c['path']) if not args.model else c['path']} |"
                    for n, c in summary["checkpoints"].items()])
    report.write_index(
        out / "index.html", title="attn-mod demo",
        intro=(f"Held-out benchmark <code>{data.name}</code>, {n_questions} questions, chance 25 % on 4-way multiple "
               f"choice. Checkpoints: {', '.join(n for n, _ in checkpoints)}. Wall time {summary['wall_s']:.0f} s."),
        tables={"Checkpoints on the held-out split (no intervention)": ck,
                f"AVAR alpha x beta sweep on {first_name} (accuracy %)": table},
        sections=[("What training with attention objectives changes", figures),
                  ("What alpha and beta do", sweep_figs),
                  ("Where the model looks (held-out examples)", ex_figs, 340)])
    print(ck)
    print(f"report: {out / 'index.html'} ({summary['wall_s']:.0f} s)")
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"

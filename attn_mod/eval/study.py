"""`attn-mod study RUN_DIRS...`: does accuracy track attention? (AVAR Fig. 1a, SAYO Fig. 2)

Reads the per-sample rows of sweep / eval runs recorded with attention metrics (``results.jsonl`` rows with
``correct`` and ``vas`` / ``target_a``) and writes, for every *condition* = (run, cell, dataset) and attention
*measure* (VAS = mass_img / (mass_sys + 1e-6), SAYO target attention a):

* accuracy by quantile of the measure: the condition's samples sorted by the measure (ties by sample id) and cut
  into `bins` groups of (almost) equal size; accuracy per group;
* point-biserial correlation r_pb = Pearson r between the measure x and correctness y in {0, 1}, and Spearman
  rho = Pearson r of the average ranks (ties share their mean rank), each with a percentile bootstrap CI
  (`n_boot` resamples of the condition's samples with replacement, seeded; a resample where x or y is
  constant has no r and is left out; the CI is None when fewer than half the resamples have one);
* across conditions (models or cells), per dataset: accuracy vs the condition's mean measure with a least-squares
  line acc = intercept + slope * mean (and Pearson r of the points).

Outputs in `out`: study.json (everything), study.csv (one row per condition x measure), quantiles.csv,
across.csv, quantiles_<measure>.png, correlation_<measure>.png, across_<measure>.png, study.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..jsonl import read_jsonl

__all__ = ["MEASURES", "load_run", "quantile_accuracy", "point_biserial", "spearman", "bootstrap_ci", "fit_line",
           "run_study", "add_arguments", "run"]

MEASURES = {"vas": "VAS (ratio form)", "target_a": "target attention a (SAYO)"}


# --------------------------------------------------------------------------------------------- reading


def load_run(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir`/results.jsonl with a boolean ``correct`` (read only: bad or torn lines are skipped
    with a warning, `attn_mod.jsonl.read_jsonl(repair=False)`)."""
    path = Path(run_dir) / "results.jsonl"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no results.jsonl: pass a sweep / eval output directory")
    rows = read_jsonl(path, required=("cell", "dataset", "correct"), repair=False)
    return [r for r in rows if isinstance(r.get("correct"), bool)]


def _run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in run_dirs]


# --------------------------------------------------------------------------------------------- statistics


def _clean(x: Sequence, y: Sequence) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray([math.nan if v is None else float(v) for v in x], dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x)
    return x[keep], y[keep]


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return None if den == 0 else float((dx * dy).sum()) / den


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share their mean rank)."""
    order = np.argsort(a, kind="mergesort")
    inv = np.empty_like(order)
    inv[order] = np.arange(len(a))
    s = a[order]
    first = np.r_[True, s[1:] != s[:-1]]
    dense = first.cumsum()[inv]
    bounds = np.r_[np.nonzero(first)[0], len(a)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def point_biserial(x: Sequence, y: Sequence) -> float | None:
    """Point-biserial r between a measure and 0/1 correctness (Pearson r); None when either is constant."""
    return _pearson(*_clean(x, y))


def spearman(x: Sequence, y: Sequence) -> float | None:
    """Spearman rho (Pearson r of average ranks); None when either is constant."""
    x, y = _clean(x, y)
    return _pearson(_rank(x), _rank(y)) if len(x) >= 2 else None


def bootstrap_ci(x: Sequence, y: Sequence, stat, *, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of `stat(x, y)` over resamples of the (x, y) pairs."""
    x, y = _clean(x, y)
    n = len(x)
    if n < 2 or n_boot < 1:
        return None, None
    rng = np.random.default_rng(seed)
    vals = []
    for idx in rng.integers(0, n, size=(n_boot, n)):
        v = stat(x[idx], y[idx])
        if v is not None:
            vals.append(v)
    if len(vals) < max(2, n_boot // 2):
        return None, None
    alpha = (1 - level) / 2
    return float(np.quantile(vals, alpha)), float(np.quantile(vals, 1 - alpha))


def quantile_accuracy(x: Sequence, y: Sequence, keys: Sequence[str] | None = None, bins: int = 4) -> list[dict]:
    """Accuracy per quantile group of x: samples sorted by (x, key), cut into `bins` near-equal groups."""
    xs = [math.nan if v is None else float(v) for v in x]
    keys = list(keys) if keys is not None else [""] * len(xs)
    items = sorted((v, k, bool(c)) for v, k, c in zip(xs, keys, y) if math.isfinite(v))
    out = []
    for i, chunk in enumerate(np.array_split(np.arange(len(items)), min(bins, len(items)) or 1)):
        if len(chunk) == 0:
            continue
        part = [items[j] for j in chunk]
        out.append({"bin": i + 1, "lo": part[0][0], "hi": part[-1][0], "n": len(part),
                    "mean": sum(p[0] for p in part) / len(part), "accuracy": sum(p[2] for p in part) / len(part)})
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict | None:
    """Least-squares line y = intercept + slope * x, with Pearson r; None with < 2 distinct x."""
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return None
    dx = x - x.mean()
    slope = float((dx * (y - y.mean())).sum() / (dx * dx).sum())
    return {"slope": slope, "intercept": float(y.mean() - slope * x.mean()), "r": _pearson(x, y), "n": len(x)}


def _r_pb(x, y):
    return _pearson(x, y)


def _rho(x, y):
    return _pearson(_rank(x), _rank(y))


# --------------------------------------------------------------------------------------------- the study


def run_study(run_dirs: Sequence[str | Path], out: str | Path, *, measures: Sequence[str] = tuple(MEASURES),
              bins: int = 4, n_boot: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """Run the study over `run_dirs`; returns {"result": dict, "paths": {name: Path}} (see module doc)."""
    if not run_dirs:
        raise ValueError("give at least one run directory (a sweep / eval output_dir with results.jsonl)")
    bad = [m for m in measures if m not in MEASURES]
    if bad:
        raise ValueError(f"unknown measure(s) {bad}; choose from {sorted(MEASURES)}")
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    labels = _run_labels(run_dirs)
    runs = {}
    for label, d in zip(labels, run_dirs):
        rows = load_run(d)
        if not any(r.get(m) is not None for r in rows for m in measures):
            raise ValueError(f"{d}: no per-sample {' / '.join(measures)} in results.jsonl; rerun the sweep with "
                             "attention_metrics: true (attn-mod eval --attention-metrics)")
        runs[label] = rows
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for label, rows in runs.items():
        for r in rows:
            groups[(label, str(r.get("cell")), str(r.get("dataset")))].append(r)
    conditions = []
    todo = [(key, m) for key in groups for m in measures]
    for (label, cell, ds), m in tqdm(todo, desc="study", disable=not progress, unit="condition"):
        rows = groups[(label, cell, ds)]
        have = [r for r in rows if r.get(m) is not None and math.isfinite(float(r[m]))]
        if not have:
            continue
        x = [float(r[m]) for r in have]
        y = [r["correct"] for r in have]
        cs = seed + len(conditions)  # a distinct, reproducible stream per condition
        conditions.append({
            "run": label, "cell": cell, "dataset": ds, "measure": m, "n": len(have), "n_rows": len(rows),
            "accuracy": sum(y) / len(y), "mean": sum(x) / len(x),
            "r_pb": point_biserial(x, y), "r_pb_ci": list(bootstrap_ci(x, y, _r_pb, n_boot=n_boot, seed=cs)),
            "spearman": spearman(x, y), "spearman_ci": list(bootstrap_ci(x, y, _rho, n_boot=n_boot, seed=cs + 7919)),
            "quantiles": quantile_accuracy(x, y, [str(r.get("sample_id")) for r in have], bins),
        })
    if not conditions:
        raise ValueError("no sample has a finite attention measure; nothing to study")
    across = {}
    for m in measures:
        pts = [c for c in conditions if c["measure"] == m]
        per_ds = {}
        for ds in sorted({c["dataset"] for c in pts}):
            sub = [c for c in pts if c["dataset"] == ds]
            per_ds[ds] = {"points": [{"run": c["run"], "cell": c["cell"], "mean": c["mean"], "accuracy": c["accuracy"],
                                      "n": c["n"]} for c in sub],
                          "fit": fit_line([c["mean"] for c in sub], [c["accuracy"] for c in sub])}
        if per_ds:
            across[m] = per_ds
    result = {"runs": {label: str(d) for label, d in zip(labels, run_dirs)}, "measures": list(measures),
              "bins": bins, "n_boot": n_boot, "seed": seed, "conditions": conditions, "across": across}
    paths = _write(result, out)
    return {"result": result, "paths": paths}


# --------------------------------------------------------------------------------------------- outputs


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ci(ci) -> str:
    return "-" if ci is None or ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _write(result: dict, out: Path) -> dict[str, Path]:
    paths = {"json": out / "study.json", "csv": out / "study.csv", "quantiles": out / "quantiles.csv",
             "across": out / "across.csv", "markdown": out / "study.md"}
    paths["json"].write_text(json.dumps(result, indent=2))
    conds = result["conditions"]
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "cell", "dataset", "measure", "n", "accuracy", "mean", "r_pb", "r_pb_lo", "r_pb_hi",
                    "spearman", "spearman_lo", "spearman_hi"])
        for c in conds:
            w.writerow([c["run"], c["cell"], c["dataset"], c["measure"], c["n"], c["accuracy"], c["mean"], c["r_pb"],
                        *c["r_pb_ci"], c["spearman"], *c["spearman_ci"]])
    with paths["quantiles"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "cell", "dataset", "measure", "bin", "lo", "hi", "n", "mean", "accuracy"])
        for c in conds:
            for q in c["quantiles"]:
                w.writerow([c["run"], c["cell"], c["dataset"], c["measure"], q["bin"], q["lo"], q["hi"], q["n"],
                            q["mean"], q["accuracy"]])
    with paths["across"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["measure", "dataset", "run", "cell", "mean", "accuracy", "n", "slope", "intercept", "r"])
        for m, per_ds in result["across"].items():
            for ds, block in per_ds.items():
                fit = block["fit"] or {}
                for p in block["points"]:
                    w.writerow([m, ds, p["run"], p["cell"], p["mean"], p["accuracy"], p["n"], fit.get("slope"),
                                fit.get("intercept"), fit.get("r")])
    for m in result["measures"]:
        sub = [c for c in conds if c["measure"] == m]
        if sub:
            paths[f"quantiles_{m}"] = _plot_quantiles(sub, m, out / f"quantiles_{m}.png")
            paths[f"correlation_{m}"] = _plot_correlation(sub, m, out / f"correlation_{m}.png")
        if m in result["across"]:
            paths[f"across_{m}"] = _plot_across(result["across"][m], m, out / f"across_{m}.png")
    paths["markdown"].write_text(_markdown(result))
    return paths


def _name(c: dict) -> str:
    return f"{c['run']} / {c['cell']} / {c['dataset']}"


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _plot_quantiles(conds: list[dict], m: str, path: Path) -> Path:
    datasets = sorted({c["dataset"] for c in conds})
    fig = _figure(5.2 * len(datasets) + 0.6, 4.2)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        for c in (c for c in conds if c["dataset"] == ds):
            qs = c["quantiles"]
            ax.plot([q["bin"] for q in qs], [100 * q["accuracy"] for q in qs], marker="o", label=f"{c['run']} / {c['cell']}")
        ax.set_xlabel(f"{MEASURES[m]} quantile (1 = lowest)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-5, 105)
        ax.set_xticks(range(1, _bins(conds) + 1))
        ax.set_title(f"{ds}: accuracy by {m} quantile", fontsize=10)
        if sum(1 for c in conds if c["dataset"] == ds) <= 12:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _bins(conds: list[dict]) -> int:
    return max(len(c["quantiles"]) for c in conds)


def _plot_correlation(conds: list[dict], m: str, path: Path) -> Path:
    fig = _figure(7.5, 1.5 + 0.45 * len(conds))
    ax = fig.subplots()
    ys = np.arange(len(conds))
    for off, key, color in ((-0.15, "r_pb", "tab:blue"), (0.15, "spearman", "tab:orange")):
        for yi, c in zip(ys, conds):
            v, (lo, hi) = c[key], c[f"{key}_ci"]
            if v is None:
                if key == "r_pb":
                    ax.text(0.02, yi, "undefined: correctness or measure constant", fontsize=7, va="center",
                            color="gray")
                continue
            ax.plot([v], [yi + off], "o", color=color)
            if lo is not None:
                ax.plot([lo, hi], [yi + off, yi + off], "-", color=color, lw=2)
        ax.plot([], [], "o-", color=color, label="point-biserial r" if key == "r_pb" else "Spearman rho")
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(ys, [_name(c) for c in conds], fontsize=7)
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-0.6, len(conds) - 0.4)
    ax.set_xlabel(f"correlation of {MEASURES[m]} with correctness (95% bootstrap CI)")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_across(per_ds: dict, m: str, path: Path) -> Path:
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    for (ds, block), color in zip(per_ds.items(), _colors()):
        xs = [p["mean"] for p in block["points"]]
        ys = [100 * p["accuracy"] for p in block["points"]]
        ax.scatter(xs, ys, color=color, label=ds, zorder=3)
        for p, x, y in zip(block["points"], xs, ys):
            ax.annotate(f"{p['run']}/{p['cell']}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        fit = block["fit"]
        if fit:
            gx = np.linspace(min(xs), max(xs), 50)
            ax.plot(gx, 100 * (fit["intercept"] + fit["slope"] * gx), "--", color=color,
                    label=f"{ds} fit: slope {100 * fit['slope']:.2g} %/unit, r = {_f(fit['r'], '{:.2f}')}")
    ax.set_xlabel(f"mean {MEASURES[m]} of the run / cell")
    ax.set_ylabel("accuracy %")
    ax.set_ylim(-5, 105)
    ax.set_title(f"accuracy vs mean {m} across runs and cells", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _colors():
    while True:
        yield from ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def _markdown(result: dict) -> str:
    lines = ["# Attention vs accuracy", "",
             f"Runs: {', '.join(f'{k} ({v})' for k, v in result['runs'].items())}. Per condition (run / cell / "
             f"dataset): point-biserial r and Spearman rho between the per-sample measure and correctness, with "
             f"95% percentile bootstrap CIs ({result['n_boot']} resamples, seed {result['seed']}); accuracy per "
             f"{result['bins']}-quantile of the measure (lowest first).", ""]
    for m in result["measures"]:
        sub = [c for c in result["conditions"] if c["measure"] == m]
        if not sub:
            continue
        lines += [f"## {MEASURES[m]}", "", "| run / cell / dataset | n | acc % | mean | r_pb [CI] | rho [CI] | "
                  "acc % by quantile |", "|---|---|---|---|---|---|---|"]
        for c in sub:
            qs = " / ".join(f"{100 * q['accuracy']:.0f}" for q in c["quantiles"])
            lines.append(f"| {_name(c)} | {c['n']} | {100 * c['accuracy']:.1f} | {c['mean']:.3g} | "
                         f"{_f(c['r_pb'], '{:.2f}')} {_ci(c['r_pb_ci'])} | {_f(c['spearman'], '{:.2f}')} "
                         f"{_ci(c['spearman_ci'])} | {qs} |")
        for ds, block in result["across"].get(m, {}).items():
            fit = block["fit"]
            lines.append("")
            if fit:
                lines.append(f"Across {len(block['points'])} runs / cells on {ds}: accuracy = "
                             f"{100 * fit['intercept']:.1f}% + {100 * fit['slope']:.3g}% x mean {m} "
                             f"(r = {_f(fit['r'], '{:.2f}')}).")
            else:
                lines.append(f"Across runs / cells on {ds}: too few distinct mean {m} values for a line.")
        undefined = [c for c in sub if c["r_pb"] is None]
        if undefined:
            lines += ["", f"No correlation where correctness or {m} is constant: "
                      + ", ".join(_name(c) for c in undefined) + "."]
        lines.append("")
    lines.append("Correlation, not causation: a sweep's cells change attention and accuracy together.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="sweep / eval output directories (with results.jsonl) recorded with "
                                           "attention metrics")
    p.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    p.add_argument("--measure", action="append", choices=sorted(MEASURES), default=None,
                   help="attention measure (repeatable; default: vas and target_a)")
    p.add_argument("--bins", type=int, default=4, help="quantile groups per condition (default 4)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    res = run_study(args.runs, args.out, measures=tuple(args.measure or MEASURES), bins=args.bins,
                    n_boot=args.bootstrap, seed=args.seed, progress=not args.no_progress)
    print(res["paths"]["markdown"].read_text())
    for key, path in sorted(res["paths"].items()):
        print(f"{key}: {path}")
    return 0

"""Sweep summaries: accuracy per cell x dataset (CSV, JSON, Markdown with baseline / best highlighted) and
alpha x beta accuracy heatmaps (PNG), from the per-sample JSONL records."""

from __future__ import annotations

import csv
import json
import math
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

from .benchmark_metrics import HEADLINE, metric_for
from .benchmark_metrics import compute as compute_benchmark
from .scoring import aggregate
from .sweep_config import Cell

METRIC_COLUMNS = ("vas", "target_a", "target_R_a")


def _mean(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def summarize(records: Sequence[dict], cells: Sequence[Cell], datasets: Sequence[str],
              sample_ids: dict[str, Sequence[str]] | None = None, *,
              metrics: Mapping[str, str] | None = None) -> dict:
    """{"rows": [...one per (cell, dataset)...], "best": {dataset: cell id}, "baseline": id or None}.

    sample_ids: {dataset: the sample ids of this run}; stored rows of other samples (e.g. of an earlier run
    without --limit) are left out, so every cell is compared on the same sample set. "n_expected" per dataset
    is the size of that set; a cell with fewer rows (an interrupted run) is marked in the tables.
    metrics: {dataset: benchmark score} (`benchmark_metrics.METRICS`; default: chosen by name); a row of a
    dataset with one gets ``"benchmark": {...}`` (e.g. MMBench circular accuracy).
    """
    wanted = None if sample_ids is None else {d: set(ids) for d, ids in sample_ids.items()}
    metrics = {ds: (metrics or {}).get(ds) or metric_for(ds) for ds in datasets}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        if "target_reward" in r and "target_R_a" not in r:  # rows written before R_a had one name
            r = {**r, "target_R_a": r["target_reward"]}
        if wanted is not None and r["sample_id"] not in wanted.get(r["dataset"], ()):
            continue
        groups[(r["cell"], r["dataset"])].append(r)
    rows = []
    for cell in cells:
        for ds in datasets:
            recs = groups.get((cell.id, ds), [])
            agg = aggregate(recs)
            row = {"cell": cell.id, "name": cell.name, "preset": cell.preset, **{k: v for k, v in cell.params},
                   "dataset": ds, "n": agg["overall"]["n"], "correct": agg["overall"]["correct"],
                   "accuracy": agg["overall"]["accuracy"], "extraction_rate": agg["overall"].get("extraction_rate"),
                   "by_category": {k: v["accuracy"] for k, v in agg.get("by_category", {}).items()}}
            for m in METRIC_COLUMNS:
                if any(m in r for r in recs):
                    row[m] = _mean(r.get(m) for r in recs)
            bench = compute_benchmark(metrics[ds], recs)
            if bench is not None:
                row["benchmark"] = bench
            rows.append(row)
    baseline = next((c.id for c in cells if c.preset == "identity"), None)
    best, beats = {}, {}
    for ds in datasets:
        cand = [r for r in rows if r["dataset"] == ds and r["cell"] != baseline and r["accuracy"] is not None]
        if cand:
            top = max(cand, key=lambda r: r["accuracy"])  # first of equals wins: grid order
            base = next((r["accuracy"] for r in rows if r["dataset"] == ds and r["cell"] == baseline), None)
            best[ds] = top["cell"]
            beats[ds] = base is None or top["accuracy"] > base
    n_expected = {ds: (len(wanted[ds]) if wanted is not None and ds in wanted else
                       max((r["n"] for r in rows if r["dataset"] == ds), default=0)) for ds in datasets}
    no_system = {ds: sum(1 for r in records if r["dataset"] == ds and r.get("n_system") == 0
                         and (wanted is None or r["sample_id"] in wanted.get(ds, ()))) for ds in datasets}
    vas_rows = sorted({r.get("vas_rows", "response") for rs in groups.values() for r in rs if "vas" in r})
    return {"rows": rows, "best": best, "best_beats_baseline": beats, "baseline": baseline,
            "datasets": list(datasets), "cells": [c.id for c in cells], "n_expected": n_expected,
            "vas_rows": vas_rows, "rows_without_system": no_system, "metrics": metrics}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def markdown_table(summary: dict) -> str:
    """Cells x datasets accuracy (%), mean column; the baseline row is marked, the best cell per dataset bold."""
    datasets, rows = summary["datasets"], summary["rows"]
    by = {(r["cell"], r["dataset"]): r for r in rows}
    n_expected = summary.get("n_expected", {})
    has_vas = any("vas" in r for r in rows)
    head = ["cell"] + [f"{d} acc %" for d in datasets] + ["mean acc %"] + (["mean VAS"] if has_vas else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["cells"]:
        accs = [by[(cell, d)]["accuracy"] for d in datasets]
        label = f"{cell} (baseline)" if cell == summary["baseline"] else cell
        cols = [label]
        for d, a in zip(datasets, accs):
            marked = summary["best"].get(d) == cell and summary["best_beats_baseline"].get(d)
            text = f"**{_pct(a)}**" if marked else _pct(a)
            n, want = by[(cell, d)]["n"], n_expected.get(d)
            cols.append(text if want is None or n == want else f"{text} (n={n})")
        cols.append(_pct(_mean(accs)))
        if has_vas:
            v = _mean(by[(cell, d)].get("vas") for d in datasets)
            cols.append("-" if v is None else f"{v:.4g}")  # 4 significant digits: VAS spans 1e-2 .. 1e6
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    lines.append("Accuracy in %, n per dataset: " + ", ".join(
        f"{d}={n_expected.get(d, by[(summary['cells'][0], d)]['n'])}" for d in datasets)
        + ". **Bold**: best non-baseline cell per dataset when it beats the baseline.")
    short = [f"{c} on {d}" for c in summary["cells"] for d in datasets
             if d in n_expected and by[(c, d)]["n"] != n_expected[d]]
    if short:
        lines.append("(n=...): cells with fewer evaluated samples than the others (an interrupted run; rerun to "
                     "complete them): " + ", ".join(short) + ".")
    tied = [d for d in datasets if d in summary["best"] and not summary["best_beats_baseline"].get(d)]
    if tied:
        lines.append("No cell beats the baseline on: " + ", ".join(tied) + ".")
    inert = {d: k for d, k in summary.get("rows_without_system", {}).items() if k}
    if inert and any(r["preset"] == "avar" for r in rows):
        lines.append("**beta is inert here**: " + ", ".join(f"{d}: {k} result row(s)" for d, k in inert.items())
                     + " have no system-prompt tokens (this model's chat template adds no system turn), so beta "
                     "(system weight 1-beta) changes nothing there and VAS (ratio form) is undefined (NaN). Set "
                     "`system:` in the sweep config (or `--system` for eval / demo).")
    if has_vas:
        from ..metrics import ROW_SET_MEANING

        used = summary.get("vas_rows") or ["response"]
        lines.append("VAS: ratio form mass_img/(mass_sys+1e-6) (image = image + target), mean over layers, heads "
                     "and the query rows " + " / ".join(f"rows={r} ({ROW_SET_MEANING.get(r, r)})" for r in used) + ".")
    lines += _benchmark_tables(summary, by)
    return "\n".join(lines) + "\n"


def _benchmark_tables(summary: dict, by: dict) -> list[str]:
    """One table per dataset with a benchmark score (MMBench circular, POPE F1, MME points, ...): cells x its
    headline columns."""
    lines = []
    for ds in summary["datasets"]:
        metric = summary.get("metrics", {}).get(ds, "accuracy")
        cols = HEADLINE.get(metric)
        if not cols:
            continue
        head = ["cell"] + [f"{label} {unit}" for _, label, unit in cols]
        lines += ["", f"{ds} ({metric}, as the benchmark reports it):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell in summary["cells"]:
            bench = by[(cell, ds)].get("benchmark") or {}
            vals = [bench.get(key) for key, _, _ in cols]
            lines.append("| " + " | ".join([cell] + [
                "-" if v is None else (_pct(v) if unit == "%" else f"{v:.1f}")
                for v, (_, _, unit) in zip(vals, cols)]) + " |")
    return lines


def heatmaps(summary: dict, out_dir: Path) -> list[Path]:
    """One PNG per dataset: accuracy on a fixed 0-100 % scale (and mean VAS when recorded) over alpha (x) x
    beta (y), each cell annotated with its change from the baseline; one column of panels per value of the
    other grid axes (renorm, layers). With fewer than two alpha x beta cells (e.g. a one-cell eval) the
    picture is a bar chart of every cell beside the baseline instead of a 1x1 heatmap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for ds in summary["datasets"]:
        base = next((r for r in summary["rows"] if r["dataset"] == ds and r["cell"] == summary["baseline"]), None)
        base_acc = None if base is None or base["accuracy"] is None else 100 * base["accuracy"]
        rows = [r for r in summary["rows"] if r["dataset"] == ds and "alpha" in r and "beta" in r]
        if len({(r["alpha"], r["beta"]) for r in rows}) < 2:
            path = _bars(summary, ds, base_acc, out_dir, Figure, FigureCanvasAgg)
            if path is not None:
                paths.append(path)
            continue
        metrics = [("accuracy", "accuracy %", 100.0, "{:.1f}", "viridis", (0.0, 100.0))]
        if any(r.get("vas") is not None for r in rows):
            metrics.append(("vas", "mean VAS (ratio form)", 1.0, "{:.3g}", "magma", None))
        other = sorted({k for r in rows for k in r if k in ("renorm", "layers")})
        panels = defaultdict(list)
        for r in rows:
            panels[tuple(str(r.get(k)) for k in other)].append(r)
        fig = Figure(figsize=(4.6 * len(panels) + 1.2, 3.8 * len(metrics) + 0.4))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(metrics), len(panels), squeeze=False)
        base_vas = None if base is None else base.get("vas")
        for mi, (key, label, factor, fmt, cmap, limits) in enumerate(metrics):
            ref = base_acc if key == "accuracy" else (None if base_vas is None else factor * base_vas)
            for ax, (pkey, prs) in zip(axes[mi], sorted(panels.items())):
                alphas = sorted({r["alpha"] for r in prs})
                betas = sorted({r["beta"] for r in prs})
                grid = [[math.nan] * len(alphas) for _ in betas]
                for r in prs:
                    val = r.get(key)
                    grid[betas.index(r["beta"])][alphas.index(r["alpha"])] = math.nan if val is None else factor * val
                lo, hi = limits or (None, None)
                im = ax.imshow(grid, origin="lower", cmap=cmap, aspect="auto", vmin=lo, vmax=hi)
                ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
                ax.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
                ax.set_xlabel("alpha (image boost)")
                ax.set_ylabel("beta (system suppression)")
                for yi, grow in enumerate(grid):
                    for xi, val in enumerate(grow):
                        if not math.isnan(val):
                            text = fmt.format(val) + ("" if ref is None else f"\n({val - ref:+{fmt[2:-1]}})")
                            ax.text(xi, yi, text, ha="center", va="center", color="w", fontsize=9,
                                    bbox=dict(facecolor="black", alpha=0.35, lw=0, pad=1.5))
                title = ", ".join(f"{k}={v}" for k, v in zip(other, pkey)) or label
                if ref is not None:
                    title += f"\n(change from baseline {fmt.format(ref)} in brackets)"
                ax.set_title(title, fontsize=9)
                fig.colorbar(im, ax=ax, label=label)
        fig.suptitle(f"{ds}: over alpha x beta" + (f" (baseline accuracy {base_acc:.1f}%)" if base_acc is not None
                                                    else ""))
        fig.tight_layout()
        path = out_dir / f"heatmap_{_safe(ds)}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _bars(summary: dict, ds: str, base_acc, out_dir: Path, Figure, FigureCanvasAgg) -> Path | None:
    """Accuracy of every cell of `ds` as bars (0-100 %), the baseline first and dashed across, with the change."""
    rows = [r for r in summary["rows"] if r["dataset"] == ds and r["accuracy"] is not None]
    if len(rows) < 2 and base_acc is not None:
        return None  # only the baseline: nothing to compare
    if not rows:
        return None
    fig = Figure(figsize=(max(4.5, 1.3 * len(rows) + 2), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.12, 0.2, 0.84, 0.66))
    labels = [("baseline" if r["cell"] == summary["baseline"] else r["cell"]) for r in rows]
    vals = [100 * r["accuracy"] for r in rows]
    colors = ["#999999" if r["cell"] == summary["baseline"] else "#3b75af" for r in rows]
    bars = ax.bar(range(len(rows)), vals, color=colors)
    for bar, v, r in zip(bars, vals, rows):
        delta = "" if base_acc is None or r["cell"] == summary["baseline"] else f" ({v - base_acc:+.1f})"
        ax.annotate(f"{v:.1f}{delta}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 2), textcoords="offset points")
    if base_acc is not None:
        ax.axhline(base_acc, color="#555555", ls="--", lw=1)
    ax.set_ylim(0, 105)
    ax.set_xticks(range(len(rows)), [textwrap.fill(lbl.replace(",", ", "), 20) for lbl in labels], fontsize=8)
    ax.set_ylabel("accuracy %")
    ax.set_title(f"{ds}: accuracy per cell (n={summary.get('n_expected', {}).get(ds, '?')}"
                 + (f", baseline {base_acc:.1f}%, change in brackets)" if base_acc is not None else ")"), fontsize=9)
    path = out_dir / f"heatmap_{_safe(ds)}.png"
    fig.savefig(path, dpi=110)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_summary(summary: dict, out_dir: str | Path, *, pictures: bool = True) -> dict[str, Path]:
    """Write summary.json, summary.csv, results.md and (with `pictures`) the heatmaps; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "summary.json", "csv": out / "summary.csv", "markdown": out / "results.md"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str))
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in summary["rows"]]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)
    paths["markdown"].write_text(markdown_table(summary))
    for p in heatmaps(summary, out) if pictures else ():
        paths[p.stem] = p
    return paths

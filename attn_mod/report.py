"""The demo report's own figures and its index.html (the attention pictures themselves come from `viz`).

- `accuracy_by_quantile`: accuracy per equal-count quantile bin of per-sample target attention a (the papers'
  central correlation: do samples whose answer looks at the target more get it right more often?). The binning
  is `viz.entropy_bin_means` (quantile edges, mean per bin) applied to (a, correct).
- `quantile_plot`, `comparison_plot`, `curves_plot`: PNGs; `write_index`: one HTML page of captioned figures.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .viz import _new_figure, _save, entropy_bin_means

__all__ = ["accuracy_by_quantile", "quantile_plot", "comparison_plot", "curves_plot", "write_index"]


def accuracy_by_quantile(values: Sequence[float], correct: Sequence[bool], bins: int = 4) -> list[dict]:
    """[{"lo", "hi", "n", "accuracy"}] per quantile bin of `values` (non-finite values dropped; bin i holds
    lo <= value < hi, the last bin includes hi)."""
    v = torch.tensor([float("nan") if x is None else float(x) for x in values], dtype=torch.float64)
    c = torch.tensor([float(bool(x)) for x in correct], dtype=torch.float64)
    if v.shape != c.shape:
        raise ValueError(f"values has {v.numel()} entries but correct has {c.numel()}")
    keep = torch.isfinite(v)
    if not keep.any():
        raise ValueError("no finite target-attention values to bin (does the benchmark have bbox columns?)")
    edges, means, counts = entropy_bin_means(v[keep], c[keep], bins)
    e = edges.tolist()
    return [{"lo": e[i], "hi": e[i + 1], "n": int(counts[i]), "accuracy": float(means[i])}
            for i in range(len(e) - 1)]


def quantile_plot(series: Mapping[str, list[dict]], *, path, title: str = "") -> Path:
    """One line per checkpoint: accuracy (%) against the target-attention quantile bin (low -> high)."""
    fig = _new_figure(6.4, 3.8, 100)
    ax = fig.add_axes((0.12, 0.17, 0.84, 0.7))
    for name, rows in series.items():
        xs = np.arange(1, len(rows) + 1)
        ax.plot(xs, [100 * r["accuracy"] for r in rows], marker="o", label=name)
        for x, r in zip(xs, rows):
            ax.annotate(f"a<{r['hi']:.3g}\nn={r['n']}", (x, 100 * r["accuracy"]), fontsize=6, ha="center",
                        xytext=(0, 5), textcoords="offset points")
    n = max(len(r) for r in series.values())
    ax.set_xticks(np.arange(1, n + 1))
    ax.set_xticklabels([f"Q{i}" for i in range(1, n + 1)])
    ax.set_ylim(0, 110)
    ax.set_xlabel("quantile of target attention a (last layer, answer rows): low -> high")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "accuracy by target-attention quantile", fontsize=10)
    return _save(fig, path)


def comparison_plot(rows: Mapping[str, Mapping[str, float | None]], *, path, title: str = "") -> Path:
    """Grouped bars per checkpoint: accuracy, mean VAS, mean target attention a (one panel each)."""
    metrics = [("accuracy", "accuracy (%)", 100.0), ("vas", "VAS (image/system ratio)", 1.0),
               ("target_a", "target attention a", 1.0)]
    fig = _new_figure(9.0, 3.2, 100)
    names = list(rows)
    for k, (key, label, scale) in enumerate(metrics):
        ax = fig.add_axes((0.07 + k * 0.325, 0.2, 0.25, 0.62))
        vals = [rows[n].get(key) for n in names]
        ys = [0.0 if v is None or not math.isfinite(v) else scale * v for v in vals]
        bars = ax.bar(range(len(names)), ys, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)])
        for b, v in zip(bars, vals):
            ax.annotate("n/a" if v is None else f"{scale * v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        if key == "vas" and max(ys) > 0 and max(ys) / max(min(y for y in ys if y > 0), 1e-12) > 50:
            ax.set_yscale("log")  # AGTO can push system attention to ~0: ratios differ by orders of magnitude
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "plain vs attention-trained checkpoint (held-out, no intervention)", fontsize=10)
    return _save(fig, path)


def curves_plot(curves: Mapping[str, Sequence[Mapping]], *, path, x: str = "step", title: str = "") -> Path:
    """Held-out accuracy (left) and training LM loss (right) against `x` for each run; stage changes dotted."""
    fig = _new_figure(9.0, 3.4, 100)
    ax_acc = fig.add_axes((0.07, 0.17, 0.4, 0.7))
    ax_loss = fig.add_axes((0.57, 0.17, 0.4, 0.7))
    for name, pts in curves.items():
        pts = [p for p in pts if p.get(x) is not None]
        if not pts:
            continue
        xs = [p[x] for p in pts]
        acc = [100 * p["accuracy"] if p.get("accuracy") is not None else float("nan") for p in pts]
        line, = ax_acc.plot(xs, acc, marker=".", label=name)
        ax_loss.plot(xs, [p.get("loss_lm", p.get("loss")) or float("nan") for p in pts], color=line.get_color(),
                     label=name)  # the LM part: AGTO's total loss is negative (L_sys = +log m_sys)
        for prev, p in zip(pts, pts[1:]):
            if p.get("stage") != prev.get("stage") and prev.get("stage") != "init":
                ax_acc.axvline(prev[x], color=line.get_color(), ls=":", lw=0.8)  # where the stage ended
    ax_acc.axhline(25, color="grey", ls="--", lw=0.8)
    ax_acc.set_ylim(0, 105)
    ax_acc.set_xlabel(x)
    ax_acc.set_ylabel("held-out 4-way MC accuracy (%)")
    ax_loss.set_xlabel(x)
    ax_loss.set_ylabel("training LM loss (answer tokens)")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle(title or "learning curves (dotted: a stage ends; dashed: chance)", fontsize=10)
    return _save(fig, path)


def _text_block(text: str) -> str:
    """Markdown-style `| a | b |` table lines -> an HTML table (bold `**x**` kept); other lines -> notes."""
    e = html.escape
    out, rows = [], []

    def cell(c, tag):
        c = c.strip()
        bold = c.startswith("**") and c.endswith("**") and len(c) > 4
        c = e(c[2:-2] if bold else c)
        try:  # numbers right-aligned (the CSS default), words left-aligned
            float(c)
            align = ""
        except ValueError:
            align = ' style="text-align:left"' if tag == "td" else ""
        return f"<{tag}{align}>{'<b>' + c + '</b>' if bold else c}</{tag}>"

    def flush():
        if rows:
            head, *body = [r for r in rows if not set(r.replace("|", "").strip()) <= set("-: ")]
            out.append("<table><tr>" + "".join(cell(c, "th") for c in head.strip("|").split("|")) + "</tr>" +
                       "".join("<tr>" + "".join(cell(c, "td") for c in r.strip().strip("|").split("|")) + "</tr>"
                               for r in body) + "</table>")
            rows.clear()

    for line in text.splitlines():
        if line.strip().startswith("|"):
            rows.append(line.strip())
            continue
        flush()
        if line.strip():
            out.append(f"<p class='note'>{e(line).replace('**', '')}</p>")
    flush()
    return "\n".join(out)


def write_index(path, *, title: str, intro: str, sections: Sequence[tuple[str, Sequence[tuple]]],
                tables: Mapping[str, str] | None = None) -> Path:
    """index.html: `sections` = [(heading, [(relative file, one-line caption), ...][, figure width px])]; PNGs are shown as images,
    HTML files embedded as iframes, anything else linked. `tables`: {heading: pre-formatted text}."""
    path = Path(path)
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}"
             "figure{display:inline-block;vertical-align:top;margin:0 1em 1.2em 0;max-width:100%}"
             "figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:0.85em;color:#444;max-width:520px}"
             "iframe{border:1px solid #ddd;width:100%;height:120px}pre{background:#f6f6f6;padding:0.6em;"
             "overflow-x:auto;font-size:0.85em}h2{border-bottom:1px solid #ccc;padding-bottom:0.2em}"
             "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 8px;"
             "text-align:right}td:first-child{text-align:left}p.note{font-size:0.85em;color:#444}"
             "</style></head><body>", f"<h1>{e(title)}</h1>", f"<p>{intro}</p>"]
    for heading, text in (tables or {}).items():
        parts.append(f"<h2>{e(heading)}</h2>{_text_block(text)}")
    for heading, figures, *width in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        style = f" style='width:{int(width[0])}px'" if width else ""
        for rel, caption in figures:
            rel = str(rel)
            if rel.endswith(".png"):
                body = f"<a href='{e(rel)}'><img src='{e(rel)}' alt='{e(caption)}'></a>"
            elif rel.endswith(".html"):
                body = f"<iframe src='{e(rel)}'></iframe>"
            else:
                body = f"<a href='{e(rel)}'>{e(rel)}</a>"
            parts.append(f"<figure{style}>{body}<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path

"""Pictures of where a VLM looks. Each function saves one file and returns its path. Figures are drawn
with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work headless.

- `image_heatmap` / `image_heatmap_grid`: per-visual-token attention of chosen query rows over the image
  (values from `attn_mod.attention_rows`), on the merged-token grid, drawn over the image (Qwen-VL).
- `cell_heatmap_grid` / `cell_raster`: the same for any family whose adapter geometry gives each visual
  token's cell in original pixels (`cells`) and the views that tile the image once (`views`: e.g.
  InternVL's tiles, then its thumbnail): one panel per view, each token's value on its cell.
- `token_text_figure`: generated tokens with backgrounds coloured by a per-token score (SAYO Fig. 5);
  PNG or self-contained HTML, by the suffix of `path`.
- `layer_curves`: per-layer VAS and per-category attention mass (from `capture` masses).
- `entropy_bins`: mean attention per token-entropy quantile bin (SAYO Fig. 4).

    with attn_mod.capture(model) as rec, record_rows(model, layers="all") as rows:   # attn_mod.attention_rows
        out = model.generate(**inputs, max_new_tokens=16)
    span = regions.locate_visual_tokens(inputs["input_ids"], model.config.image_token_id,
                                        inputs["image_grid_thw"], merge_size=2)[0]       # image 0 of sample 0
    att = rows.attention(-1, positions=[p])[0]    # one token's row; a list of positions = a span;
                                                  # layer="all" or a list of layers = layer mean
    viz.image_heatmap(att, span, image, path="heatmap.png", merge_size=2, patch_size=14, boxes=[box])

Formulas (VAS, image mass) come from `attn_mod.metrics`; geometry from `attn_mod.regions`.
"""

from __future__ import annotations

import html
import math
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.transforms import IdentityTransform

from .categories import IMAGE, RESPONSE, SYSTEM, TARGET, TEXT
from .metrics import image_mass, select_rows, vas_from_masses
from .regions import VisualSpan, box_to_pixels, image_hw, token_grid

HEATMAP_VALUE = "share of the row's attention on each visual token"


def _new_figure(width: float, height: float, dpi: int) -> Figure:
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)  # no tight bbox: the pixel size is figsize * dpi
    return path


# ------------------------------------------------------------------------------------------ image
def visual_token_grid(attention: torch.Tensor, span: VisualSpan, *, merge_size: int, frame: int = 0) -> torch.Tensor:
    """(rows, cols) values of one image's visual tokens, raster order over merged cells.

    attention: (K,) per-KV-slot values of one sample (e.g. `RowRecording.attention()[b]`);
    span: the image's `regions.VisualSpan` (from `regions.locate_visual_tokens`); frame: temporal group.
    """
    t, rows, cols = token_grid(span.grid_thw, merge_size)
    if not 0 <= frame < t:
        raise ValueError(f"frame {frame} out of range: the span has {t} temporal group(s)")
    pos = span.positions.to(attention.device)
    if int(pos.max()) >= attention.shape[-1]:
        raise ValueError(f"the span's positions reach {int(pos.max())} but attention has {attention.shape[-1]} slots")
    return attention[pos].float().reshape(t, rows, cols)[frame].cpu()


def _display_image(image, on: str, span: VisualSpan, patch_size: int):
    """(array, (H, W) of the drawing, (sx, sy) original->drawn pixel scale)."""
    h, w = image_hw(image)
    img = image.convert("RGB")
    if on == "original":
        return np.asarray(img), (h, w), (1.0, 1.0)
    if on == "resized":
        rh, rw = span.grid_thw[1] * patch_size, span.grid_thw[2] * patch_size
        return np.asarray(img.resize((rw, rh))), (rh, rw), (rw / w, rh / h)
    raise ValueError(f"on must be 'original' or 'resized', got {on!r}")


def _draw_heatmap(ax, grid, image, span, *, patch_size, on, norm, cmap, alpha, boxes, box_convention, target_cells):
    """Image, token-grid overlay (cell (r, c) spans the image's r-th row / c-th column of cells), boxes."""
    arr, (h, w), (sx, sy) = _display_image(image, on, span, patch_size)
    extent = (0, w, h, 0)  # x right, y down: row 0 of both arrays at the top
    ax.imshow(arr, extent=extent, interpolation="bilinear")
    im = ax.imshow(grid.numpy(), extent=extent, cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest")
    rows, cols = grid.shape
    if target_cells is not None:  # token cells labelled TARGET: dashed outline
        for r, c in zip(*np.nonzero(target_cells)):  # black under white dashes: visible on any background
            cell = (c * w / cols, r * h / rows)
            ax.add_patch(Rectangle(cell, w / cols, h / rows, fill=False, ec="black", lw=2.6))
            ax.add_patch(Rectangle(cell, w / cols, h / rows, fill=False, ec="white", lw=1.6, ls=(0, (3, 2))))
    for box in boxes or ():
        x0, y0, x1, y1 = box_to_pixels(box, image, box_convention)
        ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False, ec="cyan", lw=2))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    return im


def image_heatmap(attention: torch.Tensor, span: VisualSpan, image, *, path, merge_size: int, patch_size: int,
                  query: str = "", layer: str = "", boxes: Sequence | None = None, box_convention: str = "pixel",
                  categories: torch.Tensor | None = None, on: str = "original", frame: int = 0, cmap: str = "inferno",
                  alpha: float = 0.6, size: tuple[float, float] = (7.0, 6.0), dpi: int = 100) -> Path:
    """Attention over one image: each merged visual token's value painted on its cell of the image.

    attention: (K,) per-KV-slot attention of one sample (P' of the chosen rows/heads/layer, e.g.
    `RowRecording.attention(layer, positions=...)[b]`); span: the image's `VisualSpan`; image: the
    original PIL image. query / layer: text for the title (which rows, which layer). boxes: boxes on the
    original image in `box_convention` (drawn cyan). categories: (K,) slot categories of the sample; the
    cells labelled TARGET are outlined dashed. on: draw on the "original" or the processor's "resized"
    image. Size in pixels: size * dpi.
    """
    grid = visual_token_grid(attention, span, merge_size=merge_size, frame=frame)
    fig = _new_figure(*size, dpi)
    ax = fig.add_axes((0.1, 0.08, 0.7, 0.78))
    cax = fig.add_axes((0.84, 0.08, 0.03, 0.78))
    norm = Normalize(0.0, max(float(grid.max()), 1e-12))
    target = _target_cells(categories, span, merge_size, frame, grid.shape)
    im = _draw_heatmap(ax, grid, image, span, patch_size=patch_size, on=on, norm=norm, cmap=cmap, alpha=alpha,
                       boxes=boxes, box_convention=box_convention, target_cells=target)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(HEATMAP_VALUE)
    rows, cols = grid.shape
    on_target = None if target is None else float(grid[torch.from_numpy(target)].sum())
    extra = "" if target is None else f", on the target cells (dashed) {on_target:.3f}"
    head = textwrap.fill(", ".join(x for x in (layer, query) if x), int(size[0] * 12))
    fig.suptitle(f"{head}\n{rows}x{cols} visual tokens; attention on the image {float(grid.sum()):.3f}{extra}",
                 fontsize=9, y=0.98, va="top")
    ax.set_xlabel(f"x ({on} image pixels)")
    ax.set_ylabel("y (pixels, downwards)")
    return _save(fig, path)


def image_heatmap_grid(attentions: Mapping[str, torch.Tensor], span: VisualSpan, image, *, path, merge_size: int,
                       patch_size: int, title: str = "", boxes: Sequence | None = None, box_convention: str = "pixel",
                       on: str = "original", frame: int = 0, cmap: str = "inferno", alpha: float = 0.6,
                       ncols: int | None = None, panel: float = 2.6, dpi: int = 100) -> Path:
    """Several `image_heatmap` panels (e.g. one per layer) with one shared colour scale.

    attentions: {panel label: (K,) per-slot attention}; ncols = ceil(sqrt(n)) by default. Size in inches
    at `dpi`: width ncols * panel + 1.3; height 0.6 + 0.16 * title lines (wrapped at 12 characters per
    inch) + nrows * (0.92 * panel * a + 0.4), a = image height / width clipped to [0.4, 1.6].
    """
    if not attentions:
        raise ValueError("image_heatmap_grid needs at least one panel")
    grids = {k: visual_token_grid(a, span, merge_size=merge_size, frame=frame) for k, a in attentions.items()}
    n = len(grids)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    h, w = image_hw(image)
    img_w = 0.92 * panel
    img_h = img_w * min(max(h / w, 0.4), 1.6)
    cell_h = img_h + 0.4  # room for the panel title
    W = ncols * panel + 1.3
    title = textwrap.fill(title, int(W * 12))
    top_in = 0.45 + 0.16 * (title.count("\n") + 1 if title else 0)
    H = top_in + nrows * cell_h + 0.15
    fig = _new_figure(W, H, dpi)
    norm = Normalize(0.0, max(max(float(g.max()) for g in grids.values()), 1e-12))
    im = None
    for i, (label, grid) in enumerate(grids.items()):
        r, c = divmod(i, ncols)
        x0, y0 = 0.15 + c * panel + 0.04 * panel, H - top_in - (r + 1) * cell_h + 0.05  # inches from bottom-left
        ax = fig.add_axes((x0 / W, y0 / H, img_w / W, img_h / H))
        im = _draw_heatmap(ax, grid, image, span, patch_size=patch_size, on=on, norm=norm, cmap=cmap, alpha=alpha,
                           boxes=boxes, box_convention=box_convention, target_cells=None)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{label} (image {float(grid.sum()):.2f})", fontsize=8)
    return _finish_panels(fig, im, path, W=W, H=H, top_in=top_in, title=title, fontsize=9, title_in=0.1)


def _finish_panels(fig, im, path, *, W: float, H: float, top_in: float, title: str, fontsize: int,
                   title_in: float) -> Path:
    """The shared colour bar at the right (inches: 1.15 from the right edge) and the title; saves the figure."""
    cax = fig.add_axes(((W - 1.15) / W, 0.25 / H, 0.16 / W, (H - top_in - 0.35) / H))
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(textwrap.fill(HEATMAP_VALUE, 28), fontsize=7)
    cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=fontsize, y=1 - title_in / H, va="top")
    return _save(fig, path)


def _target_cells(categories, span, merge_size, frame, shape):
    if categories is None:
        return None
    cells = (categories[span.positions.to(categories.device)].long() == TARGET).cpu()
    t = token_grid(span.grid_thw, merge_size)[0]
    cells = cells.reshape(t, *shape)[frame].numpy()
    return cells if cells.any() else None


# ------------------------------------------------------------------- per-token cells (any family)
CELL_PIXEL_VALUE = ("pixel colour = sum of the values of the view's visual tokens whose cell (original "
                    "pixels) contains the pixel centre")


def cell_raster(values, cells: Sequence, image_size, *, max_side: int = 512) -> np.ndarray:
    """(rh, rw) float64 picture of per-token values over the original image: pixel (i, j), whose centre is at
    original pixel ((j + 0.5) W / rw, (i + 0.5) H / rh), holds the sum of `values[n]` over the tokens n whose
    cell (x0, y0, x1, y1) (original pixels, half-open) contains that centre; NaN where no cell does.

    values: (n,) one number per token; cells: n cells (None = a token with no cell, skipped; a cell may reach
    beyond the image, only its part inside is painted). (rh, rw) = (H, W) scaled so the long side is at most
    `max_side`. Within one view of a family geometry (`views()`: cells that tile the image once) each
    pixel lies in exactly one cell, so the picture shows each token's value on its cell.
    """
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if vals.size != len(cells):
        raise ValueError(f"{vals.size} values but {len(cells)} cells")
    h, w = image_hw(image_size)
    scale = min(1.0, max_side / max(h, w))
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    xs = (np.arange(rw) + 0.5) * (w / rw)  # pixel centres in original pixels
    ys = (np.arange(rh) + 0.5) * (h / rh)
    out = np.zeros((rh, rw))
    hit = np.zeros((rh, rw), dtype=bool)
    for v, cell in zip(vals, cells):
        if cell is None:
            continue
        x0, y0, x1, y1 = (float(c) for c in cell)
        c0, c1 = np.searchsorted(xs, x0, "left"), np.searchsorted(xs, x1, "left")  # x0 <= x < x1
        r0, r1 = np.searchsorted(ys, y0, "left"), np.searchsorted(ys, y1, "left")
        out[r0:r1, c0:c1] += v
        hit[r0:r1, c0:c1] = True
    out[~hit] = np.nan
    return out


def cell_heatmap_grid(attentions: Mapping[str, torch.Tensor], positions: torch.Tensor, cells: Sequence,
                      views: Sequence[tuple[str, int, int]], image, *, path, title: str = "",
                      boxes: Sequence | None = None, box_convention: str = "pixel",
                      categories: torch.Tensor | None = None, cmap: str = "inferno", alpha: float = 0.6,
                      panel: float = 3.2, dpi: int = 100, max_side: int = 512) -> Path:
    """Per-visual-token attention over the original image for any family: per entry of `attentions` (e.g. one
    per layer) one panel per view of the image's tokens, side by side; entries fill rows of
    ceil(sqrt(entries) / views) entries each, in order; one colour scale.

    attentions: {row label: (K,) per-KV-slot attention of one sample (`RowRecording.attention(...)[b]`)};
    positions: (n,) KV slots of the image's visual tokens in the geometry's token order; cells: their n
    original-pixel cells (the adapter geometry's `cells(image_size)`, None = no cell); views: [(label, start,
    stop)] token ranges (the geometry's `views(image_size)`, e.g. InternVL tiles / thumbnail), each painted
    with `cell_raster` on its own panel. boxes: drawn cyan (original pixels in `box_convention`).
    categories: (K,) slot categories; the cells of TARGET tokens are outlined dashed. Width in inches
    ncols * panel + 1.3 (ncols = entries per row * views), panel image height panel * 0.92 * H / W (clipped to
    [0.4, 1.6]).
    """
    if not attentions:
        raise ValueError("cell_heatmap_grid needs at least one row of panels")
    pos = torch.as_tensor(positions, dtype=torch.long).cpu()
    if pos.numel() != len(cells):
        raise ValueError(f"{pos.numel()} token positions but {len(cells)} cells")
    if not views or any(not 0 <= a < b <= len(cells) for _, a, b in views):
        raise ValueError(f"views must be (label, start, stop) ranges within the {len(cells)} tokens, got {views}")
    values = {k: a.detach().float().cpu()[pos].double().numpy() for k, a in attentions.items()}
    target = (None if categories is None else
              (categories.detach().cpu()[pos].long() == TARGET).numpy())
    rasters = {(k, i): cell_raster(v[a:b], cells[a:b], image, max_side=max_side)
               for k, v in values.items() for i, (_, a, b) in enumerate(views)}
    h, w = image_hw(image)
    per_row = max(1, math.ceil(math.sqrt(len(values)) / len(views)))  # entries side by side (each: all views)
    nrows, ncols = math.ceil(len(values) / per_row), per_row * len(views)
    img_w = 0.92 * panel
    img_h = img_w * min(max(h / w, 0.4), 1.6)
    cell_h = img_h + 0.45
    W = ncols * panel + 1.3
    title = textwrap.fill(title, int(W * 12))
    top_in = 0.3 + 0.16 * (title.count("\n") + 1 if title else 0)
    H = top_in + nrows * cell_h + 0.15
    fig = _new_figure(W, H, dpi)
    vmax = max([float(np.nanmax(r)) for r in rasters.values() if np.isfinite(r).any()] + [1e-12])
    norm = Normalize(0.0, max(vmax, 1e-12))
    arr = np.asarray(image.convert("RGB"))
    im = None
    for e, (label, vals) in enumerate(values.items()):
        r, first = divmod(e, per_row)
        for v, (view, a, b) in enumerate(views):
            c = first * len(views) + v
            x0 = 0.15 + c * panel + 0.04 * panel
            y0 = H - top_in - (r + 1) * cell_h + 0.05
            ax = fig.add_axes((x0 / W, y0 / H, img_w / W, img_h / H))
            ax.imshow(arr, extent=(0, w, h, 0), interpolation="bilinear")
            im = ax.imshow(rasters[(label, v)], extent=(0, w, h, 0), cmap=cmap, norm=norm, alpha=alpha,
                           interpolation="nearest")
            if target is not None:
                for n in range(a, b):
                    if target[n] and cells[n] is not None:
                        cx0, cy0, cx1, cy1 = (float(v) for v in cells[n])
                        for ec, lw, ls in (("black", 2.2, "-"), ("white", 1.3, (0, (3, 2)))):
                            ax.add_patch(Rectangle((cx0, cy0), cx1 - cx0, cy1 - cy0, fill=False, ec=ec, lw=lw,
                                                   ls=ls))
            for box in boxes or ():
                bx0, by0, bx1, by1 = box_to_pixels(box, image, box_convention)
                ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, ec="cyan", lw=2))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            head = f"{label}: " if label else ""
            ax.set_title(textwrap.fill(f"{head}{view} (sum {float(vals[a:b].sum()):.3f})", int(panel * 14)),
                         fontsize=7)
    return _finish_panels(fig, im, path, W=W, H=H, top_in=top_in, title=title, fontsize=8, title_in=0.08)


# ------------------------------------------------------------------------------------------- text
def _colors(values, cmap, vmin, vmax):
    vals = np.asarray([float("nan") if v is None else float(v) for v in values], dtype=float)
    finite = vals[np.isfinite(vals)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    norm = Normalize(lo, hi if hi > lo else lo + 1e-12)
    cm = colormaps[cmap]
    rgba = [None if not np.isfinite(v) else cm(norm(v)) for v in vals]
    return vals, rgba, norm, cm


def _ink(rgba) -> str:
    if rgba is None:
        return "#000000"
    r, g, b = rgba[:3]
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#ffffff"


def _shown(token: str) -> str:
    """Printable form of a token piece without newlines: tab as spaces, control characters escaped."""
    token = token.replace("\r", "").replace("\t", "    ")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in token)


def token_text_figure(tokens: Sequence[str], values: Sequence[float], *, path, label: str = "target attention a",
                      title: str = "", cmap: str = "Reds", vmin: float | None = 0.0, vmax: float | None = None,
                      width: float = 10.0, dpi: int = 100, fontsize: float = 13.0) -> Path:
    """Generated text, each token's background coloured by its value (SAYO Fig. 5).

    tokens: the generated tokens' text, in order ("\\n" breaks the line, shown as a return arrow);
    values: one number per token (NaN / None: no colour). `path` ending in ".html" writes a
    self-contained HTML page (inline CSS, value in each token's tooltip); anything else a PNG of
    width * dpi pixels (height grows with the wrapped lines).
    """
    if len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    vals, rgba, norm, cm = _colors(values, cmap, vmin, vmax)
    if str(path).lower().endswith((".html", ".htm")):
        return _token_html(tokens, vals, rgba, norm, cm, path=path, label=label, title=title)
    return _token_png(tokens, rgba, norm, cm, path=path, label=label, title=title, width=width, dpi=dpi,
                      fontsize=fontsize)


def _token_png(tokens, rgba, norm, cm, *, path, label, title, width, dpi, fontsize) -> Path:
    fig = _new_figure(width, 2.0, dpi)
    renderer = fig.canvas.get_renderer()
    font = dict(fontsize=fontsize, family="DejaVu Sans", parse_math=False)
    margin, gap = 0.3 * dpi, 2.0
    line_h = fontsize * dpi / 72 * 1.9
    max_x = width * dpi - margin
    placed, x, line = [], margin, 0
    for tok, c in zip(tokens, rgba):
        parts = tok.split("\n")  # a newline inside a token: return arrow, then the rest on the next line
        for k, part in enumerate(parts):
            shown = _shown(part) + ("\u21b5" if k < len(parts) - 1 else "")
            if shown or not tok:
                shown = shown or " "
                probe = fig.text(0, 0, shown, **font)
                w = probe.get_window_extent(renderer).width
                probe.remove()
                if x + w > max_x and x > margin:
                    x, line = margin, line + 1
                placed.append((x, line, shown, c))
                x += w + gap
            if k < len(parts) - 1:
                x, line = margin, line + 1
    n_lines = line + 1
    top_px, bottom_px = (0.6 if title else 0.25) * dpi, 1.1 * dpi
    height_px = top_px + n_lines * line_h + bottom_px
    fig.set_size_inches(width, height_px / dpi)
    for x, line, shown, c in placed:
        y = height_px - top_px - (line + 0.5) * line_h
        box = dict(boxstyle="square,pad=0.18", fc=c if c is not None else "white",
                   ec="none" if c is not None else "#bbbbbb", lw=0.6)
        fig.text(x, y, shown, transform=IdentityTransform(), va="center", ha="left", color=_ink(c), bbox=box, **font)
    if title:
        fig.text(0.5, 1 - 0.12 * dpi / height_px, textwrap.shorten(title, int(width * 11)), ha="center", va="top",
                 fontsize=11)
    cax = fig.add_axes((0.25, 0.55 * dpi / height_px, 0.5, 0.18 * dpi / height_px))
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cm), cax=cax, orientation="horizontal")
    cb.set_label(label + ("   (grey outline: not defined)" if any(c is None for c in rgba) else ""), fontsize=9)
    cb.ax.tick_params(labelsize=8)
    return _save(fig, path)


def _token_html(tokens, vals, rgba, norm, cm, *, path, label, title) -> Path:
    spans = []
    for tok, v, c in zip(tokens, vals, rgba):
        bg = to_hex(c) if c is not None else "transparent"
        border = "" if c is not None else "outline:1px solid #bbb;"
        tip = f"{label} = {v:.4g}" if np.isfinite(v) else f"{label}: not defined"
        spans.append(f'<span class="t" style="background:{bg};color:{_ink(c)};{border}" title="{html.escape(tip)}">'
                     + "\u21b5<br>".join(html.escape(_shown(part)) for part in tok.split("\n")) + "</span>")
    stops = ", ".join(to_hex(cm(x)) for x in np.linspace(0, 1, 11))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title or label)}</title>
<style>
body {{ font-family: "DejaVu Sans", Arial, sans-serif; margin: 1.5em; max-width: 60em; }}
.text {{ font-size: 17px; line-height: 2.0; }}
.t {{ white-space: pre-wrap; padding: 2px 1px; border-radius: 3px; }}
.legend {{ margin-top: 1.2em; font-size: 13px; color: #333; }}
.bar {{ display: inline-block; width: 16em; height: 0.9em; vertical-align: middle; margin: 0 0.5em;
        background: linear-gradient(to right, {stops}); }}
</style></head><body>
<h3>{html.escape(title)}</h3>
<div class="text">{"".join(spans)}</div>
<div class="legend">{html.escape(label)}: {norm.vmin:.4g}<span class="bar"></span>{norm.vmax:.4g}
 &nbsp; (hover a token for its value)</div>
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- layers
# "image" is IMAGE + TARGET (all visual tokens); its parts are image_outside_target and target.
PROFILE_CATEGORIES = {"image": None, "image_outside_target": IMAGE, "target": TARGET, "system": SYSTEM, "text": TEXT,
                      "response": RESPONSE}


def layer_profile(masses: torch.Tensor, query_cats: torch.Tensor, *, rows="response", form: str = "ratio",
                  layers: Sequence[int] | None = None) -> dict:
    """Per-layer numbers behind `layer_curves`, averaged over samples with rows.

    masses (L, B, Hq, Q, C), query_cats (B, Q), rows as in `metrics.select_rows`. Returns
    {"layers": [...], "vas": [L], "vas_describe": str, "<category>": [L] mean mass share over heads and
    rows} for image (IMAGE + TARGET), its parts image_outside_target and target, system, text, response.
    """
    res = vas_from_masses(masses, query_cats, layers=layers, rows=rows, form=form)
    sel = select_rows(query_cats.to(masses.device), rows).float()  # (B, Q)
    per_row = masses.float().mean(dim=2)  # (L, B, Q, C), mean over heads
    n = sel.sum(dim=1)  # (B,)
    mean = (per_row * sel[None, :, :, None]).sum(dim=2) / n[None, :, None]  # (L, B, C); NaN without rows
    out = {"layers": list(res.layers), "vas": res.per_layer.nanmean(dim=1).tolist(), "vas_describe": res.describe()}
    for name, code in PROFILE_CATEGORIES.items():
        series = image_mass(mean) if code is None else mean[..., code]
        out[name] = series.nanmean(dim=1).tolist()
    return out


def layer_curves(masses: torch.Tensor, query_cats: torch.Tensor, *, path, rows="response", form: str = "ratio",
                 layers: Sequence[int] | None = None, title: str = "", size: tuple[float, float] = (11.0, 4.2),
                 dpi: int = 100) -> Path:
    """Two panels over layers: VAS (`metrics.vas_from_masses`, stated form) and the mean attention mass
    share of each key category, stacked (image outside target, target, system, text, response; the line is
    image = IMAGE + TARGET), mean over heads and the `rows` query rows.

    masses (L, B, Hq, Q, C) from `Recording.masses()`; query_cats (B, Q); layers: labels of the L layers.
    """
    prof = layer_profile(masses, query_cats, rows=rows, form=form, layers=layers)
    x = prof["layers"]
    fig = _new_figure(*size, dpi)
    ax1 = fig.add_axes((0.085, 0.14, 0.345, 0.72))
    ax2 = fig.add_axes((0.52, 0.14, 0.30, 0.72))
    ax1.plot(x, prof["vas"], marker="o", color="tab:purple")
    vas = np.asarray(prof["vas"], dtype=float)
    finite = vas[np.isfinite(vas)]
    if not finite.size:
        ax1.text(0.5, 0.5, "VAS undefined:\nno attention on system tokens\n(no system prompt)", ha="center",
                 va="center", transform=ax1.transAxes, fontsize=10, color="#444444")
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 50:
        ax1.set_yscale("log")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("VAS = mean img/(sys+eps)" if form == "ratio" else "VAS = mean img/(img+sys+eps)")
    ax1.set_title(f"VAS per layer ({form} form)", fontsize=10)
    # Stacked shares, so the two parts of the image never overlap: the top of the "target" band is the image
    # mass (IMAGE + TARGET), drawn as a line.
    bands = {"image outside target": ("image_outside_target", "#f4a582"), "target": ("target", "#ca0020"),
             "system": ("system", "#4393c3"), "text": ("text", "#7fbf7b"), "response": ("response", "#bababa")}
    ys = [np.nan_to_num(np.asarray(prof[key], dtype=float)) for key, _ in bands.values()]
    ax2.stackplot(x, *ys, labels=list(bands), colors=[c for _, c in bands.values()], alpha=0.9)
    ax2.plot(x, np.nan_to_num(np.asarray(prof["image"], dtype=float)), color="black", lw=1.5, marker=".",
             label="image (total)")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("attention mass share")
    ax2.set_title("mass per key category (mean over heads, rows)", fontsize=10)
    ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, frameon=False)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if len(x) <= 40:
            ax.set_xticks(x)
            ax.tick_params(axis="x", labelsize=8 if len(x) > 16 else 10)
    fig.suptitle(title or f"query rows: {rows if isinstance(rows, str) else 'selected'}", fontsize=11)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- entropy
def entropy_bin_means(entropy, values, bins: int = 5):
    """Quantile bins of token entropy and the mean value per bin.

    entropy (N,), values (N,) (NaN values are left out of the means). Returns (edges (nb+1,),
    means (nb,), counts (nb,)) as float64 / int64 tensors with nb = min(bins, N) and equal-count bins
    by entropy quantiles (ties may make bins uneven; duplicated edges are merged). Bin i holds
    edges[i] <= H < edges[i+1] (the last bin includes its upper edge).
    """
    h = torch.as_tensor(entropy, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if h.shape != v.shape:
        raise ValueError(f"entropy has {h.numel()} values but values has {v.numel()}")
    keep = torch.isfinite(h)
    h, v = h[keep], v[keep]
    if h.numel() == 0:
        raise ValueError("no finite entropy values to bin")
    nb = max(1, min(int(bins), h.numel()))
    edges = torch.unique(torch.quantile(h, torch.linspace(0, 1, nb + 1, dtype=torch.float64)))
    if edges.numel() == 1:
        edges = torch.cat([edges, edges])
    idx = torch.bucketize(h, edges[1:-1], right=True)
    nb = edges.numel() - 1
    ok = torch.isfinite(v)
    counts = torch.bincount(idx[ok], minlength=nb)
    sums = torch.zeros(nb, dtype=torch.float64).index_add_(0, idx[ok], v[ok])
    means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    return edges, means, counts


def entropy_bins(entropy, values: Mapping[str, torch.Tensor] | torch.Tensor, *, path, bins: int = 5,
                 ylabel: str = "mean attention", title: str = "", size: tuple[float, float] = (8.0, 4.5),
                 dpi: int = 100) -> Path:
    """Bars of mean attention per token-entropy quantile bin (SAYO Fig. 4), one bar group per series.

    entropy (N,) in nats; values (N,) or {series label: (N,)} (e.g. target attention a and image
    attention v per generated token). Token counts per bin are written above the bars.
    """
    series = {ylabel: values} if not isinstance(values, Mapping) else dict(values)
    fig = _new_figure(*size, dpi)
    ax = fig.add_axes((0.1, 0.2, 0.86, 0.68))
    width = 0.8 / len(series)
    edges = None
    for s, (name, vals) in enumerate(series.items()):
        edges, means, counts = entropy_bin_means(entropy, vals, bins)
        xs = np.arange(means.numel()) + (s - (len(series) - 1) / 2) * width
        bars = ax.bar(xs, np.nan_to_num(means.numpy(), nan=0.0), width=width * 0.95, label=name)
        for bar, m, c in zip(bars, means.tolist(), counts.tolist()):
            ax.annotate("n/a" if c == 0 else f"n={c}", (bar.get_x() + bar.get_width() / 2, 0 if m != m else m),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    nb = edges.numel() - 1
    ax.set_xticks(np.arange(nb))
    e = edges.tolist()
    digits = next((d for d in range(2, 8) if len({f"{x:.{d}f}" for x in e}) == len(e)), 8)
    ax.set_xticklabels([f"[{e[i]:.{digits}f},\n{e[i + 1]:.{digits}f}{']' if i == nb - 1 else ')'}" for i in range(nb)],
                       fontsize=8)
    ax.set_xlabel("token entropy (nats), quantile bins from low to high")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    top = max((float(np.nanmax(entropy_bin_means(entropy, v, bins)[1].numpy())) for v in series.values()),
              default=0.0)
    if np.isfinite(top) and top > 0:
        ax.set_ylim(0, top * 1.15)  # room for the n= labels
    if len(series) > 1:  # above the axes, never over the bars
        ax.legend(fontsize=9, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series))
    ax.set_title(title or "attention vs token entropy", fontsize=11, pad=22 if len(series) > 1 else 6)
    return _save(fig, path)


__all__ = ["CELL_PIXEL_VALUE", "HEATMAP_VALUE", "cell_heatmap_grid", "cell_raster", "entropy_bin_means",
           "entropy_bins", "image_heatmap", "image_heatmap_grid", "layer_curves", "layer_profile", "token_text_figure",
           "visual_token_grid"]

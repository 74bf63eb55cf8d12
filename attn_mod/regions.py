"""Pixel bounding boxes -> visual-token indices (the TARGET category), per model family.

Geometry (read from transformers 5.24's Qwen2-VL image/video processors and the Qwen2.5-VL /
Qwen3-VL vision towers; Qwen3-VL reuses the same image processor with ``patch_size=16``):

* The image is resized by ``smart_resize`` to (RH, RW), both multiples of ``patch*merge``
  (28 px for Qwen2/2.5-VL, 32 px for Qwen3-VL), and cut into ``patch``-px patches:
  ``image_grid_thw = (1, RH/patch, RW/patch)``.
* ``patchify`` orders the patches as (merged row, merged col, row-in-merge, col-in-merge), so the
  ``merge**2`` patches of one merged cell are contiguous; the vision merger turns each such group
  into one LLM token (Qwen2.5-VL's window permutation is undone before the merger output).
  Hence visual token ``n`` of an image covers merged cell (r, c) = divmod(n, RW/(patch*merge)),
  i.e. resized pixels ``[c*T, (c+1)*T) x [r*T, (r+1)*T)`` with ``T = patch*merge``:
  plain raster order over merged cells.
* Videos: ``video_grid_thw = (GT, GH, GW)``; token ``t*(GH*GW/merge**2) + n`` is merged cell ``n``
  of temporal group ``t`` (frames ``t*temporal_patch ... (t+1)*temporal_patch-1`` of the sampled
  clip). Qwen2.5-VL writes one contiguous placeholder run per video, Qwen3-VL one run per
  temporal group (separated by ``<t seconds>`` text); both are handled.

Box conventions (``convention=``), all as (x0, y0, x1, y1) with x to the right, y down:

* ``"pixel"``: pixels of the ORIGINAL image, continuous coordinates (pixel i spans [i, i+1)),
  so the full-image box is (0, 0, W, H).
* ``"normalized"``: fractions of the original width/height, 0..1.
* ``"qwen1000"``: Qwen2-VL / Qwen3-VL grounding style, 0..1000 relative to the image.
* ``"resized"``: pixels of the processor's resized image (Qwen2.5-VL's absolute grounding).

Which tokens count (``by=``): ``"overlap"`` (default) selects every token whose cell, mapped back
to original-image coordinates (scaled by original/resized), overlaps the box with positive
area. ``"center"`` selects the tokens whose cell centre lies in the closed box (it may select
nothing for a box smaller than a cell; ``center`` is always a subset of ``overlap``).

Decisions:

* Degenerate boxes: x0 == x1 and/or y0 == y1 are allowed (a point or a segment). Along a
  zero-length axis the box selects the cell CONTAINING the coordinate, cells being half-open
  [start, end) except the last one, which also owns the far border (x = W selects the last
  column). The other axis follows ``by``. So a point selects exactly one token, in both modes.
* Borders: coordinates up to ``BORDER_TOL_PX`` original pixels outside [0, W] x [0, H] are
  clamped; farther out is a ValueError. A box ending exactly on a cell border (or on the image
  border) does not select the next cell (zero-area contact).
* Exactness: coordinates are read as rationals with denominator <= 10**6
  (``Fraction.limit_denominator``), so float noise such as ``0.1 * 280 = 28.000000000000004``
  does not select a sliver cell; all geometry after that is exact rational arithmetic.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Sequence

import torch

CONVENTIONS = ("pixel", "normalized", "qwen1000", "resized")
SELECTION_RULES = ("overlap", "center")
BORDER_TOL_PX = 1e-3
_SNAP_DENOMINATOR = 10**6

# (patch_size, merge_size, temporal_patch_size) of each supported family's released processor.
FAMILY_GEOMETRY = {
    "qwen2_vl": (14, 2, 2),
    "qwen2_5_vl": (14, 2, 2),
    "qwen3_vl": (16, 2, 2),
    "qwen3_vl_moe": (16, 2, 2),
}


@dataclass(frozen=True)
class Geometry:
    """Patch geometry of a family: ``token_px = patch_size * merge_size`` resized px per token side."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int = 2

    @property
    def token_px(self) -> int:
        return self.patch_size * self.merge_size


def _image_processor(obj):
    return getattr(obj, "image_processor", None) or obj


def geometry_for(processor_or_image_processor=None, family: str | None = None) -> Geometry:
    """Patch/merge sizes of a processor (or its ``image_processor``), checked against ``family``.

    Values come from the processor object when it has them, else from the family's defaults
    (``FAMILY_GEOMETRY``). A processor whose patch/merge size contradicts ``family`` is an error
    (e.g. a Qwen2.5-VL image processor, patch 14, used for a Qwen3-VL model, patch 16).
    """
    if family is not None and family not in FAMILY_GEOMETRY:
        raise ValueError(f"unknown family {family!r}; supported: {sorted(FAMILY_GEOMETRY)} "
                         "(or pass patch_size/merge_size explicitly to the region functions)")
    defaults = FAMILY_GEOMETRY.get(family, (None, None, 2))
    ip = _image_processor(processor_or_image_processor) if processor_or_image_processor is not None else None
    values = []
    for name, default in zip(("patch_size", "merge_size", "temporal_patch_size"), defaults):
        got = getattr(ip, name, None) if ip is not None else None
        if got is not None and family is not None and name != "temporal_patch_size" and got != default:
            raise ValueError(f"processor has {name}={got} but family {family!r} uses {default}; "
                             f"pass the processor that belongs to the {family} checkpoint")
        value = got if got is not None else default
        if value is None:
            raise ValueError(f"cannot determine {name}: the processor has no {name!r} attribute; "
                             f"pass family= (one of {sorted(FAMILY_GEOMETRY)})")
        values.append(int(value))
    return Geometry(*values)


def _smart_resize_fallback(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    """Copy of transformers' Qwen2-VL ``smart_resize`` (used only when it cannot be imported)."""
    ratio = max(height, width) / min(height, width)
    if ratio > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _smart_resize_of(ip):
    fn = getattr(sys.modules.get(type(ip).__module__), "smart_resize", None)
    if fn is None:
        try:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as fn
        except ImportError:  # pragma: no cover - transformers always ships it in supported versions
            fn = _smart_resize_fallback
    return fn


def _pixel_bounds(ip) -> tuple[int, int]:
    size = getattr(ip, "size", None)
    lo = hi = None
    if size is not None:
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        lo = get("shortest_edge") or get("min_pixels")
        hi = get("longest_edge") or get("max_pixels")
    lo = lo or getattr(ip, "min_pixels", None)
    hi = hi or getattr(ip, "max_pixels", None)
    if lo is None or hi is None:
        raise ValueError("the image processor has no min/max pixel budget (size['shortest_edge'/'longest_edge'] "
                         "or min_pixels/max_pixels); take the resized size from image_grid_thw instead")
    return int(lo), int(hi)


def resized_size_from_config(processor_or_image_processor, image_size, family: str | None = None) -> tuple[int, int]:
    """(RH, RW) the processor will resize an image of ``image_size`` to, re-derived from its config.

    Uses the processor module's own ``smart_resize`` with ``factor = patch*merge`` and the
    processor's min/max pixels. Prefer ``resized_size(image_grid_thw[k], patch_size)`` when the
    processor output is at hand: it is what the model actually saw.
    """
    ip = _image_processor(processor_or_image_processor)
    h, w = image_hw(image_size)
    if getattr(ip, "do_resize", True) is False:
        return h, w
    geo = geometry_for(ip, family)
    lo, hi = _pixel_bounds(ip)
    rh, rw = _smart_resize_of(ip)(h, w, factor=geo.token_px, min_pixels=lo, max_pixels=hi)
    return int(rh), int(rw)


def _grid(grid_thw) -> tuple[int, int, int]:
    vals = [int(v) for v in (grid_thw.tolist() if hasattr(grid_thw, "tolist") else grid_thw)]
    if len(vals) != 3 or min(vals) <= 0:
        raise ValueError(f"grid_thw must be 3 positive ints (t, h, w), got {vals}")
    return vals[0], vals[1], vals[2]


def resized_size(grid_thw, patch_size: int) -> tuple[int, int]:
    """(RH, RW) in pixels of the resized image/frames, from one ``image_grid_thw`` row."""
    _, gh, gw = _grid(grid_thw)
    return gh * patch_size, gw * patch_size


def token_grid(grid_thw, merge_size: int) -> tuple[int, int, int]:
    """(T, rows, cols) of LLM tokens for one grid row; tokens = T*rows*cols, raster per group."""
    t, gh, gw = _grid(grid_thw)
    if gh % merge_size or gw % merge_size:
        raise ValueError(f"grid_thw {[t, gh, gw]} is not divisible by merge_size={merge_size}; "
                         "pass the merge_size of the processor that produced the grid")
    return t, gh // merge_size, gw // merge_size


def image_hw(image_size) -> tuple[int, int]:
    """(height, width) from a PIL image (uses ``.height/.width``) or an (H, W) pair (transformers' order)."""
    if hasattr(image_size, "height") and hasattr(image_size, "width"):
        h, w = image_size.height, image_size.width
    else:
        try:
            h, w = image_size
        except (TypeError, ValueError):
            raise ValueError(f"image size must be (height, width) or a PIL image, got {image_size!r}") from None
    try:
        ok = all(float(v).is_integer() and float(v) > 0 for v in (h, w))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image size must be positive integers (height, width), got {(h, w)}")
    return int(h), int(w)


def _snap(v) -> Fraction:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, numbers.Integral):
        return Fraction(int(v))
    if isinstance(v, Fraction):
        return v
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"box coordinates must be finite, got {v}")
    return Fraction(v).limit_denominator(_SNAP_DENOMINATOR)


def _box_pixels_exact(box, image_size, convention: str, resized_hw=None) -> tuple[Fraction, ...]:
    """The one place where conventions are converted: -> clamped (x0, y0, x1, y1) original pixels."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r}; use one of {CONVENTIONS}")
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    try:
        coords = [_snap(v) for v in box]
    except TypeError:
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got {box!r}") from None
    if len(coords) != 4:
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got {len(coords)} values: {box!r}")
    h, w = image_hw(image_size)
    if convention == "pixel":
        sx = sy = Fraction(1)
    elif convention == "normalized":
        sx, sy = Fraction(w), Fraction(h)
    elif convention == "qwen1000":
        sx, sy = Fraction(w, 1000), Fraction(h, 1000)
    else:  # resized
        if resized_hw is None:
            raise ValueError("convention='resized' needs the resized size (from image_grid_thw)")
        rh, rw = resized_hw
        sx, sy = Fraction(w, rw), Fraction(h, rh)
    x0, y0, x1, y1 = coords[0] * sx, coords[1] * sy, coords[2] * sx, coords[3] * sy
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box {box!r} has x1 < x0 or y1 < y0; boxes are (x0, y0, x1, y1) corners "
                         "(convert (x, y, w, h) boxes to corners first)")
    tol = Fraction(BORDER_TOL_PX)
    if min(x0, y0) < -tol or x1 > w + tol or y1 > h + tol:
        hint = ""
        if convention == "pixel" and max(map(abs, coords)) <= 1000:
            hint = " (did you mean convention='qwen1000' or 'resized'?)"
        parts = [f"x0={float(x0):g} is {float(-x0):g} px left of the image" if x0 < -tol else "",
                 f"y0={float(y0):g} is {float(-y0):g} px above it" if y0 < -tol else "",
                 f"x1={float(x1):g} is {float(x1 - w):g} px past the right edge (W={w})" if x1 > w + tol else "",
                 f"y1={float(y1):g} is {float(y1 - h):g} px below the bottom edge (H={h})" if y1 > h + tol else ""]
        inside = x1 > 0 and y1 > 0 and x0 < w and y0 < h
        clipped = [max(float(x0), 0), max(float(y0), 0), min(float(x1), w), min(float(y1), h)]
        where = "extends outside" if inside else "lies entirely outside"
        fix = (f"clip it to the image ({', '.join(f'{v:g}' for v in clipped)} in original pixels)"
               if inside else "check the box")
        raise ValueError(f"box {box!r} ({convention}) {where} the {w}x{h} (WxH) image: "
                         f"{'; '.join(p for p in parts if p)}{hint}; {fix} or pass the right convention/image size")
    clamp = lambda v, hi: min(max(v, Fraction(0)), Fraction(hi))  # noqa: E731
    return clamp(x0, w), clamp(y0, h), clamp(x1, w), clamp(y1, h)


def box_to_pixels(box, image_size, convention: str = "pixel", *, resized_hw=None) -> tuple[float, float, float, float]:
    """Convert one box to original-image pixels (x0, y0, x1, y1), validated and clamped to the image.

    ``image_size``: (H, W) or a PIL image. ``resized_hw``: (RH, RW), needed only for ``"resized"``.
    """
    return tuple(float(v) for v in _box_pixels_exact(box, image_size, convention, resized_hw))


def _axis_range(lo: Fraction, hi: Fraction, orig: int, resized: int, cell: int, n: int, by: str) -> range:
    """Cells (0..n-1, each ``cell`` resized px) selected along one axis by [lo, hi] (original px)."""
    u0, u1 = lo * resized / orig, hi * resized / orig
    if u0 == u1:  # zero extent: the containing half-open cell (the last cell owns the far border)
        j = min(math.floor(u0 / cell), n - 1)
        return range(j, j + 1)
    if by == "overlap":
        j0, j1 = math.floor(u0 / cell), math.ceil(u1 / cell) - 1
    else:  # centre (j + 1/2) * cell inside the closed interval [u0, u1]
        j0, j1 = math.ceil(u0 / cell - Fraction(1, 2)), math.floor(u1 / cell - Fraction(1, 2))
    return range(max(j0, 0), min(j1, n - 1) + 1)


def _frames(frames, t: int) -> list[int]:
    if frames is None:
        return list(range(t))
    out = [int(frames)] if isinstance(frames, numbers.Integral) else [int(f) for f in frames]
    for f in out:
        if not 0 <= f < t:
            raise ValueError(f"frame group {f} out of range: grid has {t} temporal groups "
                             "(frame groups index video_grid_thw[k][0], i.e. sampled frames / temporal_patch_size)")
    return out


def box_token_indices(box, image_size, grid_thw, *, patch_size: int, merge_size: int, convention: str = "pixel",
                      by: str = "overlap", frames=None) -> torch.Tensor:
    """Indices (sorted, int64, shape (n,)) of the box's tokens within one image/video token block.

    ``image_size``: original (H, W) or PIL image; ``grid_thw``: the processor's (t, h, w) patch grid
    for this image/video; ``frames``: temporal groups to select (int or iterable; None = all).
    Index = t * rows * cols + r * cols + c (see the module doc for the order).
    """
    if by not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule by={by!r}; use one of {SELECTION_RULES}")
    t, rows, cols = token_grid(grid_thw, merge_size)
    rh, rw = resized_size(grid_thw, patch_size)
    h, w = image_hw(image_size)
    x0, y0, x1, y1 = _box_pixels_exact(box, (h, w), convention, (rh, rw))
    cell = patch_size * merge_size
    rr = _axis_range(y0, y1, h, rh, cell, rows, by)
    cc = _axis_range(x0, x1, w, rw, cell, cols, by)
    per_frame = (torch.arange(rr.start, rr.stop)[:, None] * cols + torch.arange(cc.start, cc.stop)[None, :]).flatten()
    idx = [f * rows * cols + per_frame for f in _frames(frames, t)]
    return torch.cat(idx).to(torch.long) if idx else torch.zeros(0, dtype=torch.long)


def token_cells(image_size, grid_thw, *, patch_size: int, merge_size: int) -> torch.Tensor:
    """(rows*cols, 4) float64: each token's cell (x0, y0, x1, y1) in ORIGINAL pixels, token order of one frame."""
    _, rows, cols = token_grid(grid_thw, merge_size)
    rh, rw = resized_size(grid_thw, patch_size)
    h, w = image_hw(image_size)
    cell = patch_size * merge_size
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    sx, sy = w / rw, h / rh
    return torch.stack([c * cell * sx, r * cell * sy, (c + 1) * cell * sx, (r + 1) * cell * sy], -1).reshape(-1, 4)


@dataclass(frozen=True)
class VisualSpan:
    """Where one image/video sits in the batch: ``positions`` (n,) int64 sequence indices in token order."""

    kind: str  # "image" | "video"
    index: int  # row of image_grid_thw / video_grid_thw
    sample: int  # batch row
    index_in_sample: int  # k-th image (or video) of that sample
    grid_thw: tuple[int, int, int]
    positions: torch.Tensor


def _as_2d_long(x, name):
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, seq), got shape {tuple(x.shape)}; "
                         f"use {name}[None] for one sample")
    return x


def _placeholder_mask(kind, input_ids, token_id, mm_token_type_ids):
    code = 1 if kind == "image" else 2
    by_ids = input_ids == token_id if token_id is not None else None
    if mm_token_type_ids is not None:
        by_types = _as_2d_long(mm_token_type_ids, "mm_token_type_ids").to(input_ids.device) == code
        if by_types.shape != input_ids.shape:
            raise ValueError(f"mm_token_type_ids shape {tuple(by_types.shape)} != "
                             f"input_ids shape {tuple(input_ids.shape)}")
        if by_ids is not None and not torch.equal(by_ids, by_types):
            raise ValueError(f"mm_token_type_ids == {code} disagrees with input_ids == {kind}_token_id={token_id}; "
                             f"pass the {kind} token id of this tokenizer")
        return by_types
    if by_ids is None:
        raise ValueError(f"{kind}_grid_thw given but neither {kind}_token_id nor mm_token_type_ids")
    return by_ids


def locate_visual_tokens(input_ids, image_token_id, image_grid_thw, *, merge_size: int, mm_token_type_ids=None,
                         video_token_id=None, video_grid_thw=None) -> list[VisualSpan]:
    """Assign the placeholder tokens of a (B, S) batch to images/videos, in grid-row order.

    Rows of ``image_grid_thw`` (N, 3) are ordered sample by sample, image by image; image k takes
    the next ``t*h*w/merge**2`` image placeholders (which must be contiguous). Padding on either
    side is irrelevant: positions come from the ids. Videos likewise with ``video_grid_thw``;
    each temporal group's placeholders must be contiguous (Qwen3-VL splits them by timestamps).
    """
    input_ids = _as_2d_long(input_ids, "input_ids")
    spans: list[VisualSpan] = []
    for kind, token_id, grids in (("image", image_token_id, image_grid_thw), ("video", video_token_id, video_grid_thw)):
        mask = _placeholder_mask(kind, input_ids, token_id, mm_token_type_ids) if (
            grids is not None or token_id is not None or mm_token_type_ids is not None) else None
        grid_rows = [] if grids is None else [_grid(g) for g in torch.as_tensor(grids).reshape(-1, 3)]
        if mask is None:
            continue
        k = 0
        for b in range(input_ids.shape[0]):
            pos = torch.nonzero(mask[b], as_tuple=False).flatten()
            used, k_in_sample = 0, 0
            while used < pos.numel():
                if k >= len(grid_rows):
                    raise ValueError(f"sample {b} has {pos.numel() - used} {kind} placeholder tokens left but "
                                     f"{kind}_grid_thw has only {len(grid_rows)} rows: placeholder count does not "
                                     f"match {kind}_grid_thw; pass the grid_thw of every {kind} in the batch, in order")
                t, rows, cols = token_grid(grid_rows[k], merge_size)
                need = t * rows * cols
                if used + need > pos.numel():
                    raise ValueError(f"{kind} {k} (grid_thw {list(grid_rows[k])}) needs {need} placeholder tokens "
                                     f"but sample {b} has only {pos.numel() - used} left; placeholder count does not "
                                     f"match {kind}_grid_thw (wrong merge_size or grid rows?)")
                p = pos[used:used + need]
                group = need if kind == "image" else rows * cols
                runs = p.view(-1, group)
                if not bool((runs[:, -1] - runs[:, 0] == group - 1).all()):
                    raise ValueError(f"{kind} {k} placeholders in sample {b} are not contiguous per "
                                     f"{'image' if kind == 'image' else 'temporal group'}; placeholder count does "
                                     f"not match {kind}_grid_thw")
                spans.append(VisualSpan(kind, k, b, k_in_sample, grid_rows[k], p))
                used += need
                k += 1
                k_in_sample += 1
        if k != len(grid_rows):
            raise ValueError(f"{kind}_grid_thw has {len(grid_rows)} rows but the placeholders of the batch account "
                             f"for {k}; placeholder count does not match {kind}_grid_thw")
    return spans


def _is_box(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and x.numel() == 4
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence) and not hasattr(x, "__array__"):
        return False
    try:
        return len(x) == 4 and all(isinstance(v, numbers.Real) or (hasattr(v, "item") and getattr(v, "ndim", 1) == 0)
                                   for v in x)
    except TypeError:
        return False


def _parse_entry(entry, b: int) -> tuple[str, int, Any, Any]:
    """-> (kind, index_in_sample, box, frames)."""
    if _is_box(entry):
        return "image", -1, entry, None  # -1: "the sample's only image"
    if not isinstance(entry, Sequence) or isinstance(entry, (str, bytes)):
        raise ValueError(f"boxes[{b}] entry {entry!r} is not a box or an (image_index, box) pair")
    if len(entry) == 2 and isinstance(entry[0], numbers.Integral):
        return "image", int(entry[0]), entry[1], None
    if len(entry) == 3 and entry[0] in ("image", "video"):
        return entry[0], int(entry[1]), entry[2], None
    if len(entry) == 4 and entry[0] == "video":
        return "video", int(entry[1]), entry[3], entry[2]
    raise ValueError(f"boxes[{b}] entry {entry!r} not understood; use box, (k, box), ('image', k, box), "
                     "('video', k, box) or ('video', k, frame_group, box)")


def target_token_mask(input_ids, image_token_id, image_grid_thw, boxes, image_sizes, *, merge_size: int,
                      patch_size: int, convention: str = "pixel", by: str = "overlap", mm_token_type_ids=None,
                      video_token_id=None, video_grid_thw=None, video_sizes=None) -> torch.Tensor:
    """(B, S) bool mask of TARGET tokens: visual tokens inside the boxes.

    input_ids: (B, S) ids (any padding side). image_grid_thw: (N_img, 3), rows ordered sample by
    sample, image by image, as the processor returns them. image_sizes: N_img original sizes,
    aligned with image_grid_thw rows, each (H, W) or a PIL image. video_grid_thw / video_sizes
    likewise for videos (frame size (H, W)).

    boxes: length-B list; ``boxes[b]`` is None or [] (no target) or a list of entries, several
    entries being unioned:
      * ``(k, box)`` or ``("image", k, box)``: box on the sample's k-th image (0-based, within the sample);
      * ``box`` alone (4 numbers): the sample's only image (error if it has several);
      * ``("video", k, box)``: box on every temporal group of the sample's k-th video;
      * ``("video", k, t, box)``: box on temporal group t only (one entry per group for per-frame boxes).
    ``boxes[b]`` may itself be a single box (shorthand for ``[box]``). A box is (x0, y0, x1, y1)
    in ``convention``; ``by`` selects the rule (see the module doc).
    """
    input_ids = _as_2d_long(input_ids, "input_ids")
    bsz = input_ids.shape[0]
    if boxes is None or len(boxes) != bsz:
        raise ValueError(f"boxes must have one entry per batch sample ({bsz}), got "
                         f"{None if boxes is None else len(boxes)}; use None or [] for samples without a target")
    spans = locate_visual_tokens(input_ids, image_token_id, image_grid_thw, merge_size=merge_size,
                                 mm_token_type_ids=mm_token_type_ids, video_token_id=video_token_id,
                                 video_grid_thw=video_grid_thw)
    table = {(s.kind, s.sample, s.index_in_sample): s for s in spans}
    counts = {}
    for s in spans:
        counts[(s.kind, s.sample)] = counts.get((s.kind, s.sample), 0) + 1
    sizes = {"image": image_sizes, "video": video_sizes}
    for kind, grids in (("image", image_grid_thw), ("video", video_grid_thw)):
        n = 0 if grids is None else torch.as_tensor(grids).reshape(-1, 3).shape[0]
        if sizes[kind] is not None and len(sizes[kind]) != n:
            raise ValueError(f"{kind}_sizes has {len(sizes[kind])} entries but {kind}_grid_thw has {n} rows; "
                             f"give one original (H, W) per {kind}, in grid order")
    mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for b, sample_boxes in enumerate(boxes):
        if sample_boxes is None:
            continue
        entries = [sample_boxes] if _is_box(sample_boxes) else list(sample_boxes)
        for entry in entries:
            kind, k, box, frames = _parse_entry(entry, b)
            have = counts.get((kind, b), 0)
            if k == -1:
                if have != 1:
                    raise ValueError(f"boxes[{b}] has a bare box but sample {b} has {have} images; "
                                     "use (image_index, box) entries")
                k = 0
            if not 0 <= k < have:
                raise ValueError(f"boxes[{b}] refers to {kind} {k} but sample {b} has {have} {kind}s "
                                 f"(indices are 0-based within the sample)")
            if sizes[kind] is None:
                raise ValueError(f"a {kind} box needs {kind}_sizes (original (H, W) per {kind})")
            span = table[(kind, b, k)]
            idx = box_token_indices(box, sizes[kind][span.index], span.grid_thw, patch_size=patch_size,
                                    merge_size=merge_size, convention=convention, by=by, frames=frames)
            mask[b, span.positions.to(input_ids.device)[idx.to(input_ids.device)]] = True
    return mask


__all__ = [
    "BORDER_TOL_PX", "CONVENTIONS", "FAMILY_GEOMETRY", "SELECTION_RULES", "Geometry", "VisualSpan",
    "box_to_pixels", "box_token_indices", "geometry_for", "image_hw", "locate_visual_tokens",
    "resized_size", "resized_size_from_config", "target_token_mask", "token_cells", "token_grid",
]


# ------------------------------------------------------------------------------ cell-list geometry
# Families whose visual tokens are not a Qwen-style merged grid (LLaVA's crop, InternVL's tiles, a
# user's own model) describe each image as a list of token cells: cell i = (x0, y0, x1, y1) in
# ORIGINAL-image pixels covered by visual token i of that image's placeholder run, or None for a
# token that is no image cell (a CLS or newline token). A cell may reach beyond the image (into padding the
# processor added): overlap counts only its part inside the image, its centre is the centre of the whole
# cell, and a cell entirely outside is never selected. Selection follows the rules of the module doc.


def _cell_axis_hit(b0: Fraction, b1: Fraction, c0: Fraction, c1: Fraction, edge: Fraction, by: str) -> bool:
    if b0 == b1:  # zero extent: the cell containing the coordinate (half-open; the far image border belongs in)
        return c0 <= b0 < c1 or (b0 == c1 == edge)
    if by == "overlap":
        return min(b1, c1) > max(b0, c0)
    mid = (c0 + c1) / 2
    return b0 <= mid <= b1


def select_cells(cells: Sequence, box, image_size, *, convention: str = "pixel", by: str = "overlap") -> torch.Tensor:
    """Indices (sorted int64) of the cells that `box` selects; `cells` as described above (None = never)."""
    if by not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule by={by!r}; use one of {SELECTION_RULES}")
    if convention == "resized":
        raise ValueError("convention='resized' is defined for Qwen-style grids only; use 'pixel', 'normalized' "
                         "or 'qwen1000' for this family")
    h, w = image_hw(image_size)
    x0, y0, x1, y1 = _box_pixels_exact(box, (h, w), convention)
    out = []
    for i, cell in enumerate(cells):
        if cell is None:
            continue
        cx0, cy0, cx1, cy1 = (Fraction(v) for v in cell)
        if min(cx1, w) <= max(cx0, 0) or min(cy1, h) <= max(cy0, 0):
            continue  # a cell entirely in padding
        if _cell_axis_hit(x0, x1, cx0, cx1, Fraction(w), by) and _cell_axis_hit(y0, y1, cy0, cy1, Fraction(h), by):
            out.append(i)
    return torch.tensor(out, dtype=torch.long)


def cells_target_mask(input_ids, image_token_id: int, image_cells: Sequence[Sequence], boxes, image_sizes, *,
                      convention: str = "pixel", by: str = "overlap", contiguous: bool = True) -> torch.Tensor:
    """(B, S) bool TARGET mask from per-image token cells (see above).

    image_cells[k]: the cells of the k-th image in processor order (sample by sample), one per
    placeholder token of that image, whose placeholders must be contiguous (with `contiguous=False`:
    the image's next len(cells) placeholders of the sample, other tokens such as Idefics3's sub-image
    markers between them). boxes / image_sizes as in `target_token_mask` (image entries only).
    """
    input_ids = _as_2d_long(input_ids, "input_ids")
    bsz = input_ids.shape[0]
    if boxes is None or len(boxes) != bsz:
        raise ValueError(f"boxes must have one entry per batch sample ({bsz}), got "
                         f"{None if boxes is None else len(boxes)}; use None or [] for samples without a target")
    if image_sizes is None or len(image_sizes) != len(image_cells):
        raise ValueError(f"image_sizes must give one original (H, W) per image ({len(image_cells)}), got "
                         f"{None if image_sizes is None else len(image_sizes)}")
    mask_ids = input_ids == int(image_token_id)
    spans: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}
    k = 0
    for b in range(bsz):
        pos = torch.nonzero(mask_ids[b], as_tuple=False).flatten()
        used, j = 0, 0
        while used < pos.numel():
            if k >= len(image_cells):
                raise ValueError(f"sample {b} has {pos.numel() - used} image placeholder tokens left but only "
                                 f"{len(image_cells)} images were given; pass every image of the batch, in order")
            need = len(image_cells[k])
            p = pos[used:used + need]
            if p.numel() != need or (contiguous and int(p[-1] - p[0]) != need - 1):
                raise ValueError(f"image {k} needs {need} contiguous placeholder tokens in sample {b}; the "
                                 "placeholders do not match the images (wrong image sizes or processor?)")
            spans[(b, j)] = (k, p)
            used, j, k = used + need, j + 1, k + 1
    if k != len(image_cells):
        raise ValueError(f"{len(image_cells)} images were given but the placeholders account for {k}")
    mask = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for b, sample_boxes in enumerate(boxes):
        if sample_boxes is None:
            continue
        have = sum(1 for (bb, _) in spans if bb == b)
        for entry in ([sample_boxes] if _is_box(sample_boxes) else list(sample_boxes)):
            kind, j, box, _ = _parse_entry(entry, b)
            if kind != "image":
                raise ValueError("video boxes are not supported for this family")
            if j == -1:
                if have != 1:
                    raise ValueError(f"boxes[{b}] has a bare box but sample {b} has {have} images; "
                                     "use (image_index, box) entries")
                j = 0
            if not 0 <= j < have:
                raise ValueError(f"boxes[{b}] refers to image {j} but sample {b} has {have} images")
            k, p = spans[(b, j)]
            idx = select_cells(image_cells[k], box, image_sizes[k], convention=convention, by=by)
            mask[b, p.to(input_ids.device)[idx.to(input_ids.device)]] = True
    return mask


__all__ += ["cells_target_mask", "select_cells"]

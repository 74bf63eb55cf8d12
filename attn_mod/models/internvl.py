"""InternVL3 / InternVL3.5 -HF (`InternVLForConditionalGeneration`): ChatML roles, `<IMG_CONTEXT>` tokens,
dynamic 448-px tiling + thumbnail, pixel shuffle.

Roles are ChatML (`ChatMLAdapter`); IMAGE = `<IMG_CONTEXT>` (config.image_token_id); the `<img>` / `</img>`
delimiters are TEXT, as Qwen's `<|vision_start|>` / `<|vision_end|>` are.

Geometry (transformers' GotOcr2 image processor and InternVL's `pixel_shuffle`): an image of (H, W) gets a
tile grid (cols, rows) = `get_optimal_tiled_canvas((H, W), (T, T), min_patches, max_patches)` (closest aspect
ratio), is resized to (rows*T, cols*T) and cut into T-px tiles in raster order; when there is more than one
tile a thumbnail (the whole image resized to T x T) follows. Each tile is cut into 14-px patches, the
(T/14)^2 patch features are pixel-shuffled with ratio 1/2, which keeps raster order over 2x2 patch blocks:
token n of a tile covers the 28-px square (r, c) = divmod(n, T/28) of the tile
(256 tokens per 448-px tile). A box therefore selects tokens in every tile it overlaps and in the thumbnail.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from ..regions import cells_target_mask, image_hw
from .base import ChatMLAdapter


@dataclass(frozen=True)
class TileGeometry:
    tile: int  # T, tile side in px
    cell: int  # px of a tile per LLM token (patch / downsample_ratio)
    tiling: bool
    min_tiles: int
    max_tiles: int
    thumbnail: bool = True

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """(cols, rows) of tiles, exactly as the processor chooses them."""
        if not (self.tiling and self.max_tiles > 1):
            return 1, 1
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        return get_optimal_tiled_canvas((h, w), (self.tile, self.tile), self.min_tiles, self.max_tiles)

    def cells(self, image_size) -> list:
        """Per `<IMG_CONTEXT>` token of the image, in order: (x0, y0, x1, y1) original pixels (Fractions)."""
        h, w = image_hw(image_size)
        cols, rows = self.grid(h, w)
        n = self.tile // self.cell
        out = []

        def tile_cells(ox, oy, sx, sy):  # tile origin (resized px) and resized->original scale
            for r in range(n):
                for c in range(n):
                    out.append(((ox + c * self.cell) * sx, (oy + r * self.cell) * sy,
                                (ox + (c + 1) * self.cell) * sx, (oy + (r + 1) * self.cell) * sy))

        sx, sy = Fraction(w, cols * self.tile), Fraction(h, rows * self.tile)
        for i in range(cols * rows):
            tile_cells((i % cols) * self.tile, (i // cols) * self.tile, sx, sy)
        if self.thumbnail and cols * rows > 1:
            tile_cells(0, 0, Fraction(w, self.tile), Fraction(h, self.tile))
        return out

    def views(self, image_size) -> list[tuple[str, int, int]]:
        """[(label, start, stop)]: token ranges of `cells` whose cells tile the image once: the tiles together,
        then the thumbnail (when there is more than one tile)."""
        h, w = image_hw(image_size)
        cols, rows = self.grid(h, w)
        per = (self.tile // self.cell) ** 2
        if cols * rows == 1:
            return [(f"single tile, {per} tokens", 0, per)]
        return [(f"{rows}x{cols} tiles, {per} tokens each", 0, rows * cols * per),
                (f"thumbnail, {per} tokens", rows * cols * per, (rows * cols + 1) * per)]


class InternVLAdapter(ChatMLAdapter):
    name = "internvl"
    model_types = ("internvl",)

    def box_geometry(self, processor, config=None) -> TileGeometry:
        ip = getattr(processor, "image_processor", None)
        size = getattr(ip, "size", None)
        if ip is None or size is None:
            raise ValueError("pixel boxes on internvl need its InternVLProcessor (the GotOcr2 image processor)")
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k))
        if get("height") != get("width"):
            raise NotImplementedError("box geometry assumes square tiles (InternVL uses 448 x 448)")
        tile = int(get("height"))
        seq = getattr(processor, "image_seq_length", None) or getattr(config, "image_seq_length", None)
        side = round(seq ** 0.5) if seq else 0
        if not seq or side * side != seq or tile % side:
            raise ValueError(f"cannot derive the token grid of a {tile}-px tile from image_seq_length={seq}")
        return TileGeometry(tile, tile // side, bool(getattr(ip, "crop_to_patches", False)),
                            int(getattr(ip, "min_patches", 1)), int(getattr(ip, "max_patches", 12)))

    def box_mask(self, target, input_ids, inputs, config, processor) -> torch.Tensor:
        if target.video_sizes:
            raise NotImplementedError("video boxes are not implemented for internvl (frames are separate "
                                      "<img> blocks of one tile each); pass images= only")
        geo = self.box_geometry(processor, config)
        cells = [geo.cells(size) for size in (target.image_sizes or [])]
        return cells_target_mask(input_ids, config.image_token_id, cells, target.boxes, target.image_sizes,
                                 convention=target.convention, by=target.by)

"""Mllama / Llama-3.2-Vision (`MllamaForConditionalGeneration`): Llama-3 role headers, one `<|image|>` placeholder
per image in the text sequence, and the image's vision tokens entering only through cross-attention layers.

Layers. The text decoder interleaves self-attention layers (keys = the text/KV sequence) with cross-attention
layers (`config.text_config.cross_attention_layers`, e.g. 3, 8, ..., 38 of 40; keys = the vision tokens of every
tile of every image of the sample, in the order (image, tile, patch) with each tile's CLS token first). Both kinds
are patched; attn-mod indexes them by their decoder layer index (`model.model.language_model.layers[i]`) everywhere:
`Intervention(layers=...)`, `capture(layers=...)`, `state.cross_layers` lists the cross-attention ones.

Labels of the text sequence (self-attention keys and every query row), from token ids only (Llama-3 template
`<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n...<|eot_id|><|start_header_id|>user...`):
SYSTEM = a system turn from its `<|start_header_id|>` through its `<|eot_id|>`; RESPONSE = assistant bodies (after
`assistant<|end_header_id|>\\n\\n`, through `<|eot_id|>`) or the positions with labels != -100; IMAGE = `<|image|>`
(the placeholder: in self-attention it is the only visual key); TEXT = the rest (BOS included); PAD = padding. The
header ids are `encode("system<|end_header_id|>\\n\\n")` etc., checked against the chat template's own rendering.
With an image, Llama-3.2-Vision's template adds no default system turn (its first release even refused a system
message next to an image): without an explicit system message there are no SYSTEM tokens (beta, VAS, L_sys and r_vis
then have no system term, as with Qwen3-VL).

Labels of the cross-attention keys (vision tokens), per sample: PAD = tiles of padding (aspect_ratio_mask 0: tiles
beyond the image's tile grid; and image slots a sample does not have, aspect_ratio_ids 0); TARGET = patch tokens
whose pixel cell a box selects; IMAGE = every other vision token, the tiles' CLS tokens included (a CLS token covers
no cell).

Which cross keys a text row sees is Mllama's `cross_attention_mask` (B, S, images, tiles): a row sees the valid
tiles of the images whose `<|image|>` precedes it (the processor's rule). A row that sees no tile (text before the
first `<|image|>`, left padding) is "fully masked": Hugging Face's eager then attends uniformly over *all* vision
keys, padded tiles included, and zeroes only the MLP output (`full_text_row_masked_out_mask`). attn-mod reproduces
that output exactly (identity transform, all keys visible), never intervenes on such rows and reports zero masses
for them (the row attends to no image; Meta's reference implementation zeroes its attention output). The operator
takes one key-category row per sample, so rows are grouped by the set of tiles they see: one operator call per
distinct set (one for a single image) plus one for the fully masked rows; each row's result is taken from its group.

How AVAR's quantities map (DESIGN.md formulas unchanged; what differs is which keys a layer has):
- Self-attention layers: the operator as in every other family. beta (w[SYSTEM]) acts there; w[IMAGE] acts on the
  `<|image|>` placeholder key. "image mass" there = attention to the placeholder(s).
- Cross-attention layers: every visible key is visual, so a row's image mass (IMAGE + TARGET) is 1 by construction
  and a uniform visual weight cancels under renorm: `Intervention.avar` (renorm) leaves cross-attention unchanged,
  the raw form (renorm=False) scales its output by (1 + alpha) (the literal element-wise boost, equivalent to a
  larger cross-attention gate), and anything that tells keys apart acts in both forms: a TARGET weight different
  from IMAGE (`w={"image": 1.2, "target": 2.0}`), PAI's absw, mul / add. System tables do nothing there.
- Masses: `rec.mass(l)` / `rec.masses()` / `rec.layers` are the self-attention layers only (categories
  `rec.categories`); `rec.cross_mass(l)` / `rec.cross_masses()` / `rec.cross_layers` the cross-attention layers,
  rows = the same query rows, with the vision-key categories `rec.cross_categories`. Their informative part is the
  TARGET share mass_TARGET (of a total image mass of 1); SAYO's a/v apply as written with the cross key counts
  (`metrics.target_attention_from_masses(rec.cross_masses(), rec.cross_categories, causal=False)`; n_X counts the
  sample's non-PAD vision keys of X: exact for rows that see all its images; rows that see none get a = v = 0).
- VAS = mass_img / (mass_sys + eps) is defined on self-attention layers only (image = the placeholder): a cross row
  has no system keys, its ratio would be 1/eps. `metrics.vas(rec)` uses `rec.layers`, i.e. exactly those.
- AGTO L_img / L_sys use `rec.masses()`: self-attention layers, image = placeholder. On a cross-attention layer
  m_img = mean mass_img / n_img = 1 / n_img is a constant (no gradient): L_img has no meaning there. A grounding
  loss for cross layers would be on mass_TARGET (e.g. -log of the TARGET share from `capture(detach=False)`'s
  `rec.cross_mass`); none is built in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn

from ..categories import IMAGE, PAD, TARGET, RoleMarkers
from ..regions import _is_box, _parse_entry, image_hw, select_cells
from .base import FamilyAdapter, marker_labeler

SENTINEL = "\x00attn-mod\x00"
_HEADER_END = "<|end_header_id|>"


def llama3_markers(tokenizer, image_token_id: int) -> RoleMarkers:
    """Llama-3 role markers as exact ids, checked against the tokenizer's chat template (see module doc)."""

    def tid(tok: str) -> int:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"tokenizer has no token {tok!r}: not a Llama-3 tokenizer; patch with "
                             "categories='explicit' and handle.set_categories(cats)")
        return int(i)

    start, eot = tid("<|start_header_id|>"), tid("<|eot_id|>")
    enc = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    system, assistant = enc(f"system{_HEADER_END}\n\n"), enc(f"assistant{_HEADER_END}\n\n")
    template = getattr(tokenizer, "chat_template", None)
    if template:
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": SENTINEL},
                                                  {"role": "user", "content": "x"}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = enc(rendered)
        has_system = any(ids[i:i + 1 + len(system)] == (start, *system) for i in range(len(ids)))
        if not has_system or ids[-1 - len(assistant):] != (start, *assistant):
            raise ValueError("the chat template's system / assistant headers do not tokenize as "
                             "'<|start_header_id|>{role}<|end_header_id|>\\n\\n': the turns cannot be located from "
                             "token ids; patch with categories='explicit' and handle.set_categories(cats)")
    return RoleMarkers(start, eot, system, assistant, (int(image_token_id),))


@dataclass(frozen=True)
class MllamaTileGeometry:
    """How Mllama's image processor maps an image onto tiles of `tile` px cut into `patch`-px patches.

    An image (H, W) gets the canvas (rows*T, cols*T) of `get_optimal_tiled_canvas` (<= max_tiles tiles), is resized
    keeping its aspect ratio to `get_image_size_fit_to_canvas` (h', w'), padded at the bottom / right to the canvas
    and cut into T-px tiles in raster order; the vision tokens of a tile are its CLS token, then its (T/patch)^2
    patches in raster order. Patch (r, c) of tile (tr, tc) covers canvas pixels x in [tc*T + c*p, +p) (likewise y),
    i.e. original pixels x * W/w', y * H/h' (exact rationals); tiles beyond the grid are padding."""

    tile: int
    patch: int
    max_tiles: int

    @property
    def tokens_per_tile(self) -> int:
        return (self.tile // self.patch) ** 2 + 1

    def grid(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(tile rows, tile cols, resized h', resized w') exactly as the processor computes them."""
        from transformers.models.mllama.image_processing_pil_mllama import (get_image_size_fit_to_canvas,
                                                                            get_optimal_tiled_canvas)

        ch, cw = get_optimal_tiled_canvas(image_height=h, image_width=w, max_image_tiles=self.max_tiles,
                                          tile_size=self.tile)
        nh, nw = get_image_size_fit_to_canvas(image_height=h, image_width=w, canvas_height=ch, canvas_width=cw,
                                              tile_size=self.tile)
        return ch // self.tile, cw // self.tile, int(nh), int(nw)

    def cells(self, image_size) -> list:
        """Per vision token of the image (max_tiles x tokens_per_tile, the model's key order): its (x0, y0, x1, y1)
        in original pixels (Fractions), or None (CLS tokens, padding tiles)."""
        h, w = image_hw(image_size)
        rows, cols, nh, nw = self.grid(h, w)
        n = self.tile // self.patch
        sx, sy = Fraction(w, nw), Fraction(h, nh)
        out: list = []
        for t in range(self.max_tiles):
            if t >= rows * cols:
                out.extend([None] * self.tokens_per_tile)
                continue
            ty, tx = divmod(t, cols)
            out.append(None)  # CLS
            for r in range(n):
                for c in range(n):
                    x0, y0 = tx * self.tile + c * self.patch, ty * self.tile + r * self.patch
                    out.append((x0 * sx, y0 * sy, (x0 + self.patch) * sx, (y0 + self.patch) * sy))
        return out


@dataclass
class CrossInputs:
    """What the cross-attention layers need for one forward: key categories (B, Kv) int8 of the vision tokens (set
    at the prefill, kept for cached decode steps) and the tiles each query row of this forward sees (B, S, N*T)."""

    key_cats: torch.Tensor | None
    row_tiles: torch.Tensor | None
    groups: dict = field(default_factory=dict)

    def row_groups(self, num_keys: int) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        """[(key categories (B, Kv) int8 with unseen keys PAD, rows (B, Q) bool, attends_image)]: every query row in
        exactly one group. The last group (attends_image False) holds the fully masked rows, all keys visible."""
        if num_keys in self.groups:
            return self.groups[num_keys]
        if self.key_cats is None or self.row_tiles is None:
            raise RuntimeError("a cross-attention layer ran without Mllama's cross_attention_mask / image inputs; "
                               "pass the processor's cross_attention_mask (and pixel_values at the prefill)")
        cats, tiles = self.key_cats, self.row_tiles.to(self.key_cats.device)
        B, Kv = cats.shape
        if Kv != num_keys or Kv % tiles.shape[2]:
            raise RuntimeError(f"attn-mod labelled {Kv} vision keys per sample ({tiles.shape[2]} tiles) but the "
                               f"cross-attention layer sees {num_keys}; cross-attention states must come from the "
                               "same prefill as the labels")
        per_tile = Kv // tiles.shape[2]
        seen = tiles.any(-1)  # (B, Q)
        patterns = []
        for b in range(B):
            rows = seen[b].nonzero().flatten()
            if rows.numel():
                pats, inv = torch.unique(tiles[b, rows], dim=0, return_inverse=True)
            else:
                pats, inv = tiles.new_zeros(0, tiles.shape[2]), rows
            patterns.append((rows, pats, inv))
        groups = []
        for g in range(max(p[1].shape[0] for p in patterns)):
            group_cats, group_rows = cats.clone(), torch.zeros_like(seen)
            for b, (rows, pats, inv) in enumerate(patterns):
                if g < pats.shape[0]:
                    visible = pats[g].repeat_interleave(per_tile)
                    group_cats[b] = torch.where(visible, cats[b], torch.zeros_like(cats[b]))
                    group_rows[b, rows[inv == g]] = True
            groups.append((group_cats, group_rows, True))
        if not bool(seen.all()):  # Hugging Face's fully masked rows: every key, padding tiles included
            groups.append((torch.where(cats == PAD, torch.full_like(cats, IMAGE), cats), ~seen, False))
        self.groups[num_keys] = groups
        return groups


class MllamaAdapter(FamilyAdapter):
    name = "mllama"
    model_types = ("mllama",)

    def _layers(self, model: nn.Module):
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find the text decoder layers of {type(model).__name__}")
        return layers

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every decoder layer's attention module in layer order: `self_attn` or `cross_attn`."""
        mods = []
        for i, layer in enumerate(self._layers(model)):
            mod = getattr(layer, "cross_attn", None) or getattr(layer, "self_attn", None)
            if mod is None:
                raise ValueError(f"decoder layer {i} of {type(model).__name__} has neither self_attn nor cross_attn")
            mods.append(mod)
        return mods

    def cross_attention_layers(self, model: nn.Module) -> frozenset[int]:
        layers = frozenset(int(i) for i in self.text_config(model).cross_attention_layers)
        if 0 in layers:  # the KV-cache length (labels of decode steps) is read from layer 0
            raise NotImplementedError("attn-mod reads the text cache length from decoder layer 0, which is a "
                                      "cross-attention layer in this config")
        return layers

    def labeler(self, model: nn.Module, processor):
        if processor is None:
            raise ValueError("mllama needs its processor or tokenizer to find the Llama-3 role headers: "
                             "attn_mod.patch(model, processor, ...), or pass categories='explicit' and "
                             "handle.set_categories(cats)")
        tokenizer = getattr(processor, "tokenizer", processor)
        markers = llama3_markers(tokenizer, int(model.config.image_token_id))
        return marker_labeler(markers, mm_token_types=False)

    def box_geometry(self, processor, config=None) -> MllamaTileGeometry:
        ip = getattr(processor, "image_processor", None)
        size = getattr(ip, "size", None)
        if ip is None or size is None or not hasattr(ip, "max_image_tiles"):
            raise ValueError("pixel boxes on mllama need its MllamaProcessor (the Mllama image processor)")
        get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k))
        if get("height") != get("width"):
            raise NotImplementedError("Mllama tiles are square; this image processor has non-square tiles")
        vision = getattr(config, "vision_config", None)
        patch = int(getattr(vision, "patch_size", 14))
        tile = int(get("height"))
        if vision is not None and int(vision.image_size) != tile:
            raise ValueError(f"the image processor's tile ({tile} px) differs from the vision config's "
                             f"image_size ({vision.image_size}); use the model's own processor")
        return MllamaTileGeometry(tile, patch, int(ip.max_image_tiles))

    def box_mask(self, target, input_ids, inputs, config, processor) -> torch.Tensor:
        """Boxes select vision keys of the cross-attention layers (`cross_inputs`), never text tokens: no text
        token (the `<|image|>` placeholder included) is TARGET."""
        return torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)

    def cross_target(self, target, input_ids, num_images: int, config, processor) -> torch.Tensor:
        """(B, num_images * max_tiles * tokens_per_tile) bool: the vision keys inside the boxes of `target`."""
        if target.video_sizes:
            raise ValueError("mllama takes no videos; pass images= only")
        geo = self.box_geometry(processor, config)
        per_image = geo.max_tiles * geo.tokens_per_tile
        counts = (input_ids == int(config.image_token_id)).sum(1).tolist()
        sizes = list(target.image_sizes or [])
        if len(sizes) != sum(counts):
            raise ValueError(f"images= gives {len(sizes)} image sizes but the batch has {sum(counts)} <|image|> "
                             "tokens; pass every image of the batch, sample by sample")
        if len(target.boxes) != len(counts):
            raise ValueError(f"boxes must have one entry per batch sample ({len(counts)}), got {len(target.boxes)}")
        mask = torch.zeros(len(counts), num_images * per_image, dtype=torch.bool)
        first = 0
        for b, sample_boxes in enumerate(target.boxes):
            have = counts[b]
            for entry in ([] if sample_boxes is None else [sample_boxes] if _is_box(sample_boxes) else sample_boxes):
                kind, j, box, _ = _parse_entry(entry, b)
                if kind != "image":
                    raise ValueError("mllama takes no videos; boxes refer to images only")
                if j == -1:
                    if have != 1:
                        raise ValueError(f"boxes[{b}] has a bare box but sample {b} has {have} images; use "
                                         "(image_index, box) entries")
                    j = 0
                if not 0 <= j < have:
                    raise ValueError(f"boxes[{b}] refers to image {j} but sample {b} has {have} images")
                idx = select_cells(geo.cells(sizes[first + j]), box, sizes[first + j], convention=target.convention,
                                   by=target.by)
                mask[b, j * per_image + idx] = True
            first += have
        return mask

    def cross_inputs(self, previous: CrossInputs | None, inputs: dict, past: int, *, target, config,
                     processor) -> CrossInputs | None:
        """The `CrossInputs` of a forward with model inputs `inputs` (`past` = cached text slots)."""
        cam = inputs.get("cross_attention_mask")
        has_vision = inputs.get("pixel_values") is not None or inputs.get("cross_attention_states") is not None
        if has_vision and cam is None:
            raise ValueError("mllama with images needs the processor's cross_attention_mask (it says which text "
                             "rows see which image tiles); pass processor(...) outputs unchanged")
        key_cats = previous.key_cats if previous is not None and past > 0 else None
        if has_vision:
            if past > 0:
                raise NotImplementedError("new images in a cached continuation are not supported by attn-mod "
                                          "(the vision-key labels are set at the prefill)")
            B, _, N, T = cam.shape
            vision = config.vision_config
            per_tile = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
            arm, ids = inputs.get("aspect_ratio_mask"), inputs.get("aspect_ratio_ids")
            if arm is not None and ids is not None:  # the processor marks tile 0 of absent image slots valid too:
                valid = arm.detach().cpu().bool() & (ids.detach().cpu() > 0)[..., None]  # id 0 = no image
            else:  # precomputed cross_attention_states: the tiles some row sees
                valid = cam.detach().cpu().bool().any(1)  # (B, N, T)
            key_cats = torch.where(valid, IMAGE, PAD).to(torch.int8).repeat_interleave(per_tile, dim=2).reshape(B, -1)
            from ..patch import BoxTarget

            if isinstance(target, BoxTarget):
                tmask = self.cross_target(target, inputs["input_ids"].cpu(), N, config, processor)
                if tmask.shape[1] != key_cats.shape[1]:
                    raise ValueError(f"the processor's geometry gives {tmask.shape[1]} vision tokens per sample, the "
                                     f"model {key_cats.shape[1]}: use the model's own processor")
                if bool((tmask & (key_cats == PAD)).any()):
                    raise RuntimeError("a box selected vision tokens of padding tiles: image sizes do not match")
                key_cats[tmask] = TARGET
        if cam is None:
            return CrossInputs(key_cats, None)
        S = (inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
        if cam.shape[1] != S:  # a plain forward with a cache may pass the whole mask (as MllamaModel slices it)
            cam = cam[:, past:past + S]
        return CrossInputs(key_cats, cam.detach().bool().flatten(2))

"""Gemma3 (`Gemma3ForConditionalGeneration`): `<start_of_turn>user|model\\n ... <end_of_turn>` turns, no system
role, 256 `<image_soft_token>` per image (pan & scan off) attending to each other both ways, sliding-window layers.

Roles. Gemma3's chat template has no system turn: a system message is rendered as the prefix "{system}\\n\\n" of
the first user turn ("<bos><start_of_turn>user\\n{system}\\n\\n{user content}<end_of_turn>\\n"). Nothing in the ids
marks where that prefix ends, so SYSTEM needs the system text itself: `attn_mod.patch(model, processor,
system_text="...")` (`LabelOptions.system_text`). SYSTEM = exactly the tokens of `encode(system + "\\n\\n")` (or of
`encode(system)` when the separator merged with the following token) found by token ids right after the first
`<start_of_turn>user\\n` header; `<bos>` and that header stay TEXT (they belong to the user turn). Without a
system text, or in a row whose first user turn does not start with those ids, there is no SYSTEM token (beta, VAS,
L_sys and r_vis then have no system mass, as for Qwen3-VL without a system prompt). RESPONSE = model-turn bodies
(after `<start_of_turn>model\\n`, through `<end_of_turn>`) or the positions with labels != -100; IMAGE =
`<image_soft_token>`; `<start_of_image>` / `<end_of_image>` and the "\\n\\n" around them are TEXT.

Masks (the model's own, `modeling_gemma3.create_masks_for_vision_model`). With `token_type_ids` (the processor's,
renamed from mm_token_type_ids) each contiguous run of image tokens is one block: its tokens see each other both
ways (OR(causal, same block)); sliding layers also AND a window: key j visible from position p iff p - j < W
(`sliding_window`, keys ahead unaffected). Without `token_type_ids` the model is causal everywhere, and so is
the operator. The operator gets them as per-key block ids (`block_ids`, 1.. per run, 0 elsewhere) and the window
size (kernels/spec.py): no N x N mask.

Geometry. The image processor resizes the whole image to S x S (no crop, no padding; pan & scan off); SigLIP cuts it
into (S/patch)^2 patches in raster order and the projector average-pools them to t x t = mm_tokens_per_image tokens
(16 x 16 = 256 for Gemma3), still raster: image token n covers cell (r, c) = divmod(n, t), i.e. original pixels
[c W/t, (c+1) W/t) x [r H/t, (r+1) H/t). Boxes select cells by `attn_mod.regions.select_cells`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache

import torch
from torch import nn

from ..categories import RESPONSE, SYSTEM, TEXT, LabelOptions, label_tokens
from ..regions import cells_target_mask, image_hw
from .base import FamilyAdapter

_SENTINEL = "\x00attn-mod\x00"


@dataclass(frozen=True)
class Gemma3Markers:
    """Exact ids of Gemma3's template: turn start / end, the ids after `<start_of_turn>` for each role, the image
    token, and (per system text) the candidate id sequences of the system prefix, longest first."""

    turn_start: int
    turn_end: int
    user_header: tuple[int, ...]
    model_header: tuple[int, ...]
    visual_token_ids: tuple[int, ...]
    system_ids: tuple[tuple[int, ...], ...] = field(default=())

    def label_row(self, ids: list[int], mark_response: bool) -> list[int]:
        """One unpadded row: SYSTEM = the system prefix of the first user turn, RESPONSE = model-turn bodies."""
        n = len(ids)
        out = [TEXT] * n
        first_user = True
        pos = 0
        while pos < n:
            if ids[pos] != self.turn_start:
                pos += 1
                continue
            end = pos + 1
            while end < n and ids[end] != self.turn_end:
                end += 1
            last = min(end, n - 1)
            head = tuple(ids[pos + 1:pos + 1 + len(self.user_header)])
            if head == self.user_header and first_user:
                first_user = False
                body = pos + 1 + len(self.user_header)
                for cand in self.system_ids:
                    if cand and tuple(ids[body:body + len(cand)]) == cand:
                        out[body:body + len(cand)] = [SYSTEM] * len(cand)
                        break
            elif mark_response and tuple(ids[pos + 1:pos + 1 + len(self.model_header)]) == self.model_header:
                body = pos + 1 + len(self.model_header)
                out[body:last + 1] = [RESPONSE] * max(0, last + 1 - body)
            pos = last + 1
        return out


def gemma3_markers(tokenizer, image_token_id: int) -> Gemma3Markers:
    """Markers read from the tokenizer, checked against the chat template's own rendering."""
    def tid(tok: str) -> int:
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"the tokenizer has no {tok!r} token; this is not a Gemma3 tokenizer (patch with "
                             "categories='explicit' and handle.set_categories(cats))")
        return int(i)

    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; Gemma3 labels need its '<start_of_turn>user' turns "
                         "(or patch with categories='explicit' and handle.set_categories(cats))")
    enc = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    markers = Gemma3Markers(tid("<start_of_turn>"), tid("<end_of_turn>"), enc("user\n"), enc("model\n"),
                            (int(image_token_id),))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": _SENTINEL}]},
         {"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], tokenize=False)
    if "<start_of_turn>user\n" not in rendered or "<start_of_turn>model\n" not in rendered:
        raise ValueError("the chat template does not render '<start_of_turn>user' / '<start_of_turn>model' turns; "
                         "not a Gemma3 template: patch with categories='explicit' and handle.set_categories(cats)")
    return markers


def system_candidates(tokenizer, system_text: str | tuple[str, ...] | None) -> tuple[tuple[int, ...], ...]:
    """Id sequences the template's system prefix "{system}\\n\\n" can start the first user turn with, longest first:
    for each system text the prefix with its separator, then the text alone (when the separator merged with the
    next token). Several texts (a tuple): the candidates of all of them, longest first, so that a prompt that
    extends another one is matched whole."""
    texts = (system_text,) if isinstance(system_text, str) else tuple(system_text or ())
    enc = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    cands = dict.fromkeys(c for t in texts if t for c in (enc(t + "\n\n"), enc(t)) if c)
    return tuple(sorted(cands, key=len, reverse=True))


def block_ids(token_type_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) int32 block ids from Gemma3's token_type_ids (1 = image token): each contiguous run of image tokens
    gets its own id 1, 2, ... per row, everything else 0 (`modeling_gemma3.get_block_sequence_ids_for_mask` + 1).
    None without token_type_ids (the model is then causal everywhere)."""
    if token_type_ids is None:
        return None
    is_image = token_type_ids == 1
    prev = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    run = torch.cumsum((is_image & ~prev).to(torch.int32), dim=1)
    return torch.where(is_image, run, torch.zeros_like(run)).to(torch.int32)


@dataclass(frozen=True)
class Gemma3Geometry:
    """The resized square of side `size` px and its t x t image-token grid (raster order)."""

    size: tuple[int, int]
    tokens_per_side: int

    def cells(self, image_size) -> list:
        h, w = image_hw(image_size)
        t = self.tokens_per_side
        return [(Fraction(c * w, t), Fraction(r * h, t), Fraction((c + 1) * w, t), Fraction((r + 1) * h, t))
                for r in range(t) for c in range(t)]

    def views(self, image_size) -> list[tuple[str, int, int]]:
        """[(label, start, stop)]: token ranges of `cells` whose cells tile the image once (one view here)."""
        t = self.tokens_per_side
        return [(f"image, {t}x{t} tokens", 0, t * t)]


class Gemma3Adapter(FamilyAdapter):
    name = "gemma3"
    model_types = ("gemma3",)

    def labeler(self, model: nn.Module, processor):
        if processor is None:
            raise ValueError("gemma3 needs its processor or tokenizer to find the '<start_of_turn>' turns: "
                             "attn_mod.patch(model, processor, ...), or pass categories='explicit' and "
                             "handle.set_categories(cats)")
        tokenizer = getattr(processor, "tokenizer", processor)
        base = gemma3_markers(tokenizer, int(model.config.image_token_id))

        @lru_cache(maxsize=8)
        def with_system(text):
            return Gemma3Markers(base.turn_start, base.turn_end, base.user_header, base.model_header,
                                 base.visual_token_ids, system_candidates(tokenizer, text))

        def label(input_ids, *, attention_mask=None, mm_token_type_ids=None, labels=None, target_mask=None,
                  options: LabelOptions = LabelOptions()):
            markers = with_system(getattr(options, "system_text", None))
            return label_tokens(input_ids, markers, attention_mask=attention_mask, mm_token_type_ids=mm_token_type_ids,
                                labels=labels, target_mask=target_mask, options=options)

        label.markers = base
        label.markers_for = with_system
        return label

    def block_ids(self, inputs: dict) -> torch.Tensor | None:
        return block_ids(inputs.get("token_type_ids"))

    def box_geometry(self, processor, config=None) -> Gemma3Geometry:
        ip = getattr(processor, "image_processor", None)
        if ip is None:
            raise ValueError("pixel boxes on gemma3 need its Gemma3Processor (with the image processor)")
        if getattr(ip, "do_pan_and_scan", False):
            raise NotImplementedError("box geometry with pan & scan (extra crops) is not implemented; use "
                                      "do_pan_and_scan=False")
        size = ip.size if isinstance(ip.size, dict) else {"height": ip.size.height, "width": ip.size.width}
        hw = (int(size["height"]), int(size["width"]))
        n = int(getattr(config, "mm_tokens_per_image", None) or getattr(processor, "image_seq_length", 256))
        t = round(n ** 0.5)
        if t * t != n or hw[0] != hw[1]:
            raise NotImplementedError(f"gemma3 geometry assumes a square resize and a square token grid; got size "
                                      f"{hw} and {n} tokens per image")
        vis = getattr(config, "vision_config", None)
        if vis is not None:
            side = int(vis.image_size) // int(vis.patch_size)
            if int(vis.image_size) != hw[0] or side % t:
                raise ValueError(f"image processor size {hw} / {n} tokens do not match the vision tower "
                                 f"(image_size {vis.image_size}, patch {vis.patch_size})")
        return Gemma3Geometry(hw, t)

    def box_mask(self, target, input_ids, inputs, config, processor) -> torch.Tensor:
        if target.video_sizes:
            raise ValueError("gemma3 takes no videos; pass images= only")
        geo = self.box_geometry(processor, config)
        cells = [geo.cells(size) for size in (target.image_sizes or [])]
        return cells_target_mask(input_ids, config.image_token_id, cells, target.boxes, target.image_sizes,
                                 convention=target.convention, by=target.by)

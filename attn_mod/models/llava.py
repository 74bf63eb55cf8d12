"""LLaVA-1.5 (`LlavaForConditionalGeneration`): plain-text "USER: / ASSISTANT:" turns, `<image>` placeholders,
a fixed grid of CLIP patches per image.

Roles. LLaVA-1.5's conversation format is "<s>{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>",
the system prompt being plain text ("A chat between a curious human ..."). SYSTEM = every token from the
first non-pad token (BOS included) up to the first " USER:" header, when that prefix holds any text (the
llava-hf template has no system text: then BOS is TEXT); RESPONSE = assistant bodies (after
" ASSISTANT:", through `</s>`), or the positions with labels != -100; IMAGE = `<image>` tokens; TEXT = the
rest. The header ids are found by tokenizing the chat template's own rendering: the template prefix
(system prompt) followed by the header must tokenize to the same ids as the rendered conversation starts
with, else the labeller refuses the tokenizer (token boundaries would shift and labels be wrong).

Geometry. The image processor (llava-1.5: CLIPImageProcessor, shortest edge 336 + centre crop 336; or
LlavaImageProcessor with `do_pad` = pad-to-square first) yields a crop of CH x CW px; CLIP cuts it into
`patch`-px patches in raster order, so visual token n (after the CLS token that
`vision_feature_select_strategy="default"` drops) covers crop cell (r, c) = divmod(n, CW/patch): 24 x 24
tokens for llava-1.5 (336/14). Cells are mapped back through the crop, the resize and the padding to
original-image pixels (exact rationals) and boxes select them by `attn_mod.regions.select_cells`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from ..categories import RESPONSE, SYSTEM, TEXT
from ..regions import cells_target_mask, image_hw
from .base import FamilyAdapter, marker_labeler

SENTINEL = "\x00attn-mod\x00"


def _find(ids: list[int], pattern: tuple[int, ...], start: int) -> int:
    n = len(pattern)
    for i in range(start, len(ids) - n + 1):
        if tuple(ids[i:i + n]) == pattern:
            return i
    return -1


@dataclass(frozen=True)
class PlainTurnMarkers:
    """Ids of a plain-text two-role template: `user_headers` / `assistant_headers` (alternative tokenisations
    of e.g. " USER:" / "USER:"), `turn_end` (`</s>`), `visual_token_ids` (`<image>`)."""

    user_headers: tuple[tuple[int, ...], ...]
    assistant_headers: tuple[tuple[int, ...], ...]
    turn_end: int
    visual_token_ids: tuple[int, ...]
    special_ids: frozenset[int] = frozenset()

    def _next(self, ids, headers, start):
        hits = [(i, len(h)) for h in headers if (i := _find(ids, h, start)) >= 0]
        return min(hits) if hits else (-1, 0)

    def label_row(self, ids: list[int], mark_response: bool) -> list[int]:
        """One unpadded row: SYSTEM before the first user header, RESPONSE assistant bodies, TEXT elsewhere.
        A prefix that is only special tokens (BOS, no system text) stays TEXT."""
        n = len(ids)
        first_user, _ = self._next(ids, self.user_headers, 0)
        out = [TEXT] * n
        if first_user > 0 and any(i not in self.special_ids for i in ids[:first_user]):
            out[:first_user] = [SYSTEM] * first_user
        if not mark_response:
            return out
        pos = max(first_user, 0)
        while True:
            a, alen = self._next(ids, self.assistant_headers, pos)
            if a < 0:
                return out
            body = a + alen
            u, _ = self._next(ids, self.user_headers, body)
            stop = u if u >= 0 else n
            end = ids.index(self.turn_end, body, stop) + 1 if self.turn_end in ids[body:stop] else stop
            out[body:end] = [RESPONSE] * (end - body)
            pos = max(end, body)


def plain_turn_markers(tokenizer, *, user: str = "USER:", assistant: str = "ASSISTANT:",
                       image_token_id: int) -> PlainTurnMarkers:
    """Markers of a LLaVA-style template, checked by tokenizing the template's own prefix (see module doc)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; LLaVA labels need the template's 'USER:' turns "
                         "(or patch with categories='explicit' and handle.set_categories(cats))")
    rendered = ""
    for content in ([{"type": "text", "text": SENTINEL}], SENTINEL):  # list content (llava-hf) or a string
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template may accept only one of the two content forms
            continue
        if SENTINEL in rendered:
            break
    if SENTINEL not in rendered or user not in rendered.split(SENTINEL)[0]:
        raise ValueError(f"the chat template does not render a {user!r} turn; this is not a LLaVA-1.5-style "
                         "template: patch with categories='explicit' and handle.set_categories(cats)")
    before = rendered.split(SENTINEL)[0]
    system_text = before[:before.rindex(user)].rstrip(" ")
    sep = before[len(system_text):before.rindex(user)]
    enc = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    headers = lambda word: tuple(dict.fromkeys(h for h in (enc(" " + word), enc(word)) if h))  # noqa: E731
    prefix, full = enc(system_text), enc(before)
    after = full[len(prefix):]
    if full[:len(prefix)] != prefix or not any(after[:len(h)] == h for h in headers(user)):
        raise ValueError(f"the template prefix {system_text[-40:]!r} and the header {sep + user!r} do not tokenize "
                         "separately; the system span cannot be located from token ids: patch with "
                         "categories='explicit' and handle.set_categories(cats)")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token (the end of an assistant turn)")
    special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", []))
    return PlainTurnMarkers(headers(user), headers(assistant), int(eos), (int(image_token_id),), special)


@dataclass(frozen=True)
class CropGeometry:
    """How a LLaVA image processor maps an original image onto the `patch`-px grid of its crop."""

    patch: int
    crop_hw: tuple[int, int]
    size: dict
    pad_to_square: bool
    cls_token: bool  # vision_feature_select_strategy == "full": the CLS token comes first and is no cell

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if "shortest_edge" in self.size and self.size["shortest_edge"]:
            s = int(self.size["shortest_edge"])  # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            return (new_long, s) if w <= h else (s, new_long)
        return int(self.size["height"]), int(self.size["width"])

    def cells(self, image_size) -> list:
        """Per visual token: (x0, y0, x1, y1) in original pixels (Fractions; beyond the image where the token
        covers pad-to-square padding), or None (CLS)."""
        h, w = image_hw(image_size)
        pad_top = pad_left = 0
        ph, pw = h, w
        if self.pad_to_square and h != w:
            side = max(h, w)
            pad_top, pad_left = ((side - h) // 2, 0) if w > h else (0, (side - w) // 2)
            ph = pw = side
        rh, rw = self.resized_hw(ph, pw)
        ch, cw = self.crop_hw
        top, left = (rh - ch) // 2, (rw - cw) // 2
        if top < 0 or left < 0:
            raise NotImplementedError(f"the processor crops {ch}x{cw} from a {rh}x{rw} resized image (it pads "
                                      "instead of cropping): box geometry for that case is not implemented")
        sy, sx = Fraction(ph, rh), Fraction(pw, rw)
        cells: list = [None] if self.cls_token else []
        for r in range(ch // self.patch):
            for c in range(cw // self.patch):
                y0, y1 = (top + r * self.patch) * sy - pad_top, (top + (r + 1) * self.patch) * sy - pad_top
                x0, x1 = (left + c * self.patch) * sx - pad_left, (left + (c + 1) * self.patch) * sx - pad_left
                cells.append((x0, y0, x1, y1))  # may reach into the padding (select_cells handles it)
        return cells

    def views(self, image_size) -> list[tuple[str, int, int]]:
        """[(label, start, stop)]: token ranges of `cells` whose cells tile the image once (one view: the crop)."""
        ch, cw = self.crop_hw
        n = (ch // self.patch) * (cw // self.patch) + int(self.cls_token)
        return [(f"centre crop, {ch // self.patch}x{cw // self.patch} tokens", 0, n)]


class LlavaAdapter(FamilyAdapter):
    name = "llava"
    model_types = ("llava",)

    def labeler(self, model: nn.Module, processor):
        if processor is None:
            raise ValueError("llava needs its processor or tokenizer to find the 'USER:' / 'ASSISTANT:' turns: "
                             "attn_mod.patch(model, processor, ...), or pass categories='explicit' and "
                             "handle.set_categories(cats)")
        tokenizer = getattr(processor, "tokenizer", processor)
        markers = plain_turn_markers(tokenizer, image_token_id=int(model.config.image_token_id))
        return marker_labeler(markers, mm_token_types=False)

    def box_geometry(self, processor, config=None) -> CropGeometry:
        ip = getattr(processor, "image_processor", None)
        patch = getattr(processor, "patch_size", None)
        if ip is None or patch is None:
            raise ValueError("pixel boxes on llava need its LlavaProcessor (image processor and patch_size)")
        if getattr(ip, "do_center_crop", False) is not True or getattr(ip, "crop_size", None) is None:
            raise NotImplementedError("box geometry assumes llava-1.5's resize + centre crop; this image "
                                      "processor does not centre-crop")
        pad = bool(getattr(ip, "do_pad", False))
        if pad and not hasattr(ip, "pad_to_square"):
            raise NotImplementedError("do_pad on a non-LLaVA image processor (batch padding): box geometry "
                                      "is not implemented; use LlavaImageProcessor(do_pad=True) or do_pad=False")
        crop = ip.crop_size
        get = crop.get if isinstance(crop, dict) else (lambda k: getattr(crop, k))
        size = ip.size if isinstance(ip.size, dict) else {k: getattr(ip.size, k, None)
                                                           for k in ("shortest_edge", "height", "width")}
        strategy = getattr(processor, "vision_feature_select_strategy", None) or getattr(
            config, "vision_feature_select_strategy", "default")
        return CropGeometry(int(patch), (int(get("height")), int(get("width"))), dict(size), pad,
                            cls_token=strategy == "full")

    def box_mask(self, target, input_ids, inputs, config, processor) -> torch.Tensor:
        if target.video_sizes:
            raise ValueError("llava-1.5 takes no videos; pass images= only")
        geo = self.box_geometry(processor, config)
        cells = [geo.cells(size) for size in (target.image_sizes or [])]
        return cells_target_mask(input_ids, config.image_token_id, cells, target.boxes, target.image_sizes,
                                 convention=target.convention, by=target.by)

"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): ChatML turns, `<image>` placeholders, anyres
grids (base image + high-res crops) with unpadding and image-newline tokens.

Roles. ChatML as rendered by llava-hf's template, "<|im_start|>{role} " + images + "\\n" + text + "<|im_end|>"
(note the space after the role): the role headers are read from the template's own rendering of a system /
user / assistant conversation and checked to tokenize separately (`chatml_markers_from_template`). SYSTEM =
a system turn, `<|im_start|>` through `<|im_end|>` (the template adds no default system turn); RESPONSE =
assistant bodies or labels != -100; IMAGE = every `<image>` placeholder (config.image_token_id).

Newline tokens. The processor expands `<image>` to one placeholder per vision feature the model writes there,
including the learned `image_newline` vector the model appends after every row of the high-res grid (and
once after a multi-image / video base grid). Those positions carry the image token id and a vision-side
embedding (not a text embedding), so they are IMAGE like every other visual slot and count in image mass and
the AVAR image terms; they cover no pixels, so their cell is None and a box never makes them TARGET.

Geometry (transformers' LlavaOnevision PIL image processor and `pack_image_features`), crop size S =
size["height"] = vision image_size, P = S / patch features per crop side, strategy "full" (SigLIP, no CLS):
* A sample with one image: the base image (the whole image resized to S x S) gives P*P tokens in raster
  order. Then the anyres grid: (BH, BW) = `select_best_resolution((H, W), image_grid_pinpoints)`; the image
  is resized to fit (`get_patch_output_size`: (NH, NW)), pasted centred on a BH x BW canvas (offsets
  ((BH-NH)//2, (BW-NW)//2)) and cut into S-px crops in raster order; the model lays the crops' features out
  as one (BH/patch) x (BW/patch) feature grid, drops the rows (or columns) of padding exactly as
  `unpad_image` does, and, when ratio = sqrt(h*w / (max_num * P^2)) > 1.1 (`vision_aspect_ratio =
  "anyres_max_<max_num>"`), bilinearly resizes the h x w grid to (h//ratio, w//ratio): output token (i, j)
  then stands for the input region [i*h/h', (i+1)*h/h') x [j*w/w', (j+1)*w/w'). Each grid row of tokens is
  followed by one newline token. Feature (i, j) covers canvas pixels [j*patch, (j+1)*patch) x
  [i*patch, (i+1)*patch), mapped back to the original through the paste offset and the NH/H, NW/W scale.
* A sample with several images (each image: pad to square, resize to S x S): P*P tokens + one newline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from ..categories import RESPONSE, SYSTEM, TEXT
from ..regions import cells_target_mask, image_hw
from .base import FamilyAdapter, marker_labeler

SENTINELS = ("\x00sys\x00", "\x00user\x00", "\x00answer\x00")


@dataclass(frozen=True)
class TemplateChatMLMarkers:
    """ChatML markers whose role headers come from the template's rendering: `system_role` / `assistant_role`
    (ids of the role word after `<|im_start|>`), `header_tail` (ids between the role word and the turn text
    there, e.g. " " and "\n"; skipped before an assistant body), `visual_token_ids`."""

    turn_start: int
    turn_end: int
    system_role: tuple[int, ...]
    assistant_role: tuple[int, ...]
    header_tail: frozenset[int]
    visual_token_ids: tuple[int, ...]

    def label_row(self, ids: list[int], mark_response: bool) -> list[int]:
        """SYSTEM: a system turn, `<|im_start|>` through `<|im_end|>`; RESPONSE: an assistant body (after the
        role word and the header tail, through `<|im_end|>`); TEXT elsewhere."""
        n, out, pos = len(ids), [TEXT] * len(ids), 0
        while pos < n:
            if ids[pos] != self.turn_start:
                pos += 1
                continue
            end = ids.index(self.turn_end, pos) if self.turn_end in ids[pos:] else n - 1
            role = tuple(ids[pos + 1:pos + 1 + len(self.system_role)])
            if role == self.system_role:
                out[pos:end + 1] = [SYSTEM] * (end + 1 - pos)
            elif mark_response and tuple(ids[pos + 1:pos + 1 + len(self.assistant_role)]) == self.assistant_role:
                body = pos + 1 + len(self.assistant_role)
                while body <= end and ids[body] in self.header_tail:
                    body += 1
                out[body:end + 1] = [RESPONSE] * max(0, end + 1 - body)
            pos = end + 1
        return out


def chatml_markers_from_template(tokenizer, visual_token_ids: tuple[int, ...]) -> TemplateChatMLMarkers:
    """Role markers read off the chat template's own rendering of a system / user / assistant conversation
    (llava-hf's OneVision template writes "<|im_start|>system \n..."); refuses a template without such turns."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; LLaVA-OneVision labels need its ChatML turns "
                         "(or patch with categories='explicit' and handle.set_categories(cats))")
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>"))
    if any(i is None or i == tokenizer.unk_token_id for i in (start, end)):
        raise ValueError("the tokenizer has no <|im_start|> / <|im_end|> tokens; this is not a ChatML template: "
                         "patch with categories='explicit' and handle.set_categories(cats)")
    messages = [{"role": r, "content": [{"type": "text", "text": s}]}
                for r, s in zip(("system", "user", "assistant"), SENTINELS)]
    refuse = ("the chat template does not render ChatML system / user / assistant turns ({}); patch with "
              "categories='explicit' and handle.set_categories(cats)")
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - any template failure means the roles cannot be located
        raise ValueError(refuse.format(e)) from None
    enc = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    ids = list(enc(rendered))
    opens = [i for i, t in enumerate(ids) if t == start]
    if len(opens) != 3 or any(s not in rendered for s in SENTINELS):
        raise ValueError(refuse.format(f"{len(opens)} turns rendered"))
    roles, tail = [], set()
    for k, (role, pos) in enumerate(zip(("system", "user", "assistant"), opens)):
        word = enc(role)
        if tuple(ids[pos + 1:pos + 1 + len(word)]) != word:
            raise ValueError(refuse.format(f"the {role} turn does not open with the ids of {role!r}"))
        j = pos + 1 + len(word)  # header tail: the ids up to the one where the turn text (sentinel) starts
        while j < len(ids) and "\x00" not in tokenizer.decode(ids[j:j + 1]):
            if tokenizer.decode(ids[j:j + 1]).strip():
                raise ValueError(refuse.format(f"the {role} header has text {tokenizer.decode(ids[j:j + 1])!r}"))
            tail.add(ids[j])
            j += 1
        roles.append(word)
    return TemplateChatMLMarkers(int(start), int(end), roles[0], roles[2], frozenset(tail), tuple(visual_token_ids))


@dataclass(frozen=True)
class AnyresGeometry:
    """How LLaVA-OneVision's processor and `pack_image_features` map an image onto its visual tokens."""

    crop: int  # S, px per crop side (= vision image_size)
    patch: int  # px per feature side
    pinpoints: tuple  # ((height, width), ...) candidate canvases
    max_num: int | None  # of "anyres_max_<n>" (None: plain "anyres", never resized)

    @property
    def side(self) -> int:
        return self.crop // self.patch

    def _base(self, sx, sy, ox=0, oy=0) -> list:
        p = self.patch
        return [((c * p) * sx - ox, (r * p) * sy - oy, ((c + 1) * p) * sx - ox, ((r + 1) * p) * sy - oy)
                for r in range(self.side) for c in range(self.side)]

    def grid_shape(self, h: int, w: int) -> tuple[int, int, int, int, int, int]:
        """(BH, BW, NH, NW, top, left): canvas, resized image and paste offset, as the processor computes them."""
        from transformers.image_processing_utils import select_best_resolution

        bh, bw = select_best_resolution((h, w), [list(p) for p in self.pinpoints])
        scale_w, scale_h = bw / w, bh / h  # get_patch_output_size
        if scale_w < scale_h:
            nw, nh = bw, min(math.ceil(h * scale_w), bh)
        else:
            nh, nw = bh, min(math.ceil(w * scale_h), bw)
        return bh, bw, nh, nw, (bh - nh) // 2, (bw - nw) // 2

    def feature_rows_cols(self, h: int, w: int):
        """Rows / columns of the canvas feature grid the model keeps (`unpad_image`) and the output grid size
        after the anyres_max resize: (r0, r1, c0, c1, out_h, out_w)."""
        bh, bw = self.grid_shape(h, w)[:2]
        fh, fw = bh // self.patch, bw // self.patch
        r0, r1, c0, c1 = 0, fh, 0, fw
        if w / h > fw / fh:  # unpad_image, in its own float arithmetic
            new_h = int(round(h * (fw / w), 7))
            pad = (fh - new_h) // 2
            r0, r1 = pad, fh - pad
        else:
            new_w = int(round(w * (fh / h), 7))
            pad = (fw - new_w) // 2
            c0, c1 = pad, fw - pad
        ch, cw = r1 - r0, c1 - c0
        oh, ow = ch, cw
        if self.max_num is not None:
            ratio = math.sqrt(ch * cw / (self.max_num * self.side**2))
            if ratio > 1.1:
                oh, ow = int(ch // ratio), int(cw // ratio)
        return r0, r1, c0, c1, oh, ow

    def cells(self, image_size, *, multi_image: bool = False) -> list:
        """Per `<image>` placeholder of the image, in order: (x0, y0, x1, y1) original pixels (Fractions; may
        reach into padding) or None for a newline token."""
        h, w = image_hw(image_size)
        if multi_image:  # pad to square (centred), resize to S x S, then one newline
            side = max(h, w)
            top, left = ((side - h) // 2, 0) if w > h else (0, (side - w) // 2)
            s = Fraction(side, self.crop)
            return self._base(s, s, left, top) + [None]
        out = self._base(Fraction(w, self.crop), Fraction(h, self.crop))
        _, _, nh, nw, top, left = self.grid_shape(h, w)
        r0, r1, c0, c1, oh, ow = self.feature_rows_cols(h, w)
        fy, fx = Fraction(r1 - r0, oh), Fraction(c1 - c0, ow)  # input features per output token
        sy, sx = Fraction(h, nh), Fraction(w, nw)
        p = self.patch
        for i in range(oh):
            for j in range(ow):
                y0, y1 = (r0 + i * fy) * p, (r0 + (i + 1) * fy) * p
                x0, x1 = (c0 + j * fx) * p, (c0 + (j + 1) * fx) * p
                out.append(((x0 - left) * sx, (y0 - top) * sy, (x1 - left) * sx, (y1 - top) * sy))
            out.append(None)  # image_newline after every row
        return out

    def views(self, image_size, *, multi_image: bool = False) -> list[tuple[str, int, int]]:
        """[(label, start, stop)]: token ranges of `cells` whose cells tile the image once: the base image, then
        the anyres grid with its newline tokens (single-image layout); one view in the multi-image layout."""
        base = self.side ** 2
        if multi_image:
            return [(f"image (padded square), {base} tokens + newline", 0, base + 1)]
        h, w = image_hw(image_size)
        oh, ow = self.feature_rows_cols(h, w)[4:]
        return [(f"base image, {base} tokens", 0, base),
                (f"anyres grid, {oh}x{ow} tokens + {oh} newlines", base, base + oh * (ow + 1))]


class LlavaOnevisionAdapter(FamilyAdapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)

    def labeler(self, model: nn.Module, processor):
        if processor is None:
            raise ValueError("llava_onevision needs its processor or tokenizer to find the chat-template role "
                             "markers: attn_mod.patch(model, processor, ...), or pass categories='explicit' and "
                             "handle.set_categories(cats)")
        tokenizer = getattr(processor, "tokenizer", processor)
        cfg = model.config
        visual = tuple(int(i) for i in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if i is not None)
        markers = chatml_markers_from_template(tokenizer, visual)
        return marker_labeler(markers)

    def box_geometry(self, processor, config=None) -> AnyresGeometry:
        ip = getattr(processor, "image_processor", None)
        if ip is None or getattr(ip, "image_grid_pinpoints", None) is None:
            raise ValueError("pixel boxes on llava_onevision need its LlavaOnevisionProcessor (anyres image processor)")
        if config is None:
            raise ValueError("pixel boxes on llava_onevision need the model config (patch size, pinpoints)")
        size = ip.size if isinstance(ip.size, dict) else {k: getattr(ip.size, k, None) for k in ("height", "width")}
        crop = config.vision_config.image_size
        if size.get("height") != crop or size.get("width") != crop or getattr(ip, "do_center_crop", None):
            raise NotImplementedError(f"box geometry assumes square {crop}-px crops (size height = width = the vision "
                                      f"image_size) without centre crop; this processor has size={size}")
        if getattr(config, "vision_feature_select_strategy", "full") != "full":
            raise NotImplementedError("box geometry assumes vision_feature_select_strategy='full' (SigLIP, no CLS; "
                                      "'default' drops a real patch per crop)")
        if [list(p) for p in ip.image_grid_pinpoints] != [list(p) for p in config.image_grid_pinpoints]:
            raise ValueError("the processor's image_grid_pinpoints differ from the model config's; the processor "
                             "does not belong to this checkpoint")
        aspect = getattr(config, "vision_aspect_ratio", "anyres_max_9")
        max_num = int(aspect.strip("anyres_max_")) if aspect.startswith("anyres_max_") else None
        return AnyresGeometry(int(crop), int(config.vision_config.patch_size),
                              tuple(tuple(p) for p in config.image_grid_pinpoints), max_num)

    def box_mask(self, target, input_ids, inputs, config, processor) -> torch.Tensor:
        if target.video_sizes:
            raise NotImplementedError("video boxes are not implemented for llava_onevision; pass images= only")
        geo = self.box_geometry(processor, config)
        sizes = list(target.image_sizes or [])
        multi = self._multi_image_flags(geo, sizes, inputs, input_ids.shape[0])
        cells = [geo.cells(size, multi_image=m) for size, m in zip(sizes, multi)]
        return cells_target_mask(input_ids, config.image_token_id, cells, target.boxes, sizes,
                                 convention=target.convention, by=target.by)

    @staticmethod
    def _multi_image_flags(geo: AnyresGeometry, sizes: list, inputs: dict, batch_size: int) -> list[bool]:
        """Per image: laid out as part of a multi-image sample? From the processor's `batch_num_images` when the
        forward has it, else (generate() passes precomputed vision features instead) from the length of each
        image's packed features: P*P + 1 for a multi-image layout, never equal to a single image's count."""
        per_sample = inputs.get("batch_num_images")
        if per_sample is not None:
            multi = [int(n) != 1 for n in torch.as_tensor(per_sample).tolist() for _ in range(int(n))]
        else:
            pooled = getattr((inputs.get("mm_encoder_outputs") or {}).get("image"), "pooler_output", None)
            if pooled is not None:
                lens = [int(f.shape[0]) for f in pooled]
                if len(lens) != len(sizes):
                    raise ValueError(f"the model holds features of {len(lens)} images but {len(sizes)} image sizes "
                                     "were given; pass one original (H, W) per image, in order")
                multi = [n == geo.side**2 + 1 for n in lens]
            elif len(sizes) == batch_size:
                multi = [False] * len(sizes)  # one image per sample: the single-image (anyres) layout
            else:
                raise ValueError("boxes on llava_onevision with several images per sample need the processor's "
                                 "batch_num_images in the model inputs (single-image and multi-image samples are "
                                 "tokenized differently)")
        if len(multi) != len(sizes):
            raise ValueError(f"batch_num_images accounts for {len(multi)} images but {len(sizes)} image sizes were "
                             "given; pass one original (H, W) per image, in order")
        return multi

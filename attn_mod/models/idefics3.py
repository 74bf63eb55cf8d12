"""Idefics3 (`Idefics3ForConditionalGeneration`) and SmolVLM (`SmolVLMForConditionalGeneration`): plain-text
"Role: ...<end_of_utterance>" turns, image splitting with row / column marker tokens and a global image,
pixel shuffle.

Roles. The template renders "{BOS}System: {s}<end_of_utterance>\\nUser:<image>{q}<end_of_utterance>\\n
Assistant: {a}<end_of_utterance>\\n" (BOS = `<|begin_of_text|>` for Idefics3; SmolVLM's template starts
with `<|im_start|>`). A turn starts after the leading special tokens or right after `<end_of_utterance>`
and its newline, with the ids of "System:" / "User:" / "Assistant:". SYSTEM = every token from the first
one (BOS included) through the system turn's `<end_of_utterance>`, when the first turn is a system turn
(else nothing is SYSTEM: these templates have no default system prompt); RESPONSE = assistant bodies
(after "Assistant:", through `<end_of_utterance>`), or the positions with labels != -100; IMAGE =
`<image>` tokens (config.image_token_id); TEXT = the rest. The header ids are checked against the
template's own rendering when the labeller is built.

Marker tokens. `<fake_token_around_image>`, `<row_i_col_j>`, `<global-img>` and the newlines between
sub-image rows are TEXT: they are ordinary vocabulary embeddings of the text model (the vision features
replace only the `<image>` positions), as Qwen's `<|vision_start|>` and InternVL's `<img>` are TEXT.
(The processor's `mm_token_type_ids`, when requested, marks the whole span markers included; it is not
used for labels.)

Geometry (transformers' Idefics3 / SmolVLM PIL image processors, the connector's `pixel_shuffle`). With M =
`max_image_size["longest_edge"]` and L = `size["longest_edge"]`: the image (H, W) is resized so its long side
is L (`_resize_output_size_rescale_to_max_len`, even short side; capped at 4096), then each side up to a
multiple of M (`resize_for_vision_encoder`: (H2, W2)). If H2 > M or W2 > M it is cut into (H2/M) x (W2/M)
sub-images of M px in raster order (prompt: `<fake_token_around_image><row_r_col_c>` + tokens per sub-image,
"\\n" after each row) and the global image (the whole image resized to M x M, after `<global-img>`) follows;
else the image is a single M x M frame (prompt: `<global-img>` + tokens). Without image splitting the
image is resized to M x M. Each frame has (M/patch)^2 patches; `pixel_shuffle` with scale s keeps raster
order over s x s patch blocks, so token n of a frame covers the (patch*s)-px square (r, c) =
divmod(n, M/(patch*s)) of it ((364/28)^2 = 169 tokens for Idefics3, (512/64)^2 = 64 for SmolVLM). A box
therefore selects tokens in every sub-image it overlaps and in the global image.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from ..categories import RESPONSE, SYSTEM, TEXT
from ..regions import cells_target_mask, image_hw
from .base import FamilyAdapter, marker_labeler

SENTINELS = ("\x00sys\x00", "\x00user\x00", "\x00answer\x00")


@dataclass(frozen=True)
class UtteranceMarkers:
    """Ids of a "Role: ...<end_of_utterance>" template: role headers ("System:", "User:", "Assistant:"),
    `turn_end` (`<end_of_utterance>`), `newline` (ids of "\\n" after it), `visual_token_ids` (`<image>`)."""

    system_header: tuple[int, ...]
    user_header: tuple[int, ...]
    assistant_header: tuple[int, ...]
    turn_end: int
    newline: tuple[int, ...]
    visual_token_ids: tuple[int, ...]
    special_ids: frozenset[int] = frozenset()

    def turns(self, ids: list[int]) -> list[tuple[str, int, int, int]]:
        """(role, start, body, end) per turn of one unpadded row; `end` is the `<end_of_utterance>` index (or
        the last index when the row ends inside the turn); role None for a span that opens with no header."""
        n, pos, out = len(ids), 0, []
        while pos < n and ids[pos] in self.special_ids and ids[pos] != self.turn_end:
            pos += 1
        while pos < n:
            role, body = None, pos
            for name, header in (("system", self.system_header), ("user", self.user_header),
                                 ("assistant", self.assistant_header)):
                if header and tuple(ids[pos:pos + len(header)]) == header:
                    role, body = name, pos + len(header)
                    break
            end = ids.index(self.turn_end, body) if self.turn_end in ids[body:] else n - 1
            out.append((role, pos, body, end))
            pos = end + 1
            if tuple(ids[pos:pos + len(self.newline)]) == self.newline:
                pos += len(self.newline)
        return out

    def label_row(self, ids: list[int], mark_response: bool) -> list[int]:
        out = [TEXT] * len(ids)
        turns = self.turns(ids)
        if turns and turns[0][0] == "system":
            out[:turns[0][3] + 1] = [SYSTEM] * (turns[0][3] + 1)
        if mark_response:
            for role, _, body, end in turns:
                if role == "assistant":
                    out[body:end + 1] = [RESPONSE] * max(0, end + 1 - body)
        return out


def utterance_markers(tokenizer, *, image_token_id: int, turn_end: str = "<end_of_utterance>") -> UtteranceMarkers:
    """Markers of an Idefics3 / SmolVLM template, checked on the template's rendering of a system, user and
    assistant turn (each header must start a turn and the three turn bodies must be found in order)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template; Idefics3 / SmolVLM labels need its 'User:' / "
                         "'Assistant:' turns (or patch with categories='explicit' and handle.set_categories(cats))")
    end = tokenizer.convert_tokens_to_ids(turn_end)
    if end is None or end == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {turn_end!r} token; this is not an Idefics3 / SmolVLM tokenizer")
    enc = lambda text: tuple(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    special = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", [])) - {int(image_token_id)}
    markers = UtteranceMarkers(enc("System:"), enc("User:"), enc("Assistant:"), int(end), enc("\n"),
                               (int(image_token_id),), special)
    messages = [{"role": r, "content": [{"type": "text", "text": s}]}
                for r, s in zip(("system", "user", "assistant"), SENTINELS)]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - any template failure means the roles cannot be located
        raise ValueError(f"the chat template cannot render a system / user / assistant conversation ({e}); "
                         "patch with categories='explicit' and handle.set_categories(cats)") from None
    ids = list(enc(rendered))
    roles = [t[0] for t in markers.turns(ids)]
    bodies = [tokenizer.decode(ids[b:e]).strip() for _, _, b, e in markers.turns(ids)]
    if roles[:3] != ["system", "user", "assistant"] or [b.strip(": ") for b in bodies[:3]] != list(SENTINELS):
        raise ValueError("the chat template does not render 'System:' / 'User:' / 'Assistant:' turns ended by "
                         f"{turn_end!r} (found roles {roles[:3]}); patch with categories='explicit' and "
                         "handle.set_categories(cats)")
    return markers


@dataclass(frozen=True)
class SplitGeometry:
    """How an Idefics3 / SmolVLM image processor maps an image onto sub-images + global image tokens."""

    tile: int  # M = max_image_size["longest_edge"], px per frame side
    longest_edge: int  # L = size["longest_edge"]
    splitting: bool
    cell: int  # patch * scale_factor: px of a frame per token side
    resize_fns: tuple  # (rescale_to_max_len, scale_below_upper_bound, max_image_size) of the processor module

    def canvas(self, h: int, w: int) -> tuple[int, int]:
        """(H2, W2): the image size before splitting, exactly as the processor computes it."""
        to_max, below, upper = self.resize_fns
        h, w = to_max(h, w, max_len=self.longest_edge)
        h, w = below(h, w, max_len=upper)
        m, aspect = self.tile, w / h  # resize_for_vision_encoder
        if w >= h:
            w = math.ceil(w / m) * m
            h = math.ceil(int(w / aspect) / m) * m
        else:
            h = math.ceil(h / m) * m
            w = math.ceil(int(h * aspect) / m) * m
        return h, w

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """(rows, cols) of sub-images; (0, 0) for a single frame (as the processor's rows / cols)."""
        if not self.splitting:
            return 0, 0
        h2, w2 = self.canvas(h, w)
        return (h2 // self.tile, w2 // self.tile) if (h2 > self.tile or w2 > self.tile) else (0, 0)

    def cells(self, image_size) -> list:
        """Per `<image>` token of the image, in order: (x0, y0, x1, y1) original pixels (Fractions)."""
        h, w = image_hw(image_size)
        rows, cols = self.grid(h, w)
        n = self.tile // self.cell
        out = []

        def frame(ox, oy, sx, sy):  # frame origin (canvas px) and canvas->original scale
            for r in range(n):
                for c in range(n):
                    out.append(((ox + c * self.cell) * sx, (oy + r * self.cell) * sy,
                                (ox + (c + 1) * self.cell) * sx, (oy + (r + 1) * self.cell) * sy))

        if rows:
            h2, w2 = self.canvas(h, w)
            for i in range(rows * cols):
                frame((i % cols) * self.tile, (i // cols) * self.tile, Fraction(w, w2), Fraction(h, h2))
        frame(0, 0, Fraction(w, self.tile), Fraction(h, self.tile))  # the global image (or the only frame)
        return out

    def views(self, image_size) -> list[tuple[str, int, int]]:
        """[(label, start, stop)]: token ranges of `cells` whose cells tile the image once: the sub-images
        together, then the global image (or the single frame)."""
        h, w = image_hw(image_size)
        rows, cols = self.grid(h, w)
        per = (self.tile // self.cell) ** 2
        if not rows:
            return [(f"single frame, {per} tokens", 0, per)]
        return [(f"{rows}x{cols} sub-images, {per} tokens each", 0, rows * cols * per),
                (f"global image, {per} tokens", rows * cols * per, (rows * cols + 1) * per)]


def _resize_fns(ip):
    mod = sys.modules.get(type(ip).__module__)
    names = ("_resize_output_size_rescale_to_max_len", "_resize_output_size_scale_below_upper_bound",
             "MAX_IMAGE_SIZE")
    if mod is None or not all(hasattr(mod, n) for n in names):
        import transformers.models.idefics3.image_processing_pil_idefics3 as mod
    return tuple(getattr(mod, n) for n in names)


class Idefics3Adapter(FamilyAdapter):
    name = "idefics3"
    model_types = ("idefics3",)

    def labeler(self, model: nn.Module, processor):
        if processor is None:
            raise ValueError(f"{self.name} needs its processor or tokenizer to find the 'User:' / 'Assistant:' "
                             "turns: attn_mod.patch(model, processor, ...), or pass categories='explicit' and "
                             "handle.set_categories(cats)")
        tokenizer = getattr(processor, "tokenizer", processor)
        markers = utterance_markers(tokenizer, image_token_id=int(model.config.image_token_id))
        # mm_token_type_ids is ignored on purpose: it marks the marker tokens too (see the module doc)
        return marker_labeler(markers, mm_token_types=False)

    def box_geometry(self, processor, config=None) -> SplitGeometry:
        ip = getattr(processor, "image_processor", None)
        if ip is None or getattr(ip, "max_image_size", None) is None:
            raise ValueError(f"pixel boxes on {self.name} need its processor (the {self.name} image processor)")
        get = lambda d, k: d.get(k) if isinstance(d, dict) else getattr(d, k, None)  # noqa: E731
        tile, longest = get(ip.max_image_size, "longest_edge"), get(ip.size, "longest_edge")
        if not tile or not longest or getattr(ip, "do_resize", True) is False:
            raise NotImplementedError("box geometry assumes size / max_image_size given as {'longest_edge': ...} "
                                      "with do_resize=True (the released Idefics3 / SmolVLM processors)")
        if config is None:
            raise ValueError(f"pixel boxes on {self.name} need the model config (patch size, scale_factor)")
        patch = config.vision_config.patch_size
        cell = int(patch) * int(config.scale_factor)
        seq = getattr(processor, "image_seq_len", None)
        if tile % cell or (seq is not None and (tile // cell) ** 2 != seq):
            raise ValueError(f"a {tile}-px frame with patch {patch} and scale_factor {config.scale_factor} does not "
                             f"give the processor's image_seq_len={seq} tokens; processor and model do not match")
        return SplitGeometry(int(tile), int(longest), bool(getattr(ip, "do_image_splitting", True)), cell,
                             _resize_fns(ip))

    def box_mask(self, target, input_ids, inputs, config, processor) -> torch.Tensor:
        if target.video_sizes:
            raise NotImplementedError(f"video boxes are not implemented for {self.name}; pass images= only")
        geo = self.box_geometry(processor, config)
        cells = [geo.cells(size) for size in (target.image_sizes or [])]
        # an image's <image> tokens are interleaved with its marker tokens: not one contiguous run
        return cells_target_mask(input_ids, config.image_token_id, cells, target.boxes, target.image_sizes,
                                 convention=target.convention, by=target.by, contiguous=False)


class SmolVLMAdapter(Idefics3Adapter):
    name = "smolvlm"
    model_types = ("smolvlm",)

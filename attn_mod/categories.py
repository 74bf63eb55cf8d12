"""Token categories and the labelling of input ids into per-slot categories.

Codes: PAD 0, SYSTEM 1, TEXT 2, IMAGE 3, TARGET 4, RESPONSE 5; 6 and 7 are free for users.
Code 3 (`IMAGE`) marks visual tokens OUTSIDE the target region, code 4 (`TARGET`) those inside it. Every
user-facing NAME follows one rule: "image" means IMAGE + TARGET (all visual tokens): `parse_categories("image")`
is (3, 4), `mass_image` is their summed mass, and the parts are "image_outside_target" (3) and "target" (4). Labels come from exact token ids (`mm_token_type_ids`,
image/video placeholder ids, chat-template role markers), never from character offsets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Sequence

import torch

from .kernels.spec import NUM_CATEGORIES


class TokenCategory(IntEnum):
    PAD = 0
    SYSTEM = 1
    TEXT = 2
    IMAGE = 3
    TARGET = 4
    RESPONSE = 5


PAD, SYSTEM, TEXT, IMAGE, TARGET, RESPONSE = (int(c) for c in TokenCategory)
VISUAL = (IMAGE, TARGET)

# The name of each code (`category_name`); "image" is not one of them: it names both visual codes.
CATEGORY_NAMES = ("pad", "system", "text", "image_outside_target", "target", "response")
# Names accepted wherever a category is named: "image" (= "visual", "image_all", "vision") is IMAGE + TARGET.
_ALIASES = {"image": VISUAL, "visual": VISUAL, "image_all": VISUAL, "vision": VISUAL}


def category_name(code: int) -> str:
    """Name of one code: "image_outside_target" for 3, "target" for 4, "code6" / "code7" for the free codes."""
    code = int(code)
    return CATEGORY_NAMES[code] if 0 <= code < len(CATEGORY_NAMES) else f"code{code}"


def parse_categories(spec, *, what: str = "category") -> tuple[int, ...]:
    """Codes named by `spec`: a name ("system", "target", "image_outside_target"), a group ("image" = "visual"
    = IMAGE + TARGET), an integer code (3), or an iterable of those."""
    if isinstance(spec, (str, int)) and not isinstance(spec, bool):
        spec = [spec]
    codes: list[int] = []
    for item in spec:
        if isinstance(item, str):
            key = item.lower()
            if key in _ALIASES:
                codes.extend(_ALIASES[key])
            elif key in CATEGORY_NAMES:
                codes.append(CATEGORY_NAMES.index(key))
            else:
                known = ", ".join(CATEGORY_NAMES + tuple(_ALIASES))
                raise ValueError(f"unknown {what} {item!r}; known names: {known} (or integer codes 0..{NUM_CATEGORIES - 1})")
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < NUM_CATEGORIES:
                raise ValueError(f"{what} code {item} is outside 0..{NUM_CATEGORIES - 1}")
            codes.append(int(item))
        else:
            raise ValueError(f"{what} must be a name or an integer code, got {item!r}")
    return tuple(dict.fromkeys(codes))


@dataclass(frozen=True)
class RoleMarkers:
    """Exact token ids of a ChatML-style template (`<|im_start|>role\\n ... <|im_end|>`).

    `*_header` are the ids that follow `<|im_start|>` for that role (e.g. encode("system\\n")).
    """

    turn_start: int
    turn_end: int
    system_header: tuple[int, ...]
    assistant_header: tuple[int, ...]
    visual_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @staticmethod
    def from_tokenizer(tokenizer, *, turn_start="<|im_start|>", turn_end="<|im_end|>",
                       visual_tokens: Sequence[str] = ("<|image_pad|>", "<|video_pad|>")) -> RoleMarkers:
        def tid(tok: str) -> int:
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == getattr(tokenizer, "unk_token_id", object()):
                raise ValueError(f"tokenizer has no token {tok!r}; pass explicit categories instead")
            return int(i)

        def header(role: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(f"{role}\n", add_special_tokens=False))

        return RoleMarkers(tid(turn_start), tid(turn_end), header("system"), header("assistant"),
                           tuple(tid(t) for t in visual_tokens))


@dataclass(frozen=True)
class LabelOptions:
    """Labelling choices. `sink_category`: code given to the first non-pad token (the usual attention
    sink) instead of its natural label; None keeps it (SYSTEM when a system turn opens the prompt).
    `system_text`: the system prompt, for templates whose ids do not delimit it (Gemma3 merges it into the first
    user turn; see attn_mod.models.gemma3), or several (a batch whose rows use different system prompts: each
    row's first user turn is matched against all of them, the longest match wins); other families ignore it.
    Stored as a tuple of distinct non-empty strings (empty: none)."""

    sink_category: int | None = None
    system_text: str | tuple[str, ...] | None = None

    def __post_init__(self):
        if self.sink_category is not None and not 0 < self.sink_category < NUM_CATEGORIES:
            raise ValueError(f"sink_category must be None or a code in 1..{NUM_CATEGORIES - 1}")
        texts = self.system_text
        if texts is None or isinstance(texts, str):
            texts = () if not texts else (texts,)
        elif isinstance(texts, (list, tuple)) and all(isinstance(t, str) for t in texts):
            texts = tuple(dict.fromkeys(t for t in texts if t))
        else:
            raise ValueError("system_text must be a string, a list of strings or None, got "
                             f"{type(self.system_text).__name__}")
        object.__setattr__(self, "system_text", texts)


def _starts_with(ids: list[int], pos: int, header: tuple[int, ...]) -> bool:
    return bool(header) and tuple(ids[pos:pos + len(header)]) == header


def _label_row(ids: list[int], markers: RoleMarkers, mark_response: bool) -> list[int]:
    """Turn structure of one (unpadded) sequence: SYSTEM turns, RESPONSE assistant bodies, TEXT elsewhere."""
    n = len(ids)
    out = [TEXT] * n
    pos = 0
    while pos < n:
        if ids[pos] != markers.turn_start:
            pos += 1
            continue
        end = pos + 1
        while end < n and ids[end] != markers.turn_end:
            end += 1
        last = min(end, n - 1)  # the closing <|im_end|> is part of the turn (or the sequence ends)
        if _starts_with(ids, pos + 1, markers.system_header):
            out[pos:last + 1] = [SYSTEM] * (last + 1 - pos)
        elif mark_response and _starts_with(ids, pos + 1, markers.assistant_header):
            body = pos + 1 + len(markers.assistant_header)
            out[body:last + 1] = [RESPONSE] * max(0, last + 1 - body)
        pos = last + 1
    return out


def label_tokens(
    input_ids: torch.Tensor,
    markers: RoleMarkers,
    *,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    options: LabelOptions = LabelOptions(),
) -> torch.Tensor:
    """Categories (B, S) int8 of a batch of ChatML token ids.

    - SYSTEM: every token of a system turn, `<|im_start|>` through its `<|im_end|>`.
    - RESPONSE: assistant turn bodies (after the assistant header, through `<|im_end|>`), or, when
      `labels` is given, exactly the positions with labels != -100.
    - IMAGE: visual placeholders (`mm_token_type_ids` > 0, else the placeholder ids); TARGET: the visual
      tokens where `target_mask` is True. PAD: attention_mask == 0. TEXT: everything else.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
    shape = tuple(input_ids.shape)
    for name, t in (("attention_mask", attention_mask), ("mm_token_type_ids", mm_token_type_ids),
                    ("labels", labels), ("target_mask", target_mask)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {shape}; they must match")
    ids_cpu = input_ids.detach().cpu()
    valid = torch.ones(shape, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
    cats = torch.full(shape, PAD, dtype=torch.int8)
    for b in range(shape[0]):
        idx = valid[b].nonzero().flatten()
        if idx.numel() == 0:
            continue
        # markers of another template style (e.g. LLaVA's plain "USER:" turns) bring their own row labeller
        row_fn = getattr(markers, "label_row", None) or (lambda ids, mr: _label_row(ids, markers, mr))
        row = row_fn(ids_cpu[b, idx].tolist(), labels is None)
        cats[b, idx] = torch.tensor(row, dtype=torch.int8)

    if labels is not None:
        resp = labels.detach().cpu() != -100
        cats[resp & valid] = RESPONSE
    if mm_token_type_ids is not None:
        visual = mm_token_type_ids.detach().cpu() > 0
    else:
        visual = torch.isin(ids_cpu, torch.tensor(markers.visual_token_ids, dtype=ids_cpu.dtype))
    cats[visual & valid] = IMAGE
    if target_mask is not None:
        tm = target_mask.detach().cpu().bool()
        stray = tm & ~(visual & valid)
        if stray.any():
            b, s = stray.nonzero()[0].tolist()
            raise ValueError(f"target mask marks non-visual token (sample {b}, position {s}); "
                             "TARGET may only be set on image/video placeholder tokens")
        cats[tm] = TARGET
    if options.sink_category is not None:
        first = valid.int().argmax(dim=1)
        has = valid.any(dim=1)
        cats[has.nonzero().flatten(), first[has]] = options.sink_category
    return cats.to(input_ids.device)


def validate_categories(cats: torch.Tensor, shape: Iterable[int] | None = None) -> torch.Tensor:
    """Check an explicit (B, S) category tensor; returns it as int8. Raises ValueError naming the fix."""
    if not isinstance(cats, torch.Tensor) or cats.is_floating_point() or cats.dim() != 2:
        raise ValueError("explicit categories must be a (B, S) integer tensor of codes 0..7")
    if shape is not None and tuple(cats.shape) != tuple(shape):
        raise ValueError(f"explicit categories have shape {tuple(cats.shape)} but the input is {tuple(shape)}; "
                         "pass one label per token (left padding included, as PAD=0)")
    if cats.numel() and (cats.min() < 0 or cats.max() >= NUM_CATEGORIES):
        raise ValueError(f"category codes must lie in 0..{NUM_CATEGORIES - 1}")
    return cats.to(torch.int8)


def prompt_end_index(cats: torch.Tensor) -> torch.Tensor:
    """(B,) slot index of the last prompt token: the slot before the first RESPONSE, else the last non-PAD slot.

    That token's row predicts the first answer token (PAI's "last row"); -1 for an all-PAD row.
    """
    B, S = cats.shape
    pos = torch.arange(S, device=cats.device).expand(B, S)
    is_resp = cats == RESPONSE
    first_resp = torch.where(is_resp, pos, torch.full_like(pos, S)).amin(dim=1)
    last_valid = torch.where(cats != PAD, pos, torch.full_like(pos, -1)).amax(dim=1)
    return torch.where(is_resp.any(dim=1), first_resp - 1, last_valid)


def category_counts(cats: torch.Tensor) -> torch.Tensor:
    """(B, NUM_CATEGORIES) number of slots of each category."""
    return torch.nn.functional.one_hot(cats.long(), NUM_CATEGORIES).sum(dim=1)

"""The training-data format: JSONL, one chat-formatted multimodal sample per line.

    samples = read_samples("data/train.jsonl")            # validated; errors name the file, line and field
    s = samples[0]; s.prompt_messages(); s.target_text(); s.load_images(); s.region_boxes()
    write_samples(samples, "out.jsonl")                    # atomic (temp file + rename)

One line:

    {"id": "q17",
     "images": ["imgs/q17.png" | "data:image/png;base64,...", ...],      # paths relative to the JSONL file
     "messages": [{"role": "system" | "user" | "assistant",
                   "content": "text" | [{"type": "image"} | {"type": "text", "text": "..."}]}, ...],
     "boxes": [[x0, y0, x1, y1], ...]              # optional TARGET region, pixels of the original image:
              | [[[x0, y0, x1, y1], ...], [...]],  #   a flat list of boxes (one-image samples) or one list per image
     "answer": "B", "answer_type": "choice" | "number" | "yesno" | "text", "options": {"A": "...", ...},
     ...}                                          # any other key is kept in `meta` (provenance, source fields)

Rules: `id` is a non-empty string, unique in the file; the number of `{"type": "image"}` parts equals the
number of `images`; roles are system / user / assistant, a system turn only first; boxes have x0 < x1, y0 < y1
and are given per image (`boxes[k]` belongs to `images[k]`). SFT trains on the last assistant turn
(`require_assistant=True`); GRPO prompts are the messages without it (`prompt_messages()`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ..eval.datasets import ANSWER_TYPES, ImageSource

__all__ = ["Box", "SampleFormatError", "TrainSample", "parse_boxes", "parse_sample", "read_samples", "sample_to_json",
           "write_samples"]

Box = tuple[float, float, float, float]
ROLES = ("system", "user", "assistant")
_KNOWN = ("id", "images", "messages", "boxes", "answer", "answer_type", "options")


class SampleFormatError(ValueError):
    """A training JSONL line is not a valid sample; the message names the file, line and field."""


@dataclass(frozen=True, eq=False)
class TrainSample:
    """One validated training sample. `messages` are normalised: every content is a list of parts."""

    id: str
    messages: tuple[dict, ...]
    images: tuple[str, ...] = ()
    boxes: tuple[tuple[Box, ...], ...] | None = None  # one tuple of boxes per image, or None (no target)
    answer: str | None = None
    answer_type: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."  # relative image paths resolve against this folder (the JSONL file's)
    where: str = "sample"  # "file.jsonl line N" for error messages

    @property
    def has_assistant(self) -> bool:
        return self.messages[-1]["role"] == "assistant"

    @property
    def has_system(self) -> bool:
        return self.messages[0]["role"] == "system"

    def system_text(self) -> str | None:
        """Text of the system turn (its text parts joined), or None without one."""
        if not self.has_system:
            return None
        content = self.messages[0]["content"]
        return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")

    def prompt_messages(self) -> list[dict]:
        """The messages without the last assistant turn (the GRPO prompt / the SFT context)."""
        return [dict(m) for m in (self.messages[:-1] if self.has_assistant else self.messages)]

    def target_text(self) -> str:
        """Text of the last assistant turn (the SFT target)."""
        if not self.has_assistant:
            raise SampleFormatError(f"{self.where}: sample {self.id!r} has no assistant turn to train on")
        return "".join(p["text"] for p in self.messages[-1]["content"] if p["type"] == "text")

    def image_sources(self) -> list[ImageSource]:
        out = []
        for k, ref in enumerate(self.images):
            where = f"{self.where} images[{k}]"
            if ref.startswith("data:"):
                out.append(ImageSource(data=ref, where=where))
            else:
                p = Path(ref)
                out.append(ImageSource(path=p if p.is_absolute() else Path(self.base_dir) / p, where=where))
        return out

    def load_images(self) -> list[Image.Image]:
        """The images as PIL RGB, in order."""
        return [src.load() for src in self.image_sources()]

    def region_boxes(self) -> list:
        """This sample's entry for `attn_mod.regions.target_token_mask` / `handle.set_target(boxes=[...])`:
        a list of (image_index, box) pairs ([] without boxes)."""
        if not self.boxes:
            return []
        return [(k, box) for k, per_image in enumerate(self.boxes) for box in per_image]


# ------------------------------------------------------------------------------------------------ parsing


def _err(where: str, msg: str) -> SampleFormatError:
    return SampleFormatError(f"{where}: {msg}")


def _parse_content(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _err(where, f"content must be a string or a list of parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        w = f"{where}[{j}]"
        if not isinstance(part, Mapping) or part.get("type") not in ("image", "text"):
            raise _err(w, f'a part must be {{"type": "image"}} or {{"type": "text", "text": ...}}, got {part!r}')
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise _err(w, "a text part needs a string 'text'")
            parts.append({"type": "text", "text": part["text"]})
        else:
            parts.append({"type": "image"})
    return parts


def _parse_box(raw: Any, where: str) -> Box:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        raise _err(where, f"a box is [x0, y0, x1, y1] in pixels, got {raw!r}")
    x0, y0, x1, y1 = (float(v) for v in raw)
    if not (x0 < x1 and y0 < y1):
        raise _err(where, f"box {list(raw)} is empty or inverted (need x0 < x1 and y0 < y1)")
    if min(x0, y0) < 0:
        raise _err(where, f"box {list(raw)} has negative pixel coordinates")
    return (x0, y0, x1, y1)


def _is_flat_box(raw: Any) -> bool:
    return isinstance(raw, (list, tuple)) and len(raw) == 4 and all(isinstance(v, (int, float)) for v in raw)


def parse_boxes(raw: Any, n_images: int, where: str) -> tuple[tuple[Box, ...], ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _err(where, f"boxes must be a list, got {type(raw).__name__}")
    if not raw:
        return None
    if n_images == 0:
        raise _err(where, "boxes are given but the sample has no images")
    if all(_is_flat_box(b) for b in raw):  # flat list of boxes: the only image
        if n_images != 1:
            raise _err(where, f"a flat list of boxes needs exactly one image, the sample has {n_images}; "
                              "give one list of boxes per image")
        return (tuple(_parse_box(b, f"{where}[{i}]") for i, b in enumerate(raw)),)
    if len(raw) != n_images:
        raise _err(where, f"boxes has {len(raw)} per-image lists but the sample has {n_images} images")
    out = []
    for k, per_image in enumerate(raw):
        if not isinstance(per_image, list):
            raise _err(f"{where}[{k}]", f"expected a list of boxes for image {k}, got {per_image!r}")
        out.append(tuple(_parse_box(b, f"{where}[{k}][{i}]") for i, b in enumerate(per_image)))
    return tuple(out) if any(out) else None


def parse_sample(obj: Any, *, where: str = "sample", base_dir: str | os.PathLike = ".",
                 require_assistant: bool = False) -> TrainSample:
    """Validate one decoded JSON object into a `TrainSample` (errors name `where` and the field)."""
    if not isinstance(obj, Mapping):
        raise _err(where, f"a sample is a JSON object, got {type(obj).__name__}")
    sid = obj.get("id")
    if isinstance(sid, int) and not isinstance(sid, bool):
        sid = str(sid)
    if not isinstance(sid, str) or not sid:
        raise _err(where, "field 'id' is missing or not a non-empty string")
    where = f"{where} (id {sid!r})"
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise _err(where, "field 'images' must be a list of paths or data URIs")
    raw_msgs = obj.get("messages")
    if not isinstance(raw_msgs, list) or not raw_msgs:
        raise _err(where, "field 'messages' is missing or empty")
    messages = []
    for i, m in enumerate(raw_msgs):
        w = f"{where} messages[{i}]"
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise _err(w, f"role must be one of {ROLES}, got {m.get('role') if isinstance(m, Mapping) else m!r}")
        if m["role"] == "system" and i != 0:
            raise _err(w, "a system turn may only be the first message")
        if "content" not in m:
            raise _err(w, "field 'content' is missing")
        messages.append({"role": m["role"], "content": _parse_content(m["content"], f"{w}.content")})
    if all(m["role"] == "system" for m in messages):
        raise _err(where, "messages need at least one user turn")
    n_parts = sum(p["type"] == "image" for m in messages for p in m["content"])
    if n_parts != len(images):
        raise _err(where, f'messages hold {n_parts} {{"type": "image"}} part(s) but "images" lists {len(images)}')
    if require_assistant and messages[-1]["role"] != "assistant":
        raise _err(where, "the last message must be the assistant turn to train on (role 'assistant')")
    boxes = parse_boxes(obj.get("boxes"), len(images), f"{where} boxes")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise _err(where, f"field 'answer' must be a string or number, got {answer!r}")
    answer_type = obj.get("answer_type")
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise _err(where, f"field 'answer_type' must be one of {ANSWER_TYPES}, got {answer_type!r}")
    options = obj.get("options") or {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in options.items()):
        raise _err(where, 'field \'options\' must map letters to texts, e.g. {"A": "red"}')
    meta = {k: v for k, v in obj.items() if k not in _KNOWN}
    return TrainSample(sid, tuple(messages), tuple(images), boxes, None if answer is None else str(answer),
                       answer_type, dict(options), meta, str(base_dir), where)


def read_samples(path: str | os.PathLike, *, require_assistant: bool = False, limit: int | None = None
                 ) -> list[TrainSample]:
    """All samples of a JSONL file, validated (blank lines skipped; duplicate ids are an error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data file {str(path)!r} not found")
    out: list[TrainSample] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path.name} line {lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SampleFormatError(f"{where}: not valid JSON ({e})") from None
            s = parse_sample(obj, where=where, base_dir=path.parent, require_assistant=require_assistant)
            if s.id in seen:
                raise SampleFormatError(f"{where}: id {s.id!r} already used on line {seen[s.id]}")
            seen[s.id] = lineno
            out.append(s)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise SampleFormatError(f"{path}: holds no samples")
    return out


def sample_to_json(s: TrainSample) -> dict:
    """The JSON object of a sample (inverse of `parse_sample`; boxes written per image)."""
    obj: dict[str, Any] = {"id": s.id, "images": list(s.images), "messages": [
        {"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in s.messages]}
    if s.boxes:
        obj["boxes"] = [[list(b) for b in per_image] for per_image in s.boxes]
    if s.answer is not None:
        obj["answer"] = s.answer
    if s.answer_type is not None:
        obj["answer_type"] = s.answer_type
    if s.options:
        obj["options"] = dict(s.options)
    obj.update(s.meta)
    return obj


def write_samples(samples: Iterable[TrainSample | Mapping], path: str | os.PathLike) -> Path:
    """Write samples (or already-valid JSON objects) to a JSONL file atomically (`attn_mod.jsonl.write_jsonl_atomic`:
    temp file, fsync, rename)."""
    from ..jsonl import write_jsonl_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(path, [sample_to_json(s) if isinstance(s, TrainSample) else dict(s) for s in samples])
    return path

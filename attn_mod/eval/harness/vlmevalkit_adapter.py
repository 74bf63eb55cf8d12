"""VLMEvalKit model wrapper around a patched in-process VLM.

    handle = attn_mod.patch(model, processor, intervention=attn_mod.Intervention.avar(0.2, 0.5))
    vlm = AttnModVLMEval(model, processor, handle=handle)
    vlm.generate([{"type": "image", "value": "/data/img.jpg"}, {"type": "text", "value": "What is shown?"}],
                 dataset="MMBench_DEV_EN")
    vlm.update(alpha=0.4)                     # live retune between runs (no reload)

Subclasses `vlmeval.vlm.base.BaseModel` when `vlmeval` is importable; otherwise `BaseModel` below, a
stand-in mirroring the upstream interface as read in open-compass/VLMEvalKit
`vlmeval/vlm/base.py` @ 23757c4385ec3433b8354e6c75b7717e612b8f52 (with `parse_file` from
`vlmeval/smp/file.py` @ 00fff545d27498e6713f42e4481522514df8d163, local files only) and the way
`vlmeval/inference.py` @ 0044c573821b996d6fe051a8804500bcf25d5a67 drives a model
(`set_dump_image(dataset.dump_image)`, `use_custom_prompt` / `build_prompt`, `generate(message, dataset)`).
VLMEvalKit itself is not installed here (it pulls torchvision and a CUDA torch; see TOOLCHAIN.md).
"""

from __future__ import annotations

import mimetypes
import os
from abc import abstractmethod
from typing import Any, Iterable, Mapping

from ..generation import IMAGE_MARKER, Request, generate_batch
from ._media import load_image


class _BaseModelStandIn:
    """Local mirror of VLMEvalKit's `BaseModel` (interface and `generate` checks; no downloads)."""

    INTERLEAVE = False
    allowed_types = ["text", "image", "video"]

    def __init__(self):
        self.dump_image_func = None

    def use_custom_prompt(self, dataset):
        return False

    @abstractmethod
    def build_prompt(self, line, dataset):
        raise NotImplementedError

    def set_dump_image(self, dump_image_func):
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset):
        return self.dump_image_func(line)

    @abstractmethod
    def generate_inner(self, message, dataset=None):
        raise NotImplementedError

    def check_content(self, msgs):
        if isinstance(msgs, str):
            return "str"
        if isinstance(msgs, dict):
            return "dict"
        if isinstance(msgs, list):
            types = [self.check_content(m) for m in msgs]
            if all(t == "str" for t in types):
                return "liststr"
            if all(t == "dict" for t in types):
                return "listdict"
        return "unknown"

    @staticmethod
    def _parse_file(s):
        """Upstream `vlmeval.smp.parse_file` for local files: (mime, path) or (None, s) for text."""
        if os.path.exists(s) and s != ".":
            assert os.path.isfile(s)
            suffix = os.path.splitext(s)[1].lower()
            if suffix == ".webp":
                return "image/webp", s
            return mimetypes.types_map.get(suffix, "unknown"), s
        return None, s

    def preproc_content(self, inputs):
        kind = self.check_content(inputs)
        if kind == "str":
            return [dict(type="text", value=inputs)]
        if kind == "dict":
            assert "type" in inputs and "value" in inputs
            return [inputs]
        if kind == "liststr":
            res = []
            for s in inputs:
                mime, pth = self._parse_file(s)
                if mime is None or mime == "unknown":
                    res.append(dict(type="text", value=s))
                else:
                    res.append(dict(type=mime.split("/")[0], value=pth))
            return res
        if kind == "listdict":
            for item in inputs:
                assert "type" in item and "value" in item
                mime, s = self._parse_file(item["value"])
                if mime is None:
                    assert item["type"] == "text"
                else:
                    assert mime.split("/")[0] == item["type"]
                    item["value"] = s
            return inputs
        return None

    def generate(self, message, dataset=None):
        assert self.check_content(message) in ["str", "dict", "liststr", "listdict"], f"Invalid input type: {message}"
        message = self.preproc_content(message)
        assert message is not None and self.check_content(message) == "listdict"
        for item in message:
            assert item["type"] in self.allowed_types, f'Invalid input type: {item["type"]}'
        return self.generate_inner(message, dataset)


try:  # the real base class when VLMEvalKit is installed
    from vlmeval.vlm.base import BaseModel  # type: ignore[import-not-found]

    HAVE_VLMEVAL = True
except ImportError:
    BaseModel = _BaseModelStandIn
    HAVE_VLMEVAL = False


def _present(line, key) -> bool:
    """`key` is in the row (dict or pandas Series) and not NaN/None."""
    if key not in line:
        return False
    value = line[key]
    return value is not None and not (isinstance(value, float) and value != value)


class AttnModVLMEval(BaseModel):
    """A VLMEvalKit model backed by a (patched) Hugging Face VLM and its processor.

    Messages (`INTERLEAVE = True`): images keep their positions between text items; in an images-first
    message the texts are joined with newlines and ``<image N>`` markers in them get image N (MMMU), other
    images come first (`attn_mod.eval.generation.Request.layout`). Text items with `role: system` become the
    system turn.

    handle: the `PatchHandle` of `attn_mod.patch(model, ...)` (enables `update`).
    generation_overrides: {dataset name: generate_batch kwargs} for that dataset (e.g. max_new_tokens).
    custom_prompt: True / dataset names for which `build_prompt` (a generic VQA / multiple-choice
        prompt) is used instead of the dataset's own.
    """

    INTERLEAVE = True
    VIDEO_LLM = False
    INSTALL_REQ = False
    allowed_types = ["text", "image"]

    def __init__(self, model, processor, handle=None, *, max_new_tokens: int = 512, system_prompt: str | None = None,
                 generation_overrides: Mapping[str, Mapping[str, Any]] | None = None,
                 custom_prompt: bool | Iterable[str] = False, **generate_kwargs):
        super().__init__()
        self.model = model
        self.processor = processor
        self.handle = handle
        self.system_prompt = system_prompt
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, **generate_kwargs)
        self.generation_overrides = {k: dict(v) for k, v in (generation_overrides or {}).items()}
        self.custom_prompt = custom_prompt if isinstance(custom_prompt, bool) else frozenset(custom_prompt)
        self.last_output = None  # the attn_mod.eval.generation.Output of the last call (token ids ...)

    # ------------------------------------------------------------------------------ attn-mod
    def update(self, intervention=None, **params):
        """Retune the patched model live (`handle.update`): e.g. `update(alpha=0.1, beta=0.3)`."""
        if self.handle is None:
            raise RuntimeError("no patch handle: pass handle=attn_mod.patch(model, processor, ...) to AttnModVLMEval")
        self.handle.update(intervention, **params)
        return self

    # --------------------------------------------------------------------------- VLMEvalKit API
    def use_custom_prompt(self, dataset):
        if isinstance(self.custom_prompt, bool):
            return self.custom_prompt
        return dataset in self.custom_prompt

    def build_prompt(self, line, dataset=None):
        """A message for one dataset row: its images, then hint, question and lettered options."""
        if getattr(self, "dump_image_func", None) is not None:
            paths = self.dump_image(line, dataset)
        elif _present(line, "image_path"):
            paths = line["image_path"]
        else:
            raise ValueError("build_prompt needs set_dump_image(dataset.dump_image) (VLMEvalKit calls it) or an "
                             "'image_path' column")
        paths = [paths] if isinstance(paths, str) else list(paths)
        options = {c: str(line[c]) for c in "ABCDEFGHIJ" if _present(line, c)}
        text = f"Hint: {line['hint']}\n" if _present(line, "hint") else ""
        text += f"Question: {line['question']}\n" if options else str(line["question"])
        if options:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
            text += "Please select the correct answer from the options above."
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value=text)]

    def generate_inner(self, message, dataset=None):
        """One answer string for a VLMEvalKit message (list of {'type', 'value'[, 'role']} dicts).

        Images keep their place: an image item after user text is put there (as ``<image N>``, which
        `attn_mod.eval.generation` resolves), and ``<image N>`` markers in the text of an images-first message
        (MMMU) get image N, as VLMEvalKit's ``split_MMMU`` does."""
        images, texts, system = [], [], self.system_prompt
        parts, interleaved = [], False
        for item in message:
            kind, value, role = item["type"], item["value"], item.get("role", "user")
            if kind == "image":
                images.append(load_image(value))
                interleaved |= bool(texts)
                parts.append(f"<image {len(images)}>")
            elif kind == "text" and role == "system":
                system = value
            elif kind == "text" and role == "user":
                texts.append(value)
                parts.append(value)
            elif kind == "text":
                raise NotImplementedError(f"text with role {role!r}: attn_mod.eval.generation renders one user turn "
                                          "(no assistant prefill)")
            else:
                raise NotImplementedError(f"{kind!r} input: attn-mod's generation path takes text and images only")
        if interleaved and any(IMAGE_MARKER.search(t) for t in texts):
            raise ValueError("message both interleaves images with text and holds <image N> markers in its text; "
                             "send one form (images first with markers, or interleaved items without)")
        question = "".join(parts) if interleaved else "\n".join(texts)
        kwargs = {**self.generate_kwargs, **self.generation_overrides.get(dataset, {})}
        out = generate_batch(self.model, self.processor, [Request(question, images, system)], **kwargs)[0]
        self.last_output = out
        return out.text

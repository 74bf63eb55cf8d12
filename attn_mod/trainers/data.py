"""Training samples -> model inputs: chat template, labels, padding, TARGET masks, cutoff.

    collator = Collator(processor, image_token_id=model.config.image_token_id, cutoff=8192)
    dataset = EncodedDataset(read_samples("train.jsonl", require_assistant=True), collator)  # validates all
    batch = collator.collate([dataset[i] for i in (0, 1)])
    model(**batch.model_inputs); batch.labels; batch.target_mask

Labels (SFT): the tokens of the LAST assistant turn, from the first token after its `<|im_start|>assistant\\n`
header through its end-of-turn token `<|im_end|>` inclusive; -100 everywhere else. Found by exact token ids
(the chat template's role markers), never by character offsets. TARGET: the visual tokens inside the sample's
pixel boxes (`attn_mod.regions.target_token_mask`), handed to the patched model with `handle.set_target(mask)`.
Cutoff: a sample longer than `cutoff` tokens is truncated (its first `cutoff` tokens kept; if that would cut an
image or leave no label token it is dropped) or dropped, as configured; both are counted.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..categories import RoleMarkers
from ..data.samples import SampleFormatError, TrainSample, read_samples

IGNORE = -100
_CACHE_BYTES = 512 * 2**20  # keep encodings in memory while they fit (no re-encoding per step)


@dataclass
class Encoded:
    """One sample as token ids (1-D tensors) plus its vision inputs."""

    sample: TrainSample
    input_ids: torch.Tensor
    labels: torch.Tensor
    mm_token_type_ids: torch.Tensor | None
    target: torch.Tensor | None           # (S,) bool TARGET mask or None
    vision: dict = field(default_factory=dict)  # pixel_values, image_grid_thw (concatenated over images)
    truncated: bool = False

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.vision.values()) + 4 * self.length


@dataclass
class Batch:
    """A padded batch. `model_inputs` go to the model's forward as keyword arguments."""

    model_inputs: dict
    labels: torch.Tensor                  # (B, S) long, IGNORE outside the trained tokens
    target_mask: torch.Tensor | None      # (B, S) bool or None when no sample has a box
    ids: list[str]

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> Batch:
        move = (lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)
        return Batch({k: move(v) for k, v in self.model_inputs.items()}, self.labels.to(device),
                     None if self.target_mask is None else self.target_mask.to(device), self.ids)


class Collator:
    """Encodes `TrainSample`s with the processor's own chat template and pads them into a `Batch`."""

    def __init__(self, processor, *, image_token_id: int | None = None, cutoff: int = 8192,
                 overflow: str = "truncate", padding_side: str = "right", box_convention: str = "pixel",
                 box_rule: str = "overlap", family: str | None = None, train_on: str = "last_assistant"):
        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if train_on not in ("last_assistant", "none"):
            raise ValueError(f"train_on must be 'last_assistant' or 'none', got {train_on!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.markers = RoleMarkers.from_tokenizer(self.tokenizer)
        self.image_token_id = image_token_id
        self.cutoff = cutoff
        self.overflow = overflow
        self.padding_side = padding_side
        self.box_convention = box_convention
        self.box_rule = box_rule
        self.family = family
        self.train_on = train_on
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._geometry = None

    # ------------------------------------------------------------------------------------- one sample
    def render(self, sample: TrainSample) -> str:
        """Chat text: the whole conversation (SFT), or the prompt with the generation header (train_on none)."""
        if self.train_on == "none":
            return self.processor.apply_chat_template(sample.prompt_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        return self.processor.apply_chat_template(list(sample.messages), tokenize=False)

    def label_span(self, ids: list[int]) -> tuple[int, int] | None:
        """[start, end) of the last assistant turn's body through its end-of-turn token, or None."""
        m = self.markers
        header = (m.turn_start, *m.assistant_header)
        for pos in range(len(ids) - len(header), -1, -1):
            if tuple(ids[pos:pos + len(header)]) == header:
                start = pos + len(header)
                end = start
                while end < len(ids) and ids[end] != m.turn_end:
                    end += 1
                return start, min(end + 1, len(ids))
        return None

    def encode(self, sample: TrainSample) -> Encoded | str:
        """The sample's `Encoded`, or a string saying why it was dropped ("too long" / "cut image" ...).
        Raises SampleFormatError (naming the sample's line) for data that cannot be used at all."""
        images = sample.load_images()
        kwargs = dict(text=[self.render(sample)], return_tensors="pt")
        if images:
            kwargs["images"] = images
        enc = self.processor(**kwargs)
        ids = enc["input_ids"][0]
        labels = torch.full_like(ids, IGNORE)
        if self.train_on == "last_assistant":
            span = self.label_span(ids.tolist())
            if span is None:
                raise SampleFormatError(f"{sample.where}: no assistant turn found in the chat-template output; "
                                        "the last message must be the assistant reply")
            labels[span[0]:span[1]] = ids[span[0]:span[1]]
        mm = enc.get("mm_token_type_ids")
        mm = None if mm is None else mm[0]
        vision = {k: enc[k] for k in ("pixel_values", "image_grid_thw") if k in enc}
        target = self._target(sample, ids, mm, vision.get("image_grid_thw"), images)
        truncated = False
        if ids.numel() > self.cutoff:
            if self.overflow == "drop":
                return "too long"
            visual = self._visual(ids, mm)
            if visual[self.cutoff:].any():
                return "cut image"
            ids, labels = ids[:self.cutoff], labels[:self.cutoff]
            mm = None if mm is None else mm[:self.cutoff]
            target = None if target is None else target[:self.cutoff]
            truncated = True
        if self.train_on == "last_assistant" and not (labels != IGNORE).any():
            return "no label token"
        return Encoded(sample, ids, labels, mm, target, vision, truncated)

    def _visual(self, ids: torch.Tensor, mm: torch.Tensor | None) -> torch.Tensor:
        if mm is not None:
            return mm > 0
        return torch.isin(ids, torch.tensor(self.markers.visual_token_ids, dtype=ids.dtype))

    def _target(self, sample, ids, mm, grid, images) -> torch.Tensor | None:
        boxes = sample.region_boxes()
        if not boxes:
            return None
        from ..regions import geometry_for, target_token_mask

        if self._geometry is None:
            self._geometry = geometry_for(self.processor, family=self.family)
        g = self._geometry
        try:
            mask = target_token_mask(ids[None], self.image_token_id, grid, [boxes],
                                     [(im.height, im.width) for im in images], merge_size=g.merge_size,
                                     patch_size=g.patch_size, convention=self.box_convention, by=self.box_rule,
                                     mm_token_type_ids=None if mm is None else mm[None])
        except ValueError as e:
            raise SampleFormatError(f"{sample.where} boxes: {e}") from None
        return mask[0]

    # ------------------------------------------------------------------------------------------ batch
    def collate(self, items: Sequence[Encoded]) -> Batch:
        """Pad to the longest sample (`padding_side`); vision tensors concatenated in sample order."""
        if not items:
            raise ValueError("cannot collate an empty batch")
        S = max(e.length for e in items)
        B = len(items)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, S), dtype=torch.long)
        labels = torch.full((B, S), IGNORE, dtype=torch.long)
        has_mm = any(e.mm_token_type_ids is not None for e in items)
        mm = torch.zeros((B, S), dtype=torch.long) if has_mm else None
        has_target = any(e.target is not None for e in items)
        target = torch.zeros((B, S), dtype=torch.bool) if has_target else None
        for b, e in enumerate(items):
            n = e.length
            sl = slice(S - n, S) if self.padding_side == "left" else slice(0, n)
            ids[b, sl] = e.input_ids
            attn[b, sl] = 1
            labels[b, sl] = e.labels
            if mm is not None and e.mm_token_type_ids is not None:
                mm[b, sl] = e.mm_token_type_ids
            if target is not None and e.target is not None:
                target[b, sl] = e.target
        inputs = {"input_ids": ids, "attention_mask": attn}
        if mm is not None:
            inputs["mm_token_type_ids"] = mm
        for key in ("pixel_values", "image_grid_thw"):
            parts = [e.vision[key] for e in items if key in e.vision]
            if parts:
                inputs[key] = torch.cat(parts, dim=0)
        return Batch(inputs, labels, target, [e.sample.id for e in items])


class EncodedDataset:
    """Samples validated and encoded up front (errors before any step; drops and truncations counted).

    Encodings are kept in memory while they fit in a budget; beyond it they are re-encoded on access."""

    def __init__(self, samples: Sequence[TrainSample], collator: Collator, *, progress: bool = True,
                 cache_bytes: int = _CACHE_BYTES):
        self.collator = collator
        self.samples: list[TrainSample] = []
        self._cache: list[Encoded] | None = []
        self.dropped: dict[str, int] = {}
        self.truncated = 0
        used = 0
        for s in tqdm(samples, desc="checking data", unit="sample", disable=not progress, leave=False):
            enc = collator.encode(s)
            if isinstance(enc, str):
                self.dropped[enc] = self.dropped.get(enc, 0) + 1
                continue
            self.samples.append(s)
            self.truncated += enc.truncated
            if self._cache is not None:
                used += enc.nbytes()
                if used > cache_bytes:
                    self._cache = None
                else:
                    self._cache.append(enc)
        if not self.samples:
            raise SampleFormatError(f"no usable training sample: dropped {self.dropped} (data.cutoff = "
                                    f"{collator.cutoff}, data.overflow = {collator.overflow!r})")

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Encoded:
        if self._cache is not None:
            return self._cache[i]
        enc = self.collator.encode(self.samples[i])
        assert not isinstance(enc, str)  # the same sample encoded the same way at validation
        return enc


def load_train_samples(path: str, *, require_assistant: bool = True, limit: int | None = None,
                       system_prompt: str | None = None) -> list[TrainSample]:
    """Training samples from a JSONL file (`attn_mod.data.samples`), or GRPO prompts from a benchmark file
    that `attn_mod.eval.datasets.load_benchmark` reads (VLMEvalKit TSV, ...; `require_assistant` must be False)."""
    p = Path(path)
    if p.suffix == ".jsonl":
        return read_samples(p, require_assistant=require_assistant, limit=limit)
    if require_assistant:
        raise SampleFormatError(f"{p.name}: SFT needs a JSONL file of chat samples with assistant turns "
                                "(see README 'Training'); benchmark files serve as GRPO prompt sources only")
    return prompts_from_benchmark(p, limit=limit, system_prompt=system_prompt)


def _image_ref(src) -> str:
    if src.path is not None:
        return str(src.path)
    buf = io.BytesIO()
    src.load().save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def prompts_from_benchmark(path, *, limit: int | None = None, system_prompt: str | None = None
                           ) -> list[TrainSample]:
    """GRPO prompts from a benchmark file (VLMEvalKit TSV, JSONL, folder): images first, then the prompt text
    of `attn_mod.eval.prompts.build_prompt`; answer, answer_type, options and bbox carried for rewards."""
    from ..eval.datasets import load_benchmark
    from ..eval.prompts import build_prompt

    bench = load_benchmark(path)
    out = []
    for i, s in enumerate(bench):
        if limit is not None and i >= limit:
            break
        content = [{"type": "image"} for _ in s.images] + [{"type": "text", "text": build_prompt(s)}]
        messages = ([{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
                    if system_prompt else []) + [{"role": "user", "content": content}]
        boxes = (tuple(s.bbox),) if s.bbox and len(s.images) == 1 else None
        out.append(TrainSample(str(s.sample_id), tuple(messages), tuple(_image_ref(src) for src in s.images), boxes,
                               s.answer, s.answer_type, dict(s.options), dict(s.meta), str(Path(path).parent),
                               f"{Path(path).name} row {s.row}"))
    if not out:
        raise SampleFormatError(f"{path}: holds no samples")
    return out

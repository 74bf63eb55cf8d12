"""Training samples -> model inputs: chat template, labels, padding, TARGET masks, cutoff.

    collator = Collator(processor, model.config, cutoff=8192)
    dataset = EncodedDataset(read_samples("train.jsonl", require_assistant=True), collator)  # validates all
    batch = collator.collate([dataset[i] for i in (0, 1)])
    model(**batch.model_inputs); batch.labels; batch.target_mask

Families: `TRAIN_FAMILIES` (Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, InternVL, Gemma3, LLaVA-OneVision, Idefics3 /
SmolVLM): one processor output per sample whose vision tensors concatenate along dim 0 (Qwen's patches +
image_grid_thw, LLaVA's / Gemma3's images, InternVL's tiles, OneVision's images x crops + image_sizes,
Idefics3's images x sub-images + pixel_attention_mask), zero-padded along dim 1 where samples differ there (the
number of crops / sub-images: exactly what the processors produce for a batch), and whose per-token tensors
(mm_token_type_ids, token_type_ids) pad like input_ids. Mllama is refused: its vision tokens are only
cross-attention keys, so the AGTO image term (image keys in self-attention) does not exist there.

Labels (SFT): the tokens of the LAST assistant turn, from the first token after its header through its
end-of-turn token inclusive (`<|im_end|>`, LLaVA's `</s>`, Gemma3's `<end_of_turn>`); -100 everywhere else.
Found by the family's own labeler (`attn_mod.models`: exact token ids of the chat template's role markers, the
RESPONSE category of `attn_mod.patch`), never by character offsets. TARGET: the visual tokens inside the sample's
pixel boxes (the family adapter's `box_mask`, as `handle.set_target(boxes=...)`), handed to the patched model
with `handle.set_target(mask)`. Cutoff: a sample longer than `cutoff` tokens is truncated (its first `cutoff`
tokens kept; if that would cut an image or leave no label token it is dropped) or dropped, as configured; both
are counted.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..categories import IMAGE, RESPONSE, TARGET
from ..data.samples import SampleFormatError, TrainSample, read_samples

IGNORE = -100
TRAIN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava", "internvl", "gemma3", "llava_onevision", "idefics3",
                  "smolvlm")  # model types the collator encodes
TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")  # processor outputs aligned with input_ids (padded like it)
_CACHE_BYTES = 512 * 2**20  # keep encodings in memory while they fit (no re-encoding per step)


@dataclass
class Encoded:
    """One sample as token ids (1-D tensors) plus its vision inputs."""

    sample: TrainSample
    input_ids: torch.Tensor
    labels: torch.Tensor
    token_inputs: dict                    # (S,) tensors aligned with input_ids (mm_token_type_ids / token_type_ids)
    target: torch.Tensor | None           # (S,) bool TARGET mask or None
    vision: dict = field(default_factory=dict)  # pixel_values, image_grid_thw ... (concatenated over images)
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
    """Encodes `TrainSample`s with the processor's own chat template and pads them into a `Batch`.

    model_config: the model's config (its `model_type` picks the family adapter: labels and box geometry)."""

    def __init__(self, processor, model_config, *, cutoff: int = 8192, overflow: str = "truncate",
                 padding_side: str = "right", box_convention: str = "pixel", box_rule: str = "overlap",
                 train_on: str = "last_assistant"):
        from types import SimpleNamespace

        from ..models import get_adapter

        if overflow not in ("truncate", "drop"):
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if train_on not in ("last_assistant", "none"):
            raise ValueError(f"train_on must be 'last_assistant' or 'none', got {train_on!r}")
        family = getattr(model_config, "model_type", None)
        if family not in TRAIN_FAMILIES:
            raise NotImplementedError(
                f"attn-mod train supports the {' / '.join(TRAIN_FAMILIES)} families; {family!r} is not wired into "
                "its collator (attn_mod/trainers/data.py; Mllama: its vision tokens are only cross-attention keys, "
                "so the AGTO image term over self-attention image keys does not exist, and its cross-attention "
                "masks are not batched). For this model compute the "
                "objectives in your own loop: attn_mod.patch(model, processor) labels its tokens, "
                "attn_mod.capture(model, detach=False) gives the masses with gradients, attn_mod.trainers.losses / "
                "rewards the formulas")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = model_config
        self.adapter = get_adapter(SimpleNamespace(config=model_config))
        self.labeler = self.adapter.labeler(SimpleNamespace(config=model_config), processor)
        self.cutoff = cutoff
        self.overflow = overflow
        self.padding_side = padding_side
        self.box_convention = box_convention
        self.box_rule = box_rule
        self.train_on = train_on
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------------------------- one sample
    def render(self, sample: TrainSample) -> str:
        """Chat text: the whole conversation (SFT), or the prompt with the generation header (train_on none)."""
        if self.train_on == "none":
            return self.processor.apply_chat_template(sample.prompt_messages(), add_generation_prompt=True,
                                                      tokenize=False)
        return self.processor.apply_chat_template(list(sample.messages), tokenize=False)

    @staticmethod
    def label_span(cats: torch.Tensor) -> tuple[int, int] | None:
        """[start, end) of the last assistant turn's body through its end-of-turn token (the last run of RESPONSE
        in the family labeler's (S,) categories), or None."""
        pos = (cats == RESPONSE).nonzero().flatten()
        if pos.numel() == 0:
            return None
        end = int(pos[-1]) + 1
        start = end - 1
        while start > 0 and int(cats[start - 1]) == RESPONSE:
            start -= 1
        return start, end

    def encode(self, sample: TrainSample) -> Encoded | str:
        """The sample's `Encoded`, or a string saying why it was dropped ("too long" / "cut image" ...).
        Raises SampleFormatError (naming the sample's line) for data that cannot be used at all."""
        from ..eval.generation import processor_nests_images

        images = sample.load_images()
        if images and getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"{sample.where}: the sample has images but the processor "
                             f"({type(self.processor).__name__}) has no image processor; load the model's full "
                             "processor (attn_mod.loading.load_processor), not only its tokenizer")
        kwargs = dict(text=[self.render(sample)], return_tensors="pt")
        if images:
            kwargs["images"] = [images] if processor_nests_images(self.processor) else images
        enc = self.processor(**kwargs)
        ids = enc["input_ids"][0]
        S = ids.numel()
        tokens = {k: enc[k][0] for k in TOKEN_KEYS if isinstance(enc.get(k), torch.Tensor)}
        vision = {k: v for k, v in enc.items()
                  if k not in ("input_ids", "attention_mask", *TOKEN_KEYS) and isinstance(v, torch.Tensor)}
        cats = self.labeler(ids[None], mm_token_type_ids=None if "mm_token_type_ids" not in tokens else
                            tokens["mm_token_type_ids"][None])[0]
        labels = torch.full_like(ids, IGNORE)
        if self.train_on == "last_assistant":
            span = self.label_span(cats)
            if span is None:
                raise SampleFormatError(f"{sample.where}: no assistant turn found in the chat-template output; "
                                        "the last message must be the assistant reply")
            labels[span[0]:span[1]] = ids[span[0]:span[1]]
        target = self._target(sample, ids, {**tokens, **vision}, images)
        truncated = False
        if S > self.cutoff:
            if self.overflow == "drop":
                return "too long"
            visual = (cats == IMAGE) | (cats == TARGET)
            if visual[self.cutoff:].any():
                return "cut image"
            ids, labels = ids[:self.cutoff], labels[:self.cutoff]
            tokens = {k: v[:self.cutoff] for k, v in tokens.items()}
            target = None if target is None else target[:self.cutoff]
            truncated = True
        if self.train_on == "last_assistant" and not (labels != IGNORE).any():
            return "no label token"
        return Encoded(sample, ids, labels, tokens, target, vision, truncated)

    def _target(self, sample, ids, inputs, images) -> torch.Tensor | None:
        from ..patch import BoxTarget

        boxes = sample.region_boxes()
        if not boxes:
            return None
        target = BoxTarget([boxes], [(im.height, im.width) for im in images], None, self.box_convention,
                           self.box_rule)
        try:
            mask = self.adapter.box_mask(target, ids[None], {"input_ids": ids[None], **{
                k: (v[None] if k in TOKEN_KEYS else v) for k, v in inputs.items()}}, self.config, self.processor)
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
        token_keys = [k for k in TOKEN_KEYS if any(k in e.token_inputs for e in items)]
        tokens = {k: torch.zeros((B, S), dtype=torch.long) for k in token_keys}
        has_target = any(e.target is not None for e in items)
        target = torch.zeros((B, S), dtype=torch.bool) if has_target else None
        for b, e in enumerate(items):
            n = e.length
            sl = slice(S - n, S) if self.padding_side == "left" else slice(0, n)
            ids[b, sl] = e.input_ids
            attn[b, sl] = 1
            labels[b, sl] = e.labels
            for k in token_keys:
                if k in e.token_inputs:
                    tokens[k][b, sl] = e.token_inputs[k]
            if target is not None and e.target is not None:
                target[b, sl] = e.target
        inputs = {"input_ids": ids, "attention_mask": attn, **tokens}
        for key in dict.fromkeys(k for e in items for k in e.vision):
            parts = [e.vision[key] for e in items if key in e.vision]
            if len({tuple(p.shape[1:]) for p in parts}) > 1:
                if len({(p.dim(), tuple(p.shape[2:])) for p in parts}) > 1:
                    raise ValueError(f"cannot batch the processor's {key!r}: per-sample shapes "
                                     f"{[tuple(p.shape) for p in parts]} differ beyond dims 0 and 1")
                n = max(p.shape[1] for p in parts)  # crops / sub-images per image: zero-pad as the processor does
                parts = [torch.nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [0, n - p.shape[1]]) for p in parts]
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

"""Batched chat generation for a (possibly patched) VLM: the one place prompts become model outputs.

    outs = generate_batch(model, processor, [Request("What color?", [img])], max_new_tokens=32)
    outs[0].text

Prompts go through the processor's own chat template; batches are left-padded (the patch handles
padding and the KV cache); greedy by default. Used by the sweep runner, `attn-mod inspect`-like tools
and the harness adapters.

Image placement (VLMEvalKit / MMMU convention): a question with ``<image N>`` markers (1-based) gets image N at
each marker, the marker text replaced by the image (a marker used twice shows the image twice); images no marker
names come first, in order. Without markers every image comes first (the released Qwen-VL order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

IMAGE_MARKER = re.compile(r"<image\s*(\d+)>")


@dataclass
class Request:
    """One prompt: a question (already formatted, may hold ``<image N>`` markers), its images (PIL) in order, an
    optional system prompt."""

    question: str
    images: Sequence[Any] = field(default_factory=list)
    system: str | None = None

    def layout(self) -> tuple[list[dict], list[int]]:
        """(user-turn content items in prompt order, image order): ``order[j]`` is the index in `images` of the
        j-th image placeholder of the prompt (the order the processor must receive the images in)."""
        n = len(self.images)
        marks = list(IMAGE_MARKER.finditer(self.question))
        if not marks:
            return [{"type": "image"} for _ in range(n)] + [{"type": "text", "text": self.question}], list(range(n))
        named = [int(m.group(1)) for m in marks]
        bad = sorted({k for k in named if not 1 <= k <= n})
        if bad:
            raise ValueError(f"the question refers to <image {bad[0]}> but the request has {n} image(s): "
                             f"{self.question[:80]!r}; pass every image the markers name (numbered from 1)")
        order = [i for i in range(n) if i + 1 not in named]
        content: list[dict] = [{"type": "image"} for _ in order]
        pos = 0
        for m, k in zip(marks, named):
            if m.start() > pos:
                content.append({"type": "text", "text": self.question[pos:m.start()]})
            content.append({"type": "image"})
            order.append(k - 1)
            pos = m.end()
        if pos < len(self.question):
            content.append({"type": "text", "text": self.question[pos:]})
        return content, order

    def placed_images(self) -> list[Any]:
        """The images in prompt order (repeated where a marker repeats)."""
        return [self.images[i] for i in self.layout()[1]]


@dataclass
class Output:
    text: str
    token_ids: list[int]
    num_prompt_tokens: int  # this request's prompt tokens (padding excluded)


def chat_messages(req: Request) -> list[dict]:
    """Hugging Face chat messages: images at their ``<image N>`` markers, else first (see `Request.layout`)."""
    content = req.layout()[0]
    # list content: some templates (llava-hf's LLaVA-OneVision) render only list content and drop a string
    messages = [{"role": "system", "content": [{"type": "text", "text": req.system}]}] if req.system else []
    return messages + [{"role": "user", "content": content}]


def render_prompt(processor, req: Request) -> str:
    return processor.apply_chat_template(chat_messages(req), add_generation_prompt=True, tokenize=False)


def processor_nests_images(processor) -> bool:
    """Processors that read a flat image list as ONE sample's images (they take them nested per sample)."""
    from transformers import Gemma3Processor, Idefics3Processor, MllamaProcessor, SmolVLMProcessor

    return isinstance(processor, (Idefics3Processor, SmolVLMProcessor, Gemma3Processor, MllamaProcessor))


def encode_batch(processor, requests: Sequence[Request], device) -> dict:
    """Left-padded processor inputs for `requests` on `device`."""
    tok = getattr(processor, "tokenizer", processor)
    texts = [render_prompt(processor, r) for r in requests]
    per_sample = [list(r.placed_images()) for r in requests]
    images = [im for ims in per_sample for im in ims]
    kwargs = dict(text=texts, return_tensors="pt", padding=True)
    if images:  # Idefics3 / SmolVLM / Gemma3 / Mllama read a flat list as ONE sample's images: nest per sample
        kwargs["images"] = per_sample if processor_nests_images(processor) else images
    side = getattr(tok, "padding_side", "left")
    tok.padding_side = "left"  # decoder-only generation needs left padding; restored below
    try:
        batch = processor(**kwargs)
    finally:
        tok.padding_side = side
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def generate_batch(model, processor, requests: Sequence[Request], *, max_new_tokens: int = 32,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int | None = None, stopping_criteria=None) -> list[Output]:
    """Generate one answer per request (greedy unless `do_sample`)."""
    if not requests:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    batch = encode_batch(processor, requests, device)
    if seed is not None:
        torch.manual_seed(seed)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if stopping_criteria is not None:
        gen_kwargs["stopping_criteria"] = stopping_criteria
    with torch.no_grad():
        seqs = model.generate(**batch, **gen_kwargs)
    prompt_len = batch["input_ids"].shape[1]
    tok = getattr(processor, "tokenizer", processor)
    outs = []
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    for row, n_prompt in zip(seqs[:, prompt_len:].tolist(), prompt_tokens):
        ids = _strip_after_eos(row, model.generation_config)
        outs.append(Output(tok.decode(ids, skip_special_tokens=True).strip(), ids, int(n_prompt)))
    return outs


def _strip_after_eos(ids: list[int], generation_config) -> list[int]:
    eos = generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
    for i, t in enumerate(ids):
        if t in eos:  # everything after the first EOS is padding
            return ids[:i]
    return ids

"""Shared test helpers: tiny models, prompts with real images through the real processor path."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from attn_mod.tiny import build_tiny


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def chat_text(processor, question: str, *, answer: str | None = None, system: str | None = None,
              image: bool = True) -> str:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)


def vlm_inputs(processor, questions, sizes, *, answers=None, seed: int = 0, system: str | None = None):
    """A left-padded batch: one image of size sizes[i] per question (optionally an explicit system turn)."""
    answers = answers or [None] * len(questions)
    texts = [chat_text(processor, q, answer=a, system=system) for q, a in zip(questions, answers)]
    images = [random_image(w, h, seed + i) for i, (w, h) in enumerate(sizes)]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def twin_models(family: str, seed: int = 0):
    """Two identical tiny models (sdpa and eager) and the processor."""
    model, processor = build_tiny(family, seed=seed)
    eager, _ = build_tiny(family, seed=seed, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    return model, eager, processor


def tok_id(processor, token: str) -> int:
    return processor.tokenizer.convert_tokens_to_ids(token)


def onehot(cats: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(cats.long(), 8).to(torch.float32)

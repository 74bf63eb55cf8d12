"""Helpers for the trainer tests: tiny JSONL training data with real images and boxes, a CLI entry."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from attn_mod.data.samples import write_samples

ROOT = Path(__file__).resolve().parents[1]
TINY_SFT = ROOT / "configs" / "train" / "tiny_sft.yaml"
ENTRY = Path(__file__).resolve().parent / "_train_entry.py"


def make_data(folder: Path, n: int = 8, seed: int = 0, *, size=(56, 56), name: str = "train.jsonl",
              long_text: int = 0) -> Path:
    """n chat samples: an image (random colours) with a box, a question, a one-word answer. Every third
    sample has no system turn, every fourth no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        has_img = i % 4 != 3
        content = ([{"type": "image"}] if has_img else []) + [
            {"type": "text", "text": "What color is the square? " + "the a of " * long_text}]
        msgs = ([] if i % 3 == 2 else [{"role": "system", "content": "You are a helpful assistant."}])
        msgs += [{"role": "user", "content": content},
                 {"role": "assistant", "content": ["red", "blue", "green"][i % 3] + " square"}]
        row = {"id": f"s{i}", "images": [], "messages": msgs}
        if has_img:
            w, h = size
            arr = (rng.random((h, w, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(folder / f"img{i}.png")
            row["images"] = [f"img{i}.png"]
            row["boxes"] = [[0, 0, w // 2, h // 2]]
        rows.append(row)
    return write_samples(rows, folder / name)


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("OMP_NUM_THREADS", "1")
    return e

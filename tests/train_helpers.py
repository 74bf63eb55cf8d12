"""Helpers for the trainer tests: tiny JSONL training data with real images and boxes, a CLI entry."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image

from attn_mod.data.samples import write_samples

ROOT = Path(__file__).resolve().parents[1]
TINY_SFT = ROOT / "configs" / "train" / "tiny_sft.yaml"
ENTRY = Path(__file__).resolve().parent / "_train_entry.py"


def make_data(folder: Path, n: int = 8, seed: int = 0, *, size=(56, 56), name: str = "train.jsonl",
              long_text: int = 0, sizes=None) -> Path:
    """n chat samples: an image (random colours) with a box, a question, a one-word answer. Every third
    sample has no system turn, every fourth no image. `sizes`: (W, H) of sample i's image cycles through them
    (default: all `size`)."""
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
            w, h = size if sizes is None else sizes[i % len(sizes)]
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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for `accelerate launch --main_process_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_when(proc, out: Path, rows: int) -> None:
    """SIGKILL the launcher `proc` (started with start_new_session=True) and its workers at once, with no cleanup,
    as soon as OUT/metrics.jsonl holds `rows` rows; fails if the run ended before that."""
    from attn_mod.jsonl import read_jsonl

    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(read_jsonl(out / "metrics.jsonl", repair=False)) >= rows:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

"""Atomic training checkpoints: everything needed to continue a run exactly.

    OUT/checkpoints/step-0000010/
        weights.safetensors     trainable parameters only (the full model, or the LoRA adapter)
        optimizer.pt            optimizer state
        scheduler.pt            learning-rate scheduler state
        rng-rank{R}.pt          python / numpy / torch (CPU and CUDA) RNG states of process R
        state.json              {"step", "samples_seen", "metrics": [rows so far], "config": {...}}

A checkpoint is written into a hidden temporary folder (files fsynced) that is renamed to its final name
in one step, so a folder named step-* is always complete; an interrupted write leaves only a temporary
folder, removed by the next save. After each save only the last `keep` checkpoints remain. Frozen
parameters are not saved: they are rebuilt from `model.path` (or the tiny seed) at resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    step: int
    samples_seen: int
    metrics: list[dict]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of parameters with requires_grad (contiguous CPU copies)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes and finds checkpoints under `root` (OUT/checkpoints). Multi-process: every rank calls
    `save` (each writes its RNG state); rank 0 writes the rest and publishes; `barrier` syncs ranks."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, *, rank: int = 0, barrier=lambda: None):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier

    def _tmp(self, step: int) -> Path:
        return self.root / f".tmp-{PREFIX}{step:07d}"

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, *, model, optimizer, scheduler, samples_seen: int, metrics: list[dict],
             config: dict) -> Path:
        tmp, final = self._tmp(step), self.root / f"{PREFIX}{step:07d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f".tmp-{PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        rng_file = tmp / f"rng-rank{self.rank}.pt"
        torch.save(rng_state(), rng_file)
        _fsync_file(rng_file)
        if self.rank == 0:
            save_file(trainable_state(model), tmp / "weights.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(
                {"step": step, "samples_seen": samples_seen, "metrics": metrics, "config": config}, indent=1))
            for f in tmp.iterdir():
                _fsync_file(f)
        self.barrier()
        if self.rank == 0:
            _fsync_dir(tmp)
            if final.exists():  # same step saved twice (e.g. `every` divides the last step): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return final

    @staticmethod
    def read_state(path: str | os.PathLike) -> Checkpoint:
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        return Checkpoint(path, int(state["step"]), int(state["samples_seen"]), list(state["metrics"]))

    def load(self, path: str | os.PathLike, *, model, optimizer, scheduler) -> Checkpoint:
        """Restore weights, optimizer, scheduler and this rank's RNG state from `path`."""
        path = Path(path)
        ckpt = self.read_state(path)
        weights = load_file(path / "weights.safetensors")
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = expected - weights.keys(), weights.keys() - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model's trainable parameters "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                             "resume with the same model / lora / freeze settings")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.is_file():
            raise ValueError(f"checkpoint {path} has no RNG state for process {self.rank}; resume with the same "
                             "number of processes")
        set_rng_state(torch.load(rng_file, weights_only=False))
        return ckpt

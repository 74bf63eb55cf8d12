"""Atomic training checkpoints: everything needed to continue a run exactly.

    OUT/checkpoints/step-0000010/
        weights.safetensors     trainable parameters only (the full model, or the LoRA adapter)
        optimizer.pt            optimizer state
        scheduler.pt            learning-rate scheduler state
        rng-rank{R}.pt          python / numpy / torch (CPU and CUDA) RNG states of process R
        state.json              {"step", "samples_seen", "layout", "sharded", "metrics": [rows so far],
                                 "config": {...}}

Sharded (FSDP2, `sharded=True`): weights.safetensors and optimizer.pt are replaced by one
torch.distributed.checkpoint (DCP) folder `shards/` that every rank writes its own shards into
(`__R_0.distcp`, plus `.metadata` from rank 0): {"model": trainable parameters, "optim": optimizer state},
both keyed by parameter name (`torch.distributed.checkpoint.state_dict.get_state_dict`), so no rank ever
holds the full model or optimizer state. Loading reads each rank's shards back in place.

DeepSpeed ZeRO-1/2 (`engine=` the DeepSpeedEngine): weights.safetensors and optimizer.pt are replaced by
DeepSpeed's own checkpoint folder `deepspeed/zero/` (`engine.save_checkpoint`, collective): the trainable
parameters (`mp_rank_00_model_states.pt`, frozen ones excluded) and each rank's partition of the optimizer
state and fp32 master weights (`zero_pp_rank_R_mp_rank_00_optim_states.pt`); state.json also lists the
trainable parameter names, checked at load (DeepSpeed itself loads the module non-strictly).

`layout` (state.json) is "full" (single process / DDP), "fsdp2" or "deepspeed"; a checkpoint resumes only
under the layout that wrote it.

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"
SHARDS = "shards"  # the DCP folder of a sharded checkpoint
DEEPSPEED, DS_TAG = "deepspeed", "zero"  # DeepSpeed's checkpoint folder and tag inside a checkpoint
LAYOUTS = {"full": "unsharded (single-process / DDP)", "fsdp2": "sharded (FSDP)", "deepspeed": "DeepSpeed ZeRO"}


@dataclass
class Checkpoint:
    path: Path
    step: int
    samples_seen: int
    metrics: list[dict]
    sharded: bool = False
    layout: str = "full"  # "full" | "fsdp2" | "deepspeed" (see LAYOUTS)
    trainable: list[str] | None = None  # trainable parameter names (DeepSpeed checkpoints)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            _fsync_file(f)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(d)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of parameters with requires_grad (contiguous CPU copies)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _sharded_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # trainable parameters only (frozen ones are rebuilt from the model path), as in weights.safetensors
    return StateDictOptions(ignore_frozen_params=True, **kw)


def sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """{"model": {name: DTensor shard}, "optim": {...}} of an FSDP2 model: this rank's shards only."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_sharded_options())
    return {"model": msd, "optim": osd}


def full_model_state(model: torch.nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full state dict (every parameter and buffer, or the trainable parameters only, unsharded, on CPU) of
    an FSDP2 model, on rank 0 (other ranks get {}). Collective: every rank must call it. Tied parameters (e.g.
    lm_head = embed_tokens) come back as ONE tensor under each of their names, as in `model.state_dict()`, so
    `save_pretrained` stores it once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    full = get_model_state_dict(model, options=options)
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in full and first[id(p)] in full:
            full[name] = full[first[id(p)]]
        first.setdefault(id(p), name)
    return full


@contextmanager
def unsharded_classes(model: torch.nn.Module):
    """While in the block, FSDP2-wrapped modules have their own class back. `fully_shard` swaps a module's class
    for a subclass `FSDP<Class>` defined in torch; transformers' `save_pretrained` picks the checkpoint-format key
    conversions by class and treats a class from outside transformers as custom code, so without this the final
    directory would keep the in-memory parameter names instead of the checkpoint format."""
    from torch.distributed.fsdp import FSDPModule

    swapped = []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            plain = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
            swapped.append((m, type(m)))
            m.__class__ = plain
    try:
        yield model
    finally:
        for m, cls in swapped:
            m.__class__ = cls


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
    `save` (each writes its RNG state, and with `sharded` / `engine` its weight / optimizer shards); rank 0 writes
    the rest and publishes; `barrier` syncs ranks. `sharded`: the model is FSDP2-wrapped (DTensor parameters).
    `engine`: the DeepSpeedEngine wrapping the model (ZeRO-1/2), whose own checkpoints hold weights and optimizer."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, *, rank: int = 0, barrier=lambda: None,
                 sharded: bool = False, engine=None):
        if sharded and engine is not None:
            raise ValueError("a checkpoint is either FSDP2-sharded or DeepSpeed's, not both")
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self.sharded = sharded
        self.engine = engine
        self.layout = "deepspeed" if engine is not None else "fsdp2" if sharded else "full"

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
        if self.sharded:  # collective: each rank writes its shards, rank 0 the metadata (files fsynced)
            import torch.distributed.checkpoint as dcp

            dcp.save(sharded_state(model, optimizer), storage_writer=dcp.FileSystemWriter(tmp / SHARDS))
        if self.engine is not None:  # collective: DeepSpeed writes the weights and each rank's optimizer partition
            self.engine.save_checkpoint(str(tmp / DEEPSPEED), tag=DS_TAG, client_state={}, save_latest=False,
                                        exclude_frozen_parameters=True)
            self.barrier()
        if self.rank == 0:
            if self.layout == "full":
                save_file(trainable_state(model), tmp / "weights.safetensors")
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"step": step, "samples_seen": samples_seen, "layout": self.layout, "sharded": self.sharded,
                     "metrics": metrics, "config": config}
            if self.engine is not None:
                state["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            _fsync_tree(tmp)
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
        sharded = bool(state.get("sharded", False))
        return Checkpoint(path, int(state["step"]), int(state["samples_seen"]), list(state["metrics"]), sharded,
                          state.get("layout", "fsdp2" if sharded else "full"), state.get("trainable"))

    def load(self, path: str | os.PathLike, *, model, optimizer, scheduler) -> Checkpoint:
        """Restore weights, optimizer, scheduler and this rank's RNG state from `path`."""
        path = Path(path)
        ckpt = self.read_state(path)
        if ckpt.layout != self.layout:
            raise ValueError(f"checkpoint {path} is {LAYOUTS.get(ckpt.layout, ckpt.layout)} but this run is "
                             f"{LAYOUTS[self.layout]}; resume with the same accelerate launch configuration")
        if self.sharded:
            self._load_sharded(path, model, optimizer)
        elif self.engine is not None:
            self._check_names(path, set(ckpt.trainable or ()),
                              {n for n, p in model.named_parameters() if p.requires_grad})
            loaded, _ = self.engine.load_checkpoint(str(path / DEEPSPEED), tag=DS_TAG, load_module_strict=False,
                                                    load_optimizer_states=True, load_lr_scheduler_states=False)
            if loaded is None:
                raise ValueError(f"checkpoint {path}: DeepSpeed found no checkpoint in {path / DEEPSPEED}")
        else:
            self._load_full(path, model, optimizer)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-rank{self.rank}.pt"
        if not rng_file.is_file():
            raise ValueError(f"checkpoint {path} has no RNG state for process {self.rank}; resume with the same "
                             "number of processes")
        set_rng_state(torch.load(rng_file, weights_only=False))
        return ckpt

    @staticmethod
    def _check_names(path: Path, saved: set[str], expected: set[str]) -> None:
        missing, unexpected = expected - saved, saved - expected
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the model's trainable parameters "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                             "resume with the same model / lora / freeze settings")

    def _load_full(self, path: Path, model, optimizer) -> None:
        weights = load_file(path / "weights.safetensors")
        self._check_names(path, set(weights), {n for n, p in model.named_parameters() if p.requires_grad})
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))

    def _load_sharded(self, path: Path, model, optimizer) -> None:
        """Collective: every rank reads its own shards into its parameters and optimizer state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        reader = dcp.FileSystemReader(path / SHARDS)
        saved = {k[len("model."):] for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
        state = sharded_state(model, optimizer)  # the layout to fill (this rank's shards)
        self._check_names(path, saved, set(state["model"]))
        dcp.load(state, storage_reader=reader)
        # strict=False: frozen parameters are not in the checkpoint (checked above: every trainable one is)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_sharded_options(strict=False))

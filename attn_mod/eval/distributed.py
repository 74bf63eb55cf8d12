"""Sweeps across processes / GPUs: who runs which batch, per-process result files, and the merge.

    accelerate launch --multi_gpu --num_processes 4 -m attn_mod.cli sweep CONFIG.yaml   # (or `accelerate config`)
    attn-mod sweep CONFIG.yaml --num-processes 4                                        # the same, launched for you

Work is the one-process run's fixed batches: *units* (cell, dataset, batch start) in the one-process order
(cells, then datasets, then batches). Every process reads the merged ``results.jsonl`` (nothing else writes
it while they run), keeps the units with at least one sample not stored yet, and takes every `world`-th of
them starting at its rank: ``pending[rank::world]``. Process r appends (flush + fsync per batch) to its own
``results.rank<r>.jsonl``; at the end (after a barrier) rank 0 merges every shard into ``results.jsonl`` in
the one-process order, deduplicated by (cell, dataset, sample_id), by an atomic rewrite, then deletes the
shards, and writes the summary / results.md / heatmaps. A run that is killed leaves its shards; the next run
(with any number of processes, one included) merges them first, so nothing done is lost or redone, whatever
the process count was.

Processes come from `accelerate` (``PartialState``: gloo on CPU, NCCL on GPUs); with ``device: cuda`` each
process uses its local GPU (``cuda:<local_rank>``). Outside a distributed launch everything is one process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..jsonl import read_jsonl, write_jsonl_atomic
from .results import KEY_FIELDS, record_key

__all__ = ["ProcessContext", "process_context", "shard_path", "shard_files", "merge_shards", "my_units", "launch"]

_SHARD = re.compile(r"results\.rank(\d+)\.jsonl$")


@dataclass
class ProcessContext:
    """This process's place in the run: rank, world size, its device and a barrier."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _state: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def device_for(self, device: str) -> str:
        """The device this process uses for a configured `device` ("cuda" -> its local GPU when distributed)."""
        if self.world > 1 and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device


def _launched_world() -> int:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def process_context(device: str) -> ProcessContext:
    """One process unless launched by accelerate / torchrun with WORLD_SIZE > 1 (then `PartialState`)."""
    if _launched_world() <= 1:
        return ProcessContext()
    from accelerate import PartialState

    state = PartialState(cpu=not device.startswith("cuda"))
    return ProcessContext(state.process_index, state.num_processes, state.local_process_index, state)


def shard_path(results_path: Path, rank: int) -> Path:
    return results_path.with_name(f"results.rank{rank}.jsonl")


def shard_files(out: Path) -> list[Path]:
    """The per-process result files in `out`, by rank."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("results.rank*.jsonl") if (m := _SHARD.search(p.name))]
    return [p for _, p in sorted(found)]


def merge_shards(results_path: Path, order: Callable[[tuple], object] | None = None) -> int:
    """Merge every shard next to `results_path` into it (dedup by key; sorted by `order(key)` when given,
    rows it does not know last, in file order); atomic rewrite, then the shards are deleted. Returns the
    number of rows added. Only one process may call this, while no other process writes."""
    results_path = Path(results_path)
    shards = shard_files(results_path.parent)
    if not shards and order is None:
        return 0
    rows = read_jsonl(results_path, required=KEY_FIELDS)
    seen = {record_key(r) for r in rows}
    before = len(rows)
    for sh in shards:
        for r in read_jsonl(sh, required=KEY_FIELDS):
            if record_key(r) not in seen:
                seen.add(record_key(r))
                rows.append(r)
    if order is not None:
        rank = {}
        for i, r in enumerate(rows):
            rank[id(r)] = (0, order(record_key(r)), i) if order(record_key(r)) is not None else (1, 0, i)
        rows.sort(key=lambda r: rank[id(r)])
    if shards or order is not None:
        write_jsonl_atomic(results_path, rows, sort_keys=True)
    for sh in shards:
        sh.unlink(missing_ok=True)
        sh.with_name(f".{sh.name}.lock").unlink(missing_ok=True)  # attn_mod.jsonl's append lock
    return len(rows) - before


def my_units(units: Sequence, rank: int, world: int) -> list:
    """This process's share of the pending `units` (already in the one-process order): every world-th."""
    return list(units[rank::world])


def launch(argv: Sequence[str], num_processes: int, *, cpu: bool) -> int:
    """Run ``attn-mod <argv>`` in `num_processes` processes through ``accelerate launch`` (free port on
    127.0.0.1); returns its exit code."""
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "attn_mod.cli", *argv]
    env = dict(os.environ)
    if cpu:
        env.setdefault("ACCELERATE_USE_CPU", "true")
    return subprocess.call(cmd, env=env)

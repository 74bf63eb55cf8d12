"""Append-only JSONL results with resume: one line per (cell, dataset, sample), flushed and fsynced per batch.

A crash loses at most the batch in flight; a torn last line (crash mid-write) is dropped on load.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable


def record_key(rec: dict) -> tuple[str, str, str]:
    return rec["cell"], rec["dataset"], rec["sample_id"]


class ResultStore:
    """`path`: the JSONL file. `done` holds the keys already written (loaded on open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[tuple[str, str, str]] = set()
        self._repair_and_load()

    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with self.path.open("rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    if not raw.endswith(b"\n"):
                        raise ValueError("unterminated line")
                except ValueError:
                    warnings.warn(f"{self.path}: dropping a torn line at byte {good_bytes} (interrupted write)")
                    break
                self.done.add(record_key(rec))
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good_bytes)

    def append(self, records: Iterable[dict]) -> None:
        lines = []
        for rec in records:
            key = record_key(rec)
            if key in self.done:
                raise RuntimeError(f"result {key} is already stored; refusing to write a duplicate row")
            lines.append(json.dumps(rec, sort_keys=True) + "\n")
            self.done.add(key)
        if not lines:
            return
        with self.path.open("a") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def load(self) -> list[dict]:
        if not self.path.exists():
            return []
        with self.path.open() as f:
            return [json.loads(line) for line in f if line.strip()]

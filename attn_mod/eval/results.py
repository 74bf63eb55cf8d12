"""Append-only JSONL results with resume: one line per (cell, dataset, sample), flushed and fsynced per batch.

Reading and writing follow `attn_mod.jsonl`: a crash loses at most the batch in flight, a torn LAST line is
truncated on open, any other bad line (not JSON, missing cell / dataset / sample_id) is quarantined to
``results.jsonl.quarantine.jsonl`` with its line number and reason; no valid row is ever dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..jsonl import append_jsonl, as_row, read_jsonl

KEY_FIELDS = ("cell", "dataset", "sample_id")


def record_key(rec: dict) -> tuple[str, str, str]:
    return rec["cell"], rec["dataset"], rec["sample_id"]


class ResultStore:
    """`path`: the JSONL file. `done` holds the keys already written (loaded, and repaired, on open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict] = read_jsonl(self.path, required=KEY_FIELDS)
        self.done: set[tuple[str, str, str]] = {record_key(r) for r in self._rows}

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        keys = [record_key(r) for r in records]
        for key in keys:
            if key in self.done:
                raise RuntimeError(f"result {key} is already stored; refusing to write a duplicate row")
        if len(set(keys)) != len(keys):
            raise RuntimeError("a batch of results holds the same (cell, dataset, sample_id) twice")
        append_jsonl(self.path, records, sort_keys=True)
        self.done.update(keys)
        self._rows.extend(as_row(r) for r in records)

    def load(self) -> list[dict]:
        """Every stored row, in file order."""
        return list(self._rows)

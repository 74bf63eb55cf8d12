"""A keyed view of one append-only JSONL file (`attn_mod.jsonl`'s rules), the storage of every pipeline stage.

    log = JsonlLog("out/stage_b.jsonl")          # repairs the file, loads the rows already written
    if "q17" not in log: log.append({"id": "q17", ...})   # one line, flushed and fsynced

On open the file is read with `attn_mod.jsonl.read_jsonl` (a torn last line is cut; any other bad line is
moved to ``<name>.quarantine.jsonl`` and every valid row stays); here a row is also bad when its key is not a
non-empty string or repeats an earlier row's key. `append` is thread-safe and refuses a second row with the
same key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from ..jsonl import append_jsonl, as_row, quarantine_path, read_jsonl, scan_jsonl

__all__ = ["JsonlLog"]


class JsonlLog:
    """Rows of one JSONL file by `key` (default "id"), in file order."""

    def __init__(self, path: str | os.PathLike, *, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.quarantine_path = quarantine_path(self.path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scan = scan_jsonl(self.path, required=(key,), check=self._checker())
        self.quarantined = len(scan.bad)  # damaged lines moved out when this log was opened
        self.truncated = scan.torn is not None  # a torn last line was cut when this log was opened
        rows = scan.rows
        if scan.bad or scan.torn is not None or scan.unterminated_ok:
            rows = read_jsonl(self.path, required=(key,), check=self._checker())
        self._rows: dict[str, dict] = {r[key]: r for r in rows}

    def _checker(self):
        seen: set[str] = set()

        def check(row: dict) -> str | None:
            k = row.get(self.key)
            if not isinstance(k, str) or not k:
                return f"{self.key!r} is not a non-empty string"
            if k in seen:
                return f"duplicate {self.key} {k!r} (the first row with it is kept)"
            seen.add(k)
            return None

        return check

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self._rows.values()))

    def get(self, key: str, default=None):
        return self._rows.get(key, default)

    def append(self, row: dict) -> None:
        """Write one row (one line, flushed and fsynced); keeps it exactly as a reload would read it."""
        key = row.get(self.key)
        if not isinstance(key, str) or not key:
            raise ValueError(f"a row of {self.path.name} needs a non-empty string {self.key!r}, got {key!r}")
        with self._lock:
            if key in self._rows:
                raise RuntimeError(f"{self.path.name}: {self.key} {key!r} is already stored; refusing a duplicate")
            append_jsonl(self.path, [row], sort_keys=True)
            self._rows[key] = as_row(row)

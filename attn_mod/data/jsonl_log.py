"""Append-only JSONL keyed by id, crash-safe and resumable: the storage of every data-pipeline stage.

    log = JsonlLog("out/stage_b.jsonl")          # repairs the file, loads the rows already written
    if "q17" not in log: log.append({"id": "q17", ...})   # one line, flushed and fsynced

Repair on open (nothing valid is ever lost):

* a torn LAST line (a crash mid-write: no trailing newline and not valid JSON) is truncated away; a last
  line that is complete JSON but lacks its newline gets the newline;
* a damaged line anywhere else (not JSON, not an object, no string id, or an id already seen) is moved to
  ``<name>.quarantine.jsonl`` (with its line number, the reason and the raw text) and the file is rewritten
  without it (temp file + fsync + rename), so every valid row stays and later appends stay parseable.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["JsonlLog"]


class JsonlLog:
    """Rows of one JSONL file by `key` (default "id"), in file order; `append` is thread-safe."""

    def __init__(self, path: str | os.PathLike, *, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.quarantine_path = self.path.with_name(self.path.stem + ".quarantine.jsonl")
        self.quarantined = 0  # damaged lines moved out when this log was opened
        self.truncated = False  # a torn last line was cut when this log was opened
        self._rows: dict[str, dict] = {}
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_and_load()

    # ------------------------------------------------------------------ loading
    def _repair_and_load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        last_terminated = raw.endswith(b"\n")
        if last_terminated:
            lines = lines[:-1]
        good: list[bytes] = []
        bad: list[tuple[int, str, bytes]] = []
        rewrite = False
        for n, line in enumerate(lines, start=1):
            is_last = n == len(lines)
            if not line.strip():
                rewrite = True  # blank lines are dropped silently
                continue
            obj, why = self._decode(line)
            if why is None and obj[self.key] in self._rows:
                why = f"duplicate {self.key} {obj[self.key]!r}"
            if why is not None:
                if is_last and not last_terminated:  # torn write of the last line
                    self.truncated = True
                    warnings.warn(f"{self.path}: dropping a torn last line ({len(line)} bytes, interrupted write)")
                else:
                    bad.append((n, why, line))
                rewrite = True
                continue
            if is_last and not last_terminated:
                rewrite = True  # complete JSON without its newline: keep it, add the newline
            self._rows[obj[self.key]] = obj
            good.append(line)
        if bad:
            self._quarantine(bad)
        if rewrite:
            self._rewrite(good)

    def _decode(self, line: bytes) -> tuple[dict | None, str | None]:
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, f"not valid JSON ({e})"
        if not isinstance(obj, dict):
            return None, f"not a JSON object ({type(obj).__name__})"
        if not isinstance(obj.get(self.key), str) or not obj[self.key]:
            return None, f"no string {self.key!r}"
        return obj, None

    def _quarantine(self, bad: list[tuple[int, str, bytes]]) -> None:
        self.quarantined = len(bad)
        with self.quarantine_path.open("a") as f:
            for n, why, line in bad:
                f.write(json.dumps({"file": self.path.name, "line": n, "reason": why,
                                    "raw": line.decode("utf-8", errors="replace")}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        warnings.warn(f"{self.path}: moved {len(bad)} damaged line(s) to {self.quarantine_path} "
                      f"(first: line {bad[0][0]}, {bad[0][1]}); all valid rows were kept")

    def _rewrite(self, good: list[bytes]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(line + b"\n" for line in good))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ access
    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(list(self._rows.values()))

    def get(self, key: str, default=None):
        return self._rows.get(key, default)

    def append(self, row: dict) -> None:
        """Write one row (one line, flushed and fsynced). A second row with the same key is an error."""
        key = row.get(self.key)
        if not isinstance(key, str) or not key:
            raise ValueError(f"a row of {self.path.name} needs a non-empty string {self.key!r}, got {key!r}")
        line = json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
        with self._lock:
            if key in self._rows:
                raise RuntimeError(f"{self.path.name}: {self.key} {key!r} is already stored; refusing a duplicate")
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self._rows[key] = row

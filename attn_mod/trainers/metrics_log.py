"""Crash-safe JSONL: one JSON object per line, appended with flush + fsync.

    log = MetricsLog("OUT/metrics.jsonl")
    log.append({"step": 1, "loss": 2.3})          # durable when it returns
    rows = read_jsonl("OUT/metrics.jsonl")        # a torn LAST line (crash mid-write) is dropped and truncated

Only a torn last line is ever removed; a damaged line in the middle is an error naming the line (a
valid row is never silently lost). `rewrite` replaces the file atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


def _line(obj: dict) -> bytes:
    return (json.dumps({k: _clean(v) for k, v in obj.items()}, ensure_ascii=False) + "\n").encode()


def read_jsonl(path: str | os.PathLike, *, repair: bool = True) -> list[dict]:
    """All rows of a JSONL file ([] if absent). A torn last line (no trailing newline, or not JSON) is
    dropped, and with `repair` the file is truncated to its last complete line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows: list[dict] = []
    good_end = 0
    pos = 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        end = pos + len(line) + (0 if last else 1)
        if line.strip():
            try:
                rows.append(json.loads(line))
                if last:  # complete JSON but no newline: keep it, add the newline on repair
                    if repair:
                        with path.open("ab") as f:
                            f.write(b"\n")
                            f.flush()
                            os.fsync(f.fileno())
                    end += 1
            except json.JSONDecodeError:
                if not last:
                    raise ValueError(f"{path} line {i + 1}: not valid JSON (only a torn last line is repaired)")
                if repair:
                    with path.open("r+b") as f:
                        f.truncate(good_end)
                        f.flush()
                        os.fsync(f.fileno())
                break
        good_end = end
        pos = end
    return rows


class MetricsLog:
    """Append-only JSONL log; every `append` is flushed and fsynced."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, obj: dict) -> None:
        with self.path.open("ab") as f:
            f.write(_line(obj))
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def rewrite(self, rows: Iterable[dict]) -> None:
        """Replace the file's content with `rows`, atomically."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for r in rows:
                    f.write(_line(r))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

"""Append-only JSONL files that never lose a valid row: the one rule for results, metrics and stage files.

    append_jsonl(path, [{"step": 1, "loss": 0.3}])          # one write, flush, fsync per call
    rows = read_jsonl(path, required=("step",))               # every valid row, in file order

The rule, applied by `read_jsonl` (with `repair=True`, the default):

* A torn LAST line (no trailing newline and not a valid row: an append interrupted mid-write) is cut off
  with a warning. An unterminated last line that IS a valid row is kept and its newline added.
* Any other bad line (not JSON, not a JSON object, missing one of `required`, or rejected by `check`) is
  QUARANTINED: copied to the side file ``<path>.quarantine.jsonl`` as
  ``{"file": ..., "line": N, "reason": ..., "text": ...}`` (N is the 1-based line number in the file as it
  was found), then removed from `path` by an atomic rewrite (temp file, fsync, rename) that keeps every valid
  row byte for byte. One warning names the lines, the reasons and the side file.
* Blank lines are ignored (and dropped when the file is rewritten).

With `repair=False` the file is never modified: bad lines are skipped with the same warning.
Writers append whole lines in one `write` so that only the last line can ever be torn. Appends and repairs
hold an exclusive advisory lock (``.<name>.lock`` beside the file, POSIX `flock`), so several processes may
append to one file (e.g. distributed sweep workers) and a reader never cuts a line another process is writing.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = ["BadLine", "JsonlScan", "append_jsonl", "as_row", "quarantine_path", "read_jsonl", "scan_jsonl",
           "write_jsonl_atomic", "write_text_atomic"]

QUARANTINE_SUFFIX = ".quarantine.jsonl"


try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: single-process use only
    fcntl = None


@contextmanager
def _locked(path: Path):
    """Exclusive advisory lock for appending to / repairing `path` (no-op where flock is unavailable)."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def quarantine_path(path: str | Path) -> Path:
    """The side file that receives the bad lines of `path`."""
    path = Path(path)
    return path.with_name(path.name + QUARANTINE_SUFFIX)


@dataclass(frozen=True)
class BadLine:
    line: int  # 1-based line number in the file as scanned
    reason: str
    text: str


@dataclass
class JsonlScan:
    """What `scan_jsonl` found: valid rows, bad lines, and the torn tail (bytes after the last newline)."""

    rows: list[dict]
    bad: list[BadLine]
    torn: bytes | None  # unterminated last line that is not a valid row, else None
    unterminated_ok: bool  # the last line is a valid row but lacks its newline
    keep: list[bytes]  # raw lines of the valid rows (newline-terminated), for rewriting


def _problem(raw: bytes, required: Sequence[str], check: Callable[[dict], str | None] | None):
    """(row, None) for a valid line, (None, reason) otherwise."""
    try:
        row = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(row, dict):
        return None, f"not a JSON object (got {type(row).__name__})"
    missing = [k for k in required if k not in row]
    if missing:
        return None, f"missing key(s) {missing} (every row needs {list(required)})"
    if check is not None:
        reason = check(row)
        if reason:
            return None, reason
    return row, None


def scan_jsonl(path: str | Path, *, required: Sequence[str] = (),
               check: Callable[[dict], str | None] | None = None) -> JsonlScan:
    """Read `path` without modifying it (see the module rule); a missing file is empty."""
    path = Path(path)
    scan = JsonlScan([], [], None, False, [])
    if not path.exists():
        return scan
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        row, reason = _problem(raw, required, check)
        if reason is None:
            scan.rows.append(row)
            scan.keep.append(raw + b"\n")
        else:
            scan.bad.append(BadLine(i, reason, raw.decode("utf-8", errors="replace")))
    if tail.strip():
        row, reason = _problem(tail, required, check)
        if reason is None:
            scan.rows.append(row)
            scan.keep.append(tail + b"\n")
            scan.unterminated_ok = True
        else:
            scan.torn = tail
    return scan


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rewrite(path: Path, lines: list[bytes]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_jsonl(path: str | Path, *, required: Sequence[str] = (), check: Callable[[dict], str | None] | None = None,
               repair: bool = True) -> list[dict]:
    """Every valid row of the JSONL file `path` (a list of dicts, file order; [] if it does not exist).

    required: keys every row must have; check(row) -> None or the reason a row is invalid. With
    `repair`, a torn last line is truncated and other bad lines are quarantined (module docstring).
    """
    path = Path(path)
    if not repair or not path.exists():
        return _report(path, scan_jsonl(path, required=required, check=check), repair=False)
    with _locked(path):
        return _report(path, scan_jsonl(path, required=required, check=check), repair=True)


def _report(path: Path, scan: JsonlScan, *, repair: bool) -> list[dict]:
    """Warn about (and with `repair`, fix) what `scan` found; returns the valid rows."""
    if scan.bad:
        side = quarantine_path(path)
        shown = "; ".join(f"line {b.line}: {b.reason}" for b in scan.bad[:5])
        more = f" (and {len(scan.bad) - 5} more)" if len(scan.bad) > 5 else ""
        if repair:
            with side.open("a", encoding="utf-8") as f:
                for b in scan.bad:
                    f.write(json.dumps({"file": path.name, "line": b.line, "reason": b.reason, "text": b.text}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            warnings.warn(f"{path}: quarantined {len(scan.bad)} bad line(s) to {side} — {shown}{more}; "
                          f"all {len(scan.rows)} valid rows kept", stacklevel=3)
        else:
            warnings.warn(f"{path}: skipping {len(scan.bad)} bad line(s) — {shown}{more}", stacklevel=3)
    if scan.torn is not None:
        warnings.warn(f"{path}: {'dropping' if repair else 'ignoring'} a torn last line of {len(scan.torn)} bytes "
                      f"(an interrupted write): {scan.torn[:80]!r}", stacklevel=3)
    if repair and (scan.bad or scan.torn is not None or scan.unterminated_ok):
        if scan.bad:
            _rewrite(path, scan.keep)
        else:  # only the tail changes: truncate (torn) or terminate (valid) in place
            size = path.stat().st_size
            with path.open("r+b") as f:
                if scan.torn is not None:
                    f.truncate(size - len(scan.torn))
                else:
                    f.seek(0, os.SEEK_END)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
    return scan.rows


def append_jsonl(path: str | Path, records: Iterable[dict], *, sort_keys: bool = False, default=None) -> int:
    """Append `records` as JSON lines in ONE write, then flush and fsync; returns the number written.

    The parent folder is created. NaN / inf are written as null (strict JSON).
    """
    path = Path(path)
    lines = [json.dumps(_strict(r), sort_keys=sort_keys, default=default, allow_nan=False) + "\n" for r in records]
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path), path.open("a", encoding="utf-8") as f:  # opened per call: sees a repaired file
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
    return len(lines)


def as_row(record: dict, default=None) -> dict:
    """`record` exactly as `read_jsonl` will return it after `append_jsonl` (NaN -> None, tuples -> lists)."""
    return json.loads(json.dumps(_strict(record), default=default, allow_nan=False))


def _strict(x):
    if isinstance(x, float):
        return x if x == x and x not in (float("inf"), float("-inf")) else None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` by `text` (temp file, fsync, rename): a kill mid-write leaves the old file whole."""
    path = Path(path)
    with _locked(path):
        _rewrite(path, [text.encode()])


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict], *, sort_keys: bool = False, default=None) -> None:
    """Replace `path` by `rows` (one JSON line each, as `append_jsonl` writes them): temp file, fsync, rename."""
    path = Path(path)
    lines = [(json.dumps(_strict(r), sort_keys=sort_keys, default=default, allow_nan=False) + "\n").encode()
             for r in rows]
    with _locked(path):
        _rewrite(path, lines)

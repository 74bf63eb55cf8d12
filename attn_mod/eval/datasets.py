"""Local benchmark files as a stream of `Sample` records (no network, images decoded only on access).

    bench = load_benchmark("LMUData/MMStar.tsv")          # VLMEvalKit TSV
    bench = load_benchmark("data/chart.jsonl", columns={"question": "query", "answer": "label"})
    bench = load_benchmark("data/my_set/")                # a folder: annotations.jsonl/.json + images
    len(bench); bench[3]; for s in bench: s.sample_id, s.question, s.options, s.load_image(), s.bbox

Formats (chosen by extension, or `format=`):

* ``.tsv`` - VLMEvalKit convention: ``index``, ``image`` (base64; a string of <= 64 characters is the index of
  another row whose image is reused; a Python/JSON list literal holds several images) or ``image_path`` (paths
  relative to the file), ``question``, optional ``hint``, option columns ``A``..``Z`` (empty / NaN = absent),
  ``answer``, ``category``, any other column (``split``, ``l2-category`` ...) goes to `Sample.meta`.
* ``.jsonl`` / ``.json`` (a list of objects, ``{"data": [...]}``, or ``{id: object}``) / ``.parquet`` - image
  paths relative to the file (or `image_root`); also base64 / data URIs, raw bytes and Hugging Face
  ``{"bytes", "path"}`` image structs; options as letter columns or an ``options`` / ``choices`` list or dict.
* a directory - one annotation file (``annotations.jsonl`` / ``.json``, else the only ``*.jsonl`` / ``*.json``),
  images referenced relative to it (``images/`` is searched too) or, with no image column, named ``<index>.<ext>``.

Columns are found by the names in `DEFAULT_COLUMNS` (first present wins); `columns={"field": "column"}`
overrides them (``None`` disables a field). A target region comes from a ``bbox`` column (JSON list: one box
``[x0, y0, x1, y1]`` or a list of boxes; `bbox_format="xywh"` for COCO-style) or ``x0/y0/x1/y1`` columns, in pixels.

Errors name the file, the 0-based data row and the column or image:
``DatasetError: mmstar.tsv row 17: column 'answer' is missing``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import math
import os
import random
import re
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from attn_mod.eval.scoring import parse_number

__all__ = [
    "ANSWER_TYPES",
    "DEFAULT_COLUMNS",
    "Benchmark",
    "DatasetError",
    "ImageSource",
    "Sample",
    "load_benchmark",
    "make_synthetic_benchmark",
]

ANSWER_TYPES = ("choice", "number", "yesno", "text")

# field -> candidate column names, first present wins
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "index": ("index", "id", "pid", "question_id", "sample_id"),
    "question": ("question", "query", "prompt"),
    "answer": ("answer", "gt_answer", "ground_truth"),
    "hint": ("hint",),
    "options": ("options", "choices"),
    "category": ("category", "task", "subject"),
    "image": ("image", "images", "image_path", "img_path", "image_file", "file_name"),
    "answer_type": ("answer_type",),
    "question_type": ("question_type",),
    "bbox": ("bbox", "bboxes", "box", "target_bbox"),
}
_BOX_COLUMNS = (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"))
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# answer_type / question_type vocabularies of common benchmarks -> ours (None: infer from the answer)
_TYPE_NAMES = {
    "choice": "choice", "multi_choice": "choice", "multi-choice": "choice", "multiple_choice": "choice",
    "multiple-choice": "choice", "mcq": "choice",
    "number": "number", "numeric": "number", "integer": "number", "float": "number",
    "yesno": "yesno", "yes/no": "yesno", "yorn": "yesno", "boolean": "yesno", "bool": "yesno",
    "text": "text", "list": "text", "open": "text",
    "free_form": None, "free-form": None, "open_ended": None,
}

Box = tuple[float, float, float, float]


class DatasetError(ValueError):
    """A benchmark file or one of its rows cannot be read; the message names the file, row and column."""


# --------------------------------------------------------------------------------------------- images


class ImageSource:
    """A lazily decoded image: a file `path`, `data` (base64 text, optionally a data URI, or encoded bytes), or
    `fetch`, a callable returning base64 text, bytes, a PathLike or a PIL image. `load()` (or calling it) gives a
    PIL RGB image; `size` reads only the header. `where` ("file row N") prefixes error messages."""

    __slots__ = ("path", "_data", "_fetch", "where", "_size")

    def __init__(
        self,
        *,
        path: str | os.PathLike | None = None,
        data: str | bytes | None = None,
        fetch: Callable[[], Any] | None = None,
        where: str = "image",
    ):
        if sum(x is not None for x in (path, data, fetch)) != 1:
            raise ValueError("ImageSource needs exactly one of path, data, fetch")
        self.path = None if path is None else Path(path)
        self._data, self._fetch, self.where, self._size = data, fetch, where, None

    def __repr__(self) -> str:
        kind = f"path={str(self.path)!r}" if self.path else "data" if self._data is not None else "fetch"
        return f"ImageSource({kind}, where={self.where!r})"

    def _bytes_or_image(self) -> bytes | Image.Image:
        if self.path is not None:
            if not self.path.is_file():
                raise DatasetError(f"{self.where}: image file '{self.path}' not found")
            return self.path.read_bytes()
        raw = self._data if self._fetch is None else self._fetch()
        if isinstance(raw, Image.Image):
            return raw
        if isinstance(raw, (bytes, bytearray, memoryview)):
            return bytes(raw)
        if isinstance(raw, os.PathLike):
            return Path(raw).read_bytes()
        return _b64decode(str(raw), self.where)

    def _open(self) -> Image.Image:
        raw = self._bytes_or_image()
        if isinstance(raw, Image.Image):
            return raw
        try:
            return Image.open(io.BytesIO(raw))
        except Exception as exc:  # PIL raises several types for corrupt data
            raise DatasetError(f"{self.where}: cannot decode image ({type(exc).__name__}: {exc})") from exc

    def load(self) -> Image.Image:
        """Decode to an RGB image (transparent areas composited on white)."""
        img = self._open()
        try:
            img.load()
        except Exception as exc:
            raise DatasetError(f"{self.where}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        self._size = img.size
        return _to_rgb(img)

    __call__ = load

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the image header, without decoding pixels (cached)."""
        if self._size is None:
            self._size = self._open().size
        return self._size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _b64decode(text: str, where: str) -> bytes:
    text = text.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    text = re.sub(r"\s+", "", text)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)  # standard or url-safe
    except (binascii.Error, ValueError) as exc:
        raise DatasetError(f"{where}: image is not valid base64 ({exc})") from exc


# --------------------------------------------------------------------------------------------- sample


@dataclass(frozen=True, eq=False)
class Sample:
    """One benchmark item. `images` are lazy (`ImageSource`); nothing is decoded until asked for.

    `answer_type` is one of "choice" (answer = option letter), "number", "yesno" (answer "yes"/"no"), "text".
    `bbox` is a tuple of pixel boxes (x0, y0, x1, y1) or None; `row` is the 0-based data row in the source file.
    """

    index: str
    question: str
    answer: str | None
    answer_type: str
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    category: str | None = None
    images: tuple[ImageSource, ...] = ()
    bbox: tuple[Box, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    row: int = -1

    @property
    def sample_id(self) -> str:
        """Stable id: ``<benchmark name>:<index>``."""
        return f"{self.source}:{self.index}"

    @property
    def image(self) -> ImageSource | None:
        """The first image (lazy), or None."""
        return self.images[0] if self.images else None

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(width, height) of the first image from its header only, or None without an image."""
        return self.images[0].size if self.images else None

    def load_image(self) -> Image.Image:
        """The first image as PIL RGB."""
        if not self.images:
            raise DatasetError(f"{self.source} row {self.row}: sample {self.index!r} has no image")
        return self.images[0].load()

    def load_images(self) -> list[Image.Image]:
        return [im.load() for im in self.images]

    def to_record(self) -> dict[str, Any]:
        """JSON-serialisable description (no image data) for result files."""
        return {
            "sample_id": self.sample_id,
            "index": self.index,
            "category": self.category,
            "answer": self.answer,
            "answer_type": self.answer_type,
            "n_images": len(self.images),
            "bbox": None if self.bbox is None else [list(b) for b in self.bbox],
        }


# --------------------------------------------------------------------------------------------- readers


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and v.strip() in ("", "nan", "NaN")


class _Reader:
    """Raw records of one file: iterate (row, dict), count, random access."""

    label: str
    base_dir: Path

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def get(self, row: int) -> dict[str, Any]:
        raise NotImplementedError

    def columns(self) -> list[str] | None:
        """Column names when the format has a fixed header, else None (per-record keys)."""
        return None

    def image_for_index(self, index: str) -> Any:
        raise DatasetError(f"{self.label}: image references to other rows are only supported in TSV files")


def _raise_csv_limit() -> None:
    limit = sys.maxsize
    while True:  # base64 images are far beyond csv's default 128 KiB field limit
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


class _TsvReader(_Reader):
    """VLMEvalKit TSV (pandas `to_csv(sep="\\t")` quoting). Byte offsets of rows are indexed on demand, so
    `get(row)` and references to another row's image seek instead of holding the file in memory."""

    def __init__(self, path: Path):
        _raise_csv_limit()
        self.path, self.label, self.base_dir = path, path.name, path.parent
        self._offsets: list[int] | None = None
        self._index_rows: dict[str, int] | None = None
        self._ref_cache: OrderedDict[str, Any] = OrderedDict()
        with open(path, "rb") as fh:
            first = next(self._records(fh, 0), None)
        if first is None:
            raise DatasetError(f"{self.label}: empty file (no header row)")
        self._header = [h.strip() for h in first[1]]
        self._header[0] = self._header[0].lstrip("\ufeff")
        self._data_start = first[2]

    def columns(self) -> list[str]:
        return list(self._header)

    def _records(self, fh, start: int) -> Iterator[tuple[int, list[str], int]]:
        """(start offset, fields, end offset) of each record from byte `start`."""
        fh.seek(start)
        pos = [start]

        def lines():
            while True:
                line = fh.readline()
                if not line:
                    return
                pos[0] += len(line)
                try:
                    yield line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DatasetError(f"{self.label}: not UTF-8 text near byte {pos[0] - len(line)} ({exc})") from exc

        reader = csv.reader(lines(), delimiter="\t", quotechar='"', doublequote=True, strict=False)
        while True:
            begin = pos[0]
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DatasetError(f"{self.label}: malformed TSV near byte {begin} ({exc})") from exc
            if fields:  # blank lines are not rows
                yield begin, fields, pos[0]

    def _to_dict(self, row: int, fields: list[str]) -> dict[str, Any]:
        if len(fields) > len(self._header):
            raise DatasetError(f"{self.label} row {row}: {len(fields)} fields but the header has {len(self._header)}")
        return dict(zip(self._header, fields))  # short rows: trailing columns missing

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.path, "rb") as fh:
            for row, (_, fields, _) in enumerate(self._records(fh, self._data_start)):
                yield row, self._to_dict(row, fields)

    def _index(self) -> None:
        if self._offsets is not None:
            return
        offsets, by_index = [], {}
        key = "index" if "index" in self._header else None
        col = self._header.index(key) if key else None
        with open(self.path, "rb") as fh:
            for row, (begin, fields, _) in enumerate(self._records(fh, self._data_start)):
                offsets.append(begin)
                if col is not None and col < len(fields):
                    by_index.setdefault(fields[col].strip(), row)
        self._offsets, self._index_rows = offsets, by_index

    def count(self) -> int:
        self._index()
        return len(self._offsets)

    def get(self, row: int) -> dict[str, Any]:
        self._index()
        with open(self.path, "rb") as fh:
            _, fields, _ = next(self._records(fh, self._offsets[row]))
        return self._to_dict(row, fields)

    def image_for_index(self, index: str) -> Any:
        """The `image` cell of the row whose `index` is `index` (small LRU cache: references repeat)."""
        if index in self._ref_cache:
            self._ref_cache.move_to_end(index)
            return self._ref_cache[index]
        self._index()
        row = self._index_rows.get(index)
        if row is None:
            raise KeyError(index)
        value = self.get(row).get("image")
        self._ref_cache[index] = value
        if len(self._ref_cache) > 16:
            self._ref_cache.popitem(last=False)
        return value


class _JsonlReader(_Reader):
    def __init__(self, path: Path):
        self.path, self.label, self.base_dir = path, path.name, path.parent
        self._offsets: list[int] | None = None

    def _lines(self, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
        with open(self.path, "rb") as fh:
            fh.seek(start)
            pos, lineno = start, 0
            for line in fh:
                lineno += 1
                if line.strip():
                    yield pos, lineno, line
                pos += len(line)

    def _parse(self, row: int, lineno: int | None, line: bytes) -> dict[str, Any]:
        at = f"{self.label} row {row}" + (f" (line {lineno})" if lineno else "")
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{at}: invalid JSON ({exc})") from exc
        if not isinstance(rec, dict):
            raise DatasetError(f"{at}: expected a JSON object, got {type(rec).__name__}")
        return rec

    def rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for row, (_, lineno, line) in enumerate(self._lines()):
            yield row, self._parse(row, lineno, line)

    def _index(self) -> list[int]:
        if self._offsets is None:
            self._offsets = [pos for pos, _, _ in self._lines()]
        return self._offsets

    def count(self) -> int:
        return len(self._index())

    def get(self, row: int) -> dict[str, Any]:
        offset = self._index()[row]
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return self._parse(row, None, fh.readline())


class _JsonReader(_Reader):
    """A JSON list of objects, ``{"data" | "annotations" | ...: [...]}``, or ``{id: object}`` (id -> index)."""

    def __init__(self, path: Path):
        self.path, self.label, self.base_dir = path, path.name, path.parent
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{self.label}: invalid JSON ({exc})") from exc
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                data = lists[0]
            elif data and all(isinstance(v, dict) for v in data.values()):
                data = [{"index": k, **v} if "index" not in v else v for k, v in data.items()]
        if not isinstance(data, list):
            raise DatasetError(f"{self.label}: expected a list of objects (or one list inside an object)")
        for row, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DatasetError(f"{self.label} row {row}: expected a JSON object, got {type(rec).__name__}")
        self._data = data

    def rows(self):
        yield from enumerate(self._data)

    def count(self) -> int:
        return len(self._data)

    def get(self, row: int) -> dict[str, Any]:
        return self._data[row]


class _ParquetReader(_Reader):
    def __init__(self, path: Path):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is in the [eval] extra
            raise ImportError(f"reading {path.name} needs pyarrow: pip install 'attn-mod[eval]'") from exc
        self.path, self.label, self.base_dir = path, path.name, path.parent
        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:
            raise DatasetError(f"{self.label}: not a readable Parquet file ({exc})") from exc
        self._rg_starts = []
        start = 0
        for i in range(self._file.num_row_groups):
            self._rg_starts.append(start)
            start += self._file.metadata.row_group(i).num_rows

    def columns(self) -> list[str]:
        return list(self._file.schema_arrow.names)

    def rows(self):
        row = 0
        for batch in self._file.iter_batches(batch_size=64):
            for rec in batch.to_pylist():
                yield row, rec
                row += 1

    def count(self) -> int:
        return self._file.metadata.num_rows

    def get(self, row: int) -> dict[str, Any]:
        import bisect

        rg = bisect.bisect_right(self._rg_starts, row) - 1
        table = self._file.read_row_group(rg)
        return table.slice(row - self._rg_starts[rg], 1).to_pylist()[0]


def _find_annotations(directory: Path) -> Path:
    for name in ("annotations.jsonl", "annotations.json", "data.jsonl", "data.json"):
        if (directory / name).is_file():
            return directory / name
    found = sorted(p for p in directory.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"{directory}: no annotation file (annotations.jsonl / .json or one *.jsonl / *.json)")
    raise DatasetError(
        f"{directory}: several annotation files ({', '.join(p.name for p in found)}); pass the file path instead"
    )


# --------------------------------------------------------------------------------------------- benchmark


class Benchmark:
    """A local benchmark: `len()`, `bench[i]`, iteration (streamed, `limit` applied) yielding `Sample`s.

    Options: `name` (default: file stem / folder name; prefixes `sample_id`), `format` ("tsv", "jsonl", "json",
    "parquet"; default from the extension), `columns` (field -> column overrides, see `DEFAULT_COLUMNS`),
    `image_root` (base of relative image paths; default the annotation file's folder), `limit` (first N rows),
    `answer_type` (force one type for every row, e.g. "yesno" for 1/0 answers), `require_answer` /
    `require_image` (raise on rows without them; default True), `bbox_format` ("xyxy" or "xywh").

    Iteration checks that `index` values are unique, so `sample_id` is a stable key for resumable result files.
    `len()` of a TSV / JSONL file scans it once (no JSON or image decoding) and remembers row offsets, which
    `bench[i]` then seeks to; Parquet lengths come from its metadata.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        format: str | None = None,
        columns: Mapping[str, str | None] | None = None,
        image_root: str | os.PathLike | None = None,
        limit: int | None = None,
        answer_type: str | None = None,
        require_answer: bool = True,
        require_image: bool = True,
        bbox_format: str = "xyxy",
    ):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"benchmark file not found: {path}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if answer_type is not None and answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
        if bbox_format not in ("xyxy", "xywh"):
            raise ValueError(f"bbox_format must be 'xyxy' or 'xywh', got {bbox_format!r}")
        unknown = set(columns or {}) - set(DEFAULT_COLUMNS)
        if unknown:
            raise ValueError(f"unknown field(s) in columns: {sorted(unknown)}; fields are {sorted(DEFAULT_COLUMNS)}")

        self._dir_mode = path.is_dir()
        file = _find_annotations(path) if self._dir_mode else path
        fmt = (format or file.suffix.lstrip(".")).lower()
        readers = {"tsv": _TsvReader, "jsonl": _JsonlReader, "json": _JsonReader, "parquet": _ParquetReader}
        if fmt not in readers:
            raise DatasetError(f"{file.name}: unsupported format {fmt!r} (expected one of {sorted(readers)})")
        self.path = path
        self.format = fmt
        self.name = name or (path.name if self._dir_mode else path.stem)
        self._reader: _Reader = readers[fmt](file)
        self._image_root = Path(image_root) if image_root is not None else self._reader.base_dir
        self._columns = dict(columns or {})
        self.limit = limit
        self.answer_type = answer_type
        self.require_answer = require_answer
        self.require_image = require_image
        self.bbox_format = bbox_format
        self._stems: dict[str, Path] | None = None
        self._fixed = self._resolve(self._reader.columns()) if self._reader.columns() is not None else None

    def __repr__(self) -> str:
        return f"Benchmark(name={self.name!r}, format={self.format!r}, path='{self.path}')"

    # ------------------------------------------------------------------ sequence protocol
    def __len__(self) -> int:
        n = self._reader.count()
        return n if self.limit is None else min(n, self.limit)

    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.name}: sample {i} out of range (len {n})")
        return self._sample(i, self._reader.get(i))

    def __iter__(self) -> Iterator[Sample]:
        seen: dict[str, int] = {}
        for row, rec in self._reader.rows():
            if self.limit is not None and row >= self.limit:
                return
            sample = self._sample(row, rec)
            if sample.index in seen:
                raise DatasetError(
                    f"{self._reader.label} row {row}: duplicate index '{sample.index}' (also row {seen[sample.index]})"
                )
            seen[sample.index] = row
            yield sample

    # ------------------------------------------------------------------ columns
    def _resolve(self, keys) -> dict[str, Any]:
        """field -> column name (or None) for a set of available keys; also letter and box columns."""
        keys = list(keys)
        present = set(keys)
        out: dict[str, Any] = {}
        for fld, cands in DEFAULT_COLUMNS.items():
            if fld in self._columns:
                out[fld] = self._columns[fld]
            else:
                out[fld] = next((c for c in cands if c in present), None)
        out["_letters"] = [c for c in _LETTERS if c in present] if out["options"] is None else []
        out["_boxcols"] = None
        if out["bbox"] is None and "bbox" not in self._columns:
            out["_boxcols"] = next((cols for cols in _BOX_COLUMNS if all(c in present for c in cols)), None)
        out["_keys"] = keys
        return out

    def _missing(self, where: str, column: str, cols: dict[str, Any], rec: Mapping[str, Any]) -> DatasetError:
        if column not in rec and column in cols["_keys"]:  # a TSV row shorter than the header
            return DatasetError(f"{where}: column '{column}' is missing (the row has only {len(rec)} fields)")
        if column not in rec:
            return DatasetError(f"{where}: column '{column}' is missing (columns: {', '.join(map(str, cols['_keys']))})")
        return DatasetError(f"{where}: column '{column}' is missing (empty value)")

    # ------------------------------------------------------------------ record -> Sample
    def _sample(self, row: int, rec: dict[str, Any]) -> Sample:
        cols = self._fixed if self._fixed is not None else self._resolve(rec.keys())
        where = f"{self._reader.label} row {row}"
        used = {c for k, c in cols.items() if not k.startswith("_") and isinstance(c, str) and not k.endswith("_type")}
        used.update(cols["_letters"])
        used.update(cols["_boxcols"] or ())

        def value(fld: str, required: bool = False) -> Any:
            col = cols[fld]
            v = rec.get(col) if col is not None else None
            if _is_missing(v):
                if required:
                    raise self._missing(where, col or DEFAULT_COLUMNS[fld][0], cols, rec)
                return None
            return v

        index = value("index")
        index = str(row) if index is None else _scalar_str(index)
        question = value("question", required=True)
        hint = value("hint")
        answer = value("answer", required=self.require_answer)
        category = value("category")
        options = self._options(rec, cols, where)
        images = self._images(rec, cols, where, index)
        if self.require_image and not images:
            raise self._missing(where, cols["image"] or "image", cols, rec)
        bbox = self._bbox(rec, cols, where)

        answer = None if answer is None else _scalar_str(answer).strip()
        meta = {k: v for k, v in rec.items() if k not in used and not _is_missing(v)}
        declared = self.answer_type
        if declared is None:
            # MathVista: question_type multi_choice beats answer_type (which then describes the option text)
            qtype, atype = (self._declared_type(rec, cols[f], where) for f in ("question_type", "answer_type"))
            declared = "choice" if qtype == "choice" else atype or qtype
        kind, answer = _answer_type(answer, options, declared, where)
        return Sample(
            index=index,
            question=str(question),
            answer=answer,
            answer_type=kind,
            options=options,
            hint=None if hint is None else str(hint),
            category=None if category is None else _scalar_str(category),
            images=tuple(images),
            bbox=bbox,
            meta=meta,
            source=self.name,
            row=row,
        )

    @staticmethod
    def _declared_type(rec, col, where) -> str | None:
        if col is None or _is_missing(rec.get(col)):
            return None
        raw = str(rec[col]).strip().lower()
        if raw not in _TYPE_NAMES:
            raise DatasetError(f"{where}: unknown {col} {raw!r} (known: {', '.join(sorted(_TYPE_NAMES))})")
        return _TYPE_NAMES[raw]

    def _options(self, rec, cols, where) -> dict[str, str]:
        if cols["_letters"]:
            return {c: _scalar_str(rec[c]).strip() for c in cols["_letters"] if not _is_missing(rec.get(c))}
        col = cols["options"]
        raw = rec.get(col) if col is not None else None
        if _is_missing(raw):
            return {}
        if isinstance(raw, str):
            raw = _parse_literal(raw, where, col)
        if isinstance(raw, Mapping):
            return {str(k).strip().upper(): str(v).strip() for k, v in raw.items() if not _is_missing(v)}
        if isinstance(raw, (list, tuple)):
            if len(raw) > len(_LETTERS):
                raise DatasetError(f"{where}: column '{col}' has {len(raw)} options (at most 26)")
            return {_LETTERS[i]: str(v).strip() for i, v in enumerate(raw)}
        if hasattr(raw, "tolist"):  # numpy array from parquet
            return {_LETTERS[i]: str(v).strip() for i, v in enumerate(raw.tolist())}
        raise DatasetError(f"{where}: column '{col}' must be a list or mapping of options, got {type(raw).__name__}")

    def _images(self, rec, cols, where, index) -> list[ImageSource]:
        col = cols["image"]
        raw = rec.get(col) if col is not None else None
        if isinstance(self._reader, _TsvReader) and col == "image" and _is_missing(raw) and "image_path" in rec:
            col, raw = "image_path", rec.get("image_path")  # VLMEvalKit: path-only rows
        if _is_missing(raw):
            if col is None and self._dir_mode:
                return [self._image_by_stem(index, where)]
            return []
        tsv_b64 = isinstance(self._reader, _TsvReader) and col in ("image", "images")
        return [self._image_source(item, where, tsv_b64) for item in _as_list(raw, where, col)]

    def _image_source(self, item: Any, where: str, tsv_b64: bool) -> ImageSource:
        if isinstance(item, Mapping):  # Hugging Face Image struct
            if item.get("bytes") is not None:
                return ImageSource(data=bytes(item["bytes"]), where=where)
            if item.get("path"):
                return ImageSource(path=self._image_path(str(item["path"])), where=where)
            raise DatasetError(f"{where}: image struct has neither 'bytes' nor 'path'")
        if isinstance(item, (bytes, bytearray, memoryview)):
            return ImageSource(data=bytes(item), where=where)
        text = str(item).strip()
        if tsv_b64:
            if _looks_like_path(text):  # base64 has no "."; a file name in the image column is a path
                return ImageSource(path=self._image_path(text), where=where)
            if len(text) <= 64:  # VLMEvalKit: the index of another row carrying the image
                reader = self._reader

                def fetch(ref=text):
                    try:
                        target = reader.image_for_index(ref)
                    except KeyError:
                        raise DatasetError(f"{where}: image refers to index '{ref}', which is not in the file "
                                           "(the 'image' column holds base64 data, a row index or an image "
                                           "file name)") from None
                    if _is_missing(target) or len(str(target).strip()) <= 64:
                        raise DatasetError(f"{where}: image refers to index '{ref}', whose image is not base64 data")
                    return str(target)

                return ImageSource(fetch=fetch, where=where)
            return ImageSource(data=text, where=where)
        if text.startswith("data:") or len(text) > 1024:
            return ImageSource(data=text, where=where)
        return ImageSource(path=self._image_path(text), where=where)

    def _image_path(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        if p.is_absolute():
            return p
        first = self._image_root / p
        if not first.exists() and (self._image_root / "images" / p).exists():
            return self._image_root / "images" / p
        return first

    def _image_by_stem(self, index: str, where: str) -> ImageSource:
        if self._stems is None:
            self._stems = {}
            for d in (self._image_root, self._image_root / "images"):
                if d.is_dir():
                    for p in sorted(d.iterdir()):
                        if p.suffix.lower() in _IMAGE_EXTS:
                            self._stems.setdefault(p.stem, p)
        if index not in self._stems:
            raise DatasetError(f"{where}: no image column and no image file named '{index}.*' in {self._image_root}")
        return ImageSource(path=self._stems[index], where=where)

    def _bbox(self, rec, cols, where) -> tuple[Box, ...] | None:
        if cols["_boxcols"]:
            vals = [rec.get(c) for c in cols["_boxcols"]]
            if all(_is_missing(v) for v in vals):
                return None
            if any(_is_missing(v) for v in vals):
                raise DatasetError(f"{where}: bbox columns {', '.join(cols['_boxcols'])} are partly empty")
            raw: Any = [vals]
        else:
            col = cols["bbox"]
            raw = rec.get(col) if col is not None else None
            if _is_missing(raw):
                return None
            if isinstance(raw, str):
                raw = _parse_literal(raw, where, col)
            if hasattr(raw, "tolist"):
                raw = raw.tolist()
            if not isinstance(raw, (list, tuple)):
                raise DatasetError(f"{where}: column '{col}' must be a list [x0, y0, x1, y1] or a list of boxes")
            if not raw:
                return None
            raw = [list(b) if isinstance(b, (list, tuple)) else b for b in raw]
            if not isinstance(raw[0], list):
                raw = [raw]
        boxes = []
        for b in raw:
            try:
                nums = [float(x) for x in b]
            except (TypeError, ValueError):
                raise DatasetError(f"{where}: bbox {b!r} is not numeric") from None
            if len(nums) != 4 or not all(math.isfinite(x) for x in nums):
                raise DatasetError(f"{where}: bbox {b!r} must be 4 finite numbers")
            x0, y0, a, b2 = nums
            x1, y1 = (x0 + a, y0 + b2) if self.bbox_format == "xywh" else (a, b2)
            if x1 < x0 or y1 < y0:
                raise DatasetError(f"{where}: bbox {b!r} has x1 < x0 or y1 < y0")
            boxes.append((x0, y0, x1, y1))
        return tuple(boxes)


def _looks_like_path(text: str) -> bool:
    """An image file name (base64 data and row indices never end in ".png", ".jpg", ...)."""
    return len(text) < 4096 and Path(text).suffix.lower() in _IMAGE_EXTS


def _scalar_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _parse_literal(text: str, where: str, col: str) -> Any:
    text = text.strip()
    if not text or text[0] not in "[{(":
        raise DatasetError(f"{where}: column '{col}' is not a list: {text[:40]!r}")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        try:
            return ast.literal_eval(text)  # VLMEvalKit writes Python list literals
        except (ValueError, SyntaxError) as exc:
            raise DatasetError(f"{where}: column '{col}' cannot be parsed ({exc})") from exc


def _as_list(raw: Any, where: str, col: str) -> list[Any]:
    if isinstance(raw, str):
        s = raw.strip()
        if s.startswith("[") and s.endswith("]"):
            return [x for x in _parse_literal(s, where, col) if not _is_missing(x)]
        return [s]
    if isinstance(raw, (list, tuple)):
        return [x for x in raw if not _is_missing(x)]
    if hasattr(raw, "tolist") and not isinstance(raw, (bytes, bytearray)):
        return [x for x in raw.tolist() if not _is_missing(x)]
    return [raw]


def _letter_of(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer names: "B", "(B)", "B." or an option's exact text."""
    a = answer.strip()
    m = re.fullmatch(r"[(\[]?\s*([A-Za-z])\s*[)\].:]?", a)
    if m and (not options or m.group(1).upper() in options):
        return m.group(1).upper()
    hits = [k for k, v in options.items() if v.strip().lower() == a.lower()]
    return hits[0] if len(hits) == 1 else None


def _answer_type(answer: str | None, options: Mapping[str, str], declared: str | None, where: str):
    """(answer_type, normalised answer): declared type (validated) or inferred from options / the answer."""
    if declared == "choice" or (declared is None and options and answer is not None and _letter_of(answer, options)):
        if answer is None:
            return "choice", None
        letter = _letter_of(answer, options)
        if letter is None:
            raise DatasetError(f"{where}: answer {answer!r} is neither an option letter nor an option text")
        return "choice", letter
    if answer is None:
        return declared or ("choice" if options else "text"), None
    if declared == "yesno" or (declared is None and answer.lower().strip(".") in ("yes", "no")):
        a = answer.lower().strip(".")
        norm = {"yes": "yes", "true": "yes", "1": "yes", "no": "no", "false": "no", "0": "no"}.get(a)
        if norm is None:
            raise DatasetError(f"{where}: answer {answer!r} is not yes/no")
        return "yesno", norm
    if declared == "number" or (declared is None and parse_number(answer) is not None):
        if parse_number(answer) is None:
            raise DatasetError(f"{where}: answer {answer!r} is not a number")
        return "number", answer
    return "text", answer


def load_benchmark(path: str | os.PathLike, **kwargs: Any) -> Benchmark:
    """Open a local benchmark (TSV / JSONL / JSON / Parquet file, or a directory); see `Benchmark` for options:
    name, format, columns, image_root, limit, answer_type, require_answer, require_image, bbox_format."""
    return Benchmark(path, **kwargs)


# --------------------------------------------------------------------------------------------- synthetic data

_COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
}
_SHAPES = ("square", "circle", "triangle")
_SYNTH_COLUMNS = ["index", "image", "question", "A", "B", "C", "D", "answer", "answer_type", "category", "bbox", "split"]


def _draw(draw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=color)
    elif shape == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=color)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=color)


def _place(rng: random.Random, w: int, h: int, sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes (2 px apart) for shapes of the given sizes."""
    boxes: list[tuple[int, int, int, int]] = []
    for s in sizes:
        for _ in range(500):
            x0, y0 = rng.randint(1, w - s - 1), rng.randint(1, h - s - 1)
            box = (x0, y0, x0 + s, y0 + s)
            if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1] or b[3] + 2 <= box[1] for b in boxes):
                boxes.append(box)
                break
        else:  # pragma: no cover - canvases are large enough for 5 shapes of <= 16 px
            raise RuntimeError("could not place synthetic shapes")
    return boxes


def _synthetic_item(rng: random.Random, i: int) -> dict[str, Any]:
    from PIL import ImageDraw

    w = rng.randrange(64, 129, 8)
    h = rng.choice([v for v in range(48, 97, 8) if v != w])
    img = Image.new("RGB", (w, h), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    colors = list(_COLORS)
    kind = ("color", "count", "existence", "shape")[i % 4]
    row: dict[str, Any] = {k: "" for k in _SYNTH_COLUMNS}
    row.update(index=str(i), category=kind, split="synthetic")

    if kind == "color":
        target, *others = rng.sample(colors, 4)
        objs = [("square", target)] + [(rng.choice(("circle", "triangle")), c) for c in others[: rng.randint(1, 2)]]
        letters_order = [target] + others
        rng.shuffle(letters_order)
        row.update(question="What color is the square?", answer_type="choice")
        row.update({ltr: c for ltr, c in zip("ABCD", letters_order)})
        row["answer"] = "ABCD"[letters_order.index(target)]
        target_ids = [0]
    elif kind == "count":
        k = rng.randint(1, 4)
        circle_color = rng.choice(colors)
        extra = rng.randint(0, 1)
        objs = [("circle", circle_color)] * k + [(rng.choice(("square", "triangle")), rng.choice(colors)) for _ in range(extra)]
        row.update(question="How many circles are there in the image?", answer=str(k), answer_type="number")
        target_ids = list(range(k))
    elif kind == "existence":
        present = (i // 4) % 2 == 0  # balanced yes / no
        objs = [(rng.choice(("square", "circle")), rng.choice(colors)) for _ in range(rng.randint(1, 2))]
        if present:
            objs.insert(0, ("triangle", rng.choice(colors)))
        row.update(question="Is there a triangle in the image?", answer="Yes" if present else "No", answer_type="yesno")
        target_ids = [0] if present else []
    else:
        target_color, *others = rng.sample(colors, 3)
        shape = rng.choice(_SHAPES)
        objs = [(shape, target_color)] + [(rng.choice(_SHAPES), c) for c in others[: rng.randint(1, 2)]]
        row.update(question=f"What shape is the {target_color} object?", answer=shape, answer_type="text")
        target_ids = [0]

    sizes = [rng.randint(10, 16) for _ in objs]
    boxes = _place(rng, w, h, sizes)
    for (shape, color), box in zip(objs, boxes):
        _draw(draw, shape, box, _COLORS[color])
    tboxes = [list(boxes[j]) for j in target_ids]
    row["bbox"] = "" if not tboxes else json.dumps(tboxes[0] if len(tboxes) == 1 else tboxes)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    row["image"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return row


def make_synthetic_benchmark(path: str | os.PathLike, n: int = 16, seed: int = 0) -> Path:
    """Write a small deterministic VLMEvalKit-style TSV of coloured shapes and return its path.

    Rows cycle through four question kinds: "What color is the square?" (choice A-D), "How many circles ...?"
    (number), "Is there a triangle ...?" (yes/no, alternating) and "What shape is the <color> object?" (text). Images are
    non-square PNGs between 64x48 and 128x96 (base64 in `image`); `bbox` holds the target object's pixel box
    [x0, y0, x1, y1] (x1/y1 exclusive), a list of boxes for counting rows, empty when there is no target.
    The same (n, seed) always gives the same bytes.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_SYNTH_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for i in range(n):
            writer.writerow(_synthetic_item(rng, i))
    return path

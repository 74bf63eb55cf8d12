"""SAYO grounded-region data: GQA scene graphs and ReFocus chart / table annotations -> training JSONL with boxes.

    convert_gqa("val_balanced_questions.json", "val_sceneGraphs.json", "images/", "gqa_train.jsonl")
    convert_refocus("chartQA_v_bar_wbb.json", "chart_train.jsonl", image_root="ReFocus_Code/")
    # or: attn-mod data grounded --format gqa|refocus ...

Every sample is a GRPO prompt (system? / user = image + question + answer instruction; no assistant turn) with
`answer` / `answer_type` for the accuracy reward and per-image `boxes` = the TARGET region in ORIGINAL-image
pixels (x0, y0, x1, y1). Boxes are never resized here: `attn_mod.regions` maps them to visual tokens with the
model's own geometry at training time (28-px merged cells for Qwen2/2.5-VL, 32 px for Qwen3-VL, ...), via
`TrainSample.region_boxes()` -> `handle.set_target(boxes=..., images=...)`.

Input fields read
-----------------
GQA (the released balanced-questions and scene-graph JSON files):

* questions file: ``{question_id: {"imageId": str, "question": str, "answer": str,
  "semantic": [{"operation": str, "argument": str, "dependencies": [int]}, ...],
  "annotations": {"question" | "answer" | "fullAnswer": {token_span: object_id}}}}`` (a list of objects with
  an ``"id"`` is accepted too). ``fullAnswer`` and ``types`` are copied into the provenance when present.
* scene-graph file: ``{image_id: {"width": int, "height": int,
  "objects": {object_id: {"name": str, "x": int, "y": int, "w": int, "h": int}}}}`` (pixels, top-left origin).
* images: ``<images>/<imageId>.jpg`` (or .png / .jpeg).

Object ids of a program step: the parenthesised, comma-separated ids at the end of its ``argument``
(``"table (2354786)"``, ``"cup,on,o (123,456)"``; ``-`` means none). Target objects (``targets=``):
``"final"`` (default; SAYO's "final target object") = the ids of the last step, or, when it names none (exist,
query, and, compare ...), of the steps it depends on, followed back through ``dependencies`` until a step names
ids (both branches of and / or / compare); ``"program"`` = every id the program names; ``"annotations"`` =
the ids of ``annotations.question``, ``.answer`` and ``.fullAnswer``. Box of an object:
``(x, y, x + w, y + h)`` clipped to the image.

ReFocus (the ``*_wbb.json`` files of the ReFocus code release, ``{id: example}`` or a list with ``"id"``):

* ``figure_path`` (relative to `image_root`, default the annotation file's folder), ``query`` (or
  ``question``), ``answer``;
* charts: ``x_values`` / ``x_bboxes`` and ``y_values`` / ``y_bboxes`` (one box per axis label: the band of
  that bar);
* tables: ``column_headers`` / ``columns_bbox`` and ``row_starters`` / ``rows_bbox``;
* a box is ``{"x1", "y1", "x2", "y2"}`` or ``[x1, y1, x2, y2]``, as FRACTIONS of the image width / height (the
  ReFocus scripts divide by the size); ``units="pixel"`` reads pixels instead.

Target region: the bars / columns / rows whose label occurs in the question (case-insensitive, whole words,
whitespace-normalised). For a table with both a matched column and a matched row, the boxes are the matched
cells (column box ∩ row box); otherwise the matched columns or rows. Questions without a match, unknown object
ids, missing images, scene-graph sizes that disagree with the image file and empty boxes are skipped and
counted by reason in the result (``skipped``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ..eval.prompts import COT_INSTRUCTIONS, DEFAULT_INSTRUCTIONS, build_prompt
from ..eval.scoring import parse_number
from .samples import parse_sample, write_samples

__all__ = ["ConvertResult", "convert_gqa", "convert_refocus", "gqa_final_object_ids", "gqa_program_object_ids", "label_in_question",
           "summary_table"]

_IDS_AT_END = re.compile(r"\(([^()]*)\)\s*$")
GQA_TARGETS = ("final", "program", "annotations")


@dataclass
class ConvertResult:
    path: Path
    written: int
    skipped: Counter = field(default_factory=Counter)
    source: str = ""


def _load_records(path: str | os.PathLike, what: str) -> list[tuple[str, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path.name}: not valid JSON ({e})") from None
    if isinstance(data, Mapping):
        items = list(data.items())
    elif isinstance(data, list):
        items = []
        for i, rec in enumerate(data):
            if not isinstance(rec, Mapping) or "id" not in rec:
                raise ValueError(f"{path.name}[{i}]: a list of {what} records needs an 'id' in each object")
            items.append((str(rec["id"]), rec))
    else:
        raise ValueError(f"{path.name}: expected a JSON object {{id: record}} or a list of records")
    for key, rec in items:
        if not isinstance(rec, Mapping):
            raise ValueError(f"{path.name}: record {key!r} is not a JSON object")
    return [(str(k), dict(v)) for k, v in items]


def _answer_type(answer: str) -> str:
    a = answer.strip().lower()
    if a in ("yes", "no"):
        return "yesno"
    return "number" if parse_number(answer) is not None else "text"


def _clip(box, w: int, h: int):
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = max(0.0, min(x0, w)), max(0.0, min(x1, w))
    y0, y1 = max(0.0, min(y0, h)), max(0.0, min(y1, h))
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _sample(sid: str, image_ref: str, question: str, answer: str, boxes: list, *, system, instructions,
            meta: dict, base_dir: Path) -> dict:
    kind = _answer_type(answer)
    table = COT_INSTRUCTIONS if instructions == "cot" else DEFAULT_INSTRUCTIONS
    text = build_prompt({"question": question, "answer_type": kind}, instructions=table)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    obj = {"id": sid, "images": [image_ref], "messages": messages, "boxes": [list(b) for b in boxes],
           "answer": answer, "answer_type": kind, **meta}
    parse_sample(obj, where=f"converted sample {sid!r}", base_dir=base_dir)  # the format's own validation
    return obj


def _image_ref(path: Path, out_dir: Path) -> str:
    return os.path.relpath(path.resolve(), out_dir.resolve())


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def _bar(records: list, desc: str, progress: bool) -> Iterator:
    return tqdm(records, desc=desc, unit="q", disable=not progress)


# ------------------------------------------------------------------------------------------------ GQA


def _step_ids(step: Any) -> list[str]:
    arg = step.get("argument", "") if isinstance(step, Mapping) else ""
    m = _IDS_AT_END.search(str(arg))
    return [p.strip() for p in m.group(1).split(",") if p.strip() and p.strip() != "-"] if m else []


def _dedupe(ids) -> list[str]:
    out: list[str] = []
    for i in ids:
        if i not in out:
            out.append(i)
    return out


def gqa_program_object_ids(semantic: Any) -> list[str]:
    """Object ids named by a GQA semantic program (order of first appearance, no duplicates)."""
    return _dedupe(i for step in semantic or [] for i in _step_ids(step))


def gqa_final_object_ids(semantic: Any) -> list[str]:
    """Ids of the program's final target object(s): the last step's ids, else those of the steps it depends
    on (followed back until a step names ids; every branch)."""
    steps = list(semantic or [])
    seen: set[int] = set()

    def walk(i: int) -> list[str]:
        if not 0 <= i < len(steps) or i in seen:
            return []
        seen.add(i)
        ids = _step_ids(steps[i])
        if ids:
            return ids
        deps = steps[i].get("dependencies", []) if isinstance(steps[i], Mapping) else []
        return [x for d in deps if isinstance(d, int) for x in walk(d)]

    return _dedupe(walk(len(steps) - 1)) if steps else []


def _gqa_annotation_ids(ann: Any) -> list[str]:
    out: list[str] = []
    for key in ("question", "answer", "fullAnswer"):
        for v in ((ann or {}).get(key) or {}).values():
            for part in str(v).split(","):
                part = part.strip()
                if part and part not in out:
                    out.append(part)
    return out


def _find_image(folder: Path, image_id: str) -> Path | None:
    for ext in (".jpg", ".png", ".jpeg"):
        p = folder / f"{image_id}{ext}"
        if p.is_file():
            return p
    return None


def convert_gqa(questions: str | os.PathLike, scene_graphs: str | os.PathLike, images: str | os.PathLike,
                out: str | os.PathLike, *, targets: str = "final", system: str | None = None,
                instructions: str = "cot", limit: int | None = None, progress: bool = True) -> ConvertResult:
    """GQA questions + scene graphs -> training JSONL at `out` (see the module doc for the fields read)."""
    if targets not in GQA_TARGETS:
        raise ValueError(f"targets must be one of {GQA_TARGETS}, got {targets!r}")
    if instructions not in ("default", "cot"):
        raise ValueError(f"instructions must be 'default' or 'cot', got {instructions!r}")
    folder = Path(images)
    if not folder.is_dir():
        raise FileNotFoundError(f"GQA image folder {str(folder)!r} not found (it holds <imageId>.jpg)")
    qs = _load_records(questions, "GQA questions")
    graphs = dict(_load_records(scene_graphs, "GQA scene graphs"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped: Counter = Counter()
    rows, sizes_checked = [], {}
    for qid, q in _bar(qs, "gqa", progress):
        if limit is not None and len(rows) >= limit:
            break
        missing = [k for k in ("imageId", "question", "answer") if k not in q]
        if missing:
            raise ValueError(f"{Path(questions).name}: question {qid!r} lacks field(s) {missing}")
        image_id = str(q["imageId"])
        graph = graphs.get(image_id)
        if graph is None:
            skipped["no_scene_graph"] += 1
            continue
        try:
            w, h, objects = int(graph["width"]), int(graph["height"]), graph["objects"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{Path(scene_graphs).name}: scene graph {image_id!r} needs width, height and "
                             "objects") from None
        path = _find_image(folder, image_id)
        if path is None:
            skipped["image_missing"] += 1
            continue
        if image_id not in sizes_checked:
            sizes_checked[image_id] = _image_size(path) == (w, h)
        if not sizes_checked[image_id]:
            skipped["size_mismatch"] += 1
            continue
        ids = (gqa_final_object_ids(q.get("semantic")) if targets == "final" else
               gqa_program_object_ids(q.get("semantic")) if targets == "program" else
               _gqa_annotation_ids(q.get("annotations")))
        known = [i for i in ids if i in objects]
        if len(known) < len(ids):
            skipped["unknown_object_ids"] += len(ids) - len(known)
        boxes, names = [], []
        for oid in known:
            o = objects[oid]
            try:
                box = _clip((o["x"], o["y"], o["x"] + o["w"], o["y"] + o["h"]), w, h)
            except (KeyError, TypeError):
                raise ValueError(f"{Path(scene_graphs).name}: object {oid!r} of image {image_id!r} needs "
                                 "x, y, w, h") from None
            if box is not None:
                boxes.append(box)
                names.append({"id": oid, "name": o.get("name")})
        if not boxes:
            skipped["no_target"] += 1
            continue
        meta = {"source": {"format": "gqa", "question_id": qid, "image_id": image_id}, "target_objects": names}
        for k in ("fullAnswer", "types"):
            if k in q:
                meta["source"][k] = q[k]
        rows.append(_sample(f"gqa-{qid}", _image_ref(path, out.parent), str(q["question"]), str(q["answer"]),
                            boxes, system=system, instructions=instructions, meta=meta, base_dir=out.parent))
    if not rows:
        raise ValueError(f"no GQA question could be converted (skipped: {dict(skipped)}); check the paths and "
                         "that the scene graphs belong to the questions' images")
    write_samples(rows, out)
    return ConvertResult(out, len(rows), skipped, "gqa")


# ------------------------------------------------------------------------------------------------ ReFocus


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", str(s).strip().lower())


def label_in_question(label: str, question: str) -> bool:
    """Whether `label` occurs in `question` as whole words (case-insensitive, whitespace-normalised)."""
    lab = _norm(label)
    if not lab:
        return False
    return re.search(rf"(?<!\w){re.escape(lab)}(?!\w)", _norm(question)) is not None


def _refocus_box(raw: Any, w: int, h: int, units: str, where: str):
    if isinstance(raw, Mapping):
        try:
            vals = [float(raw[k]) for k in ("x1", "y1", "x2", "y2")]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: a box is {{x1, y1, x2, y2}} or [x1, y1, x2, y2], got {raw!r}") from None
    elif isinstance(raw, (list, tuple)) and len(raw) == 4:
        vals = [float(v) for v in raw]
    else:
        raise ValueError(f"{where}: a box is {{x1, y1, x2, y2}} or [x1, y1, x2, y2], got {raw!r}")
    if units == "normalized":
        if max(vals) > 1.0 + 1e-6:
            raise ValueError(f"{where}: box {raw!r} is not in fractions of the image size; pass units='pixel' "
                             "(--refocus-units pixel) for pixel boxes")
        vals = [vals[0] * w, vals[1] * h, vals[2] * w, vals[3] * h]
    return _clip(vals, w, h)


def _matched(rec: dict, values_key: str, boxes_key: str, question: str, w, h, units, where) -> list:
    values, boxes = rec.get(values_key) or [], rec.get(boxes_key) or []
    if len(values) != len(boxes):
        raise ValueError(f"{where}: {values_key} has {len(values)} labels but {boxes_key} has {len(boxes)} boxes")
    return [(v, _refocus_box(b, w, h, units, f"{where} {boxes_key}[{i}]"))
            for i, (v, b) in enumerate(zip(values, boxes)) if label_in_question(str(v), question)]


def convert_refocus(annotations: str | os.PathLike, out: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                    kind: str = "auto", units: str = "normalized", system: str | None = None,
                    instructions: str = "cot", limit: int | None = None, progress: bool = True) -> ConvertResult:
    """ReFocus chart / table annotations -> training JSONL at `out` (see the module doc for the fields read)."""
    if kind not in ("auto", "chart", "table"):
        raise ValueError(f"kind must be 'auto', 'chart' or 'table', got {kind!r}")
    if units not in ("normalized", "pixel"):
        raise ValueError(f"units must be 'normalized' or 'pixel', got {units!r}")
    if instructions not in ("default", "cot"):
        raise ValueError(f"instructions must be 'default' or 'cot', got {instructions!r}")
    records = _load_records(annotations, "ReFocus annotation")
    root = Path(image_root) if image_root is not None else Path(annotations).parent
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = Path(annotations).name
    skipped: Counter = Counter()
    rows = []
    for rid, rec in _bar(records, "refocus", progress):
        if limit is not None and len(rows) >= limit:
            break
        where = f"{name} record {rid!r}"
        question = rec.get("query", rec.get("question"))
        if question is None or "answer" not in rec or "figure_path" not in rec:
            raise ValueError(f"{where}: needs figure_path, query (or question) and answer")
        k = kind
        if k == "auto":
            k = "table" if ("columns_bbox" in rec or "rows_bbox" in rec) else \
                "chart" if ("x_bboxes" in rec or "y_bboxes" in rec) else None
            if k is None:
                raise ValueError(f"{where}: neither chart boxes (x_bboxes / y_bboxes) nor table boxes "
                                 "(columns_bbox / rows_bbox)")
        p = Path(rec["figure_path"])
        path = p if p.is_absolute() else root / p
        size = _image_size(path)
        if size is None:
            skipped["image_missing"] += 1
            continue
        w, h = size
        if k == "chart":
            matched = _matched(rec, "x_values", "x_bboxes", question, w, h, units, where) + \
                _matched(rec, "y_values", "y_bboxes", question, w, h, units, where)
            boxes = [b for _, b in matched if b is not None]
            labels = [str(v) for v, _ in matched]
        else:
            cols = _matched(rec, "column_headers", "columns_bbox", question, w, h, units, where)
            rws = _matched(rec, "row_starters", "rows_bbox", question, w, h, units, where)
            labels = [str(v) for v, _ in cols + rws]
            if cols and rws:
                boxes = [c for c in (_intersect(cb, rb) for _, cb in cols for _, rb in rws) if c is not None]
            else:
                boxes = [b for _, b in cols + rws if b is not None]
        if not boxes:
            skipped["no_target"] += 1
            continue
        meta = {"source": {"format": "refocus", "kind": k, "id": rid, "figure_path": str(rec["figure_path"])},
                "target_labels": labels}
        rows.append(_sample(f"refocus-{rid}", _image_ref(path, out.parent), str(question), str(rec["answer"]), boxes,
                            system=system, instructions=instructions, meta=meta, base_dir=out.parent))
    if not rows:
        raise ValueError(f"no ReFocus record could be converted (skipped: {dict(skipped)}); check image_root "
                         "(figure_path is relative to it)")
    write_samples(rows, out)
    return ConvertResult(out, len(rows), skipped, "refocus")


def _intersect(a, b):
    if a is None or b is None:
        return None
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def summary_table(result: ConvertResult) -> str:
    lines = ["| grounded conversion | count |", "|---|---:|", f"| written ({result.path}) | {result.written} |"]
    lines += [f"| skipped: {k} | {v} |" for k, v in sorted(result.skipped.items())]
    return "\n".join(lines)

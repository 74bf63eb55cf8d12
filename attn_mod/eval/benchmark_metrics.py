"""Benchmark scores the way the field reports them, from per-sample result records.

    name = metric_for("MMBench_DEV_EN")            # "mmbench" (by dataset name; metric_for(name, "pope") overrides)
    scores = compute(name, records)               # {"metric": ..., "circular_accuracy": 0.61, "by_category": ...}

A *record* is one line of a sweep's results.jsonl: ``index``, ``category``, ``answer``, ``extracted``, boolean
``correct`` and ``meta`` (the benchmark columns listed in `BENCHMARK_FIELDS`, copied from the TSV row by
`record_fields`). Fractions are in [0, 1]; MME scores are points, as MME reports them.

* ``mmbench`` (MMBench / CCBench, VLMEvalKit circular evaluation): rows are grouped by ``int(index) % 1e6`` (the
  rotated copies of a question have index + k * 1e6); a group is correct only if every rotation is.
  circular_accuracy = mean over groups; vanilla_accuracy = mean over the un-rotated rows (index < 1e6);
  plain_accuracy = mean over all rows. Per ``category`` / ``l2-category`` of each group's un-rotated row.
* ``hallusionbench``: the index is ``<cat>_<subcat>_<visual>_<set_id>_<figure_id>_<question_id>`` (fields 3-5
  after splitting on ``_``). aAcc = mean over questions; fAcc = mean over (l2-category, set_id, figure_id) groups
  of "all correct"; qAcc = mean over (l2-category, set_id, question_id) groups of "all correct"; overall = mean
  of the three. Also per ``category`` and per ``l2-category``.
* ``mme``: per sub-task (``category``) acc = mean over questions, acc+ = mean over images (``image_path``) of
  "both questions correct"; score = 100 * acc + 100 * acc+ (max 200); perception = sum over the 10 perception
  sub-tasks (max 2000), cognition = sum over the 4 cognition sub-tasks (max 800). Images without exactly two
  questions (a run with --limit) are left out of acc+ and counted in ``incomplete_pairs``.
* ``pope``: positives are gold "yes"; a prediction counts as "yes" only when "yes" was extracted (anything else,
  unextracted included, is "no"). accuracy = mean correct, precision = TP / (TP + FP), recall = TP / (TP + FN),
  F1 = 2PR / (P + R) (0 when undefined), yes_ratio = predicted yes / n. Per split: ``category`` split on commas;
  like VLMEvalKit, a row listed under several splits counts once per split in the overall numbers too.
* ``mathvista``: accuracy overall and by MathVista's ``question_type`` (multi_choice / free_form), its
  ``answer_type`` (integer / float / text / list), ``task`` (our ``category``) and each of ``skills``.
* ``accuracy``: no benchmark-specific score (the sweep's plain accuracy is the score).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = ["BENCHMARK_FIELDS", "METRICS", "HEADLINE", "metric_for", "compute", "record_fields"]

# TSV columns (kept in Sample.meta by the loader) that some benchmark score needs; the sweep copies them per record.
BENCHMARK_FIELDS = ("l2-category", "image_path", "question_type", "answer_type", "skills", "task")

MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                  "scene")
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
_ROTATION = 1_000_000


def record_fields(sample: Any) -> dict[str, str]:
    """The `BENCHMARK_FIELDS` present in a sample's meta, as strings (stored as a record's ``meta``)."""
    meta = getattr(sample, "meta", None) or {}
    return {k: str(meta[k]) for k in BENCHMARK_FIELDS if k in meta}


def _field(rec: Mapping, key: str) -> Any:
    meta = rec.get("meta") or {}
    return meta[key] if key in meta else rec.get(key)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _correct(rec: Mapping) -> bool:
    c = rec.get("correct")
    if not isinstance(c, bool):
        raise ValueError(f"record {rec.get('sample_id', rec.get('index'))!r} has no boolean 'correct'")
    return c


def _acc_by(records: Iterable[Mapping], keys: Callable[[Mapping], Iterable[str]]) -> dict[str, dict]:
    """{group: {"n", "accuracy"}} where a record belongs to every group `keys(rec)` yields (sorted by name)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        for k in keys(r):
            groups[k].append(_correct(r))
    return {k: {"n": len(v), "accuracy": _mean(v)} for k, v in sorted(groups.items())}


def _one(key: str):
    def get(rec):
        v = _field(rec, key)
        return [] if v in (None, "") else [str(v)]
    return get


# --------------------------------------------------------------------------------------------- MMBench


def mmbench(records: Sequence[Mapping]) -> dict:
    """VLMEvalKit circular evaluation (see module doc)."""
    groups: dict[int, list[tuple[int, Mapping]]] = defaultdict(list)
    for r in records:
        try:
            idx = int(str(r["index"]).strip())
        except ValueError:
            raise ValueError(f"MMBench circular scoring needs integer indices, got {r['index']!r} "
                             f"({r.get('sample_id')}); set the dataset's metric: accuracy") from None
        groups[idx % _ROTATION].append((idx, r))
    circ, heads = {}, {}
    for g, rows in groups.items():
        circ[g] = all(_correct(r) for _, r in rows)
        heads[g] = min(rows, key=lambda x: x[0])[1]  # the un-rotated row (or the lowest index present)
    main = [r for rs in groups.values() for i, r in rs if i < _ROTATION]

    def by(key):
        out: dict[str, list[bool]] = defaultdict(list)
        for g, ok in circ.items():
            v = _field(heads[g], key)
            if v not in (None, ""):
                out[str(v)].append(ok)
        return {k: {"n": len(v), "accuracy": _mean(v)} for k, v in sorted(out.items())}

    return {"metric": "mmbench", "n": len(records), "n_groups": len(groups),
            "circular_accuracy": _mean(list(circ.values())),
            "vanilla_accuracy": _mean([_correct(r) for r in main]),
            "plain_accuracy": _mean([_correct(r) for r in records]),
            "by_category": by("category"), "by_l2-category": by("l2-category")}


# --------------------------------------------------------------------------------------------- HallusionBench


def _hallusion_ids(rec: Mapping) -> tuple[str, str, str]:
    parts = str(rec["index"]).split("_")
    if len(parts) < 6:
        raise ValueError(f"HallusionBench index {rec['index']!r} ({rec.get('sample_id')}) is not "
                         "<cat>_<subcat>_<visual>_<set_id>_<figure_id>_<question_id>; set the dataset's metric")
    return parts[3], parts[4], parts[5]


def _hallusion_block(rows: Sequence[Mapping]) -> dict:
    figs: dict[tuple, list[bool]] = defaultdict(list)
    qs: dict[tuple, list[bool]] = defaultdict(list)
    for r in rows:
        set_id, fig_id, q_id = _hallusion_ids(r)
        l2 = str(_field(r, "l2-category"))
        figs[(l2, set_id, fig_id)].append(_correct(r))
        qs[(l2, set_id, q_id)].append(_correct(r))
    a = _mean([_correct(r) for r in rows])
    f = _mean([all(v) for v in figs.values()])
    q = _mean([all(v) for v in qs.values()])
    return {"n": len(rows), "aAcc": a, "fAcc": f, "qAcc": q,
            "overall": None if a is None else (a + f + q) / 3}


def hallusionbench(records: Sequence[Mapping]) -> dict:
    """aAcc / fAcc / qAcc from the index fields (see module doc)."""
    out = {"metric": "hallusionbench", **_hallusion_block(records)}
    for key in ("category", "l2-category"):
        split: dict[str, list] = defaultdict(list)
        for r in records:
            v = _field(r, key)
            if v not in (None, ""):
                split[str(v)].append(r)
        out[f"by_{key}"] = {k: _hallusion_block(v) for k, v in sorted(split.items())}
    return out


# --------------------------------------------------------------------------------------------- MME


def mme(records: Sequence[Mapping]) -> dict:
    """Per sub-task acc + acc+ (pairs by image_path) and the perception / cognition sums (see module doc)."""
    stats: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        img = _field(r, "image_path")
        if img in (None, ""):
            raise ValueError(f"MME scoring pairs questions by image_path, missing in {r.get('sample_id')}; "
                             "is this the VLMEvalKit MME.tsv?")
        stats[str(r.get("category"))][str(img)].append(_correct(r))
    by, incomplete = {}, 0
    for cat, imgs in sorted(stats.items()):
        pairs = [all(v) for v in imgs.values() if len(v) == 2]
        incomplete += sum(len(v) != 2 for v in imgs.values())
        acc = _mean([x for v in imgs.values() for x in v])
        plus = _mean(pairs)
        by[cat] = {"n": sum(map(len, imgs.values())), "acc": acc, "acc_plus": plus,
                   "score": 100 * acc + 100 * (plus or 0.0)}
    perception = sum(by[c]["score"] for c in MME_PERCEPTION if c in by)
    cognition = sum(by[c]["score"] for c in MME_COGNITION if c in by)
    missing = [c for c in MME_PERCEPTION + MME_COGNITION if c not in by]
    return {"metric": "mme", "n": len(records), "perception": perception, "cognition": cognition,
            "total": perception + cognition, "missing_subtasks": missing, "incomplete_pairs": incomplete,
            "by_category": by}


# --------------------------------------------------------------------------------------------- POPE


def _pope_block(rows: Sequence[Mapping]) -> dict:
    gold = [str(r.get("answer")).strip().lower() == "yes" for r in rows]
    pred = [str(r.get("extracted")).strip().lower() == "yes" for r in rows]
    tp = sum(g and p for g, p in zip(gold, pred))
    fp = sum((not g) and p for g, p in zip(gold, pred))
    fn = sum(g and not p for g, p in zip(gold, pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"n": len(rows), "accuracy": _mean([_correct(r) for r in rows]), "precision": precision,
            "recall": recall, "f1": f1, "yes_ratio": _mean(pred)}


def pope(records: Sequence[Mapping]) -> dict:
    """Accuracy / precision / recall / F1 / yes-ratio, overall and per split (see module doc)."""
    exploded: list[Mapping] = []
    split: dict[str, list] = defaultdict(list)
    for r in records:
        cats = [c.strip() for c in str(r.get("category") or "").split(",") if c.strip()]
        for c in cats or [None]:
            exploded.append(r)
            if c is not None:
                split[c].append(r)
    return {"metric": "pope", **_pope_block(exploded), "n_rows": len(records),
            "by_split": {k: _pope_block(v) for k, v in sorted(split.items())}}


# --------------------------------------------------------------------------------------------- MathVista


def _skills(rec: Mapping) -> list[str]:
    raw = _field(rec, "skills")
    if raw in (None, ""):
        return []
    if isinstance(raw, (list, tuple)):
        return [str(s) for s in raw]
    try:
        val = ast.literal_eval(str(raw))
    except (ValueError, SyntaxError):
        return [str(raw)]
    return [str(s) for s in val] if isinstance(val, (list, tuple)) else [str(val)]


def mathvista(records: Sequence[Mapping]) -> dict:
    """Accuracy by question type, answer type, task and skill (see module doc)."""
    task = (lambda r: [str(_field(r, "task"))] if _field(r, "task") not in (None, "") else _one("category")(r))
    return {"metric": "mathvista", "n": len(records), "accuracy": _mean([_correct(r) for r in records]),
            "by_question_type": _acc_by(records, _one("question_type")),
            "by_answer_type": _acc_by(records, _one("answer_type")),
            "by_task": _acc_by(records, task), "by_skill": _acc_by(records, _skills)}


# --------------------------------------------------------------------------------------------- dispatch

METRICS: dict[str, Callable[[Sequence[Mapping]], dict] | None] = {
    "accuracy": None, "mmbench": mmbench, "hallusionbench": hallusionbench, "mme": mme, "pope": pope,
    "mathvista": mathvista,
}
# metric -> the (key, label, unit) columns a summary table shows; unit "%" (fraction x 100) or "pts"
HEADLINE: dict[str, tuple[tuple[str, str, str], ...]] = {
    "mmbench": (("circular_accuracy", "circular", "%"), ("vanilla_accuracy", "vanilla", "%")),
    "hallusionbench": (("aAcc", "aAcc", "%"), ("fAcc", "fAcc", "%"), ("qAcc", "qAcc", "%")),
    "mme": (("perception", "perception", "pts"), ("cognition", "cognition", "pts")),
    "pope": (("accuracy", "acc", "%"), ("precision", "precision", "%"), ("recall", "recall", "%"),
             ("f1", "F1", "%"), ("yes_ratio", "yes-ratio", "%")),
    "mathvista": (("accuracy", "acc", "%"),),
}


def metric_for(dataset: str, override: str | None = None) -> str:
    """The benchmark score for a dataset: `override` when given (validated), else chosen by name: "mmbench" /
    "ccbench" -> mmbench, "hallusion" -> hallusionbench, "pope" -> pope, "mathvista" -> mathvista, "MME" (not
    MME-RealWorld) -> mme, anything else -> accuracy."""
    if override is not None:
        if override not in METRICS:
            raise ValueError(f"unknown benchmark metric {override!r}; choose one of {sorted(METRICS)}")
        return override
    n = dataset.lower()
    if "mmbench" in n or "ccbench" in n:
        return "mmbench"
    if "hallusion" in n:
        return "hallusionbench"
    if "pope" in n:
        return "pope"
    if "mathvista" in n:
        return "mathvista"
    if re.fullmatch(r"mme(?:[-_ .].*)?", n) and "realworld" not in n.replace("-", "").replace("_", ""):
        return "mme"
    return "accuracy"


def compute(metric: str, records: Sequence[Mapping]) -> dict | None:
    """The benchmark score `metric` of `records` (None for "accuracy" or no records)."""
    if metric not in METRICS:
        raise ValueError(f"unknown benchmark metric {metric!r}; choose one of {sorted(METRICS)}")
    fn = METRICS[metric]
    return None if fn is None or not records else fn(list(records))

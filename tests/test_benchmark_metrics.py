"""Benchmark scores as the field reports them, on fixtures in the real VLMEvalKit TSV column layouts.

Each fixture is written as a TSV, loaded through `load_benchmark`, scored with `score()` on hand-written model
outputs, and the benchmark score is compared with numbers worked out by hand in the comments.
"""

import base64
import csv
import io

import pytest
from PIL import Image

from attn_mod.eval import benchmark_metrics as bm
from attn_mod.eval.datasets import load_benchmark
from attn_mod.eval.scoring import score
from attn_mod.eval.summary import markdown_table, summarize
from attn_mod.eval.sweep_config import Cell


def _png(seed: int) -> str:
    img = Image.new("RGB", (8 + seed % 5, 6), (seed * 37 % 255, 90, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, columns, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


def records_for(path, predictions, **kw):
    """Score `predictions` (index -> model output) against the loaded benchmark, as the sweep does."""
    bench = load_benchmark(path, **kw)
    out = []
    for s in bench:
        res = score(s, predictions[s.index])
        out.append({"cell": "identity", "dataset": bench.name, **s.to_record(), "prediction": predictions[s.index],
                    "extracted": res.extracted, "correct": res.correct, "method": res.method,
                    **({"meta": m} if (m := bm.record_fields(s)) else {})})
    return bench, out


# --------------------------------------------------------------------------------------------- MMBench

MMB_COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
            "l2-category", "comment", "split"]


def mmbench_rows():
    """Three questions with their circular rotations (index + k * 1e6, options shifted, images by reference)."""
    qs = [
        (0, "What color is the car?", ["red", "blue", "green", "white"], "B", "attribute_recognition",
         "finegrained_perception (instance-level)"),
        (1, "Is it day or night?", ["day", "night"], "A", "attribute_recognition",
         "finegrained_perception (instance-level)"),
        (2, "Which scene is this?", ["beach", "forest", "city"], "C", "image_scene", "coarse_perception"),
    ]
    rows = []
    for i, q, opts, ans, cat, l2 in qs:
        for k in range(len(opts)):
            rot = opts[k:] + opts[:k]
            gold = "ABCD"[rot.index(opts["ABCD".index(ans)])]
            row = {"index": str(i + k * 1_000_000), "question": q, "hint": "", "answer": gold, "category": cat,
                   "image": _png(i) if k == 0 else str(i), "source": "fixture", "l2-category": l2, "split": "dev"}
            row.update({"ABCD"[j]: o for j, o in enumerate(rot)})
            rows.append(row)
    return rows


def test_mmbench_circular_differs_from_plain(tmp_path):
    rows = mmbench_rows()
    gold = {r["index"]: r["answer"] for r in rows}
    preds = {idx: f"The answer is {g}." for idx, g in gold.items()}
    # Q1 (2 rotations): rotation 1 wrong. Q2 (3 rotations): the un-rotated row wrong, rotations right.
    preds["1000001"] = "B" if gold["1000001"] == "A" else "A"
    preds["2"] = "A"
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_COLS, rows)
    bench, recs = records_for(path, preds)
    assert len(recs) == 4 + 2 + 3 and sum(r["correct"] for r in recs) == 7
    assert recs[1]["meta"]["l2-category"] == "finegrained_perception (instance-level)"
    assert bm.metric_for(bench.name) == "mmbench"
    res = bm.compute("mmbench", recs)
    # groups: Q0 all 4 right -> 1; Q1 one wrong -> 0; Q2 one wrong -> 0  => circular 1/3
    assert res["n_groups"] == 3 and res["circular_accuracy"] == pytest.approx(1 / 3)
    assert res["plain_accuracy"] == pytest.approx(7 / 9)  # 9 rows, 7 right: differs from circular
    assert res["vanilla_accuracy"] == pytest.approx(2 / 3)  # un-rotated rows 0, 1, 2: right, right, wrong
    assert res["by_category"] == {"attribute_recognition": {"n": 2, "accuracy": 0.5},
                                  "image_scene": {"n": 1, "accuracy": 0.0}}
    assert res["by_l2-category"]["coarse_perception"]["accuracy"] == 0.0


def test_mmbench_rejects_non_integer_index():
    with pytest.raises(ValueError, match="integer indices.*metric: accuracy"):
        bm.compute("mmbench", [{"index": "q-1", "correct": True}])


# --------------------------------------------------------------------------------------------- HallusionBench

HALLU_COLS = ["index", "image", "question", "answer", "category", "l2-category", "image_path"]


def test_hallusionbench_aacc_facc_qacc(tmp_path):
    # (index, category, l2-category, gold, model output right?)
    spec = [("VD_illusion_1_0_0_0", "VD", "illusion", "Yes", True),
            ("VD_illusion_1_0_0_1", "VD", "illusion", "No", False),
            ("VD_illusion_1_0_1_0", "VD", "illusion", "No", True),
            ("VD_illusion_1_0_1_1", "VD", "illusion", "Yes", True),
            ("VS_chart_1_1_0_0", "VS", "chart", "Yes", True),
            ("VS_chart_1_1_1_0", "VS", "chart", "No", False)]
    rows = [{"index": i, "image": _png(n), "question": "Is the left line longer?", "answer": a, "category": c,
             "l2-category": l2, "image_path": f"{i}.png"} for n, (i, c, l2, a, _) in enumerate(spec)]
    flip = {"Yes": "No", "No": "Yes"}
    preds = {i: (f"{a}, it is." if ok else f"{flip[a]}.") for i, _, _, a, ok in spec}
    bench, recs = records_for(write_tsv(tmp_path / "HallusionBench.tsv", HALLU_COLS, rows), preds)
    assert [r["correct"] for r in recs] == [ok for *_, ok in spec]
    assert bm.metric_for(bench.name) == "hallusionbench"
    res = bm.compute("hallusionbench", recs)
    assert res["aAcc"] == pytest.approx(4 / 6)
    # figures (l2, set, figure): (ill,0,0)=[T,F]->F (ill,0,1)=[T,T]->T (chart,1,0)=[T]->T (chart,1,1)=[F]->F
    assert res["fAcc"] == pytest.approx(2 / 4)
    # questions (l2, set, question): (ill,0,0)=[T,T]->T (ill,0,1)=[F,T]->F (chart,1,0)=[T,F]->F
    assert res["qAcc"] == pytest.approx(1 / 3)
    assert res["overall"] == pytest.approx((4 / 6 + 2 / 4 + 1 / 3) / 3)
    vs = res["by_category"]["VS"]
    assert (vs["aAcc"], vs["fAcc"], vs["qAcc"]) == (0.5, 0.5, 0.0)
    ill = res["by_l2-category"]["illusion"]
    assert (ill["aAcc"], ill["fAcc"], ill["qAcc"]) == (0.75, 0.5, 0.5)
    with pytest.raises(ValueError, match="HallusionBench index"):
        bm.compute("hallusionbench", [{"index": "7", "correct": True}])


# --------------------------------------------------------------------------------------------- MME

MME_COLS = ["index", "image", "question", "answer", "category", "image_path"]


def mme_fixture(tmp_path):
    # (category, image, [(gold, right?), (gold, right?)])
    spec = [("existence", "e1.jpg", [("Yes", True), ("No", True)]),
            ("existence", "e2.jpg", [("Yes", True), ("No", False)]),
            ("count", "c1.jpg", [("Yes", True), ("No", False)]),
            ("code_reasoning", "r1.png", [("Yes", True), ("No", True)]),
            ("code_reasoning", "r2.png", [("Yes", True), ("No", True)]),
            ("code_reasoning", "r3.png", [("Yes", True), ("No", False)])]
    rows, preds, i = [], {}, 0
    for n, (cat, img, pair) in enumerate(spec):
        first = i
        for gold, ok in pair:
            rows.append({"index": str(i), "image": _png(n) if i == first else str(first),
                         "question": "Is there a dog in this image? Please answer yes or no.", "answer": gold,
                         "category": cat, "image_path": f"{cat}/{img}"})
            preds[str(i)] = gold if ok else {"Yes": "No", "No": "Yes"}[gold]
            i += 1
    return write_tsv(tmp_path / "MME.tsv", MME_COLS, rows), preds


def test_mme_perception_cognition(tmp_path):
    path, preds = mme_fixture(tmp_path)
    bench, recs = records_for(path, preds)
    assert bm.metric_for(bench.name) == "mme"
    res = bm.compute("mme", recs)
    ex, cnt, code = (res["by_category"][c] for c in ("existence", "count", "code_reasoning"))
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == (0.75, 0.5, pytest.approx(125.0))  # 3/4, 1/2 pairs
    assert (cnt["acc"], cnt["acc_plus"], cnt["score"]) == (0.5, 0.0, pytest.approx(50.0))
    assert code["acc"] == pytest.approx(5 / 6) and code["acc_plus"] == pytest.approx(2 / 3)
    assert code["score"] == pytest.approx(100 * 5 / 6 + 100 * 2 / 3)  # 150
    assert res["perception"] == pytest.approx(175.0) and res["cognition"] == pytest.approx(150.0)
    assert res["total"] == pytest.approx(325.0) and res["incomplete_pairs"] == 0
    assert "OCR" in res["missing_subtasks"] and "existence" not in res["missing_subtasks"]
    # one question of the pair e2 missing (a --limit run): acc counts it, acc+ leaves the image out
    part = bm.compute("mme", [r for r in recs if r["index"] != "3"])
    assert part["incomplete_pairs"] == 1 and part["by_category"]["existence"]["acc_plus"] == 1.0
    assert part["by_category"]["existence"]["acc"] == 1.0
    with pytest.raises(ValueError, match="image_path"):
        bm.compute("mme", [{"index": "0", "category": "count", "correct": True}])


# --------------------------------------------------------------------------------------------- POPE

POPE_COLS = ["index", "image", "question", "answer", "category", "image_path"]


def test_pope_f1_precision_recall_yes_ratio(tmp_path):
    # (gold, model output, split)
    spec = [("yes", "Yes", "random"), ("yes", "No", "random"), ("no", "No", "random"), ("no", "Yes", "random"),
            ("yes", "Yes, there is.", "popular"), ("no", "no", "popular"), ("no", "I cannot tell.", "popular"),
            ("yes", "yes", "popular,adversarial")]
    rows = [{"index": str(i), "image": _png(i), "question": "Is there a chair in the image?", "answer": g,
             "category": c, "image_path": f"COCO_val2014_{i:012d}.jpg"} for i, (g, _, c) in enumerate(spec)]
    bench, recs = records_for(write_tsv(tmp_path / "POPE.tsv", POPE_COLS, rows),
                              {str(i): p for i, (_, p, _) in enumerate(spec)})
    assert bm.metric_for(bench.name) == "pope"
    assert [r["extracted"] for r in recs][6] is None
    res = bm.compute("pope", recs)
    # row 7 counts for both splits -> 9 entries: TP rows 0,4,7,7 = 4; FP row 3; FN row 1; TN rows 2,5,6
    assert res["n"] == 9 and res["n_rows"] == 8
    assert res["precision"] == pytest.approx(4 / 5) and res["recall"] == pytest.approx(4 / 5)
    assert res["f1"] == pytest.approx(0.8)
    assert res["accuracy"] == pytest.approx(6 / 9)  # rows 1, 3 wrong; row 6 unextracted -> wrong
    assert res["yes_ratio"] == pytest.approx(5 / 9)  # predicted yes: rows 0, 3, 4, 7, 7
    rnd, pop, adv = (res["by_split"][k] for k in ("random", "popular", "adversarial"))
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"], rnd["yes_ratio"]) == (0.5,) * 5
    assert (pop["accuracy"], pop["precision"], pop["recall"], pop["f1"], pop["yes_ratio"]) == (0.75, 1, 1, 1, 0.5)
    assert (adv["n"], adv["f1"], adv["yes_ratio"]) == (1, 1, 1)
    # no predicted yes at all: precision / F1 are 0 by convention, not a division error
    none = bm.compute("pope", [dict(r, extracted="no") for r in recs])
    assert (none["precision"], none["recall"], none["f1"], none["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


# --------------------------------------------------------------------------------------------- MathVista

MV_COLS = ["index", "image", "question", "answer", "choices", "precision", "question_type", "answer_type",
           "task", "skills", "unit"]


def test_mathvista_by_question_and_answer_type(tmp_path):
    rows = [
        {"index": "1", "question": "What fraction of the shape is blue?\nChoices:\n(A) 3/11\n(B) 8/11\n(C) 6/11",
         "answer": "8/11", "choices": "['3/11', '8/11', '6/11']", "question_type": "multi_choice",
         "answer_type": "text", "task": "figure question answering",
         "skills": "['scientific reasoning', 'statistical reasoning']"},
        {"index": "2", "question": "Find x.\nChoices:\n(A) 5\n(B) 6\n(C) 7", "answer": "6",
         "choices": "['5', '6', '7']", "question_type": "multi_choice", "answer_type": "text",
         "task": "geometry problem solving", "skills": "['geometry reasoning', 'algebraic reasoning']"},
        {"index": "3", "question": "How many apples are left?", "answer": "14", "question_type": "free_form",
         "answer_type": "integer", "task": "math word problem", "skills": "['arithmetic reasoning']"},
        {"index": "4", "question": "What is the fraction of females?", "answer": "0.6", "precision": "1.0",
         "question_type": "free_form", "answer_type": "float", "task": "figure question answering",
         "skills": "['statistical reasoning']"},
        {"index": "5", "question": "What is the angle?", "answer": "40", "question_type": "free_form",
         "answer_type": "integer", "task": "geometry problem solving", "skills": "['geometry reasoning']",
         "unit": "degrees"},
    ]
    for i, r in enumerate(rows):
        r["image"] = _png(i)
    preds = {"1": "The correct answer is (B) 8/11.", "2": "(C)", "3": "The number missing is 14.",
             "4": "The fraction is 0.6.", "5": "The angle is 50 degrees."}
    bench, recs = records_for(write_tsv(tmp_path / "MathVista_MINI.tsv", MV_COLS, rows), preds)
    assert [r["correct"] for r in recs] == [True, False, True, True, False]
    assert bm.metric_for(bench.name) == "mathvista"
    res = bm.compute("mathvista", recs)
    acc = lambda d: {k: v["accuracy"] for k, v in d.items()}  # noqa: E731
    assert res["accuracy"] == pytest.approx(3 / 5)
    assert acc(res["by_question_type"]) == {"free_form": pytest.approx(2 / 3), "multi_choice": 0.5}
    assert acc(res["by_answer_type"]) == {"float": 1.0, "integer": 0.5, "text": 0.5}
    assert acc(res["by_task"]) == {"figure question answering": 1.0, "geometry problem solving": 0.0,
                                   "math word problem": 1.0}
    assert acc(res["by_skill"]) == {"algebraic reasoning": 0.0, "arithmetic reasoning": 1.0,
                                    "geometry reasoning": 0.0, "scientific reasoning": 1.0,
                                    "statistical reasoning": 1.0}
    assert res["by_skill"]["geometry reasoning"]["n"] == 2


# --------------------------------------------------------------------------------------------- choice + wiring


@pytest.mark.parametrize("name,metric", [
    ("MMBench_DEV_EN", "mmbench"), ("MMBench_TEST_CN_V11", "mmbench"), ("CCBench", "mmbench"),
    ("HallusionBench", "hallusionbench"), ("MME", "mme"), ("mme_test", "mme"), ("MME-RealWorld", "accuracy"),
    ("MMStar", "accuracy"), ("POPE", "pope"), ("MathVista_MINI", "mathvista"), ("synth", "accuracy")])
def test_metric_for_by_name(name, metric):
    assert bm.metric_for(name) == metric


def test_metric_override_and_validation():
    assert bm.metric_for("MMBench_DEV_EN", "accuracy") == "accuracy"
    assert bm.metric_for("my_pope_copy", "mme") == "mme"
    with pytest.raises(ValueError, match="unknown benchmark metric 'circular'.*mmbench"):
        bm.metric_for("x", "circular")
    from attn_mod.config import ConfigError, from_dict
    from attn_mod.eval.sweep_config import SweepConfig

    with pytest.raises((ConfigError, ValueError), match="metric"):
        from_dict(SweepConfig, {"datasets": [{"path": "a.tsv", "metric": "circular"}]})


def test_summary_carries_benchmark_scores(tmp_path):
    rows = mmbench_rows()
    gold = {r["index"]: r["answer"] for r in rows}
    preds = dict(gold, **{"2": "A"})  # only Q2's un-rotated row wrong: plain 8/9, circular 2/3
    _, recs = records_for(write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_COLS, rows), preds)
    cells = [Cell.make("identity", {}, name="baseline")]
    summ = summarize(recs, cells, ["MMBench_DEV_EN"])  # chosen by name
    row = summ["rows"][0]
    assert row["accuracy"] == pytest.approx(8 / 9) and row["benchmark"]["circular_accuracy"] == pytest.approx(2 / 3)
    md = markdown_table(summ)
    assert "MMBench_DEV_EN (mmbench" in md and "| identity | 66.7 | 66.7 |" in md
    plain = summarize(recs, cells, ["MMBench_DEV_EN"], metrics={"MMBench_DEV_EN": "accuracy"})  # explicit override
    assert "benchmark" not in plain["rows"][0] and "circular" not in markdown_table(plain)


def test_sweep_records_carry_benchmark_fields(tmp_path):
    """A real (tiny-model) sweep on the MMBench fixture: records keep l2-category, the summary's circular score
    equals a regrouping of the stored rows by index % 1e6, and results.md shows it."""
    import json

    from attn_mod.config import from_dict
    from attn_mod.eval.sweep import run_sweep
    from attn_mod.eval.sweep_config import SweepConfig

    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_COLS, mmbench_rows())
    cfg = from_dict(SweepConfig, {"model": "tiny:qwen2_5_vl", "datasets": [{"path": str(path)}],
                                  "generation": {"max_new_tokens": 2, "batch_size": 9},
                                  "output_dir": str(tmp_path / "run")})
    res = run_sweep(cfg, progress=False)
    rows = [json.loads(line) for line in open(res.paths["results"])]
    assert len(rows) == 9 and all(r["meta"]["l2-category"] for r in rows)
    groups = {}
    for r in rows:
        groups.setdefault(int(r["index"]) % 1_000_000, []).append(r["correct"])
    want = sum(all(v) for v in groups.values()) / 3
    got = res.summary["rows"][0]["benchmark"]
    assert got["circular_accuracy"] == pytest.approx(want) and got["n_groups"] == 3
    assert res.summary["metrics"] == {"MMBench_DEV_EN": "mmbench"}
    assert "MMBench_DEV_EN (mmbench" in res.paths["markdown"].read_text()


def test_eval_metric_flag_is_validated_before_anything_is_written(tmp_path, capsys):
    from attn_mod.cli import main as cli_main

    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_COLS, mmbench_rows())
    out = tmp_path / "ev"
    assert cli_main(["eval", "--model", "tiny:qwen2_5_vl", "--data", str(path), "--metric", "circular",
                     "--out", str(out), "--no-progress"]) == 2
    assert "metric 'circular' is unknown" in capsys.readouterr().err and not out.exists()

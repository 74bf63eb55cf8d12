"""`attn-mod study`: statistics against independent float64 computations, and the command on two tiny runs."""

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from attn_mod.cli import main as cli_main
from attn_mod.eval import study
from attn_mod.eval.datasets import make_synthetic_benchmark


def ref_point_biserial(x, y):
    """r_pb = (M1 - M0) / s_n * sqrt(p q), s_n the population standard deviation of x (textbook form)."""
    x1 = [a for a, b in zip(x, y) if b]
    x0 = [a for a, b in zip(x, y) if not b]
    n = len(x)
    mean = sum(x) / n
    s_n = math.sqrt(sum((a - mean) ** 2 for a in x) / n)
    p = len(x1) / n
    return (sum(x1) / len(x1) - sum(x0) / len(x0)) / s_n * math.sqrt(p * (1 - p))


def ref_ranks(a):
    """Average ranks by counting: rank = #smaller + (#equal + 1) / 2."""
    return [sum(b < v for b in a) + (sum(b == v for b in a) + 1) / 2 for v in a]


def ref_pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correlations_match_textbook_forms(seed):
    rng = np.random.default_rng(seed)
    x = list(rng.gamma(2.0, 1.5, size=60))
    x[5] = x[6] = x[7]  # ties
    y = [bool(v + rng.normal(0, 1.5) > 3) for v in x]
    assert study.point_biserial(x, y) == pytest.approx(ref_point_biserial(x, y), rel=1e-12)
    assert study.spearman(x, y) == pytest.approx(ref_pearson(ref_ranks(x), ref_ranks([float(b) for b in y])), rel=1e-12)
    # None (missing) measures are dropped pairwise
    assert study.point_biserial(x + [None], y + [True]) == pytest.approx(ref_point_biserial(x, y), rel=1e-12)
    assert study.point_biserial(x, [True] * len(x)) is None and study.spearman([1.0] * 4, [True, False] * 2) is None


def test_fit_line_and_quantiles_by_hand():
    fit = study.fit_line([1.0, 2.0, 3.0, 4.0], [0.2, 0.4, 0.5, 0.9])
    # slope = sum(dx dy) / sum(dx^2) = (-1.5*-0.3 + -0.5*-0.1 + 0.5*0 + 1.5*0.4) / 5 = 1.1 / 5
    assert fit["slope"] == pytest.approx(0.22) and fit["intercept"] == pytest.approx(0.5 - 0.22 * 2.5)
    assert fit["r"] == pytest.approx(ref_pearson([1, 2, 3, 4], [0.2, 0.4, 0.5, 0.9]))
    assert study.fit_line([1.0, 1.0], [0.1, 0.5]) is None
    x = [5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 0.5]
    y = [True, False, True, False, False, True, False]
    qs = study.quantile_accuracy(x, y, bins=3)  # sorted: 0.5F 1F 2F | 3T 4F | 5T 6T
    assert [q["n"] for q in qs] == [3, 2, 2]
    assert [q["accuracy"] for q in qs] == [0.0, 0.5, 1.0]
    assert (qs[0]["lo"], qs[0]["hi"], qs[2]["hi"]) == (0.5, 2.0, 6.0)


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(3)
    x = list(rng.normal(size=200))
    y = [bool(v + rng.normal(0, 0.7) > 0) for v in x]
    r = study.point_biserial(x, y)
    lo, hi = study.bootstrap_ci(x, y, study._r_pb, n_boot=300, seed=5)
    assert lo < r < hi and hi - lo < 0.3
    assert study.bootstrap_ci(x, y, study._r_pb, n_boot=300, seed=5) == (lo, hi)
    lo2, hi2 = study.bootstrap_ci(x[:40], y[:40], study._r_pb, n_boot=300, seed=5)
    assert hi2 - lo2 > hi - lo  # fewer samples, wider interval
    assert study.bootstrap_ci([1.0, 2.0], [True, True], study._r_pb, n_boot=50) == (None, None)


def write_run(path, rows):
    path.mkdir(parents=True)
    with open(path / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def test_study_numbers_on_written_runs(tmp_path):
    """Two runs written by hand, where accuracy rises with VAS: the table and the fitted line match."""
    rng = np.random.default_rng(0)
    runs = []
    for k, shift in enumerate((0.0, 1.0)):
        rows = []
        for cell in ("identity", "avar(alpha=0.5)"):
            boost = 0.5 if cell != "identity" else 0.0
            for i in range(40):
                v = float(rng.gamma(2.0, 1.0)) + shift + boost
                rows.append({"cell": cell, "dataset": "synth", "sample_id": f"synth:{i}", "vas": v,
                             "target_a": None, "correct": bool(v + rng.normal(0, 1) > 3.0)})
        runs.append(write_run(tmp_path / f"model{k}", rows))
    with open(runs[1] / "results.jsonl", "a") as f:
        f.write('{"cell": "identity", "dat')  # a torn last line is skipped, not fatal
    with pytest.warns(UserWarning, match="torn last line"):
        res = study.run_study(runs, tmp_path / "out", measures=("vas",), n_boot=200, progress=False)
    conds = res["result"]["conditions"]
    assert len(conds) == 4
    for c in conds:
        rows = [json.loads(line) for line in open(tmp_path / c["run"] / "results.jsonl") if line.endswith("}\n")]
        mine = [r for r in rows if r["cell"] == c["cell"]]
        x, y = [r["vas"] for r in mine], [r["correct"] for r in mine]
        assert c["accuracy"] == pytest.approx(sum(y) / len(y)) and c["mean"] == pytest.approx(sum(x) / len(x))
        assert c["r_pb"] == pytest.approx(ref_point_biserial(x, y), rel=1e-9) and c["r_pb"] > 0.2
        assert sum(q["n"] for q in c["quantiles"]) == 40
    fit = res["result"]["across"]["vas"]["synth"]["fit"]
    pts = res["result"]["across"]["vas"]["synth"]["points"]
    xs, ys = [p["mean"] for p in pts], [p["accuracy"] for p in pts]
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(intercept) and fit["slope"] > 0
    lines = list(csv.DictReader(open(res["paths"]["csv"])))
    assert len(lines) == 4 and float(lines[0]["r_pb"]) == pytest.approx(conds[0]["r_pb"])
    assert "accuracy = " in res["paths"]["markdown"].read_text()
    with pytest.raises(ValueError, match="attention_metrics: true"):
        study.run_study([write_run(tmp_path / "plain", [{"cell": "c", "dataset": "d", "correct": True}])],
                        tmp_path / "o2", progress=False)
    with pytest.raises(FileNotFoundError, match="no results.jsonl"):
        study.run_study([tmp_path / "out"], tmp_path / "o3", progress=False)


def _check_png(path):
    img = np.asarray(Image.open(path).convert("L"))
    assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 5


def test_study_command_on_two_tiny_sweep_runs(tmp_path):
    from attn_mod.eval.sweep import run_sweep
    from attn_mod.eval.sweep_config import DatasetConfig, GenerationConfig, GridConfig, SweepConfig
    from attn_mod.tiny import build_tiny

    tsv = make_synthetic_benchmark(tmp_path / "synthetic.tsv", n=8, seed=2)
    dirs = []
    for seed in (0, 1):  # two different tiny models
        model, proc = build_tiny("qwen2_5_vl", seed=seed)
        cfg = SweepConfig(model="tiny:qwen2_5_vl", datasets=[DatasetConfig(path=str(tsv), name="synthetic")],
                          grid=GridConfig(preset="avar", alpha=[0.5], beta=[0.5]),
                          generation=GenerationConfig(max_new_tokens=3, batch_size=8), attention_metrics=True,
                          output_dir=str(tmp_path / f"tiny{seed}"))
        run_sweep(cfg, progress=False, model=model, processor=proc)
        dirs.append(str(tmp_path / f"tiny{seed}"))
    out = tmp_path / "study"
    assert cli_main(["study", *dirs, "--out", str(out), "--bootstrap", "100", "--bins", "2", "--no-progress"]) == 0
    result = json.loads((out / "study.json").read_text())
    conds = result["conditions"]
    assert {(c["run"], c["measure"]) for c in conds} == {(r, m) for r in ("tiny0", "tiny1") for m in ("vas", "target_a")}
    for c in conds:
        rows = [json.loads(line) for line in open(tmp_path / c["run"] / "results.jsonl")]
        mine = [r for r in rows if r["cell"] == c["cell"] and r.get(c["measure"]) is not None]
        assert c["n"] == len(mine) and c["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
    vas_cells = [c for c in conds if c["measure"] == "vas"]
    assert len(vas_cells) == 4 and all(c["n"] == 8 for c in vas_cells)
    for name in ("quantiles_vas", "correlation_vas", "across_vas", "quantiles_target_a", "across_target_a"):
        _check_png(out / f"{name}.png")
    assert len(result["across"]["vas"]["synthetic"]["points"]) == 4
    assert (out / "study.md").read_text().startswith("# Attention vs accuracy")
    assert cli_main(["study", str(tmp_path / "nope"), "--out", str(out)]) == 2  # clear error, no traceback

"""End-to-end sweeps on a tiny saved model and a generated local TSV: files, consistency, resume, retune."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import attn_mod
from attn_mod.cli import main as cli_main
from attn_mod.config import ConfigError, from_dict, load_config
from attn_mod.eval import sweep as sweep_mod
from attn_mod.eval.datasets import load_benchmark, make_synthetic_benchmark
from attn_mod.eval.generation import Request, generate_batch
from attn_mod.eval.results import ResultStore
from attn_mod.eval.sweep import run_sweep
from attn_mod.eval.sweep_config import Cell, SweepConfig
from attn_mod.loading import load_model
from attn_mod.tiny import save_tiny


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model_dir = save_tiny("qwen2_5_vl", root / "model")
    tsv = make_synthetic_benchmark(root / "bench.tsv", n=6, seed=1)
    return root, model_dir, tsv


def config(root, model_dir, tsv, out, **kw):
    data = dict(model=str(model_dir), datasets=[{"path": str(tsv), "name": "synth"}],
                grid={"preset": "avar", "alpha": [0.0, 0.5], "beta": [0.0, 0.5]},
                generation={"max_new_tokens": 4, "batch_size": 4}, output_dir=str(root / out))
    data.update(kw)
    return from_dict(SweepConfig, data)


def keys_and_predictions(path):
    rows = [json.loads(line) for line in open(path)]
    return rows, {(r["cell"], r["dataset"], r["sample_id"]): r["prediction"] for r in rows}


def test_sweep_end_to_end_files_consistent(workspace):
    root, model_dir, tsv = workspace
    cfg = config(root, model_dir, tsv, "full", attention_metrics=True)
    res = run_sweep(cfg, progress=False)
    rows, preds = keys_and_predictions(res.paths["results"])
    assert len(rows) == len(preds) == 5 * 6  # baseline + 2x2 cells, 6 samples, no duplicates
    assert {r["cell"] for r in rows} == {c.id for c in cfg.build_cells()}
    # summary accuracies recomputed from the JSONL rows
    for row in res.summary["rows"]:
        mine = [r for r in rows if r["cell"] == row["cell"]]
        assert row["n"] == 6 and row["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / 6)
        vals = [r["vas"] for r in mine if r["vas"] is not None]
        assert vals and row["vas"] == pytest.approx(sum(vals) / len(vals))
    assert all("target_a" in r for r in rows if r["bbox"])  # synthetic rows carry boxes
    assert any(r["target_a"] is not None for r in rows if r["bbox"])
    md = res.paths["markdown"].read_text()
    assert "identity (baseline)" in md and "mean VAS" in md
    base_acc = next(r["accuracy"] for r in res.summary["rows"] if r["cell"] == "identity")
    best_acc = next(r["accuracy"] for r in res.summary["rows"] if r["cell"] == res.summary["best"]["synth"])
    bold_rows = [line for line in md.splitlines() if line.startswith("|") and "**" in line]
    assert (len(bold_rows) == 1) == (best_acc > base_acc) and ("No cell beats the baseline" in md) == (best_acc <= base_acc)
    csv_lines = res.paths["csv"].read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 5
    heat = Image.open(res.paths["heatmap_synth"])
    assert heat.size[0] > 200 and heat.size[1] > 200 and np.asarray(heat.convert("L")).std() > 5
    js = json.loads(res.paths["json"].read_text())
    assert js["baseline"] == "identity" and js["best"]["synth"] in js["cells"]
    # the intervention really changes attention: VAS grows with alpha
    vas = {r["cell"]: r["vas"] for r in res.summary["rows"]}
    assert vas["avar(alpha=0.5,beta=0.5)"] > vas["identity"]


def test_kill_and_resume_gives_same_results(workspace, monkeypatch):
    root, model_dir, tsv = workspace
    clean = run_sweep(config(root, model_dir, tsv, "clean"), progress=False)
    _, want = keys_and_predictions(clean.paths["results"])

    calls = {"n": 0}
    real = sweep_mod.generate_batch

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "generate_batch", flaky)
    cfg = config(root, model_dir, tsv, "crash")
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, progress=False)
    partial, _ = keys_and_predictions(root / "crash" / "results.jsonl")
    assert 0 < len(partial) < 30
    # a torn final line (crash mid-write) is dropped on resume
    with open(root / "crash" / "results.jsonl", "a") as f:
        f.write('{"cell": "identity", "data')
    monkeypatch.setattr(sweep_mod, "generate_batch", real)
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = run_sweep(cfg, progress=False)
    assert resumed.new_records == 30 - len(partial)
    rows, got = keys_and_predictions(resumed.paths["results"])
    assert len(rows) == len(got) == 30 and got == want
    # running again does nothing
    assert run_sweep(cfg, progress=False).new_records == 0


def test_retune_equals_fresh_patch(workspace):
    root, model_dir, tsv = workspace
    res = run_sweep(config(root, model_dir, tsv, "full2"), progress=False)
    rows, _ = keys_and_predictions(res.paths["results"])
    cell = Cell.make("avar", {"alpha": 0.5, "beta": 0.5})
    model, proc = load_model(model_dir)
    attn_mod.patch(model, proc, intervention=cell.intervention)
    bench = list(load_benchmark(tsv, name="synth"))
    from attn_mod.eval.prompts import build_prompt

    outs = generate_batch(model, proc, [Request(build_prompt(s), s.load_images()) for s in bench], max_new_tokens=4)
    sweep_preds = {r["sample_id"]: r["prediction"] for r in rows if r["cell"] == cell.id}
    assert {s.sample_id: o.text for s, o in zip(bench, outs)} == sweep_preds
    base_preds = {r["sample_id"]: r["prediction"] for r in rows if r["cell"] == "identity"}
    assert base_preds != sweep_preds or all(r["n_tokens"] == 0 for r in rows)


def test_config_errors_name_the_key(workspace, tmp_path):
    root, model_dir, tsv = workspace
    for bad, match in [
        ({"grid": {"preset": "pai", "beta": [0.1]}}, "grid key 'beta' does not apply to preset 'pai'"),
        ({"grid": {"preset": "avar", "alpha": [-0.1]}}, "alpha must be >= 0"),
        ({"grid": {"preset": "avar", "alpah": [0.1]}}, r"grid.alpah: unknown key"),
        ({"generation": {"batch_size": 0}}, "batch_size must be >= 1"),
        ({"datasets": []}, "list at least one benchmark"),
        ({"cells": [{"preset": "avar", "params": {"gamma": 1}}]}, r"no parameter\(s\) \['gamma'\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            config(root, model_dir, tsv, "x", **bad)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"model": str(model_dir), "datasets": [{"path": str(tsv)}], "outptu_dir": "x"}))
    with pytest.raises(ConfigError, match=r"s.yaml.outptu_dir: unknown key"):
        load_config(SweepConfig, p)


def test_manifest_mismatch_refuses_to_mix(workspace):
    root, model_dir, tsv = workspace
    cfg = config(root, model_dir, tsv, "mix", grid=None)
    run_sweep(cfg, progress=False, limit=2)
    other = config(root, model_dir, tsv, "mix", grid=None, generation={"max_new_tokens": 2, "batch_size": 4})
    with pytest.raises(ValueError, match="different sweep.*generation"):
        run_sweep(other, progress=False, limit=2)
    assert run_sweep(other, progress=False, limit=2, resume=False).new_records == 2


def test_cli_sweep_and_eval(workspace, tmp_path, capsys):
    root, model_dir, tsv = workspace
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump({"model": str(model_dir), "datasets": [{"path": str(tsv), "name": "synth"}],
                                 "grid": {"preset": "avar", "alpha": [0.2], "beta": [0.0, 0.4]},
                                 "generation": {"max_new_tokens": 3}, "output_dir": str(tmp_path / "out")}))
    assert cli_main(["sweep", str(p), "--limit", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "identity (baseline)" in out and "avar(alpha=0.2,beta=0.4)" in out
    assert cli_main(["eval", "--model", "tiny:qwen3_vl", "--data", str(tsv), "--alpha", "0.3", "--beta", "0.2",
                     "--limit", "2", "--max-new-tokens", "3", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert (tmp_path / "ev" / "results.md").exists()
    assert cli_main(["eval", "--model", str(tmp_path / "nope"), "--data", str(tsv), "--no-progress",
                     "--out", str(tmp_path / "ev2")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "tiny:qwen3_vl", "--data", str(tsv), "--alpha", "-1", "--no-progress",
                     "--out", str(tmp_path / "ev3")]) == 2
    assert "alpha must be >= 0" in capsys.readouterr().err


def test_result_store_refuses_duplicates(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    store.append([{"cell": "a", "dataset": "d", "sample_id": "1", "correct": True}])
    with pytest.raises(RuntimeError, match="duplicate"):
        store.append([{"cell": "a", "dataset": "d", "sample_id": "1", "correct": False}])
    assert ResultStore(tmp_path / "r.jsonl").done == {("a", "d", "1")}


def test_failed_eval_writes_nothing_and_the_corrected_command_runs(workspace, tmp_path, capsys):
    """Issue 8 item 2: a typo in --model / --data / --device leaves the output folder untouched."""
    root, model_dir, tsv = workspace
    out = tmp_path / "ev"
    base = ["eval", "--data", str(tsv), "--limit", "2", "--max-new-tokens", "2", "--out", str(out), "--no-progress"]
    assert cli_main(["eval", "--model", str(model_dir) + "l", *base[1:]]) == 2
    assert "not a directory" in capsys.readouterr().err and not out.exists()
    assert cli_main(["eval", "--model", str(model_dir), "--data", str(tmp_path / "missing.tsv"), *base[3:]]) == 2
    assert not out.exists()
    assert cli_main(["eval", "--model", str(model_dir), "--device", "cuda:7", *base[1:]]) == 2
    err = capsys.readouterr().err
    assert "device 'cuda:7'" in err and "Traceback" not in err and not out.exists()
    # a manifest left by an older failed run (no results) does not block the folder either
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"model": "runs/demo/modell"}))
    assert cli_main(["eval", "--model", str(model_dir), *base[1:]]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 * 2  # baseline + avar, 2 samples
    # a different model on stored results is refused, --no-resume starts over
    assert cli_main(["eval", "--model", "tiny:qwen3_vl", *base[1:]]) == 2
    assert "--no-resume" in capsys.readouterr().err
    assert cli_main(["eval", "--model", "tiny:qwen3_vl", "--no-resume", *base[1:]]) == 0


def test_clean_one_line_errors_and_ctrl_c(workspace, tmp_path, capsys, monkeypatch):
    """Issue 8 item 3: --device cuda without CUDA, --backend triton on CPU, Ctrl-C: one line each."""
    root, model_dir, tsv = workspace
    base = ["eval", "--model", str(model_dir), "--data", str(tsv), "--limit", "2", "--max-new-tokens", "2",
            "--no-progress"]
    if not torch.cuda.is_available():
        assert cli_main([*base, "--device", "cuda", "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "use --device cpu" in err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli_main([*base, "--backend", "triton", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err and "--backend torch" in err
    calls = {"n": 0}
    real = sweep_mod.generate_batch

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "generate_batch", interrupted)
    assert cli_main([*base, "--batch-size", "1", "--out", str(tmp_path / "c")]) == 130
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "1 result rows are saved" in last and "rerun the same command to resume" in last
    assert cli_main([*base, "--batch-size", "1", "--out", str(tmp_path / "c")]) == 0  # resumes


def test_config_paths_resolve_against_the_yaml_file(workspace, tmp_path, monkeypatch):
    """Issue 8 item 4: relative paths in a sweep YAML are relative to the YAML, wherever it is run from."""
    from attn_mod.eval.sweep_config import load_sweep_config

    root, model_dir, tsv = workspace
    cfg_dir = tmp_path / "configs" / "sweeps"
    cfg_dir.mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.tsv").write_bytes(tsv.read_bytes())
    p = cfg_dir / "s.yaml"
    p.write_text(yaml.safe_dump({"model": "tiny:qwen2_5_vl", "grid": None, "output_dir": "../../runs/x",
                                 "datasets": [{"path": "../../data/b.tsv", "name": "synth", "image_root": "imgs"}],
                                 "generation": {"max_new_tokens": 2}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_sweep_config(p)
    assert Path(cfg.datasets[0].path).resolve() == (tmp_path / "data" / "b.tsv").resolve()
    assert Path(cfg.datasets[0].image_root).resolve() == (cfg_dir / "imgs").resolve()
    assert Path(cfg.output_dir).resolve() == (tmp_path / "runs" / "x").resolve()
    assert cfg.model == "tiny:qwen2_5_vl"
    assert load_sweep_config(p, overrides={"output_dir": "o"}).output_dir == "o"  # CLI: relative to the cwd
    assert cli_main(["sweep", str(p), "--limit", "1", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "x" / "results.jsonl").exists()
    shipped = load_sweep_config(Path(__file__).parents[1] / "configs" / "sweeps" / "tiny_avar.yaml")
    assert Path(shipped.output_dir).resolve() == (Path(__file__).parents[1] / "runs" / "demo" / "sweep").resolve()


def test_summary_compares_cells_on_the_same_samples(workspace):
    """Issue 8 item 5: a cell run with --limit is not compared with a baseline over more samples."""
    root, model_dir, tsv = workspace
    full = run_sweep(config(root, model_dir, tsv, "same", grid=None), progress=False)  # baseline, 6 samples
    assert full.summary["rows"][0]["n"] == 6
    cfg = config(root, model_dir, tsv, "same", grid={"preset": "avar", "alpha": [0.5], "beta": [0.5]})
    res = run_sweep(cfg, progress=False, limit=2)
    assert res.new_records == 2
    by = {r["cell"]: r for r in res.summary["rows"]}
    assert by["identity"]["n"] == by["avar(alpha=0.5,beta=0.5)"]["n"] == 2
    rows = [json.loads(x) for x in open(res.paths["results"])]
    first2 = {r["sample_id"] for r in rows if r["cell"] != "identity"}
    base = [r for r in rows if r["cell"] == "identity" and r["sample_id"] in first2]
    assert by["identity"]["accuracy"] == pytest.approx(sum(r["correct"] for r in base) / 2)
    md = res.paths["markdown"].read_text()
    assert "n per dataset: synth=2" in md and "(n=" not in md
    # a cell with fewer rows than the sample set (interrupted) is marked
    from attn_mod.eval.summary import markdown_table, summarize

    cells = cfg.build_cells()
    partial = [r for r in rows if not (r["cell"] != "identity" and r["sample_id"] == sorted(first2)[0])]
    s = summarize(partial, cells, ["synth"], sample_ids={"synth": sorted(first2)})
    md = markdown_table(s)
    assert "(n=1)" in md and "fewer evaluated samples" in md


def test_cli_is_fast_and_heatmaps_are_drawn_once(workspace, tmp_path, monkeypatch):
    """Issue 8 item 12: --help and validation errors import neither torch nor transformers; a sweep draws its
    heatmaps once, at the end (also when a resumed sweep has nothing to do)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom attn_mod.cli import main\n"
             "try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules], code)\n")

    def heavy(*argv):
        out = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path).stdout
        return out.strip().splitlines()[-1]

    assert heavy("--help") == "HEAVY [] 0"
    assert heavy("eval", "--help") == "HEAVY [] 0"
    assert heavy("sweep", "--help") == "HEAVY [] 0"
    assert heavy("sweep", str(tmp_path / "missing.yaml")) == "HEAVY [] 2"
    assert "'transformers'" not in heavy("eval", "--model", str(tmp_path / "nope"), "--data", "x.tsv")

    from attn_mod.eval import summary as summary_mod

    calls = []
    real = summary_mod.heatmaps
    monkeypatch.setattr(summary_mod, "heatmaps", lambda *a, **k: calls.append(1) or real(*a, **k))
    root, model_dir, tsv = workspace
    cfg = config(root, model_dir, tsv, "once")
    res = run_sweep(cfg, progress=False, limit=2)
    assert len(calls) == 1 and res.paths["heatmap_synth"].exists()
    assert run_sweep(cfg, progress=False, limit=2).new_records == 0 and len(calls) == 2


def test_heatmap_pictures_scale_baseline_and_single_cell(tmp_path, monkeypatch):
    """Issue 8 item 13: fixed 0-100 accuracy scale, change from the baseline, bars instead of a 1x1 heatmap."""
    from matplotlib.axes import Axes

    from attn_mod.eval import summary as summary_mod

    seen = []
    real = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, *a, **k: seen.append(k) or real(self, *a, **k))
    texts = []
    real_text = Axes.text
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, *a, **k: texts.append(s) or real_text(self, x, y, s, *a, **k))
    cells = [Cell.make("identity", {}, name="baseline")] + [Cell.make("avar", {"alpha": a, "beta": b})
                                                            for a in (0.0, 0.5) for b in (0.0, 0.5)]
    recs = [{"cell": c.id, "dataset": "d", "sample_id": str(i), "correct": i == 0, "answer_type": "choice",
             "category": None, "extracted": "A", "method": "x"} for c in cells for i in range(4)]
    s = summary_mod.summarize(recs, cells, ["d"])
    paths = summary_mod.heatmaps(s, tmp_path)
    assert seen and all(k["vmin"] == 0.0 and k["vmax"] == 100.0 for k in seen)  # constant 25 %: still 0-100
    assert any("(+0.0)" in t for t in texts)
    one = [cells[0], cells[1]]
    s1 = summary_mod.summarize([r for r in recs if r["cell"] in (one[0].id, one[1].id)], one, ["d"])
    seen.clear()
    (tmp_path / "one").mkdir()
    (p,) = summary_mod.heatmaps(s1, tmp_path / "one")
    assert not seen and Image.open(p).size[0] < Image.open(paths[0]).size[0] * 1.5  # a bar chart, no imshow

"""Distributed sweeps: sharding, shard merge, and real multi-process runs (gloo on CPU, accelerate launch)
compared with a one-process run, including a hard kill and a resume with a different process count."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from attn_mod.cli import main as cli_main
from attn_mod.eval.datasets import make_synthetic_benchmark
from attn_mod.eval.distributed import merge_shards, my_units, shard_files, shard_path
from attn_mod.jsonl import append_jsonl
from attn_mod.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def test_units_are_shared_out_disjoint_and_complete():
    units = [(c, d, b) for c in range(5) for d in range(2) for b in (0, 4, 8)]
    for world in (1, 2, 3, 7):
        parts = [my_units(units, r, world) for r in range(world)]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(units) and len(flat) == len(set(flat))
        assert all(p == sorted(p) for p in parts)  # each process keeps the one-process order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def _row(cell, i, **kw):
    return {"cell": cell, "dataset": "d", "sample_id": f"d:{i}", "correct": bool(i % 2), **kw}


def test_merge_shards_dedups_orders_and_removes_shards(tmp_path):
    res = tmp_path / "results.jsonl"
    append_jsonl(res, [_row("b", 0), _row("a", 1)], sort_keys=True)
    append_jsonl(shard_path(res, 0), [_row("a", 0), _row("a", 1)], sort_keys=True)  # a:1 is already merged
    append_jsonl(shard_path(res, 3), [_row("b", 1), _row("x", 9)], sort_keys=True)
    with open(shard_path(res, 3), "a") as f:
        f.write('{"cell": "b", "data')  # killed mid-write
    assert [p.name for p in shard_files(tmp_path)] == ["results.rank0.jsonl", "results.rank3.jsonl"]
    order = {("a", "d", "d:0"): 0, ("a", "d", "d:1"): 1, ("b", "d", "d:0"): 2, ("b", "d", "d:1"): 3}
    with pytest.warns(UserWarning, match="torn last line"):
        added = merge_shards(res, order=order.get)
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert added == 3 and [(r["cell"], r["sample_id"]) for r in rows] == [
        ("a", "d:0"), ("a", "d:1"), ("b", "d:0"), ("b", "d:1"), ("x", "d:9")]  # unknown rows last
    assert shard_files(tmp_path) == []
    assert merge_shards(res) == 0 and len(res.read_text().splitlines()) == 5


# --------------------------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny("qwen2_5_vl", root / "model")
    tsv = make_synthetic_benchmark(root / "bench.tsv", n=4, seed=3)
    cfg = {"model": str(model_dir), "datasets": [{"path": str(tsv), "name": "synth"}],
           "grid": {"preset": "avar", "alpha": [0.5], "beta": [0.0, 0.5]},
           "generation": {"max_new_tokens": 3, "batch_size": 2}, "attention_metrics": True}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    ref = root / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1): same float reduction order
    try:
        assert cli_main(["sweep", str(path), "--output-dir", str(ref), "--no-progress"]) == 0  # one process
    finally:
        torch.set_num_threads(threads)
    return root, path, env, ref


def cli(args, env, **kw):
    proc = subprocess.run([sys.executable, "-m", "attn_mod.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def rows_of(out):
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")  # wall time, the one field that differs between runs
    return rows


def test_two_processes_equal_one(setup):
    root, path, env, ref = setup
    out = root / "two"
    proc = cli(["sweep", str(path), "--output-dir", str(out), "--num-processes", "2", "--no-progress"], env)
    assert proc.stdout.count("identity (baseline)") == 1  # only rank 0 reports
    want, got = rows_of(ref), rows_of(out)
    assert len(want) == 3 * 4 and got == want  # same rows, same order, no duplicates
    assert (out / "results.md").read_text() == (ref / "results.md").read_text()
    assert (out / "summary.csv").read_text() == (ref / "summary.csv").read_text()
    assert (out / "heatmap_synth.png").exists() and shard_files(out) == []


def test_kill_and_resume_with_another_process_count(setup):
    root, path, env, ref = setup
    out = root / "killed"
    cmd = [sys.executable, "-m", "attn_mod.cli", "sweep", str(path), "--output-dir", str(out), "--num-processes",
           "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            n = sum(len(p.read_text().splitlines()) for p in shard_files(out)) if out.exists() else 0
            if n >= 2:  # the first batch is stored; kill everything at once, mid-run
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shards = shard_files(out)
    partial = sum(len(p.read_text().splitlines()) for p in shards)
    assert shards and 0 < partial < 12, "the run was not killed mid-way"
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").stat().st_size == 0
    # resume with 3 processes: the shards of the killed run are merged first, the rest is shared out
    cli(["sweep", str(path), "--output-dir", str(out), "--num-processes", "3", "--no-progress"], env)
    got = rows_of(out)
    keys = [(r["cell"], r["dataset"], r["sample_id"]) for r in got]
    assert len(keys) == len(set(keys)) == 12 and got == rows_of(ref)
    assert (out / "results.md").read_text() == (ref / "results.md").read_text()
    assert shard_files(out) == []
    # and once more with one process (in-process): nothing left to do
    from attn_mod.eval.sweep import run_sweep
    from attn_mod.eval.sweep_config import load_sweep_config

    assert run_sweep(load_sweep_config(path, overrides={"output_dir": str(out)}), progress=False).new_records == 0
    assert rows_of(out) == rows_of(ref)


def test_merge_leaves_no_shard_side_files(tmp_path):
    res = tmp_path / "results.jsonl"
    append_jsonl(shard_path(res, 1), [_row("a", 0)], sort_keys=True)
    merge_shards(res)
    assert sorted(p.name for p in tmp_path.iterdir() if "rank" in p.name) == []

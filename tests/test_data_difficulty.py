"""Difficulty filter with a real (tiny, sharpened) model: G rollouts per prompt, accuracies predicted from the
rollouts of a first pass, the [low, high] band, resume, patched mode and the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from attn_mod.cli import main
from attn_mod.config import ConfigError, load_config
from attn_mod.data.difficulty import FilterConfig, in_band, run_filter
from attn_mod.data.samples import read_samples, write_samples
from attn_mod.eval.scoring import normalize_text, score
from attn_mod.tiny import build_tiny
from tests.helpers import random_image

G = 8


@pytest.fixture(scope="module")
def tiny():
    model, proc = build_tiny("qwen2_5_vl", seed=3)
    with torch.no_grad():  # a peaked next-token distribution, so one-token rollouts repeat across the G samples
        model.lm_head.weight.mul_(25.0)
    return model, proc


def write_data(d: Path, golds: dict[str, str] | None = None, n: int = 6) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "imgs").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        sid = f"p{i}"
        random_image(56 + 12 * i, 56, seed=10 + i).save(d / "imgs" / f"{sid}.png")
        rows.append({"id": sid, "images": [f"imgs/{sid}.png"],
                     "messages": [{"role": "system", "content": "Answer briefly."},
                                  {"role": "user", "content": [{"type": "image"},
                                                               {"type": "text", "text": f"What is shown ({i})?"}]}],
                     "boxes": [[0, 0, 20 + i, 30]], "answer": (golds or {}).get(sid, "zebra"), "answer_type": "text"})
    return write_samples(rows, d / "data.jsonl")


def cfg_for(data: Path, out: Path, **kw) -> FilterConfig:
    cfg = FilterConfig(data=str(data), output_dir=str(out), rollouts=G, max_new_tokens=1, temperature=1.0, **kw)
    cfg.validate()
    return cfg


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_filter_accuracies_band_and_resume(tmp_path, tiny):
    model, proc = tiny
    first = run_filter(cfg_for(write_data(tmp_path / "d1"), tmp_path / "f1"), progress=False,
                       model=model, processor=proc)
    r1 = rows(first.paths["accuracies"])
    assert [r["id"] for r in r1] == [f"p{i}" for i in range(6)]
    assert all(len(r["completions"]) == G and r["rollouts"] == G for r in r1)
    assert any(len(set(r["completions"])) > 1 for r in r1), "rollouts are sampled, not greedy copies"

    # golds chosen from the first pass: a completion seen k times gives accuracy k/G on the second pass
    golds, predicted = {}, {}
    for r in r1:
        if r["id"] == "p5":  # keeps the gold "zebra": 0 of G, below the band
            predicted["p5"] = sum(score({"answer": "zebra", "answer_type": "text"}, c).correct
                                  for c in r["completions"]) / G
            continue
        counts = Counter(normalize_text(c) for c in r["completions"] if normalize_text(c))  # tiny vocab: bytes too
        mid = [c for c, k in counts.items() if 2 <= k <= 6] or list(counts)
        if not mid:
            continue
        raw = next(c for c in r["completions"] if normalize_text(c) == mid[0]).strip()
        golds[r["id"]] = raw
        sample = {"answer": raw, "answer_type": "text"}
        predicted[r["id"]] = sum(score(sample, c).correct for c in r["completions"]) / G
    assert len(golds) >= 4 and predicted["p5"] == 0
    data2 = write_data(tmp_path / "d2", golds)
    cfg = cfg_for(data2, tmp_path / "f2")
    part = run_filter(cfg, limit=3, progress=False, model=model, processor=proc)  # interrupted run...
    assert part.new_rows == 3
    full = run_filter(cfg, progress=False, model=model, processor=proc)  # ...resumed
    assert full.new_rows == 3
    r2 = {r["id"]: r for r in rows(full.paths["accuracies"])}
    for sid, acc in predicted.items():
        assert r2[sid]["accuracy"] == pytest.approx(acc), sid
        assert r2[sid]["completions"] == next(r for r in r1 if r["id"] == sid)["completions"]
    assert any(0.25 <= a <= 0.75 for a in predicted.values()), "the fixture must exercise the kept band"
    kept = read_samples(full.paths["kept"])
    want_kept = [sid for sid in (f"p{i}" for i in range(6)) if 0.25 <= r2[sid]["accuracy"] <= 0.75]
    assert [s.id for s in kept] == want_kept and all(r2[s]["kept"] for s in want_kept)
    assert kept[0].load_images()[0].size[1] == 56  # images rebased to the output folder
    rep = json.loads(full.paths["report"].read_text())
    assert rep["kept"] + rep["too_hard"] + rep["too_easy"] == 6
    assert rep["too_hard"] == sum(r["accuracy"] < 0.25 for r in r2.values()) >= 1

    # a fresh uninterrupted run writes the same accuracies file byte for byte
    fresh = run_filter(cfg_for(data2, tmp_path / "f3"), progress=False, model=model, processor=proc)
    assert fresh.paths["accuracies"].read_bytes() == full.paths["accuracies"].read_bytes()


def test_in_band_is_inclusive():
    assert in_band(0.25, 0.25, 0.75) and in_band(0.75, 0.25, 0.75)
    assert not in_band(0.125, 0.25, 0.75) and not in_band(0.875, 0.25, 0.75)


def test_patched_filter_through_the_cli(tmp_path):
    data = write_data(tmp_path / "d", n=2)
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny:qwen2_5_vl", "data": str(data), "output_dir": str(tmp_path / "o"),
                                    "rollouts": 4, "max_new_tokens": 2,
                                    "intervention": {"preset": "avar", "params": {"alpha": 0.3, "beta": 0.4}}}))
    assert main(["data", "filter", str(path), "--no-progress"]) == 0
    acc = rows(tmp_path / "o" / "accuracies.jsonl")
    assert len(acc) == 2 and all(r["rollouts"] == 4 and len(r["completions"]) == 4 for r in acc)


def test_filter_config_errors(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump({"data": "x.jsonl", "low": 0.8, "high": 0.2}))
    with pytest.raises(ConfigError, match="low <= high"):
        load_config(FilterConfig, path)
    data = write_data(tmp_path / "d", n=1)
    bad = [json.loads(x) for x in data.read_text().splitlines()]
    del bad[0]["answer"]
    write_samples(bad, tmp_path / "noans.jsonl")
    with pytest.raises(ValueError, match="has no 'answer'"):
        run_filter(cfg_for(tmp_path / "noans.jsonl", tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()

"""`attn-mod demo`: accuracy-by-attention binning against an independent computation, argument errors before
any work, and `attn-mod demo --quick` end to end on the shipped checkpoints (files present, numbers finite)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attn_mod.demo import ASSETS
from attn_mod.report import accuracy_by_quantile

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_by_quantile_matches_numpy():
    rng = np.random.default_rng(5)
    a = rng.gamma(2.0, 0.05, size=203)
    correct = rng.random(203) < np.clip(4 * a, 0, 1)
    values = list(a) + [float("nan"), None]  # non-finite values are dropped
    rows = accuracy_by_quantile(values, list(correct) + [True, False], bins=4)
    edges = np.quantile(a.astype(np.float64), np.linspace(0, 1, 5))
    assert len(rows) == 4
    for i, r in enumerate(rows):
        lo, hi = edges[i], edges[i + 1]
        inside = (a >= lo) & ((a < hi) if i < 3 else (a <= hi))
        assert r["lo"] == pytest.approx(lo, rel=1e-12) and r["hi"] == pytest.approx(hi, rel=1e-12)
        assert r["n"] == int(inside.sum())
        assert r["accuracy"] == pytest.approx(correct[inside].mean(), rel=1e-12)
    assert sum(r["n"] for r in rows) == 203
    with pytest.raises(ValueError, match="bbox"):
        accuracy_by_quantile([None, float("nan")], [True, False])
    with pytest.raises(ValueError, match="entries"):
        accuracy_by_quantile([0.1, 0.2], [True])


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "attn_mod", "demo", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1800)


def test_bad_arguments_fail_before_any_output(tmp_path, capsys):
    from attn_mod.cli import main

    out = tmp_path / "o"
    for args, message in [(["--model", f"x={tmp_path / 'nope'}"], "not a Hugging Face model directory"),
                          (["--model", "a/b=" + str(ASSETS / "plain")], "simple NAME"),
                          (["--samples", "0", "--quick"], "--samples must be >= 1"),
                          (["--benchmark", str(tmp_path / "none.tsv")], "does not exist")]:
        assert main(["demo", "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    assert (ASSETS / "plain" / "model.safetensors").is_file() and (ASSETS / "agto" / "model.safetensors").is_file()
    out = tmp_path / "demo"
    r = _run(["--quick", "--out", str(out), "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert set(s["checkpoints"]) == {"plain", "agto"} and s["questions"] == 16
    for name, c in s["checkpoints"].items():
        assert c["n"] == 16 and 0 <= c["accuracy"] <= 1
        assert _finite(c["vas"]) and c["vas"] > 0 and _finite(c["target_a"]) and 0 < c["target_a"] < 1
        assert f"{name}: accuracy {100 * c['accuracy']:.1f}%" in r.stdout
        bins = s["accuracy_by_attention"][name]
        assert sum(b["n"] for b in bins) == 16 and all(_finite(b["accuracy"]) for b in bins)
    rows = s["sweep"]["rows"]
    assert len(rows) == 1 + 2 * 2 and all(_finite(x["accuracy"]) and _finite(x["vas"]) for x in rows)
    assert "| identity (baseline) |" in r.stdout and "avar(alpha=1,beta=0.5)" in r.stdout
    for e in s["examples"]:
        assert _finite(e["vas"]) and _finite(e["target_a"])
    page = (out / "index.html").read_text()
    refs = re.findall(r"src='([^']+)'", page)
    assert len(refs) >= 8 and all((out / ref).is_file() for ref in refs), refs
    for must in ("accuracy_by_attention.png", "comparison.png", "curves.png", "sweep/heatmap_heldout.png",
                 "examples/plain/0/heatmap.png", "examples/agto/0/tokens.png", "examples/plain/0/layers.png"):
        assert must in refs, must
        assert (out / must).stat().st_size > 1000


def test_tiny_checkpoint_resaved_like_the_trainer_loads_with_its_image_processor(tmp_path):
    """The trainer saves a tiny processor by trying processor.save_pretrained first (which fails without a video
    processor but leaves processor_class in tokenizer_config.json): loading must still give the full processor."""
    from attn_mod.loading import load_processor
    from attn_mod.tiny import build_tiny

    model, processor = build_tiny("qwen2_5_vl")
    model.save_pretrained(tmp_path)
    try:
        processor.save_pretrained(tmp_path)
    except Exception:  # noqa: BLE001 - the trainer's own fallback
        processor.tokenizer.save_pretrained(tmp_path)
        processor.image_processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert loaded.image_processor is not None and loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()

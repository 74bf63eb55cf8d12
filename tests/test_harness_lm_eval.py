"""eval.harness.lm_eval_adapter against the real lm-eval (0.4.13 here), fully offline.

lm-eval is a test requirement here (the [eval] extra; CI installs .[dev,eval]), so nothing is skipped.
A tiny patched Qwen2.5-VL runs the example task configs/lm_eval/attn_mod_synthetic_vqa.yaml on a local
JSONL + PNG dataset through lm-eval's own hf-multimodal model class, evaluator, filters and metric.
"""

import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import attn_mod  # noqa: E402
from attn_mod.categories import SYSTEM  # noqa: E402
from attn_mod.eval.harness import EXAMPLE_TASKS_DIR, make_lm, run_lm_eval  # noqa: E402
from attn_mod.tiny import build_tiny  # noqa: E402
from helpers import random_image  # noqa: E402

TASK = "attn_mod_synthetic_vqa"


@pytest.fixture(scope="module")
def patched():
    model, proc = build_tiny("qwen2_5_vl")
    handle = attn_mod.patch(model, proc, intervention=attn_mod.Intervention.avar(alpha=0.0, beta=0.0))
    yield model, proc, handle
    handle.remove()


def write_dataset(root, answers):
    """A local JSONL task file: one row per answer, small PNGs (the last row has two images)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, answer in enumerate(answers):
        paths = []
        for j in range(2 if i == len(answers) - 1 else 1):
            p = root / f"img{i}_{j}.png"
            random_image(56 + 14 * i, 56 + 14 * j, seed=10 * i + j).save(p)
            paths.append(str(p))
        rows.append({"question": f"What is shown in picture {i}?", "answer": answer, "images": paths})
    data = root / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def run(model, proc, data, cache, **kw):
    overrides = {TASK: {"dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache)}}}
    return run_lm_eval(model, proc, [TASK], task_paths=[EXAMPLE_TASKS_DIR], task_overrides=overrides, limit=3,
                       batch_size=2, gen_kwargs={"max_gen_toks": 6}, include_default_tasks=False, **kw)


def responses(results):
    return [s["filtered_resps"][0] for s in sorted(results["samples"][TASK], key=lambda s: s["doc_id"])]


def test_lm_eval_end_to_end_metric_and_live_update(patched, tmp_path):
    model, proc, handle = patched
    data = write_dataset(tmp_path / "d1", ["zebra", "zebra", "zebra"])

    with attn_mod.capture(model) as rec:
        res = run(model, proc, data, tmp_path / "cache", output_path=tmp_path / "out")
    metrics = res["results"][TASK]
    assert metrics["sample_len"] == 3 and "exact_match,strip" in metrics
    first = responses(res)
    assert len(first) == 3 and all(isinstance(r, str) for r in first)
    # lm-eval's prompts went through the chat template with one image block per image
    prompt = res["samples"][TASK][0]["arguments"]["gen_args_0"]["arg_0"]
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt and prompt.endswith("assistant\n")
    # every generate batch of lm-eval (3 docs, batch 2) ran through the patched attention
    assert rec.num_runs == 2
    sys_before = max(float(rec.mass(-1, run=r)[..., SYSTEM].max()) for r in range(rec.num_runs))
    assert sys_before > 0.05
    saved = list((tmp_path / "out").rglob("results_*.json"))
    assert saved and TASK in json.loads(saved[0].read_text())["results"]
    assert list((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl"))

    # the metric is computed from the generations: make doc 0's reference its (filtered) answer
    data2 = write_dataset(tmp_path / "d2", [first[0], "zebra", "zebra"])
    res2 = run(model, proc, data2, tmp_path / "cache")
    assert responses(res2) == first
    assert res2["results"][TASK]["exact_match,strip"] == pytest.approx(1 / 3)

    # retune live (no reload): beta=1 removes the system turn from the attention of every other row
    handle.update(alpha=3.0, beta=1.0)
    try:
        with attn_mod.capture(model) as rec2:
            res3 = run(model, proc, data, tmp_path / "cache")
    finally:
        handle.update(alpha=0.0, beta=0.0)
    assert rec2.num_runs == 2
    for r in range(rec2.num_runs):
        mass, rows = rec2.mass(-1, run=r), rec2.query_categories(r)
        non_system = (rows != SYSTEM)[:, None, :].expand(mass.shape[:3])
        assert float(mass[..., SYSTEM][non_system].abs().max()) < 1e-6
    assert responses(res3) != first


def test_qwen3_vl_through_lm_eval(tmp_path):
    model, proc = build_tiny("qwen3_vl")
    handle = attn_mod.patch(model, proc, intervention=attn_mod.Intervention.avar(alpha=0.2, beta=0.5))
    data = write_dataset(tmp_path / "d", ["a", "b"])
    overrides = {TASK: {"dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "c")}}}
    with attn_mod.capture(model) as rec:
        res = run_lm_eval(model, proc, TASK, task_paths=[EXAMPLE_TASKS_DIR], task_overrides=overrides, limit=2,
                          batch_size=2, gen_kwargs="max_gen_toks=2", include_default_tasks=False)
    handle.remove()
    assert res["results"][TASK]["sample_len"] == 2 and "exact_match,strip" in res["results"][TASK]
    assert rec.num_runs == 1 and rec.categories.shape[0] == 2


def test_make_lm_uses_the_given_objects(patched):
    model, proc, _ = patched
    lm = make_lm(model, proc, batch_size=2)
    assert lm.model is model and lm.processor is proc and lm.tokenizer is proc.tokenizer
    assert lm.batch_size == 2 and lm.image_token == "<|image_pad|>"


def test_overrides_must_name_requested_tasks(patched, tmp_path):
    model, proc, _ = patched
    with pytest.raises(ValueError, match="not in tasks"):
        run_lm_eval(model, proc, [TASK], task_paths=[EXAMPLE_TASKS_DIR], include_default_tasks=False,
                    task_overrides={"some_other_task": {"limit": 1}})


def test_harness_package_imports_no_harness_eagerly():
    code = ("import sys, attn_mod.eval.harness as h; "
            "bad = [m for m in ('lm_eval', 'vlmeval', 'lmms_eval') if m in sys.modules]; "
            "assert not bad, bad; assert callable(h.run_lm_eval) and 'lm_eval' not in sys.modules")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert proc.returncode == 0, proc.stderr[-2000:]

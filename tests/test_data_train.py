"""The assembled AVAR JSONL trains with `attn-mod train` unchanged: one tiny SFT step on the synthesized file."""

from __future__ import annotations

import json
import math
from pathlib import Path

from attn_mod.cli import main
from attn_mod.config import load_config
from attn_mod.data.samples import read_samples
from attn_mod.data.synthesis import SynthesisConfig, run_synthesis
from tests.test_data_synthesis import GATES, ITEMS, Server, config, write_source

TINY_SFT = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny_sft.yaml"


def test_synthesized_jsonl_trains_one_sft_step(tmp_path):
    source = write_source(tmp_path / "src")
    server = Server(tmp_path / "server")
    try:
        cfg = load_config(SynthesisConfig, config(tmp_path, source, server.url, "synth"))
        result = run_synthesis(cfg, progress=False)
    finally:
        server.stop()
    train = result.paths["train"]
    assert len(read_samples(train, require_assistant=True)) == len(ITEMS) - len(GATES)
    out = tmp_path / "train_run"
    rc = main(["train", str(TINY_SFT), f"data.train={train}", f"output_dir={out}", "schedule.max_steps=1",
               "schedule.batch_size=2"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert math.isfinite(rows[0]["loss"]) and rows[0]["loss"] > 0
    # every synthesized sample has a system turn and an image: both AGTO terms are computed on all of them
    assert rows[0]["samples_img"] == 2 and rows[0]["samples_sys"] == 2 and math.isfinite(rows[0]["loss_img"])


TINY_GRPO = TINY_SFT.with_name("tiny_grpo.yaml")


def test_grounded_jsonl_trains_one_grpo_step_with_the_sayo_reward(tmp_path):
    from attn_mod.data.grounded import convert_gqa

    data = Path(__file__).resolve().parent / "data" / "gqa"
    res = convert_gqa(data / "questions.json", data / "scene_graphs.json", data / "images", tmp_path / "gqa.jsonl",
                      progress=False)
    out = tmp_path / "grpo_run"
    assert main(["train", str(TINY_GRPO), f"data.train={res.path}", f"output_dir={out}", "schedule.max_steps=1",
                 "schedule.batch_size=2", "rollout.group_size=2", "rollout.max_completion_length=4"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    # every converted prompt has TARGET boxes: the SAYO reward is defined for all 2 x 2 completions
    assert rows[0]["reward_undefined/sayo"] == 0 and math.isfinite(rows[0]["reward/sayo"])

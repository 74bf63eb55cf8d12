"""Trainer core: config validation, NaN stop, gradient checkpointing, LoRA, SIGKILL + resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import ENTRY, TINY_SFT, env, make_data

from attn_mod.config import ConfigError
from attn_mod.jsonl import read_jsonl
from attn_mod.trainers.config import apply_overrides, load_train_config
from attn_mod.trainers.loop import TrainingStopped, lr_lambda
from attn_mod.trainers.sft import SFTRecipe


def _cfg(tmp_path, *overrides, n=8):
    data = make_data(tmp_path / "data", n)
    return load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", *overrides])


def test_config_overrides_are_validated(tmp_path):
    cfg = _cfg(tmp_path, "optim.lr=1e-5", "optim.betas=[0.9,0.95]", "objective.layers=[0,-1]", "lora.enabled=true")
    assert cfg.optim.lr == 1e-5 and cfg.optim.betas == [0.9, 0.95] and cfg.objective.layers == [0, -1]
    assert cfg.lora.enabled is True
    for bad, match in [("optim.lrr=1", r"optim\.lrr: unknown key"), ("optim.lr=fast", r"optim\.lr: expected a number"),
                       ("objective.query=rows", r"objective\.query"), ("schedule.batch_size=0", "batch_size"),
                       ("nosuch.key=1", r"nosuch: unknown key"), ("objective.layers=some", "layers"),
                       ("rollout.group_size=4", "no 'rollout' section"), ("optim.lr", "section.key=value")]:
        with pytest.raises(ConfigError, match=match):
            _cfg(tmp_path, bad)
    with pytest.raises(ConfigError, match="exactly one of model.path"):
        _cfg(tmp_path, "model.path=/x")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_cli_bad_key_is_an_error_before_anything_runs(tmp_path):
    from attn_mod.cli import main

    data = make_data(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert main(["train", str(TINY_SFT), f"data.train={data}", f"output_dir={out}", "optim.lrr=1"]) == 2
    assert not out.exists()


def test_lr_schedule_warmup_then_cosine():
    vals = [lr_lambda(s, warmup=2, total=6, kind="cosine", min_ratio=0.0) for s in range(6)]
    assert vals[:3] == [0.5, 1.0, 1.0] and vals[2] > vals[3] > vals[4] > vals[5] > 0


def test_nan_stops_naming_step_and_component_and_keeps_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "schedule.max_steps=5", "checkpoint.every=1", "checkpoint.keep=3")
    r = SFTRecipe(cfg)
    r.setup()
    orig = r.micro_batch

    def poisoned(step, micro):
        if step == 3:
            with torch.no_grad():
                r.model.lm_head.weight[0, 0] = float("nan")
        return orig(step, micro)

    r.micro_batch = poisoned
    with pytest.raises(TrainingStopped, match=r"step 3: non-finite loss, loss_lm \(") as info:
        r.train()
    r.cleanup()
    assert "loss_img" not in str(info.value) and "step-0000002" in str(info.value)
    rows = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    ckpts = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert ckpts == ["step-0000001", "step-0000002"]
    weights = load_file(tmp_path / "out" / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _train(tmp_path, name, *overrides):
    cfg = _cfg(tmp_path, f"output_dir={tmp_path / name}", "schedule.max_steps=2", *overrides)
    r = SFTRecipe(cfg)
    r.setup()
    rows = r.train()
    params = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    r.cleanup()
    return rows, params


def test_gradient_checkpointing_gives_the_same_run(tmp_path, monkeypatch):
    patch_module = sys.modules["attn_mod.patch"]  # `attn_mod.patch` is the function
    calls = []
    real = patch_module.category_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("return_mass"))
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_module, "category_attention", counting)
    rows, params = _train(tmp_path, "plain")
    n_plain = len(calls)
    rows_gc, params_gc = _train(tmp_path, "gc", "model.gradient_checkpointing=true")
    # 2 steps x 2 layers; with checkpointing every attention call runs again (with masses) inside backward
    assert n_plain == 4 and len(calls) - n_plain == 8 and all(calls)
    for a, b in zip(rows, rows_gc):
        assert a == pytest.approx(b, rel=1e-5)
    for n in params:
        torch.testing.assert_close(params_gc[n], params[n], rtol=1e-5, atol=1e-6)


def test_lora_trains_only_the_adapter(tmp_path):
    from attn_mod.tiny import build_tiny

    rows, params = _train(tmp_path, "lora", "lora.enabled=true", "lora.r=4", "optim.lr=1e-2")
    base, _ = build_tiny("qwen2_5_vl", seed=0)
    base_params = dict(base.named_parameters())
    changed = [n for n, p in params.items() if "lora_" in n]
    assert changed and all(torch.isfinite(p).all() for p in params.values())
    for n, p in params.items():  # injected adapters leave every base weight untouched
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            torch.testing.assert_close(p, base_params[key].detach(), rtol=0, atol=0)
    saved = load_file(tmp_path / "lora" / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()


def _run_cli(args, **kw):
    return subprocess.run([sys.executable, str(ENTRY), "train", *map(str, args)], env=env(), capture_output=True,
                          text=True, timeout=600, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    data = make_data(tmp_path / "data", 8)
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=6", "checkpoint.every=2", "checkpoint.keep=2"]
    full = _run_cli(base + [f"output_dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ENTRY), "train", *map(str, base), f"output_dir={out}"],
                            env={**env(), "ATTN_MOD_TEST_STEP_SLEEP": "0.4"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(read_jsonl(out / "metrics.jsonl", repair=False)) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= len(read_jsonl(out / "metrics.jsonl")) < 6
    assert (out / "checkpoints" / "step-0000002").is_dir() and not (out / "final").exists()

    again = _run_cli(base + [f"output_dir={out}"])  # without --resume: refuses to overwrite the run
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _run_cli(base + [f"output_dir={out}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(tmp_path / "full" / "metrics.jsonl")
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(tmp_path / "full" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_same_global_batch(tmp_path):
    data = make_data(tmp_path / "data", 8)
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=3", "schedule.batch_size=2", "checkpoint.every=0"]
    one = _run_cli(base + [f"output_dir={tmp_path / 'one'}", "schedule.gradient_accumulation_steps=2"])
    assert one.returncode == 0, one.stderr[-3000:]
    # accelerate's --cpu launcher needs mpirun for several processes; torchrun (--multi_gpu) with
    # ACCELERATE_USE_CPU=true gives 2 CPU processes on gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), str(ENTRY), "train"]
    two = subprocess.run(launch + [*map(str, base), f"output_dir={tmp_path / 'two'}"],
                         env={**env(), "ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1"}, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    stats = json.loads((tmp_path / "two" / "data_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["global_batch"] == 4
    r1, r2 = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert len(r1) == len(r2) == 3
    for a, b in zip(r1, r2):
        assert a["tokens"] == b["tokens"] and a["samples_img"] == b["samples_img"]
        for k in ("loss", "loss_lm", "loss_img", "loss_sys", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)

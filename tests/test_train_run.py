"""Trainer core: config validation, NaN stop, gradient checkpointing, LoRA, SIGKILL + resume, 2-process DDP
(FSDP and the refused distributed setups: tests/test_fsdp.py)."""

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

    killed_rows = read_jsonl(out / "metrics.jsonl", repair=False)
    last_ckpt = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    again = _run_cli(base + [f"output_dir={out}"])  # without --resume: refuses to overwrite the run
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _run_cli(base + [f"output_dir={out}", "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000006"]  # last K=2
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(tmp_path / "full" / "metrics.jsonl")
    # rows the killed run wrote after its last checkpoint are kept aside, never deleted
    later = [r for r in killed_rows if r["step"] > last_ckpt]
    superseded = read_jsonl(out / "metrics.superseded.jsonl") if later else []
    assert [{k: v for k, v in r.items() if k != "superseded_by_resume_from"} for r in superseded] == later
    assert all(r["superseded_by_resume_from"] == last_ckpt for r in superseded)
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


def test_shipped_sft_configs_validate():
    from pathlib import Path

    for path in sorted(Path(TINY_SFT).parent.glob("*.yaml")):
        import yaml

        if (yaml.safe_load(path.read_text()) or {}).get("recipe", "sft") != "sft":
            continue
        cfg = load_train_config(path)
        assert cfg.recipe == "sft" and cfg.objective is not None
    cold = load_train_config(Path(TINY_SFT).parent / "avar_coldstart.yaml")
    assert (cold.optim.lr, cold.data.cutoff, cold.objective.lambda_img, cold.objective.lambda_sys,
            cold.objective.layers) == (1e-5, 8192, 0.15, 0.15, "all")


def test_reference_backward_keeps_o_n_memory_and_exact_gradients():
    """Under autograd the torch operator recomputes each query chunk in backward: what it saves for backward
    is O(Q) (no Q x K matrix), and the gradients equal those of the unchunked operator."""
    from attn_mod.kernels.reference import category_attention_reference
    from attn_mod.kernels.spec import CategoryTransform

    B, Hkv, G, Q, D = 1, 2, 2, 96, 8
    q = torch.randn(B, Hkv * G, Q, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Q, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Q, D, dtype=torch.float64, requires_grad=True)
    cat = torch.randint(1, 6, (B, Q))
    cat[:, :3] = 0
    tr = CategoryTransform.from_lists(w={3: 1.3, 1: 0.6}, mul={2: 1.1})
    g_out, g_mass = torch.randn(B, Hkv * G, Q, D, dtype=torch.float64), torch.randn(B, Hkv * G, Q, 8,
                                                                                   dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    grads = []
    for chunk in (Q, 8):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = category_attention_reference(q, k, v, cat, tr, return_mass=True, chunk_size=chunk)
        loss = (r.out * g_out).sum() + (r.mass * g_mass).sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
        if chunk == Q:  # one chunk = no checkpoint: autograd keeps the Hq x Q x K probabilities
            assert max(saved) >= Hkv * G * Q * Q
        else:  # checkpointed chunks: nothing of size Hq x Q x K is kept for backward
            assert max(saved, default=0) < Hkv * G * Q * Q // 4, max(saved)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resume_in_process_continues_and_rejects_changed_batch(tmp_path):
    cfg = _cfg(tmp_path, "schedule.max_steps=2", "checkpoint.every=1")
    r = SFTRecipe(cfg)
    r.setup()
    first = r.train()
    r.cleanup()
    longer = _cfg(tmp_path, "schedule.max_steps=3", "checkpoint.every=1")
    r = SFTRecipe(longer, resume=True)
    r.setup()
    assert r.start_step == 2
    rows = r.train()
    r.cleanup()
    assert rows[:2] == first and [row["step"] for row in rows] == [1, 2, 3]
    assert read_jsonl(tmp_path / "out" / "metrics.jsonl") == rows
    changed = _cfg(tmp_path, "schedule.max_steps=4", "schedule.batch_size=1")
    with pytest.raises(ValueError, match="schedule.batch_size differ"):
        r = SFTRecipe(changed, resume=True)
        try:
            r.setup()
        finally:
            r.cleanup()


def test_bf16_autocast_step_runs_and_stays_close_to_fp32(tmp_path):
    rows, _ = _train(tmp_path, "fp32", "schedule.max_steps=1", "checkpoint.save_final=false")
    rows_bf16, _ = _train(tmp_path, "bf16", "schedule.max_steps=1", "precision.mixed=bf16",
                          "checkpoint.save_final=false")
    for k in ("loss", "loss_lm", "loss_img", "loss_sys"):
        assert rows_bf16[0][k] == pytest.approx(rows[0][k], rel=0.05, abs=0.05), k
        assert rows_bf16[0][k] != rows[0][k] or k == "loss_img", k  # autocast really ran in bf16


def test_checkpoint_write_is_atomic_and_prunes_to_keep(tmp_path, monkeypatch):
    from attn_mod.trainers.checkpoint import Checkpointer

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck = Checkpointer(tmp_path / "ck", keep=2)
    kw = dict(model=model, optimizer=opt, scheduler=sched, samples_seen=0, metrics=[], config={})
    for step in (1, 2, 3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        ck.save(step, **{**kw, "metrics": [{"step": step}]})
    assert [p.name for p in ck.list()] == ["step-0000002", "step-0000003"]
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError):
        ck.save(4, **kw)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.latest().name == "step-0000003"  # the interrupted write is invisible
    want = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    state = ck.load(ck.latest(), model=model, optimizer=opt, scheduler=sched)
    assert state.step == 3 and state.metrics == [{"step": 3}] and torch.equal(model.weight, want)
    ck.save(5, **kw)  # the next save clears the stale temporary folder
    assert [p.name for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_train_memory_bench_smoke(tmp_path):
    from pathlib import Path

    root = Path(TINY_SFT).parents[2]
    md = tmp_path / "RESULTS.md"
    md.write_text("kept\n")
    res = subprocess.run([sys.executable, str(root / "bench" / "train_memory.py"), "--seqs", "300", "--layers", "1",
                          "--out", str(tmp_path / "tm.json"), "--results-md", str(md)], env=env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "tm.json").read_text())
    assert {r["mode"] for r in rows} == {"attn_mod", "eager"}
    a, e = sorted(rows, key=lambda r: r["mode"])
    assert a["seq"] == e["seq"] > 250 and a["loss"] == pytest.approx(e["loss"], rel=1e-5)  # same objective
    assert md.read_text().startswith("kept\n") and f"| {a['seq']} | 1 |" in md.read_text()


def test_train_memory_table_marks_oom_and_compares_losses():
    """The GPU table (bench/train_memory.py --device cuda): an out-of-memory step prints OOM (no loss comparison),
    bf16 losses compare at bf16 tolerance."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("train_memory", Path(TINY_SFT).parents[2] / "bench" / "train_memory.py")
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    row = dict(layers=2, device="cuda", width="real", dtype="bfloat16", backend="triton")
    rows = [{**row, "mode": "attn_mod", "seq": 8192, "oom": False, "peak_delta_mib": 900.5, "seconds": 0.4,
             "loss": 7.01},
            {**row, "mode": "eager", "seq": 8192, "oom": False, "peak_delta_mib": 9000.0, "seconds": 0.9, "loss": 7.05},
            {**row, "mode": "attn_mod", "seq": 32768, "oom": False, "peak_delta_mib": 3600.0, "seconds": 1.5,
             "loss": 7.2},
            {**row, "mode": "eager", "seq": 32768, "oom": True, "peak_delta_mib": None, "seconds": None, "loss": None}]
    lines = tm.table(rows, 2)
    assert lines[2] == "| 8192 | 2 | 900.5 | 9000.0 | 0.4 | 0.9 | yes |"
    assert lines[3] == "| 32768 | 2 | 3600.0 | OOM | 1.5 | OOM | - |"


def test_model_from_path_and_final_dir_loads_back(tmp_path):
    from attn_mod.loading import load_model
    from attn_mod.tiny import save_tiny

    path = save_tiny("qwen2_5_vl", tmp_path / "init")
    rows, params = _train(tmp_path, "frompath", "model.tiny=null", f"model.path={path}", "schedule.max_steps=1")
    model, processor = load_model(tmp_path / "frompath" / "final")
    assert processor.tokenizer.chat_template
    trained = dict(model.named_parameters())
    for n, p in params.items():
        torch.testing.assert_close(trained[n], p, rtol=0, atol=0)
    assert rows[0]["step"] == 1 and rows[0]["samples_img"] > 0


def test_resume_moves_rows_after_the_last_checkpoint_aside(tmp_path):
    """A run that died after step 3 but before its checkpoint: resuming from step 2 recomputes step 3, and the
    dead run's step-3 row goes to metrics.superseded.jsonl instead of being deleted."""
    import shutil

    cfg = _cfg(tmp_path, "schedule.max_steps=3", "checkpoint.every=2", "checkpoint.keep=5")
    r = SFTRecipe(cfg)
    r.setup()
    first = r.train()
    r.cleanup()
    ckpts = tmp_path / "out" / "checkpoints"
    shutil.rmtree(ckpts / "step-0000003")  # as if killed between the step-3 row and its checkpoint
    shutil.rmtree(tmp_path / "out" / "final", ignore_errors=True)
    r = SFTRecipe(_cfg(tmp_path, "schedule.max_steps=3", "checkpoint.every=2", "checkpoint.keep=5"), resume=True)
    r.setup()
    assert r.start_step == 2
    rows = r.train()
    r.cleanup()
    assert rows == first and read_jsonl(tmp_path / "out" / "metrics.jsonl") == first
    superseded = read_jsonl(tmp_path / "out" / "metrics.superseded.jsonl")
    assert superseded == [{**first[2], "superseded_by_resume_from": 2}]


@pytest.mark.parametrize("family", ["mllama"])
def test_train_refuses_families_its_collator_does_not_encode(tmp_path, family):
    """Only the Qwen-VL collator exists: another family is refused at setup, naming the supported ones and the
    way to train it (patch + capture + losses), before any weight loads or file is written."""
    from attn_mod.trainers.config import load_train_config
    from attn_mod.trainers.sft import SFTRecipe

    data = make_data(tmp_path / "data", 2)
    cfg = load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", f"model.tiny={family}"])
    recipe = SFTRecipe(cfg)
    with pytest.raises(NotImplementedError, match=rf"supports the qwen2_5_vl / qwen3_vl / llava / internvl / gemma3 / "
                                                  rf"llava_onevision / idefics3 / smolvlm families; '{family}'.*"
                                                  r"cross-attention keys.*attn_mod.capture\(model, detach=False\)"):
        recipe.setup()
    assert not hasattr(recipe, "model") and not (tmp_path / "out").exists()

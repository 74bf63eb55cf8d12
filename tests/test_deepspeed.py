"""DeepSpeed ZeRO-1/2 under `accelerate launch` (2 processes, DeepSpeed's CPU accelerator, gloo), with the shipped
recipe configs/accelerate/deepspeed_zero2.yaml: the same losses and final weights as one process with the same
global batch (with DeepSpeed's gradient accumulation and gradient checkpointing), optimizer state really
partitioned per rank in DeepSpeed's checkpoints, SIGKILL + --resume reproducing the uninterrupted run (ZeRO-1,
LoRA), bf16, GRPO equal to DDP; and the DeepSpeed setups that are refused with a reason (ZeRO-3, offload, a
DeepSpeed optimizer section, ACCELERATE_USE_CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import ENTRY, ROOT, TINY_SFT, env, free_port, kill_when, make_data

from attn_mod.jsonl import read_jsonl

DS_YAML = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
DDP_YAML = ROOT / "configs" / "accelerate" / "ddp.yaml"
LOSSES = ("loss", "loss_lm", "loss_img", "loss_sys")


def _launch_cmd(args, *, config=DS_YAML, launch=()) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml` with 2 processes (README)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), *launch, str(ENTRY), "train",
            *map(str, args)]


def _ds_env(**extra) -> dict:
    e = {**env(), "MASTER_ADDR": "127.0.0.1"}
    e.pop("ACCELERATE_USE_CPU", None)  # DeepSpeed picks its CPU accelerator itself (no GPU here)
    return {**e, **extra}


def _run(cmd, **extra):
    proc = subprocess.run(cmd, env=_ds_env(**extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _one(args):
    return _run([sys.executable, str(ENTRY), "train", *map(str, args)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with accumulation 4, and ZeRO-2 over 2 processes with accumulation 2 (DeepSpeed's own
    accumulation boundaries) and gradient checkpointing: the same global batch (4)."""
    root = tmp_path_factory.mktemp("deepspeed")
    data = make_data(root / "data", 8)
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=3", "schedule.batch_size=1", "checkpoint.every=2"]
    _one(base + [f"output_dir={root / 'one'}", "schedule.gradient_accumulation_steps=4"])
    _run(_launch_cmd(base + [f"output_dir={root / 'zero2'}", "schedule.gradient_accumulation_steps=2",
                             "model.gradient_checkpointing=true"]))
    return root, data


def _assert_same_rows(r1, r2, keys, rel=1e-5, abs=1e-6):
    assert [r["step"] for r in r1] == [r["step"] for r in r2] and r1
    for a, b in zip(r1, r2):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=abs), k


@pytest.mark.slow
def test_zero2_two_processes_match_one_process_same_global_batch(runs):
    root, _ = runs
    stats = json.loads((root / "zero2" / "data_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["global_batch"] == 4
    r1, r2 = read_jsonl(root / "one" / "metrics.jsonl"), read_jsonl(root / "zero2" / "metrics.jsonl")
    _assert_same_rows(r1, r2, (*LOSSES, "lr", "tokens", "samples_img", "samples_sys"))
    assert r2[-1]["lr"] < r2[0]["lr"]  # our schedule drives DeepSpeed's optimizer (cosine decay reached it)
    f1, f2 = root / "one" / "final", root / "zero2" / "final"
    assert sorted(p.name for p in f1.iterdir()) == sorted(p.name for p in f2.iterdir())
    w1, w2 = load_file(f1 / "model.safetensors"), load_file(f2 / "model.safetensors")
    assert w1.keys() == w2.keys() and len(w1) > 20
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    init = load_file(root / "one" / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert any(not torch.equal(init[k], w2[k]) for k in init)  # it trained
    from attn_mod.loading import load_model

    model, _ = load_model(f2)
    for n, p in model.named_parameters():
        if n in w1:
            torch.testing.assert_close(p.detach(), w1[n], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_zero2_checkpoint_partitions_optimizer_state_per_rank(runs):
    """DeepSpeed's own checkpoint inside ours: each rank wrote its own half of the fp32 master weights and AdamW
    moments (not a replica), the module file holds the trainable parameters only (no frozen vision weights);
    state.json says layout "deepspeed" and lists the trainable names."""
    root, _ = runs
    ckpt = root / "zero2" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["deepspeed", "rng-rank0.pt", "rng-rank1.pt", "scheduler.pt",
                                                       "state.json"]
    state = json.loads((ckpt / "state.json").read_text())
    full = load_file(root / "one" / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert state["layout"] == "deepspeed" and sorted(state["trainable"]) == sorted(full)
    zero = ckpt / "deepspeed" / "zero"
    module = torch.load(zero / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert set(module) == set(full) and not any("visual" in k for k in module)
    total = sum(t.numel() for t in full.values())
    sizes = []
    for rank in (0, 1):
        opt = torch.load(zero / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
                         weights_only=False)["optimizer_state_dict"]
        assert int(opt["zero_stage"]) == 2 and opt["partition_count"] == [2]
        (part,) = opt["single_partition_of_fp32_groups"]
        moments = opt["base_optimizer_state"]["state"][0]
        assert moments["exp_avg"].numel() == part.numel() and float(moments["exp_avg_sq"].abs().sum()) > 0
        sizes.append(part.numel())
    assert sizes[0] > 0 and sizes[1] > 0 and total <= sum(sizes) <= total + 2 * 64  # halves (+ alignment padding)


@pytest.mark.slow
def test_zero1_lora_sigkill_then_resume_matches_uninterrupted(runs):
    """ZeRO-1 (`--zero_stage 1`) with LoRA: killed mid-run (SIGKILL to launcher and workers), then --resume:
    metrics.jsonl and the final adapter equal the uninterrupted run's exactly."""
    root, data = runs
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=5", "schedule.batch_size=2", "checkpoint.every=2",
            "checkpoint.keep=2", "lora.enabled=true", "lora.r=4"]
    full, out = root / "lora_full", root / "lora_killed"
    _run(_launch_cmd(base + [f"output_dir={full}"], launch=("--zero_stage", "1")))
    proc = subprocess.Popen(_launch_cmd(base + [f"output_dir={out}"], launch=("--zero_stage", "1")),
                            env=_ds_env(ATTN_MOD_TEST_STEP_SLEEP="0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(proc, out, 3)
    assert 3 <= len(read_jsonl(out / "metrics.jsonl")) < 5 and not (out / "final").exists()
    assert (out / "checkpoints" / "step-0000002" / "deepspeed" / "zero" / "mp_rank_00_model_states.pt").is_file()
    resumed = _run(_launch_cmd(base + [f"output_dir={out}", "--resume"], launch=("--zero_stage", "1")))
    assert "resumed from" in resumed.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(full / "metrics.jsonl")
    a = load_file(out / "final" / "adapter_model.safetensors")
    b = load_file(full / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a and all("lora_" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    opt = torch.load(out / "checkpoints" / "step-0000004" / "deepspeed" / "zero"
                     / "zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
    assert int(opt["zero_stage"]) == 1


@pytest.mark.slow
def test_zero2_bf16_runs_close_to_fp32(runs):
    """precision.mixed=bf16 reaches DeepSpeed's bf16 mode: step-1 losses close to the fp32 run's but not equal
    (bf16 compute really ran); OUT/final holds the bf16 weights the engine trained."""
    root, data = runs
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=2", "schedule.batch_size=2", "checkpoint.every=0",
            "precision.mixed=bf16"]
    _run(_launch_cmd(base + [f"output_dir={root / 'bf16'}"]))
    bf16, fp32 = read_jsonl(root / "bf16" / "metrics.jsonl")[0], read_jsonl(root / "zero2" / "metrics.jsonl")[0]
    for k in LOSSES:
        assert bf16[k] == pytest.approx(fp32[k], rel=0.05, abs=0.05), k
    assert any(bf16[k] != fp32[k] for k in LOSSES)
    w = load_file(root / "bf16" / "final" / "model.safetensors")
    assert w and all(v.dtype == torch.bfloat16 for v in w.values())


@pytest.mark.slow
def test_zero2_grpo_equals_ddp_two_processes(runs):
    """GRPO under ZeRO-2 (the engine runs the policy forward and backward; generate and scoring use the module)
    equals the same 2-process run under DDP (same seeds: the same rollouts)."""
    root, data = runs
    base = [ROOT / "configs" / "train" / "tiny_grpo.yaml", f"data.train={data}", "schedule.max_steps=2"]
    ddp_out, ds_out = root / "grpo_ddp", root / "grpo_zero2"
    _run(_launch_cmd(base + [f"output_dir={ddp_out}"], config=DDP_YAML), ACCELERATE_USE_CPU="true")
    _run(_launch_cmd(base + [f"output_dir={ds_out}"]))
    r_ddp, r_ds = read_jsonl(ddp_out / "metrics.jsonl"), read_jsonl(ds_out / "metrics.jsonl")
    assert len(r_ddp) == len(r_ds) == 2
    for a, b in zip(r_ddp, r_ds):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    w1, w2 = load_file(ddp_out / "final" / "model.safetensors"), load_file(ds_out / "final" / "model.safetensors")
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert (ds_out / "checkpoints" / "step-0000002" / "deepspeed" / "zero").is_dir()


# --------------------------------------------------------------------------------------------- refused setups


def _sft_cfg(tmp_path, *overrides):
    from attn_mod.trainers.config import load_train_config

    data = make_data(tmp_path / "data", 2)
    return load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", *overrides])


def _fake_deepspeed(monkeypatch, ds_config: dict):
    """accelerate.Accelerator replaced by one reporting DEEPSPEED with a plugin holding `ds_config`."""
    import accelerate

    plugin = types.SimpleNamespace(deepspeed_config=ds_config, gradient_accumulation_steps=1)

    class FakeAccelerator:
        def __init__(self, **kw):
            self.distributed_type = accelerate.DistributedType.DEEPSPEED
            self.num_processes = 2
            self.state = types.SimpleNamespace(deepspeed_plugin=plugin)

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    return plugin


@pytest.mark.parametrize("zero, extra, match", [
    ({"stage": 3}, {}, "ZeRO-3 is not supported: it partitions the parameters"),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, "offload_optimizer to 'cpu' is not supported"),
    ({"stage": 1, "offload_param": {"device": "nvme"}}, {}, "offload_param to 'nvme' is not supported"),
    ({"stage": 2}, {"optimizer": {"type": "AdamW"}}, "its own optimizer / scheduler is not supported"),
])
def test_unsupported_deepspeed_setups_are_refused_before_any_work(tmp_path, monkeypatch, zero, extra, match):
    from attn_mod.trainers.sft import SFTRecipe

    _fake_deepspeed(monkeypatch, {"zero_optimization": zero, **extra})
    recipe = SFTRecipe(_sft_cfg(tmp_path))
    with pytest.raises(NotImplementedError, match=match):
        recipe.setup()
    assert not (tmp_path / "out").exists()


def test_deepspeed_config_takes_batch_accumulation_and_clipping_from_the_training_config(tmp_path, monkeypatch):
    from attn_mod.trainers.sft import SFTRecipe

    plugin = _fake_deepspeed(monkeypatch, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1})
    recipe = SFTRecipe(_sft_cfg(tmp_path, "schedule.batch_size=3", "schedule.gradient_accumulation_steps=5",
                                "optim.max_grad_norm=0.7"))
    recipe._deepspeed_config(plugin, 4)  # 4 processes
    ds = plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (3, 5, 60, 0.7)
    assert plugin.gradient_accumulation_steps == 5


def test_deepspeed_launch_with_accelerate_use_cpu_is_refused(tmp_path, monkeypatch):
    """accelerate ignores DeepSpeed when ACCELERATE_USE_CPU=true (plain CPU data parallel): refused, naming the fix."""
    from attn_mod.trainers.sft import SFTRecipe

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(ValueError, match="unset ACCELERATE_USE_CPU"):
        SFTRecipe(_sft_cfg(tmp_path)).setup()
    assert not (tmp_path / "out").exists()


def test_deepspeed_and_other_checkpoints_do_not_cross_load(tmp_path):
    """A one-process checkpoint cannot resume a DeepSpeed run (and back): a clear error before anything changes."""
    from attn_mod.trainers.checkpoint import Checkpointer

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    Checkpointer(tmp_path / "ck").save(1, model=model, optimizer=opt, scheduler=sched, samples_seen=4, metrics=[],
                                       config={})
    before, rng = model.weight.detach().clone(), torch.get_rng_state()

    class NoEngine:  # never reached: the layout check comes first
        def load_checkpoint(self, *a, **k):
            raise AssertionError("load_checkpoint must not run")

    with pytest.raises(ValueError, match=r"is unsharded \(single-process / DDP\) but this run is DeepSpeed ZeRO"):
        Checkpointer(tmp_path / "ck", engine=NoEngine()).load(tmp_path / "ck" / "step-0000001", model=model,
                                                               optimizer=opt, scheduler=sched)
    assert torch.equal(model.weight, before) and torch.equal(torch.get_rng_state(), rng)
    ds = tmp_path / "ds" / "step-0000001"
    ds.mkdir(parents=True)
    (ds / "state.json").write_text(json.dumps({"step": 1, "samples_seen": 4, "layout": "deepspeed", "sharded": False,
                                               "metrics": [], "config": {}, "trainable": ["weight", "bias"]}))
    with pytest.raises(ValueError, match=r"is DeepSpeed ZeRO but this run is unsharded"):
        Checkpointer(tmp_path / "ds").load(ds, model=model, optimizer=opt, scheduler=sched)
    shutil.rmtree(tmp_path / "ds")

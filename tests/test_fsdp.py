"""FSDP2 under `accelerate launch` (2 CPU processes, gloo): same losses, masses and final weights as one process
with the same global batch (with gradient checkpointing), really sharded checkpoints, SIGKILL + --resume
reproducing the uninterrupted run, bf16 mixed precision, LoRA, GRPO equal to DDP; and the launch configurations
that are refused with a reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import ENTRY, ROOT, TINY_SFT, env, free_port, kill_when, make_data

from attn_mod.jsonl import read_jsonl

FSDP_YAML = ROOT / "configs" / "accelerate" / "fsdp.yaml"
DDP_YAML = ROOT / "configs" / "accelerate" / "ddp.yaml"
LOSSES = ("loss", "loss_lm", "loss_img", "loss_sys")


def _launch_cmd(args) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` with 2 CPU processes (the README command)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_YAML), "--num_processes",
            "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(ENTRY), "train",
            *map(str, args)]


def _fsdp_env(**extra) -> dict:
    return {**env(), "ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "127.0.0.1", **extra}


def _fsdp(args, **extra):
    proc = subprocess.run(_launch_cmd(args), env=_fsdp_env(**extra), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _one(args, **extra):
    proc = subprocess.run([sys.executable, str(ENTRY), "train", *map(str, args)], env={**env(), **extra},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with accumulation 2 and FSDP over 2 processes with accumulation 1: same global batch (4). The
    FSDP run also uses gradient checkpointing (non-reentrant; the masses are still recorded once per forward)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = make_data(root / "data", 8)
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=3", "schedule.batch_size=2", "checkpoint.every=2"]
    _one(base + [f"output_dir={root / 'one'}", "schedule.gradient_accumulation_steps=2"],
         ATTN_MOD_TEST_DUMP_MASSES=str(root / "masses_one"))
    _fsdp(base + [f"output_dir={root / 'two'}", "model.gradient_checkpointing=true"],
          ATTN_MOD_TEST_DUMP_MASSES=str(root / "masses_two"))
    return root, data


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_same_global_batch(runs):
    root, _ = runs
    stats = json.loads((root / "two" / "data_stats.json").read_text())
    assert stats["num_processes"] == 2 and stats["global_batch"] == 4
    r1, r2 = read_jsonl(root / "one" / "metrics.jsonl"), read_jsonl(root / "two" / "metrics.jsonl")
    assert [r["step"] for r in r1] == [r["step"] for r in r2] == [1, 2, 3]
    for a, b in zip(r1, r2):
        assert (a["tokens"], a["samples_img"], a["samples_sys"]) == (b["tokens"], b["samples_img"], b["samples_sys"])
        for k in (*LOSSES, "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    # OUT/final is a normal HF directory (full state dict gathered on rank 0), same names and files as one process
    f1, f2 = root / "one" / "final", root / "two" / "final"
    assert sorted(p.name for p in f1.iterdir()) == sorted(p.name for p in f2.iterdir())
    assert json.loads((f1 / "config.json").read_text()) == json.loads((f2 / "config.json").read_text())
    w1, w2 = load_file(f1 / "model.safetensors"), load_file(f2 / "model.safetensors")
    assert w1.keys() == w2.keys() and len(w1) > 20
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    from attn_mod.loading import load_model

    model, _ = load_model(f2)
    for n, p in model.named_parameters():  # loads back by path with the trained weights
        torch.testing.assert_close(p.detach(), w1[n] if n in w1 else p.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_checkpoints_are_sharded_per_rank(runs):
    """Each rank wrote its own shard of every trainable parameter (not a replica), plus its RNG state; the
    optimizer moments are sharded the same way; frozen (vision) weights are not saved."""
    import torch.distributed.checkpoint as dcp

    root, _ = runs
    ckpt = root / "two" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng-rank0.pt", "rng-rank1.pt", "scheduler.pt", "shards",
                                                       "state.json"]
    assert json.loads((ckpt / "state.json").read_text())["sharded"] is True
    assert {p.name for p in (ckpt / "shards").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}
    meta = dcp.FileSystemReader(ckpt / "shards").read_metadata().state_dict_metadata
    weights = load_file(root / "one" / "checkpoints" / "step-0000002" / "weights.safetensors")
    assert {k[len("model."):] for k in meta if k.startswith("model.")} == set(weights)
    assert not any("visual" in k for k in meta)
    for name, full in weights.items():
        for key in (f"model.{name}", f"optim.state.{name}.exp_avg"):
            assert tuple(meta[key].size) == tuple(full.shape), key
            (o0, n0), (o1, n1) = sorted((c.offsets[0], c.sizes[0]) for c in meta[key].chunks)  # two, on dim 0
            assert (o0, o1, n0 + n1) == (0, n0, full.shape[0]) and min(n0, n1) > 0, key


@pytest.mark.slow
def test_fsdp_attention_masses_equal_one_process(runs):
    """The patch / capture hooks see the same attention on the FSDP-wrapped model: the masses the attention
    losses receive on rank r equal those of micro-batch r of the one-process run (same weights, same samples)."""
    root, _ = runs
    for rank in (0, 1):
        want = torch.load(root / "masses_one" / f"masses-rank0-call{rank}.pt")
        got = torch.load(root / "masses_two" / f"masses-rank{rank}-call0.pt")
        assert got["masses"].shape == want["masses"].shape and got["masses"].shape[0] == 2  # (L, B, Hq, S, C)
        assert torch.equal(got["key_cats"], want["key_cats"]) and torch.equal(got["rows"], want["rows"])
        assert float(want["masses"].sum()) > 0
        torch.testing.assert_close(got["masses"], want["masses"], rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_fsdp_lora_matches_one_process_and_resumes_exactly(runs):
    """LoRA under FSDP: the same losses and adapter as one process; checkpoints hold only the adapter's shards
    (and its optimizer state); resuming from step 2 gives the uninterrupted run's rows and adapter exactly."""
    import shutil

    import torch.distributed.checkpoint as dcp

    root, data = runs
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=4", "schedule.batch_size=2", "checkpoint.every=2",
            "checkpoint.keep=5", "lora.enabled=true", "lora.r=4"]
    one, two, res = root / "lora_one", root / "lora_two", root / "lora_resumed"
    _one(base + [f"output_dir={one}", "schedule.gradient_accumulation_steps=2"])
    _fsdp(base + [f"output_dir={two}"])
    for a, b in zip(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"), strict=True):
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    assert sorted(p.name for p in (one / "final").iterdir()) == sorted(p.name for p in (two / "final").iterdir())
    assert json.loads((one / "final" / "adapter_config.json").read_text()) == json.loads(
        (two / "final" / "adapter_config.json").read_text())
    a1, a2 = load_file(one / "final" / "adapter_model.safetensors"), load_file(two / "final" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys() and a1 and all("lora_" in k for k in a1)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6)
    meta = dcp.FileSystemReader(two / "checkpoints" / "step-0000002" / "shards").read_metadata().state_dict_metadata
    saved = {k[len("model."):] for k in meta if k.startswith("model.")}
    assert saved == set(load_file(one / "checkpoints" / "step-0000002" / "weights.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    # as if killed after step 4's metrics row, before its checkpoint
    shutil.copytree(two, res)
    shutil.rmtree(res / "checkpoints" / "step-0000004")
    shutil.rmtree(res / "final")
    assert "resumed from" in _fsdp(base + [f"output_dir={res}", "--resume"]).stdout
    assert read_jsonl(res / "metrics.jsonl") == read_jsonl(two / "metrics.jsonl")
    r = load_file(res / "final" / "adapter_model.safetensors")
    assert r.keys() == a2.keys() and all(torch.equal(r[k], a2[k]) for k in r)


def _tied_model(folder: Path) -> Path:
    """The tiny Qwen2.5-VL saved with tie_word_embeddings (lm_head = embed_tokens), as Qwen2.5-VL-3B."""
    from safetensors.torch import save_file

    from attn_mod.tiny import save_tiny

    path = save_tiny("qwen2_5_vl", folder)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg.setdefault("text_config", {})["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.slow
def test_fsdp_tied_embeddings_final_equals_one_process(runs):
    """Tied input / output embeddings (one FSDP group for both, accelerate): same losses and the same final
    directory as one process, the tied weight stored once."""
    from attn_mod.loading import load_model

    root, data = runs
    tied = _tied_model(root / "tied_model")
    model, _ = load_model(tied)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=2", "schedule.batch_size=2", "checkpoint.every=0",
            "model.tiny=null", f"model.path={tied}"]
    _one(base + [f"output_dir={root / 'tied_one'}", "schedule.gradient_accumulation_steps=2"])
    _fsdp(base + [f"output_dir={root / 'tied_two'}"])
    for a, b in zip(read_jsonl(root / "tied_one" / "metrics.jsonl"), read_jsonl(root / "tied_two" / "metrics.jsonl")):
        for k in LOSSES:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    w1 = load_file(root / "tied_one" / "final" / "model.safetensors")
    w2 = load_file(root / "tied_two" / "final" / "model.safetensors")
    assert w1.keys() == w2.keys() and "lm_head.weight" not in w2
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    model, _ = load_model(root / "tied_two" / "final")
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight


@pytest.mark.slow
def test_sharded_checkpointer_is_atomic_and_exact(tmp_path):
    """The sharded Checkpointer on a small fully_shard model over 2 gloo processes (tests/_fsdp_checkpoint_worker.py):
    a save whose shard write fails on one rank publishes nothing; the last good checkpoint restores weights, AdamW
    moments, scheduler and RNG exactly into still-sharded parameters; another model's checkpoint is refused."""
    worker = Path(__file__).resolve().parent / "_fsdp_checkpoint_worker.py"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), str(worker), str(tmp_path)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.glob("ok-rank*")) == ["ok-rank0", "ok-rank1"]


@pytest.mark.slow
def test_fsdp_sigkill_then_resume_matches_uninterrupted_bf16(runs):
    """Killed mid-run (SIGKILL to launcher and workers), then --resume: metrics.jsonl and the final weights equal
    the uninterrupted run's exactly. Runs with precision.mixed=bf16 (FSDP MixedPrecisionPolicy): step-1 losses
    are close to the fp32 FSDP run's but not equal (bf16 compute really ran)."""
    root, data = runs
    base = [TINY_SFT, f"data.train={data}", "schedule.max_steps=5", "schedule.batch_size=2", "checkpoint.every=2",
            "checkpoint.keep=2", "precision.mixed=bf16"]
    full = root / "bf16_full"
    _fsdp(base + [f"output_dir={full}"])
    out = root / "bf16_killed"
    proc = subprocess.Popen(_launch_cmd(base + [f"output_dir={out}"]),
                            env=_fsdp_env(ATTN_MOD_TEST_STEP_SLEEP="0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(proc, out, 3)
    assert 3 <= len(read_jsonl(out / "metrics.jsonl")) < 5 and not (out / "final").exists()
    assert (out / "checkpoints" / "step-0000002" / "shards" / ".metadata").is_file()
    resumed = _fsdp(base + [f"output_dir={out}", "--resume"])
    assert "resumed from" in resumed.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(full / "metrics.jsonl")
    a, b = load_file(out / "final" / "model.safetensors"), load_file(full / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # mixed precision: fp32 master weights are saved; step 1 (before any update) close to the fp32 run
    assert all(v.dtype == torch.float32 for v in a.values())
    bf16, fp32 = read_jsonl(full / "metrics.jsonl")[0], read_jsonl(root / "two" / "metrics.jsonl")[0]
    for k in LOSSES:
        assert bf16[k] == pytest.approx(fp32[k], rel=0.05, abs=0.05), k
    assert any(bf16[k] != fp32[k] for k in LOSSES)


# --------------------------------------------------------------------------------------------- refused setups


def _sft_cfg(tmp_path, *overrides):
    from attn_mod.trainers.config import load_train_config

    data = make_data(tmp_path / "data", 2)
    return load_train_config(TINY_SFT, [f"data.train={data}", f"output_dir={tmp_path / 'out'}", *overrides])


def _fake_accelerator(monkeypatch, kind, **plugin):
    """accelerate.Accelerator replaced by one reporting `kind` and an FSDP plugin built from the FSDP_* variables
    as the launcher sets them (FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, FSDP_ACTIVATION_CHECKPOINTING ...)."""
    import types

    import accelerate
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = {"FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", **plugin}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fsdp = FullyShardedDataParallelPlugin() if kind == "FSDP" else None

    class FakeAccelerator:
        def __init__(self, **kw):
            self.distributed_type = getattr(accelerate.DistributedType, kind)
            self.state = types.SimpleNamespace(fsdp_plugin=fsdp)

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)


@pytest.mark.parametrize("kind, overrides, plugin, match", [
    ("MEGATRON_LM", [], {}, "MEGATRON_LM is not supported"),
    ("FSDP", [], {"FSDP_VERSION": "1"}, "FSDP version 2 only"),
    ("FSDP", ["model.freeze_vision=false"], {}, "trainable vision tower is not supported"),
    ("FSDP", [], {"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP", "FSDP_MIN_NUM_PARAMS": "100"}, "SIZE_BASED_WRAP"),
    ("FSDP", [], {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, "use model.gradient_checkpointing"),
])
def test_unsupported_distributed_setups_are_refused_before_any_work(tmp_path, monkeypatch, kind, overrides, plugin,
                                                                    match):
    from attn_mod.trainers.sft import SFTRecipe

    _fake_accelerator(monkeypatch, kind, **plugin)
    recipe = SFTRecipe(_sft_cfg(tmp_path, *overrides))
    with pytest.raises(NotImplementedError, match=match):
        recipe.setup()
    assert not (tmp_path / "out").exists()


def test_sharded_and_unsharded_checkpoints_do_not_cross_load(tmp_path):
    """A DDP / one-process checkpoint cannot resume an FSDP run (and back): a clear error before any weight,
    optimizer or RNG state changes."""
    from attn_mod.trainers.checkpoint import Checkpointer

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    Checkpointer(tmp_path / "ck").save(1, model=model, optimizer=opt, scheduler=sched, samples_seen=4, metrics=[],
                                       config={})
    before = model.weight.detach().clone()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"is unsharded \(single-process / DDP\) but this run is sharded \(FSDP\)"):
        Checkpointer(tmp_path / "ck", sharded=True).load(tmp_path / "ck" / "step-0000001", model=model,
                                                           optimizer=opt, scheduler=sched)
    assert torch.equal(model.weight, before) and torch.equal(torch.get_rng_state(), rng)
    assert Checkpointer.read_state(tmp_path / "ck" / "step-0000001").sharded is False


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "lora_kl"])
def test_fsdp_grpo_equals_ddp_two_processes(runs, variant):
    """GRPO under FSDP (generate gathers the root shard group, whose vision encoder it calls outside the forward,
    and runs synchronised forwards) equals the same 2-process run under DDP (same seeds: the same rollouts).
    Both launch with the shipped recipes, configs/accelerate/{fsdp,ddp}.yaml. `lora_kl`: LoRA with a k3 KL to the
    disabled adapter."""
    root, data = runs
    grpo = ROOT / "configs" / "train" / "tiny_grpo.yaml"
    base = [grpo, f"data.train={data}", "schedule.max_steps=2"]
    if variant == "lora_kl":  # the reference policy is the disabled adapter (SAYO recipe's setup)
        base += ["lora.enabled=true", "lora.r=4", "objective.beta=0.001"]
    ddp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_YAML), "--num_processes",
           "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), str(ENTRY), "train",
           *map(str, base), f"output_dir={root / f'grpo_ddp_{variant}'}"]
    proc = subprocess.run(ddp, env=_fsdp_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _fsdp(base + [f"output_dir={root / f'grpo_fsdp_{variant}'}"])
    ddp_out, fsdp_out = root / f"grpo_ddp_{variant}", root / f"grpo_fsdp_{variant}"
    for run in (ddp_out, fsdp_out):
        assert json.loads((run / "data_stats.json").read_text())["num_processes"] == 2
    r_ddp, r_fsdp = read_jsonl(ddp_out / "metrics.jsonl"), read_jsonl(fsdp_out / "metrics.jsonl")
    assert len(r_ddp) == len(r_fsdp) == 2
    for a, b in zip(r_ddp, r_fsdp):
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    weights = "adapter_model.safetensors" if variant == "lora_kl" else "model.safetensors"
    w1, w2 = load_file(ddp_out / "final" / weights), load_file(fsdp_out / "final" / weights)
    assert w1.keys() == w2.keys() and len(w1) > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert all(0 < r["completion_length"] <= 8 for r in r_fsdp)
    assert (fsdp_out / "checkpoints" / "step-0000002" / "shards" / "__1_0.distcp").is_file()  # sharded
    assert (ddp_out / "checkpoints" / "step-0000002" / "weights.safetensors").is_file()
    if variant == "lora_kl":
        assert all(r["kl"] is not None and r["kl"] >= 0 for r in r_fsdp) and r_fsdp[1]["kl"] > 0


def test_fsdp_shard_groups_are_the_language_decoder_layers(tmp_path, monkeypatch):
    """Default groups: the language model's decoder layers only (never a vision block); naming a vision-tower
    class explicitly is an error naming the fix."""
    import types

    from accelerate.utils import FullyShardedDataParallelPlugin

    from attn_mod.tiny import build_tiny
    from attn_mod.trainers.sft import SFTRecipe

    recipe = SFTRecipe(_sft_cfg(tmp_path))
    recipe.model, _ = build_tiny("qwen2_5_vl", seed=0)
    assert set(recipe.model._no_split_modules) == {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"}
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    for names, want in [(None, ["Qwen2_5_VLDecoderLayer"]), ("Qwen2_5_VLDecoderLayer,Qwen2_5_VLVisionBlock", None)]:
        if names:
            monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", names)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        recipe.accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin))
        if want:
            recipe._set_fsdp_groups()
            assert plugin.transformer_cls_names_to_wrap == want
        else:
            with pytest.raises(ValueError, match=r"vision-tower classes \['Qwen2_5_VLVisionBlock'\]"):
                recipe._set_fsdp_groups()

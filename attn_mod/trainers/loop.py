"""The shared trainer core: one `Recipe` class a reader follows top to bottom (torchtune-style).

    recipe = SFTRecipe(cfg, resume=False)   # cfg from attn_mod.trainers.config.load_train_config
    recipe.setup()                          # accelerator, model (patched), data, optimizer, scheduler, checkpoints
    recipe.train()                          # forward, loss, backward, step, log, checkpoint
    recipe.cleanup()

A recipe subclass supplies `train_step(batch) -> StepOutput` (one micro-batch: the differentiable loss, the
components checked for NaN/inf, the floats logged) and may override `micro_batch` (where a micro-batch comes
from: GRPO builds it from rollouts) and `reduce_metrics` (how micro-batch floats become one row).

Steps and data. One optimizer step consumes a global batch of G = batch_size x gradient_accumulation_steps x
num_processes samples. Sample t of the run (t = 0, 1, ...) is position t mod N of the permutation of epoch
t // N (seeded by schedule.seed and the epoch), so the data position is a function of the step and resume needs
nothing else. Micro-batch k = m * num_processes + rank of step s (m = accumulation index) holds samples
t = s*G + k*batch_size ... + batch_size - 1: one process with accumulation 2 sees exactly the micro-batches two
processes see. The step loss is the mean of the micro-batch losses (DDP / FSDP average across processes).

Distribution (accelerate launch): one process, DDP, FSDP2 (`configs/accelerate/fsdp.yaml`; parameters,
gradients and optimizer state sharded, one shard group per language-model decoder layer, sharded checkpoints,
OUT/final gathered on rank 0), or DeepSpeed ZeRO-1/2 (`configs/accelerate/deepspeed_zero2.yaml`; optimizer
state and fp32 master weights, and with ZeRO-2 gradients, partitioned; DeepSpeed's own checkpoints). Under
DeepSpeed the engine runs backward, accumulation boundaries, gradient clipping and the optimizer step
(`_deepspeed_config` sets its micro batch, accumulation and clipping from this config); the schedule stays ours.
ZeRO-3, DeepSpeed offload, Megatron-LM and XLA are refused at setup (`_setup_accelerator`).

Outputs: OUT/metrics.jsonl (one object per optimizer step, fsynced; `metric_keys`), OUT/checkpoints/ (atomic,
see checkpoint.py), OUT/final/ (a loadable model directory, or the LoRA adapter), OUT/config.yaml,
OUT/data_stats.json (samples kept / truncated / dropped). A non-finite loss component stops the run before the
optimizer step with `TrainingStopped` naming the step and component; checkpoints already written stay intact.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ..jsonl import append_jsonl, read_jsonl, write_jsonl_atomic
from ..patch import patch
from .checkpoint import Checkpointer, full_model_state, unsharded_classes
from .config import TrainConfig
from .data import Batch, Collator, EncodedDataset, load_train_samples

# the vision tower and its projector in every trained family (Qwen's visual.* holds both; Idefics3's projector is
# `connector`, LLaVA-OneVision's row separator `image_newline`): frozen by model.freeze_vision
VISION_PARAM_KEYS = ("visual.", "vision_tower", "vision_model", "multi_modal_projector", "model.connector.",
                     "image_newline")


def _fsdp_on_cpu(acc) -> None:
    """Honour an FSDP launch on CPU processes (`ACCELERATE_USE_CPU=true accelerate launch --config_file
    configs/accelerate/fsdp.yaml ...`, gloo). accelerate 1.15 selects FSDP only for accelerator devices
    (AcceleratorState: the FSDP branch sits under MULTI_GPU / NPU / XPU ...), so on CPU an FSDP launch silently
    becomes MULTI_CPU data parallel with full replicas. torch's FSDP2 `fully_shard` runs on CPU with gloo, so the
    state is set to FSDP with the plugin the launcher configured (FSDP_* environment variables); from there on
    accelerate's own FSDP2 path (`prepare`, clip, no_sync) runs unchanged. On GPUs nothing changes here."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (wants_fsdp and acc.distributed_type == DistributedType.MULTI_CPU):
        return
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _deepspeed_launch() -> bool:
    """`accelerate launch` with a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED for the workers)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss / gradient); the message names step and component."""


@dataclass
class StepOutput:
    """What `train_step` returns for one micro-batch."""

    loss: torch.Tensor                                  # 0-dim, differentiable
    components: dict[str, torch.Tensor] = field(default_factory=dict)  # checked finite before backward
    metrics: dict[str, float] = field(default_factory=dict)            # logged (see reduce_metrics)


def lr_lambda(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step `step + 1` (step counts from 0): linear warm-up over `warmup`
    steps, then cosine / linear decay from 1 towards `min_ratio` (reached one step after the last), or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


class Recipe:
    """Base recipe. Subclasses set the class attributes and implement `train_step`."""

    name = "base"
    objective_config: type | None = None   # dataclass of the `objective` section
    rollout_config: type | None = None     # dataclass of the `rollout` section (GRPO)
    metric_keys: tuple[str, ...] = ("loss", "lr")  # key order of a metrics row (after "step")
    sum_metrics: frozenset[str] = frozenset()       # summed over micro-batches; the other keys are averaged
    progress_keys: tuple[str, ...] = ("loss",)
    require_assistant = True                # data samples must end with the assistant turn to train on
    train_on = "last_assistant"             # Collator labels ("none": prompts only, for rollouts)

    def __init__(self, cfg: TrainConfig, *, resume: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.out = Path(cfg.output_dir)
        self.metrics_rows: list[dict] = []
        self.start_step = 0

    # ================================================================================ setup
    def setup(self) -> None:
        """Build everything; every configuration and data error surfaces here, before any step."""
        self.accelerator = self._setup_accelerator()
        self.is_main = self.accelerator.is_main_process
        self._check_output_dir()
        self.processor, model_config = self._setup_processor()
        self.collator, self.dataset = self._setup_data(model_config)  # data errors before the weights load
        self.model, _ = self._setup_model()
        self.handle = patch(self.model, self.processor, backend=self.cfg.model.backend,
                            sink_category=self.cfg.model.sink_category, system_text=self._system_texts())
        self.peft_model = self._setup_lora()
        self.total_steps = self._total_steps()
        self.optimizer = self._setup_optimizer()
        self.scheduler = self._setup_scheduler()
        if self.accelerator.is_fsdp2:
            self._set_fsdp_groups()
        self.module, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.sharded = bool(self.accelerator.is_fsdp2)  # FSDP2: DTensor parameters, sharded checkpoints
        from accelerate.utils import DistributedType

        deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        self.engine = self.module if deepspeed else None  # the DeepSpeedEngine runs backward and the optimizer step
        self.checkpointer = Checkpointer(self.out / "checkpoints", self.cfg.checkpoint.keep,
                                         rank=self.accelerator.process_index,
                                         barrier=self.accelerator.wait_for_everyone, sharded=self.sharded,
                                         engine=self.engine)
        self.metrics_path = self.out / "metrics.jsonl"
        self.superseded_path = self.out / "metrics.superseded.jsonl"
        self.setup_objective()
        self._maybe_resume()
        self._write_run_files()

    def _setup_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        if not torch.cuda.is_available():  # DeepSpeed, when installed, is imported by accelerate's model unwrapping
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # at every save; say CPU so it does not warn it guessed
        # Vision weights that train but see a text-only batch get no gradient: DDP must expect unused params.
        unused = not self.cfg.model.freeze_vision and not self.cfg.lora.enabled
        handlers = [DistributedDataParallelKwargs(find_unused_parameters=unused)]
        if _deepspeed_launch():
            if os.environ.get("ACCELERATE_USE_CPU", "false").lower() == "true":
                raise ValueError("a DeepSpeed launch with ACCELERATE_USE_CPU=true silently becomes CPU data "
                                 "parallel in accelerate; unset ACCELERATE_USE_CPU (on a machine without GPUs "
                                 "DeepSpeed's CPU accelerator and gloo are used by themselves)")
            if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator: accelerate must be told gloo, or it
                from accelerate.utils import InitProcessGroupKwargs  # counts one process per rank

                handlers.append(InitProcessGroupKwargs(backend="gloo"))
        acc = Accelerator(mixed_precision=self.cfg.precision.mixed, kwargs_handlers=handlers)
        _fsdp_on_cpu(acc)
        kind = str(acc.distributed_type).rsplit(".", 1)[-1]
        if kind == "DEEPSPEED":
            self._deepspeed_config(acc.state.deepspeed_plugin, acc.num_processes)
        if kind in ("MEGATRON_LM", "XLA"):
            raise NotImplementedError(
                f"attn-mod train runs single-process, DDP or FSDP2; {kind} is not supported: its checkpoints are "
                "not implemented, so resume would be wrong. Use FSDP (configs/accelerate/fsdp.yaml) or DDP.")
        if kind == "FSDP":
            if acc.state.fsdp_plugin.fsdp_version != 2:
                raise NotImplementedError(
                    "attn-mod train supports FSDP version 2 only (torch fully_shard; its checkpoints are what "
                    "attn_mod.trainers.checkpoint writes): set fsdp_config.fsdp_version: 2 in the accelerate config "
                    "(configs/accelerate/fsdp.yaml) or pass --fsdp_version 2")
            if not self.cfg.model.freeze_vision:
                raise NotImplementedError(
                    "FSDP with a trainable vision tower is not supported: a text-only micro-batch on one process "
                    "gives its vision weights no gradient there, so the processes' gradient reduce-scatters differ "
                    "(FSDP has no find_unused_parameters). Keep model.freeze_vision: true under FSDP, or use DDP")
            from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

            plugin = acc.state.fsdp_plugin
            if plugin.auto_wrap_policy is size_based_auto_wrap_policy:
                raise NotImplementedError(
                    "fsdp_auto_wrap_policy SIZE_BASED_WRAP is not supported: it can make a vision block a shard group "
                    "of its own (see Recipe._set_fsdp_groups); use TRANSFORMER_BASED_WRAP (configs/accelerate/fsdp.yaml)")
            if plugin.activation_checkpointing:
                raise NotImplementedError(
                    "fsdp_activation_checkpointing is not supported (untested with the attention-mass recording): set "
                    "it to false and use model.gradient_checkpointing: true in the training config")
        set_seed(self.cfg.schedule.seed, device_specific=True)
        return acc

    def _deepspeed_config(self, plugin, num_processes: int) -> None:
        """Check the DeepSpeed plugin's ZeRO settings and fill in what this training config decides: micro batch
        (schedule.batch_size), gradient accumulation (schedule.gradient_accumulation_steps; DeepSpeed's
        accumulation boundaries must be ours), clipping (optim.max_grad_norm) and the global batch."""
        ds = plugin.deepspeed_config
        zero = ds.setdefault("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        if stage == 3:
            raise NotImplementedError(
                "DeepSpeed ZeRO-3 is not supported: it partitions the parameters and all-gathers them per module "
                "on every process together, but a text-only micro-batch skips the vision tower on one process "
                "only (a collective mismatch), and its partitioned checkpoints / final-weight gathering are not "
                "wired. To shard parameters use FSDP2 (configs/accelerate/fsdp.yaml, which keeps the vision tower "
                "in the root group); ZeRO-1/2 shard optimizer state and gradients (configs/accelerate/"
                "deepspeed_zero2.yaml)")
        for what in ("offload_optimizer", "offload_param"):
            device = (zero.get(what) or {}).get("device", "none")
            if device not in (None, "none"):
                raise NotImplementedError(
                    f"DeepSpeed {what} to {device!r} is not supported (untested: no run of it could be checked "
                    "here, and it needs DeepSpeed's compiled CPU optimizer); set zero_optimization."
                    f"{what}.device: none (accelerate config: {what}_device: none)")
        if "optimizer" in ds or "scheduler" in ds:
            raise NotImplementedError(
                "a DeepSpeed config with its own optimizer / scheduler is not supported: attn-mod train builds "
                "AdamW and the lr schedule from the training config (optim.*, schedule.*); remove those sections")
        s = self.cfg.schedule
        ds["train_micro_batch_size_per_gpu"] = s.batch_size
        ds["gradient_accumulation_steps"] = s.gradient_accumulation_steps
        ds["train_batch_size"] = s.batch_size * s.gradient_accumulation_steps * num_processes
        ds["gradient_clipping"] = float(self.cfg.optim.max_grad_norm or 0.0)
        ds.setdefault("steps_per_print", 10**9)  # no DeepSpeed progress prints (ours is the progress bar)
        plugin.gradient_accumulation_steps = s.gradient_accumulation_steps

    def _set_fsdp_groups(self) -> None:
        """FSDP2 shard groups: one per language-model decoder layer (accelerate adds the embedding and the
        final-norm / lm_head groups; the root group holds the rest, the vision tower included). A block that runs
        only for some batches must not be a group of its own: a text-only micro-batch skips the vision blocks, so
        their all-gathers would run on some processes only (gloo: collective mismatch; NCCL: a hang)."""
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = self.accelerator.state.fsdp_plugin
        if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
            return  # NO_WRAP: one group (the root)
        in_vision = {type(m).__name__ for n, m in self.model.named_modules() if any(k in n for k in VISION_PARAM_KEYS)}
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = sorted(
                c for c in (getattr(self.model, "_no_split_modules", None) or []) if c not in in_vision)
        bad = sorted(set(plugin.transformer_cls_names_to_wrap) & in_vision)
        if bad:
            raise ValueError(f"fsdp_transformer_layer_cls_to_wrap names vision-tower classes {bad}: they do not run "
                             "on a text-only batch, so they cannot be FSDP groups of their own. Name only the language "
                             "model's decoder layer class, or leave the key unset (attn-mod picks it)")

    def _check_output_dir(self) -> None:
        has_run = (self.out / "metrics.jsonl").exists() or (self.out / "checkpoints").exists()
        if has_run and not self.resume:
            raise ValueError(f"output_dir {str(self.out)!r} already holds a run (metrics.jsonl / checkpoints); "
                             "pass --resume to continue it or choose another output_dir")

    def _setup_processor(self):
        """(processor, model config) without loading any weights."""
        m = self.cfg.model
        if m.tiny is not None:
            from ..tiny import build_processor, tiny_config

            processor = build_processor(m.tiny)
            return processor, tiny_config(m.tiny, processor.tokenizer, **m.tiny_kwargs)
        from transformers import AutoConfig

        from ..loading import load_processor, model_type_of

        model_type = model_type_of(m.path)  # clear errors for a missing / non-HF directory
        return load_processor(m.path, model_type), AutoConfig.from_pretrained(m.path, local_files_only=True)

    def _setup_model(self):
        m = self.cfg.model
        dtype = getattr(torch, m.dtype)  # validated: float32 | bfloat16 | float16 | float64
        if m.tiny is not None:
            from ..tiny import build_tiny

            model, processor = build_tiny(m.tiny, seed=m.tiny_seed, dtype=dtype, **m.tiny_kwargs)
        else:
            from ..loading import load_model

            model, processor = load_model(m.path)  # checkpoint dtype, then cast below
            model = model.to(dtype)
        model.train()
        if hasattr(model, "config"):
            model.config.use_cache = False
        frozen = list(m.freeze) + (list(VISION_PARAM_KEYS) if m.freeze_vision else [])
        for name, p in model.named_parameters():
            if any(key in name for key in frozen):
                p.requires_grad_(False)
        if m.gradient_checkpointing:  # non-reentrant: the recomputation runs inside backward, where the patch
            # recomputes masses without recording them again (attn_mod.patch: `_in_backward`)
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model, processor

    def _setup_lora(self):
        """peft LoRA on the language model. The HF model keeps being called directly (the adapters are injected
        in place), so the patch's labelling hook runs; the PeftModel saves the adapter and disables it."""
        lc = self.cfg.lora
        if not lc.enabled:
            return None
        from peft import LoraConfig, get_peft_model

        targets = "|".join(lc.target_modules)
        config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                            target_modules=rf".*language_model.*\.({targets})")
        return get_peft_model(self.model, config)

    def _setup_data(self, model_config):
        d = self.cfg.data
        collator = Collator(self.processor, model_config, cutoff=d.cutoff, overflow=d.overflow,
                            padding_side=d.padding_side, box_convention=d.box_convention, box_rule=d.box_rule,
                            train_on=self.train_on)  # refuses a family it cannot encode, before any data is read
        samples = load_train_samples(d.train, require_assistant=self.require_assistant, limit=d.limit,
                                     system_prompt=d.system_prompt)
        dataset = EncodedDataset(samples, collator, progress=self.cfg.logging.progress and
                                 self.accelerator.is_main_process)
        return collator, dataset

    def _system_texts(self) -> list[str]:
        """The data's distinct system prompts: the labels of templates that merge the system prompt into the first
        user turn (Gemma3) need its text to find it (`attn_mod.patch(system_text=...)`)."""
        return sorted({t for t in (s.system_text() for s in self.dataset.samples) if t})

    def global_batch(self) -> int:
        s = self.cfg.schedule
        return s.batch_size * s.gradient_accumulation_steps * self.accelerator.num_processes

    def _total_steps(self) -> int:
        s = self.cfg.schedule
        if s.max_steps is not None:
            return s.max_steps
        return max(1, math.ceil(s.epochs * len(self.dataset) / self.global_batch()))

    def _setup_optimizer(self):
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check model.freeze / model.freeze_vision / lora")
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)

    def _setup_scheduler(self):
        s = self.cfg.schedule
        warmup = s.warmup_steps or int(s.warmup_ratio * self.total_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_lambda(step, warmup=warmup, total=self.total_steps, kind=s.scheduler,
                                                   min_ratio=s.min_lr_ratio))

    def setup_objective(self) -> None:
        """Recipe hook: anything the objective needs (reference model, reward functions ...)."""

    def _maybe_resume(self) -> None:
        latest = self.checkpointer.latest() if self.resume else None
        if self.resume and latest is None and self.is_main:
            print(f"attn-mod train: no checkpoint under {self.out / 'checkpoints'}; starting from step 0")
        if latest is None:
            return
        self._check_resumable(self.checkpointer.read_state(latest), latest)
        ckpt = self.checkpointer.load(latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.start_step = ckpt.step
        self.metrics_rows = ckpt.metrics
        if self.is_main:
            # Rows a killed run wrote after its last checkpoint are recomputed by this run: they move to
            # metrics.superseded.jsonl (never lost), and metrics.jsonl is rewritten atomically to the checkpoint's rows.
            written = read_jsonl(self.metrics_path) if self.metrics_path.exists() else []
            later = [r for r in written if isinstance(r.get("step"), int) and r["step"] > ckpt.step]
            if later:
                append_jsonl(self.superseded_path, [{**r, "superseded_by_resume_from": ckpt.step} for r in later])
            write_jsonl_atomic(self.metrics_path, self.metrics_rows)
            print(f"attn-mod train: resumed from {latest} (step {ckpt.step})"
                  + (f"; {len(later)} later metrics row(s) moved to {self.superseded_path.name}" if later else ""))
        self.accelerator.wait_for_everyone()

    # settings that decide the data order and the meaning of a step: a resumed run must keep them
    RESUME_KEYS = (("recipe",), ("data", "train"), ("data", "shuffle"), ("data", "limit"), ("schedule", "seed"),
                   ("schedule", "batch_size"), ("schedule", "gradient_accumulation_steps"), ("lora", "enabled"))

    def _check_resumable(self, ckpt, path) -> None:
        saved = json.loads((path / "state.json").read_text()).get("config", {})
        now = self.cfg.to_dict()

        def get(d, keys):
            for k in keys:
                d = d.get(k) if isinstance(d, dict) else None
            return d

        diff = [".".join(k) for k in self.RESUME_KEYS if get(saved, k) != get(now, k)]
        if not diff and ckpt.samples_seen != ckpt.step * self.global_batch():
            diff.append("number of processes (global batch)")
        if diff:
            raise ValueError(f"cannot resume from {path}: {', '.join(diff)} differ from the checkpoint's run; "
                             "resume with the same settings or start a new output_dir")

    def _write_run_files(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        stats = {"samples": len(self.dataset) + self.dataset.num_dropped, "kept": len(self.dataset),
                 "truncated": self.dataset.truncated, "dropped": self.dataset.dropped,
                 "cutoff": self.cfg.data.cutoff, "overflow": self.cfg.data.overflow,
                 "total_steps": self.total_steps, "global_batch": self.global_batch(),
                 "num_processes": self.accelerator.num_processes}
        (self.out / "data_stats.json").write_text(json.dumps(stats, indent=1))
        if self.dataset.truncated or self.dataset.num_dropped:
            print(f"attn-mod train: {self.dataset.truncated} sample(s) truncated to {self.cfg.data.cutoff} tokens, "
                  f"{self.dataset.num_dropped} dropped {self.dataset.dropped}")

    # ================================================================================ data order
    def _permutation(self, epoch: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_perms", {})
        if epoch not in cache:
            n = len(self.dataset)
            if self.cfg.data.shuffle:
                g = torch.Generator().manual_seed(self.cfg.schedule.seed * 1_000_003 + epoch)
                cache[epoch] = torch.randperm(n, generator=g)
            else:
                cache[epoch] = torch.arange(n)
            for old in [e for e in cache if e < epoch - 1]:
                del cache[old]
        return cache[epoch]

    def sample_indices(self, step: int, micro: int) -> list[int]:
        """Dataset indices of micro-batch `micro` of this process at optimizer step `step` (1-based)."""
        bs = self.cfg.schedule.batch_size
        k = micro * self.accelerator.num_processes + self.accelerator.process_index
        first = (step - 1) * self.global_batch() + k * bs
        n = len(self.dataset)
        return [int(self._permutation(t // n)[t % n]) for t in range(first, first + bs)]

    def micro_batch(self, step: int, micro: int) -> Batch:
        """The micro-batch for (step, micro), on the training device."""
        items = [self.dataset[i] for i in self.sample_indices(step, micro)]
        return self.collator.collate(items).to(self.accelerator.device)

    # ================================================================================ one micro-batch
    def train_step(self, batch: Batch) -> StepOutput:
        raise NotImplementedError("a recipe implements train_step(batch) -> StepOutput")

    def reduce_metrics(self, parts: list[dict[str, float]]) -> dict[str, float]:
        """One row from the micro-batch floats of all processes: `sum_metrics` summed, the rest averaged."""
        keys = list(parts[0])
        local = torch.tensor([[p[k] for k in keys] for p in parts], dtype=torch.float64)
        if self.accelerator.num_processes > 1:
            local = self.accelerator.gather(local.to(self.accelerator.device)).cpu()
        out = {}
        for j, k in enumerate(keys):
            col = local[:, j]
            out[k] = float(col.sum()) if k in self.sum_metrics else float(col.mean())
        return out

    def _check_finite(self, step: int, micro: int, batch: Batch, out: StepOutput) -> None:
        bad = [name for name, v in {"loss": out.loss, **out.components}.items()
               if not bool(torch.isfinite(v.detach()).all())]
        flag = torch.tensor([float(bool(bad))], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process stops together
            flag = self.accelerator.reduce(flag, "sum")
        if flag.item() == 0:
            return
        latest = self.checkpointer.latest()
        where = f"micro-batch {micro}, samples {batch.ids}" if bad else "on another process"
        values = ", ".join(f"{n}={float(out.components.get(n, out.loss).detach()):g}" for n in bad)
        raise TrainingStopped(f"step {step}: non-finite {', '.join(bad) or 'loss'} ({values or where}; {where}); "
                              "stopped before the optimizer step. Last good checkpoint: "
                              f"{latest if latest else 'none written yet'}")

    # ================================================================================ the loop
    def train(self) -> list[dict]:
        acc, sched = self.accelerator, self.cfg.schedule
        accum = sched.gradient_accumulation_steps
        bar = tqdm(total=self.total_steps, initial=self.start_step, desc=f"train {self.name}", unit="step",
                   disable=not (self.cfg.logging.progress and self.is_main), dynamic_ncols=True)
        self.module.train()
        for step in range(self.start_step + 1, self.total_steps + 1):
            lr = self.scheduler.get_last_lr()[0]
            parts = []
            for micro in range(accum):
                batch = self.micro_batch(step, micro)
                last = micro == accum - 1 or self.engine is not None  # DeepSpeed decides its own reduction
                with nullcontext() if last else acc.no_sync(self.module):
                    out = self.train_step(batch)
                    self._check_finite(step, micro, batch, out)
                    if self.engine is not None:  # reduce + clip + optimizer step at DeepSpeed's accumulation boundary
                        self.engine.backward(out.loss / accum, scale_wrt_gas=False)
                        self.engine.step()
                    else:
                        acc.backward(out.loss / accum)
                parts.append(out.metrics)
            if self.engine is None:
                if self.cfg.optim.max_grad_norm is not None:
                    acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()

            reduced = self.reduce_metrics(parts)
            row = {"step": step, **{k: (lr if k == "lr" else reduced[k]) for k in self.metric_keys},
                   **{k: v for k, v in reduced.items() if k not in self.metric_keys}}
            self.metrics_rows.append(row)
            if self.is_main:
                append_jsonl(self.metrics_path, [row])
                bar.set_postfix({k: f"{row[k]:.4g}" for k in self.progress_keys if k in row})
                if self.cfg.logging.print_every and step % self.cfg.logging.print_every == 0:
                    print(json.dumps(row))
            bar.update(1)
            every = self.cfg.checkpoint.every
            if (every and step % every == 0) or step == self.total_steps:
                self.save_checkpoint(step)
        bar.close()
        if self.cfg.checkpoint.save_final:
            self.save_final()
        return self.metrics_rows

    # ================================================================================ saving
    def save_checkpoint(self, step: int) -> Path:
        return self.checkpointer.save(step, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                      samples_seen=step * self.global_batch(), metrics=self.metrics_rows,
                                      config=self.cfg.to_dict())

    def save_final(self) -> Path | None:
        """OUT/final: the full model + processor files (loadable by path), or the LoRA adapter."""
        final = self.out / "final"
        self.accelerator.wait_for_everyone()
        # FSDP: gather the full (unsharded) state dict on rank 0 (collective), saved as a normal HF directory
        # (LoRA: the trainable parameters, i.e. the adapter, only)
        full = full_model_state(self.model, trainable_only=self.peft_model is not None) if self.sharded else None
        if self.is_main:
            import shutil

            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.handle.remove()  # save the plain model (attention implementation restored)
            with unsharded_classes(self.model) if self.sharded else nullcontext():
                if self.peft_model is not None:  # PeftModel keys: base_model.model. + the HF model's names
                    kw = {"state_dict": {f"base_model.model.{k}": v for k, v in full.items()}} if self.sharded else {}
                    self.peft_model.save_pretrained(tmp, **kw)
                else:
                    self.model.save_pretrained(tmp, state_dict=full)  # None: the model's own state dict
                    self._save_processor(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.accelerator.wait_for_everyone()
        return final

    def _save_processor(self, path: Path) -> None:
        try:
            self.processor.save_pretrained(path)
        except Exception:  # noqa: BLE001 - tiny processors without a video processor cannot be saved whole
            tok = getattr(self.processor, "tokenizer", self.processor)
            # as attn_mod.tiny.save_tiny does: no processor_class naming the unimportable wrapper class, so that
            # attn_mod.loading.load_processor rebuilds the full processor instead of returning the bare tokenizer
            kept, tok._processor_class = getattr(tok, "_processor_class", None), None
            try:
                tok.save_pretrained(path)
            finally:
                tok._processor_class = kept
            ip = getattr(self.processor, "image_processor", None)
            if ip is not None:
                ip.save_pretrained(path)

    def cleanup(self) -> None:
        if getattr(self, "handle", None) is not None:
            self.handle.remove()
        acc = getattr(self, "accelerator", None)
        if acc is not None:
            acc.end_training()
            from accelerate.state import AcceleratorState

            # the accelerate state is a process-wide singleton: forget this run's settings (mixed precision ...)
            # so that a next recipe in the same process can choose its own; the process group is kept
            AcceleratorState._reset_state()


def run(cfg: TrainConfig, *, resume: bool = False) -> list[dict]:
    """Build the config's recipe, train, clean up; returns the metrics rows."""
    from .config import recipe_class

    recipe = recipe_class(cfg.recipe)(cfg, resume=resume)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()

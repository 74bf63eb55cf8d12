"""Training configs: one YAML file -> `TrainConfig` (dataclasses validated by `attn_mod.config`).

    cfg = load_train_config("configs/train/tiny_sft.yaml", ["optim.lr=1e-5", "schedule.max_steps=3"])

Sections: `recipe` (sft | grpo), `model`, `data`, `optim`, `schedule`, `checkpoint`, `logging`, `lora`,
`precision`, and the recipe's own sections (`objective`, and for GRPO `rollout`), whose dataclasses the recipe
class declares (`Recipe.objective_config` / `Recipe.rollout_config`). Every key has a default; unknown keys and
badly typed values are errors naming the key, raised before anything is loaded. Overrides are dotted
`section.key=value` strings; values are read as YAML (`optim.betas=[0.9,0.95]`, `lora.enabled=true`).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from ..config import ConfigError, from_dict, read_yaml

RECIPES = {"sft": "attn_mod.trainers.sft:SFTRecipe", "grpo": "attn_mod.trainers.grpo:GRPORecipe"}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # YAML 1.1 reads "1e-5" as a string


@dataclass
class ModelConfig:
    """The policy: a local Hugging Face directory (`path`) or an in-memory tiny model (`tiny`: family name)."""

    path: Optional[str] = None
    tiny: Optional[str] = None          # attn_mod.tiny family ("qwen2_5_vl" | "qwen3_vl"): tests and demos
    tiny_seed: int = 0
    tiny_kwargs: dict = field(default_factory=dict)  # build_tiny sizes: hidden, layers, heads, kv_heads, vision_depth
    dtype: str = "float32"              # parameter dtype: float32 | bfloat16 | float16 (see precision.mixed)
    backend: str = "auto"               # attention operator backend: auto | torch | triton | flex
    freeze_vision: bool = True          # vision tower (and its merger) frozen
    freeze: list[str] = field(default_factory=list)  # extra parameter-name substrings to freeze
    gradient_checkpointing: bool = False  # non-reentrant; masses are recorded once (not at recomputation)
    sink_category: Optional[int] = None  # category code of the first token (attention sink), see attn_mod.patch

    def validate(self):
        if (self.path is None) == (self.tiny is None):
            raise ValueError("model: give exactly one of model.path (a local Hugging Face directory) or "
                             "model.tiny (an attn_mod.tiny family, for tests)")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"model.dtype must be float32 | bfloat16 | float16 | float64, got {self.dtype!r}")
        if self.backend not in ("auto", "torch", "triton", "flex"):
            raise ValueError(f"model.backend must be auto | torch | triton | flex, got {self.backend!r}")


@dataclass
class DataConfig:
    """Training data: a JSONL file of `attn_mod.data.samples` (SFT, GRPO) or a VLMEvalKit TSV (GRPO prompts)."""

    train: str = ""
    limit: Optional[int] = None          # use only the first N samples
    cutoff: int = 8192                   # max tokens per sample (prompt + answer, image tokens included)
    overflow: Literal["truncate", "drop"] = "truncate"  # what happens to a longer sample (counted in the log)
    padding_side: Literal["left", "right"] = "right"
    shuffle: bool = True                 # a fresh permutation per epoch, from schedule.seed and the epoch
    box_convention: str = "pixel"        # TARGET boxes: pixel | normalized | qwen1000 | resized
    box_rule: Literal["overlap", "center"] = "overlap"
    system_prompt: Optional[str] = None  # GRPO prompts from a TSV: system turn to add

    def validate(self):
        if not self.train:
            raise ValueError("data.train is required: a JSONL file of training samples (see README 'Training')")
        if self.cutoff < 8:
            raise ValueError(f"data.cutoff must be >= 8 tokens, got {self.cutoff}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {self.limit}")
        if self.box_convention not in ("pixel", "normalized", "qwen1000", "resized"):
            raise ValueError(f"data.box_convention must be pixel | normalized | qwen1000 | resized, "
                             f"got {self.box_convention!r}")


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: Optional[float] = 1.0  # None: no clipping

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


@dataclass
class ScheduleConfig:
    """Steps, batches and the learning-rate schedule. One optimizer step consumes a global batch of
    batch_size x gradient_accumulation_steps x num_processes samples."""

    seed: int = 0
    batch_size: int = 1                  # per process and micro-batch
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0                  # used when max_steps is null
    max_steps: Optional[int] = None
    warmup_steps: int = 0
    warmup_ratio: float = 0.0            # used when warmup_steps == 0
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0            # the cosine / linear decay ends at lr * min_lr_ratio

    def validate(self):
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"schedule.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"schedule.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"schedule.epochs must be > 0, got {self.epochs}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("schedule.warmup_steps must be >= 0 and schedule.warmup_ratio in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"schedule.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


@dataclass
class CheckpointConfig:
    """Checkpoints under OUT/checkpoints/step-NNNNNNN (atomic), every `every` steps and at the end."""

    every: int = 0                        # 0: only at the end
    keep: int = 2                         # last K checkpoints kept
    save_final: bool = True               # OUT/final: a loadable model directory (or the adapter with LoRA)

    def validate(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class LoggingConfig:
    progress: bool = True                 # tqdm bar with the live loss
    print_every: int = 0                  # >0: also print a metrics line every N steps


@dataclass
class LoraConfig:
    """Optional LoRA adapters (peft) on the language model."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])

    def validate(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")


@dataclass
class PrecisionConfig:
    """Mixed precision through accelerate (autocast; fp16 adds loss scaling)."""

    mixed: Literal["no", "bf16", "fp16"] = "no"


@dataclass
class TrainConfig:
    recipe: Literal["sft", "grpo"] = "sft"
    output_dir: str = "runs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    objective: Any = None                 # the recipe's `objective_config` dataclass
    rollout: Any = None                   # the recipe's `rollout_config` dataclass (GRPO), else absent

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_class(name: str):
    """The recipe class for `recipe: name` (imported lazily: the GRPO module loads only for GRPO)."""
    if name not in RECIPES:
        raise ConfigError(f"recipe: {name!r} is not one of {sorted(RECIPES)}")
    module, attr = RECIPES[name].split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ConfigError(f"recipe: {name!r} needs {module}, which this installation does not have") from None


def _numbers(value):
    """Strings that are numbers in YAML 1.2 (e.g. '1e-5', which YAML 1.1 keeps as a string) -> float."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and ("e" in value.lower()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` strings to a nested dict (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. optim.lr=1e-5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


def build_train_config(data: dict, where: str = "config") -> TrainConfig:
    """Validate a raw mapping (already overridden) into a `TrainConfig` with the recipe's sections."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {data!r}")
    data = _numbers(data)
    recipe = data.get("recipe", "sft")
    if recipe not in RECIPES:
        raise ConfigError(f"{where}.recipe: {recipe!r} is not one of {sorted(RECIPES)}")
    cls = recipe_class(recipe)
    common = {k: v for k, v in data.items() if k not in ("objective", "rollout")}
    cfg = from_dict(TrainConfig, common, where)
    for section in ("objective", "rollout"):
        section_cls = getattr(cls, f"{section}_config", None)
        if section_cls is None:
            if data.get(section) is not None:
                raise ConfigError(f"{where}.{section}: recipe {recipe!r} has no {section!r} section")
            continue
        setattr(cfg, section, from_dict(section_cls, data.get(section), f"{where}.{section}"))
    validate = getattr(cls, "validate_config", None)
    if callable(validate):
        try:
            validate(cfg)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return cfg


def load_train_config(path: Union[str, Path], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a training YAML file, apply dotted overrides and validate everything."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    data = apply_overrides(data, overrides)
    cfg = build_train_config(data, where=path.name)
    # Relative data / model paths are relative to the config file's folder when they exist there.
    for section, key in (("data", "train"), ("model", "path")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (path.parent / value).exists():
            setattr(obj, key, str(path.parent / value))
    return cfg


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

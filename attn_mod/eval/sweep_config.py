"""Sweep / eval configuration (YAML -> dataclasses) and the expansion of a grid into cells.

    model: runs/tiny-model            # a local HF directory, or "tiny:qwen2_5_vl" (embedded random tiny model)
    datasets:
      - {path: data/synthetic.tsv}
    grid: {preset: avar, alpha: [0.0, 0.2], beta: [0.0, 0.5]}
    generation: {max_new_tokens: 16, batch_size: 4}
    output_dir: runs/sweep

Relative paths in a YAML file (model, datasets[].path, datasets[].image_root, output_dir) are resolved
against the folder of the YAML file, not the current directory (`load_sweep_config`); paths given on the
command line (--output-dir) are relative to the current directory.

A *cell* is one intervention; every cell is evaluated on every dataset. The grid is the cartesian
product of the listed parameter values of one preset; `cells:` adds explicit ones; `include_baseline`
adds the identity (unpatched) cell.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..intervention import Intervention

PRESET_PARAMS = {
    "avar": ("alpha", "beta", "renorm", "layers"),
    "pai": ("alpha", "layers"),
    "vaf": ("enhance", "suppress", "layers"),
    "identity": (),
}


@dataclass
class DatasetConfig:
    """One local benchmark (see `attn_mod.eval.datasets.load_benchmark`) and how to prompt for it."""

    path: str = ""
    name: str | None = None
    format: str | None = None
    limit: int | None = None
    columns: dict[str, Any] | None = None
    image_root: str | None = None
    answer_type: str | None = None
    instructions: Literal["default", "cot"] = "default"
    template: str | None = None
    system: str | None = None
    metric: str | None = None  # benchmark score (attn_mod.eval.benchmark_metrics); None: chosen by name

    def validate(self):
        if not self.path:
            raise ValueError("every dataset needs a path")
        if self.metric is not None:
            from .benchmark_metrics import METRICS

            if self.metric not in METRICS:
                raise ValueError(f"dataset metric {self.metric!r} is unknown; choose one of {sorted(METRICS)}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"dataset limit must be >= 0, got {self.limit}")


@dataclass
class GridConfig:
    """Cartesian grid over one preset's parameters; unset lists keep the preset's default."""

    preset: Literal["avar", "pai", "vaf", "identity"] = "avar"
    alpha: list[float] | None = None
    beta: list[float] | None = None
    renorm: list[bool] | None = None
    layers: list[Any] | None = None
    enhance: list[float] | None = None
    suppress: list[float] | None = None

    def axes(self) -> dict[str, list]:
        return {k: getattr(self, k) for k in ("alpha", "beta", "renorm", "layers", "enhance", "suppress")
                if getattr(self, k) is not None}

    def validate(self):
        allowed = PRESET_PARAMS[self.preset]
        for key, values in self.axes().items():
            if key not in allowed:
                raise ValueError(f"grid key {key!r} does not apply to preset {self.preset!r} "
                                 f"(its parameters: {', '.join(allowed) or 'none'})")
            if not values:
                raise ValueError(f"grid.{key} is an empty list")


@dataclass
class CellConfig:
    """An explicit cell: a preset and its parameters."""

    preset: Literal["avar", "pai", "vaf", "identity"] = "identity"
    params: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    batch_size: int = 4
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def validate(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"generation.batch_size must be >= 1, got {self.batch_size}")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0, got {self.temperature}")


@dataclass
class SweepConfig:
    model: str = "tiny:qwen2_5_vl"
    device: str = "cpu"
    dtype: str = "auto"
    backend: Literal["auto", "torch", "triton", "flex"] = "auto"
    datasets: list[DatasetConfig] = field(default_factory=list)
    grid: GridConfig | None = None
    cells: list[CellConfig] = field(default_factory=list)
    include_baseline: bool = True
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    attention_metrics: bool = False
    vas_rows: Literal["response", "answer", "after_image", "all"] = "response"  # see attn_mod.metrics.select_rows
    system: str | None = None  # system prompt for every dataset without its own `system:`
    output_dir: str = "runs/sweep"

    def validate(self):
        if not self.datasets:
            raise ValueError("datasets: list at least one benchmark (e.g. - {path: data/bench.tsv})")
        for d in self.datasets:  # also when built in code (attn-mod eval), not only from YAML
            d.validate()
        names = [d.name or d.path for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets have duplicate names {names}; give each a distinct name")
        self.build_cells()  # surfaces invalid alpha/beta/layers now

    def build_cells(self) -> list[Cell]:
        cells: list[Cell] = []
        if self.include_baseline:
            cells.append(Cell.make("identity", {}, name="baseline"))
        if self.grid is not None:
            axes = self.grid.axes()
            keys = list(axes)
            for values in itertools.product(*(axes[k] for k in keys)):
                cells.append(Cell.make(self.grid.preset, dict(zip(keys, values))))
        for c in self.cells:
            cells.append(Cell.make(c.preset, c.params, name=c.name))
        unique: dict[str, Cell] = {}
        for c in cells:
            unique.setdefault(c.id, c)
        if not unique:
            raise ValueError("no cells to evaluate: set grid:, cells: or include_baseline: true")
        return list(unique.values())


@dataclass(frozen=True)
class Cell:
    """One intervention setting of a sweep; `id` is a stable key for results files."""

    id: str
    name: str
    preset: str
    params: tuple[tuple[str, Any], ...]
    intervention: Intervention

    @staticmethod
    def make(preset: str, params: dict, name: str | None = None) -> Cell:
        if preset not in PRESET_PARAMS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESET_PARAMS)}")
        unknown = set(params) - set(PRESET_PARAMS[preset])
        if unknown:
            raise ValueError(f"preset {preset!r} has no parameter(s) {sorted(unknown)}; "
                             f"its parameters: {', '.join(PRESET_PARAMS[preset]) or 'none'}")
        iv = Intervention.from_preset(preset, **params)
        items = tuple(sorted(params.items()))
        ident = preset if not items else f"{preset}(" + ",".join(f"{k}={_fmt(v)}" for k, v in items) + ")"
        return Cell(ident, name or ident, preset, items, iv)

    def param(self, key: str, default=None):
        return dict(self.params).get(key, default)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple, range)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def check_model(cfg: SweepConfig) -> None:
    """Cheap checks of model path / family, device and backend (nothing loaded, nothing written, no
    transformers import); ValueError / FileNotFoundError naming the fix."""
    from ..loading import check_backend, check_device, check_model_path

    check_device(cfg.device)
    check_backend(cfg.backend, cfg.device)
    if cfg.model.startswith("tiny:"):
        from ..tiny import FAMILIES

        if cfg.model.split(":", 1)[1] not in FAMILIES:
            raise ValueError(f"unknown tiny model {cfg.model!r}; use one of {[f'tiny:{f}' for f in FAMILIES]}")
    else:
        check_model_path(cfg.model)


def _under(base: Path, value: str | None) -> str | None:
    if value is None or value == "":
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


def resolve_paths(cfg: SweepConfig, base: str | Path) -> SweepConfig:
    """A copy of `cfg` whose relative paths (model unless "tiny:...", dataset paths and image roots,
    output_dir) are taken relative to `base` (the folder of the YAML file)."""
    base = Path(base)
    model = cfg.model if cfg.model.startswith("tiny:") else _under(base, cfg.model)
    datasets = [dataclasses.replace(d, path=_under(base, d.path), image_root=_under(base, d.image_root))
                for d in cfg.datasets]
    return dataclasses.replace(cfg, model=model, datasets=datasets, output_dir=_under(base, cfg.output_dir))


def load_sweep_config(path: str | Path, overrides: dict | None = None) -> SweepConfig:
    """Read a sweep YAML (validated, see `attn_mod.config.load_config`), resolve its relative paths against
    the YAML's folder, then apply `overrides` (field -> value, taken as given, e.g. from the command line)."""
    from ..config import load_config

    cfg = resolve_paths(load_config(SweepConfig, path), Path(path).resolve().parent)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
        cfg.validate()
    return cfg

"""Interventions: which per-category transform applies in which layers, heads and query rows.

Published methods are presets of one operator (DESIGN.md, "Published methods"):

    Intervention.avar(alpha=0.2, beta=0.5)   # w[IMAGE,TARGET] = 1+alpha, w[SYSTEM] = 1-beta, renorm
    Intervention.pai(alpha=0.2)              # absw[IMAGE,TARGET] = alpha, layers 2.., answer rows
    Intervention.vaf()                       # mul[IMAGE,TARGET] = 1.15, mul[SYSTEM] = 0.95, layers [9/32, 15/32)
                                             # of the depth (9-14 of 32 layers, 8-12 of 28)
    Intervention.identity()                  # analysis only
    Intervention(w={"image": 1.3}, layers=[0, 1], heads=[2], query=["response"])   # generic

Table keys are category names: "image" is every visual token (IMAGE + TARGET, codes 3 and 4); its parts
are "image_outside_target" (3) and "target" (4); a part's key overrides "image" for that part.

`updated(**params)` re-runs the preset with new parameters (live retuning for sweeps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import torch

from .categories import IMAGE, SYSTEM, TARGET, parse_categories
from .kernels.spec import CategoryTransform

PROMPT_END = "prompt_end"  # pseudo query category: the last prompt row (predicts the first answer token)


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _table(spec: Mapping | None, what: str) -> dict[int, float]:
    """{key: value} -> {code: value}. "image" covers IMAGE and TARGET; a key naming one code ("target",
    "image_outside_target", 4) overrides a group key, so {"image": 2, "target": 3} boosts target tokens by 3
    and the rest of the image by 2. Two keys of the same kind giving one code different values is an error."""
    parsed = []
    for key, val in (spec or {}).items():
        try:
            codes = parse_categories(key)
        except ValueError as e:
            raise ValueError(f"{e} (a key of table {what!r})") from None
        parsed.append((len(codes) > 1, key, codes, _check_finite(f"{what}[{key!r}]", val)))
    out: dict[int, float] = {}
    for group in (True, False):  # group keys first, single-code keys override them
        seen: dict[int, Any] = {}
        for is_group, key, codes, val in parsed:
            if is_group != group:
                continue
            for code in codes:
                if code in seen and out[code] != val:
                    raise ValueError(f"table {what!r}: keys {seen[code]!r} and {key!r} give category {code} "
                                     f"different values ({out[code]} and {val})")
                seen[code] = key
                out[code] = val
    return out


@dataclass(frozen=True)
class DepthFraction:
    """Layers given as a fraction of the model's depth: [round(start * L), round(stop * L)), at least one layer.

    VAF's default uses it: ClearSight's "middle layers" 9-14 of a 32-layer model are [9/32, 15/32) of the
    depth, so the preset fits models of any depth instead of failing "out of range" on small ones. (PAI's
    default "2:" stays absolute: its intent is "skip the first two layers".) Integer layers stay absolute.
    """

    start: float
    stop: float = 1.0

    def __post_init__(self):
        if not 0 <= self.start < self.stop <= 1:
            raise ValueError(f"DepthFraction needs 0 <= start < stop <= 1, got {self.start}, {self.stop}")

    def resolve(self, n: int) -> tuple[int, ...]:
        lo = min(round(self.start * n), n - 1)
        hi = max(round(self.stop * n), lo + 1)
        return tuple(range(lo, min(hi, n)))

    def __repr__(self) -> str:
        return f"depth[{self.start:.4g}:{self.stop:.4g}]"

    __str__ = __repr__


VAF_LAYERS = DepthFraction(9 / 32, 15 / 32)  # ClearSight's layers 9-14 of 32


def _where(spec) -> str:
    if isinstance(spec, range):
        return f"{spec.start}..{spec.stop - 1}" if spec.step == 1 else str(list(spec))
    if isinstance(spec, (list, tuple)):
        return "[" + ", ".join(map(str, spec)) + "]"
    return str(spec)


def parse_layer_spec(values: Sequence[str] | None):
    """Command-line layers (`--layers 0 1`, `--layers 2:`, `--layers all`) -> an Intervention `layers` value."""
    if values is None:
        return None
    if len(values) == 1 and (values[0] == "all" or ":" in values[0]):
        return values[0]
    try:
        return [int(v) for v in values]
    except ValueError:
        raise ValueError(f"--layers takes layer indices, 'start:stop' or 'all', got {' '.join(values)}") from None


def _resolve_indices(spec, n: int, what: str, hint: str) -> tuple[int, ...]:
    """'all', an int, an iterable of ints, a range, a slice, a 'a:b' string or a `DepthFraction` -> sorted
    indices in [0, n)."""
    if spec is None or spec == "all":
        return tuple(range(n))
    if isinstance(spec, DepthFraction):
        return spec.resolve(n)
    if isinstance(spec, str):
        try:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) == 1:
                spec = [parts[0]]
            elif len(parts) in (2, 3):
                spec = slice(*parts)
            else:
                raise ValueError
        except (TypeError, ValueError):
            raise ValueError(f"{what} {spec!r} is not 'all', an index, or a 'start:stop' slice") from None
    if isinstance(spec, slice):
        return tuple(range(n))[spec]
    if isinstance(spec, int):
        spec = [spec]
    idx = []
    for i in spec:
        i = int(i)
        if not -n <= i < n:
            raise ValueError(f"{what} index {i} is out of range for a model with {n} {hint}; "
                             f"use indices in 0..{n - 1} (or negative from the end)")
        idx.append(i % n)
    return tuple(sorted(set(idx)))


@dataclass(frozen=True, repr=False)
class Intervention:
    """A per-category transform (tables keyed by category name or code) and where it applies.

    layers / heads: "all", an index, a list, a range, a slice or "start:stop" (resolved per model).
    query: "all" or category names/codes of the query rows to modify, plus "prompt_end".
    """

    mul: Mapping[Any, float] = field(default_factory=dict)
    absw: Mapping[Any, float] = field(default_factory=dict)
    add: Mapping[Any, float] = field(default_factory=dict)
    w: Mapping[Any, float] = field(default_factory=dict)
    renorm: bool = True
    layers: Any = "all"
    heads: Any = "all"
    query: Any = "all"
    name: str = "custom"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for attr in ("mul", "absw", "add", "w"):
            object.__setattr__(self, attr, _table(getattr(self, attr), attr))
        if any(v < 0 for v in self.w.values()):
            raise ValueError(f"post-softmax weights w must be >= 0, got {self.w}")
        if self.query != "all":
            names = [self.query] if isinstance(self.query, (str, int)) else list(self.query)
            cats = [n for n in names if n != PROMPT_END]
            parse_categories(cats, what="query category")
        self.transform()  # validates the tables

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def avar(cls, alpha: float = 0.2, beta: float = 0.5, *, renorm: bool = True, layers="all", heads="all",
             query="all") -> Intervention:
        """AVAR training-free modulation: image weight 1+alpha (alpha >= 0), system weight 1-beta (0 <= beta <= 1)."""
        alpha, beta = _check_finite("alpha", alpha), _check_finite("beta", beta)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (it boosts image attention by 1+alpha), got {alpha}")
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must lie in [0, 1] (system weight 1-beta; beta=1 removes the system turn), got {beta}")
        return cls(w={IMAGE: 1 + alpha, TARGET: 1 + alpha, SYSTEM: 1 - beta}, renorm=renorm, layers=layers,
                   heads=heads, query=query, name="avar",
                   params=dict(alpha=alpha, beta=beta, renorm=renorm, layers=layers, heads=heads, query=query))

    @classmethod
    def pai(cls, alpha: float = 0.2, *, layers=None, heads="all", query=("response", PROMPT_END)) -> Intervention:
        """PAI: s' = s + alpha*|s| on image keys, on the rows that produce the answer. Default layers "2:"
        (absolute, as in the paper: the first two, shallow layers are never modified), so on a model with <= 2
        layers PAI resolves to no layer and `patch` warns; pass layers=... there."""
        layers = "2:" if layers is None else layers
        alpha = _check_finite("alpha", alpha)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 for PAI, got {alpha}")
        return cls(absw={IMAGE: alpha, TARGET: alpha}, layers=layers, heads=heads, query=query, name="pai",
                   params=dict(alpha=alpha, layers=layers, heads=heads, query=query))

    @classmethod
    def vaf(cls, enhance: float = 1.15, suppress: float = 0.95, *, layers=None, heads="all",
            query="all") -> Intervention:
        """VAF / ClearSight: scale image-key scores by `enhance` and system-key scores by `suppress`. Default
        layers: [9/32, 15/32) of the depth (`VAF_LAYERS`; the paper's layers 9-14 of a 32-layer model, 8-12 of
        a 28-layer one, layer 1 of a 2-layer one)."""
        layers = VAF_LAYERS if layers is None else layers
        enhance, suppress = _check_finite("enhance", enhance), _check_finite("suppress", suppress)
        if enhance <= 0 or suppress <= 0:
            raise ValueError(f"enhance and suppress must be > 0, got {enhance}, {suppress}")
        return cls(mul={IMAGE: enhance, TARGET: enhance, SYSTEM: suppress}, layers=layers, heads=heads,
                   query=query, name="vaf", params=dict(enhance=enhance, suppress=suppress, layers=layers,
                                                        heads=heads, query=query))

    @classmethod
    def identity(cls) -> Intervention:
        """No change to attention (for analysis: capture masses only)."""
        return cls(name="identity")

    PRESETS = ("avar", "pai", "vaf", "identity")

    @classmethod
    def from_preset(cls, name: str, **params) -> Intervention:
        if name not in cls.PRESETS:
            raise ValueError(f"unknown intervention preset {name!r}; choose one of {cls.PRESETS} or build Intervention(...)")
        return getattr(cls, name)(**params)

    def updated(self, **params) -> Intervention:
        """A copy with new parameters: preset parameters (alpha, beta, ...) or generic fields (w, layers ...)."""
        if self.name in self.PRESETS and self.name != "identity":
            unknown = set(params) - set(self.params)
            if unknown:
                raise ValueError(f"{self.name} has no parameter(s) {sorted(unknown)}; its parameters are "
                                 f"{sorted(self.params)}")
            return self.from_preset(self.name, **{**self.params, **params})
        fields = {"mul", "absw", "add", "w", "renorm", "layers", "heads", "query"}
        unknown = set(params) - fields
        if unknown:
            raise ValueError(f"cannot update {sorted(unknown)} on a {self.name!r} intervention; "
                             f"updatable fields: {sorted(fields)}")
        return replace(self, **params)

    # ------------------------------------------------------------------------------- resolution
    def transform(self) -> CategoryTransform:
        return CategoryTransform.from_lists(self.mul, self.absw, self.add, self.w, self.renorm)

    def layer_indices(self, num_layers: int) -> tuple[int, ...]:
        return _resolve_indices(self.layers, num_layers, "layer", "decoder layers")

    def head_mask(self, num_heads: int) -> torch.Tensor:
        mask = torch.zeros(num_heads, dtype=torch.bool)
        mask[list(_resolve_indices(self.heads, num_heads, "head", "query heads"))] = True
        return mask

    def query_codes(self) -> tuple[tuple[int, ...], bool] | None:
        """(category codes, prompt_end flag) of enabled query rows, or None when all rows are enabled."""
        if self.query == "all":
            return None
        names = [self.query] if isinstance(self.query, (str, int)) else list(self.query)
        return parse_categories([n for n in names if n != PROMPT_END]), PROMPT_END in names

    def row_enable(self, row_cats: torch.Tensor, row_pos: torch.Tensor, prompt_end: torch.Tensor) -> torch.Tensor | None:
        """(B, Q) bool of enabled query rows, or None for all rows.

        row_cats (B, Q) categories of the query slots; row_pos (Q,) their slot positions; prompt_end (B,).
        """
        spec = self.query_codes()
        if spec is None:
            return None
        codes, use_end = spec
        enable = torch.isin(row_cats.long(), torch.tensor(codes, dtype=torch.long, device=row_cats.device))
        if use_end:
            enable = enable | (row_pos[None, :] == prompt_end[:, None])
        return enable

    def __repr__(self) -> str:
        from .categories import category_name

        def table(t: Mapping[int, float]) -> str:
            items = dict(t)
            parts = []
            if IMAGE in items and TARGET in items and items[IMAGE] == items[TARGET]:
                parts.append(f"image: {items.pop(IMAGE):.4g}")
                items.pop(TARGET)
            parts += [f"{category_name(c)}: {v:.4g}" for c, v in sorted(items.items())]
            return "{" + ", ".join(parts) + "}"

        tables = [f"{name}={table(getattr(self, name))}" for name in ("mul", "absw", "add", "w") if getattr(self, name)]
        where = [f"{k}={_where(getattr(self, k))}" for k in ("layers", "heads", "query") if getattr(self, k) != "all"]
        renorm = [] if self.renorm else ["renorm=False"]
        return f"Intervention({self.describe()}; " + ", ".join(tables + renorm + where or ["no change"]) + ")"

    def describe(self) -> str:
        if self.params:
            shown = ", ".join(f"{k}={v}" for k, v in self.params.items() if k in ("alpha", "beta", "enhance",
                                                                                 "suppress", "renorm"))
            return f"{self.name}({shown})"
        return self.name

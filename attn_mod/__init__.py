"""attn-mod: category-aware attention for vision-language models.

    import attn_mod
    handle = attn_mod.patch(model, processor, intervention=attn_mod.Intervention.avar(alpha=0.2, beta=0.5))
    with attn_mod.capture(model) as rec:
        model(**inputs)
    rec.mass(-1)[..., attn_mod.TokenCategory.IMAGE]

The public names below are imported on first use (PEP 562), so `import attn_mod.cli` / `attn-mod --help`
do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_LAZY = {
    "NUM_CATEGORIES": "attn_mod.kernels.spec",
    "CategoryTransform": "attn_mod.kernels.spec",
    "Intervention": "attn_mod.intervention",
    "PatchHandle": "attn_mod.patch",
    "patch": "attn_mod.patch",
    "Recording": "attn_mod.capture",
    "capture": "attn_mod.capture",
    "TokenCategory": "attn_mod.categories",
    "label_tokens": "attn_mod.categories",
    "category_attention": "attn_mod.kernels.function",
    "SUPPORTED_FAMILIES": "attn_mod.models",
    "UnsupportedModelError": "attn_mod.models",
}

__all__ = sorted([*_LAZY, "metrics"])


def __getattr__(name: str):
    if name == "metrics":
        return importlib.import_module("attn_mod.metrics")
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attn_mod' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps `attn_mod.patch` / `attn_mod.capture` the functions when their submodules are imported (the
    import system would otherwise bind the submodule over the lazily exported function)."""

    def __setattr__(self, name, value):
        if name in ("patch", "capture") and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

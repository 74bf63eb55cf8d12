"""Adapters that run a patched in-process VLM under standard evaluation harnesses.

    from attn_mod.eval.harness import run_lm_eval, AttnModVLMEval, AttnModLMMs

- `run_lm_eval` / `make_lm`: lm-evaluation-harness via its `hf-multimodal` model class (lm_eval_adapter).
- `AttnModVLMEval`: a VLMEvalKit `BaseModel` (vlmevalkit_adapter).
- `AttnModLMMs`, `register_with_lmms_eval`: an lmms-eval `lmms` model (lmms_eval_adapter).

Names resolve lazily: importing this package imports none of lm_eval, vlmeval or lmms_eval.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_lm_eval": "lm_eval_adapter",
    "make_lm": "lm_eval_adapter",
    "EXAMPLE_TASKS_DIR": "lm_eval_adapter",
    "AttnModVLMEval": "vlmevalkit_adapter",
    "AttnModLMMs": "lmms_eval_adapter",
    "register_with_lmms_eval": "lmms_eval_adapter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

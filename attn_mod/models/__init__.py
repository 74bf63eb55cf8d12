"""Family adapters: one small class per model family (ids, roles, geometry). `get_adapter(model)` picks one."""

from __future__ import annotations

from .base import ChatMLAdapter, FamilyAdapter
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .mllama import MllamaAdapter
from .qwen import Qwen2_5_VLAdapter, Qwen3VLAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (Qwen2_5_VLAdapter(), Qwen3VLAdapter(), LlavaAdapter(), InternVLAdapter(),
                                       MllamaAdapter(), Idefics3Adapter(), SmolVLMAdapter(), LlavaOnevisionAdapter(),
                                       Gemma3Adapter())
SUPPORTED_FAMILIES = tuple(a.name for a in ADAPTERS)


class UnsupportedModelError(ValueError):
    pass


def get_adapter(model, *, explicit: bool = False) -> FamilyAdapter:
    """The adapter of `model`'s family; with `explicit=True` any decoder model gets the generic adapter."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    if explicit:
        return FamilyAdapter()
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise UnsupportedModelError(
        f"attn-mod has no adapter for model type {model_type!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}. "
        "For any other decoder model use explicit labels: handle = attn_mod.patch(model, categories='explicit', ...) "
        "then handle.set_categories(cats) with a (B, S) tensor of category codes before each forward."
    )


__all__ = ["ADAPTERS", "SUPPORTED_FAMILIES", "ChatMLAdapter", "FamilyAdapter", "UnsupportedModelError", "get_adapter"]

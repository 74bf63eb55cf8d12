"""Qwen2.5-VL and Qwen3-VL: ChatML templates, `mm_token_type_ids`, merged-patch visual tokens.

Geometry (for pixel boxes -> tokens): Qwen2.5-VL patch 14 x merge 2 = 28 px per visual token,
Qwen3-VL patch 16 x merge 2 = 32 px. Qwen3-VL's template has no default system turn.
"""

from __future__ import annotations

from .base import ChatMLAdapter


class Qwen2_5_VLAdapter(ChatMLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    patch_size = 14
    merge_size = 2


class Qwen3VLAdapter(ChatMLAdapter):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    patch_size = 16
    merge_size = 2

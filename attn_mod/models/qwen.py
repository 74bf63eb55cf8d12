"""Qwen2.5-VL and Qwen3-VL: ChatML templates, `mm_token_type_ids`, merged-patch visual tokens.

Pixel geometry (patch x merge = 28 px per visual token for Qwen2.5-VL, 32 px for Qwen3-VL) lives in
`attn_mod.regions.FAMILY_GEOMETRY`. Qwen3-VL's template has no default system turn.
"""

from __future__ import annotations

from .base import ChatMLAdapter


class Qwen2_5_VLAdapter(ChatMLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


class Qwen3VLAdapter(ChatMLAdapter):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

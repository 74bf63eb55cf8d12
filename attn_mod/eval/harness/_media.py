"""Harness inputs -> PIL images (shared by the VLMEvalKit and lmms-eval adapters)."""

from __future__ import annotations

import os

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v")


def is_video_path(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and str(value).lower().endswith(VIDEO_SUFFIXES)


def load_image(value):
    """An RGB PIL image from a PIL image or a local image path."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (str, os.PathLike)):
        if is_video_path(value):
            raise NotImplementedError(f"video input {str(value)!r}: attn-mod's generation path "
                                      "(attn_mod.eval.generation) takes images only")
        if not os.path.isfile(value):
            raise FileNotFoundError(f"image file {str(value)!r} does not exist (only local paths are read)")
        with Image.open(value) as im:
            return im.convert("RGB")
    raise TypeError(f"expected a PIL image or a local image path, got {type(value).__name__}")

"""Helpers of the `attn_mod_synthetic_vqa` lm-eval task: images from local files, one placeholder each."""

from __future__ import annotations

import io

from PIL import Image

IMAGE_PLACEHOLDER = "<image>"  # lm-eval's hf-multimodal placeholder (lm_eval.models.hf_vlms)


def _image_fields(doc) -> list:
    images = doc.get("images", doc.get("image"))
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _open(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, dict):  # datasets' Image feature stored without decoding: {"bytes", "path"}
        if item.get("bytes"):
            return Image.open(io.BytesIO(item["bytes"])).convert("RGB")
        item = item["path"]
    with Image.open(item) as im:  # a local path
        return im.convert("RGB")


def doc_to_image(doc) -> list[Image.Image]:
    """The document's images as RGB PIL images, in order."""
    return [_open(x) for x in _image_fields(doc)]


def doc_to_text(doc) -> str:
    """One image placeholder per image, then the question and the answer instruction."""
    return IMAGE_PLACEHOLDER * len(_image_fields(doc)) + f"{doc['question']}\nAnswer with a single word."

"""Loading a local VLM checkpoint (a Hugging Face directory) and its processor, with clear errors.

Nothing is downloaded: paths must exist locally (`local_files_only=True`). Processors that need
torchvision (video processors) fall back to the PIL image processor without video support.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


BACKENDS = ("auto", "torch", "triton", "flex")


def check_device(device: str) -> torch.device:
    """`device` as a torch.device, or a ValueError naming the fix (no CUDA build / no such GPU / bad name)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} is not available: {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) visible; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available on this machine; use --device cpu")
    return dev


def check_backend(backend: str, device: str | torch.device) -> str:
    """Validate an attention backend for `device` before any model is loaded (ValueError naming the fix)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    dev = torch.device(device)
    if backend == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs a CUDA device (device is {str(dev)!r}); use --backend torch (or "
                         "auto) on CPU, or set TRITON_INTERPRET=1 to run the kernels in the slow interpreter")
    if backend == "flex" and dev.type not in ("cuda", "cpu"):
        raise ValueError(f"backend 'flex' does not run on {dev.type}; use --backend torch")
    return backend


def check_model_path(path: str | Path) -> str:
    """Cheap checks of a local checkpoint before loading it: a directory with config.json of a supported
    family. Returns its model_type (FileNotFoundError / ValueError naming the fix)."""
    from .models import ADAPTERS, SUPPORTED_FAMILIES

    model_type = model_type_of(path)
    if not any(model_type in a.model_types for a in ADAPTERS):
        raise ValueError(f"{path} is a {model_type!r} model; attn-mod supports the VLM families "
                         f"{', '.join(SUPPORTED_FAMILIES)} (other decoders: attn_mod.patch(model, categories='explicit'))")
    return model_type


def model_type_of(path: str | Path) -> str:
    """The `model_type` of a local checkpoint directory (raises FileNotFoundError / ValueError)."""
    path = Path(path)
    cfg = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory; pass a local Hugging Face checkpoint "
                                "(a folder with config.json and weights)")
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} is missing: {path} is not a Hugging Face model directory")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if not model_type:
        raise ValueError(f"{cfg} has no model_type")
    return model_type


def load_processor(path: str | Path, model_type: str | None = None):
    """The checkpoint's processor; without torchvision, its PIL image processor and no video processor."""
    from transformers import AutoProcessor

    model_type = model_type or model_type_of(path)
    from .tiny import FAMILIES, load_tiny_processor

    try:
        proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as first:  # noqa: BLE001 - fall back to the torchvision-free build below
        if model_type not in FAMILIES:
            raise ValueError(f"cannot load the processor of {path} ({type(first).__name__}: {first})") from first
        return load_tiny_processor(path, model_type)
    if getattr(proc, "image_processor", None) is None and model_type in FAMILIES:
        # a tiny checkpoint re-saved by the trainer names the private processor class in tokenizer_config.json,
        # which AutoProcessor resolves to the bare tokenizer: rebuild the processor around it
        return load_tiny_processor(path, model_type)
    return proc


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from a local directory, in eval mode, on `device`.

    Raises a ValueError naming the supported families when the checkpoint is not a supported VLM.
    """
    model_type = check_model_path(path)
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    model = model.to(device).eval()
    return model, load_processor(path, model_type)

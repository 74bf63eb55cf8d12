"""Test setup. On machines without an NVIDIA device the Triton interpreter is enabled here, before triton is
imported anywhere, so the kernels run on CPU. On a GPU machine the compiled kernels run (CUDA tests); the
interpreter tests are then run separately with TRITON_INTERPRET=1 (see README "GPU test subset")."""

import os


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


if not _has_nvidia_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # DeepSpeed (installed for tests/test_deepspeed.py) is imported by accelerate's unwrap at every save_pretrained;
    # told the accelerator it does not warn that it fell back to the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Fresh but reproducible random inputs per test (seed derived from the test id)."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) & 0xFFFFFFFF)

"""Test setup: the Triton interpreter must be enabled before triton is imported anywhere."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
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

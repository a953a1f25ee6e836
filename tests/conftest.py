"""Test-wide setup.

Without CUDA, Triton kernels run in the interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it happens here, at collection
start.  DeepSpeed is pointed at its CPU accelerator the same way.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA (runs in bench/gpu_runbook.sh on a lent GPU)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return DEVICE

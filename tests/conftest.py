"""Test setup: Triton runs in its CPU interpreter when there is no GPU; GPU tests skip without one."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported (fastalign imports it lazily, on first triton use).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def scratch_budget():
    """Set the scratch budget for one test, restoring the default afterwards."""
    from fastalign import set_scratch_budget

    yield set_scratch_budget
    set_scratch_budget(None)

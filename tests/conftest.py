"""Test setup.

``pytest`` (what ``make test`` and CI run): the CPU suite. Triton kernels run in triton's CPU interpreter
(``TRITON_INTERPRET=1`` is set here, before anything imports triton), and tests marked ``gpu`` are skipped.
``pytest -m gpu`` (``make test-gpu``, ``bench/gpu_check.sh``): the GPU suite, with triton compiling for the
device; it needs CUDA.
"""

import os

import pytest
import torch


def _gpu_run(config) -> bool:
    return config.getoption("markexpr", "").strip() == "gpu"


def pytest_configure(config):
    if not _gpu_run(config):
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if _gpu_run(config) and torch.cuda.is_available():
        return
    reason = (
        "GPU tests run on a CUDA machine with `pytest -m gpu` (bench/gpu_check.sh)"
        if not _gpu_run(config)
        else "`pytest -m gpu` needs a CUDA device and torch sees none"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def scratch_budget():
    """Set the scratch budget for one test, restoring the default afterwards."""
    from fastalign import set_scratch_budget

    yield set_scratch_budget
    set_scratch_budget(None)

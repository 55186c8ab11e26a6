"""Test setup.

``pytest`` (what ``make test`` and CI run): the CPU suite. Triton kernels run in triton's CPU interpreter
(``TRITON_INTERPRET=1`` is set here, before anything imports triton), and tests marked ``gpu`` are skipped.
``pytest -m gpu`` (``make test-gpu``, ``bench/gpu_check.sh``): the GPU suite, with triton compiling for the
device; it needs CUDA.

``FASTALIGN_CHECK_DEVICE`` (set by ``bench/gpu_check.sh``): ``cuda`` makes a ``pytest -m gpu`` run that finds no
CUDA device an error rather than a run of skips, and turns the step's timeout (SIGTERM) into pytest's own
interruption, which still prints the summary. ``cpu`` is the check's rehearsal: the tests marked ``gpu_core``
(tests/kernels/test_gpu_core.py) run on the CPU, Triton in its interpreter, and the other ``gpu`` tests are skipped.
"""

import os
import signal

import pytest
import torch

CHECK_DEVICE = os.environ.get("FASTALIGN_CHECK_DEVICE", "").strip().lower()


def _gpu_run(config) -> bool:
    return config.getoption("markexpr", "").strip() == "gpu"


def _interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: the GPU check's step timed out")


def pytest_configure(config):
    if CHECK_DEVICE not in ("", "cuda", "cpu"):
        raise pytest.UsageError(f"FASTALIGN_CHECK_DEVICE must be 'cuda' or 'cpu' (or unset), got {CHECK_DEVICE!r}")
    if not _gpu_run(config) or CHECK_DEVICE == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    if CHECK_DEVICE:
        signal.signal(signal.SIGTERM, _interrupted)


def pytest_collection_modifyitems(config, items):
    if _gpu_run(config) and CHECK_DEVICE == "cpu":
        reason = "the GPU check's rehearsal (FASTALIGN_CHECK_DEVICE=cpu) runs only the gpu_core tests, on the CPU"
        marker = pytest.mark.skip(reason=reason)
        for item in items:
            if "gpu" in item.keywords and "gpu_core" not in item.keywords:
                item.add_marker(marker)
        return
    if _gpu_run(config) and torch.cuda.is_available():
        return
    if _gpu_run(config) and CHECK_DEVICE == "cuda":
        raise pytest.UsageError("FASTALIGN_CHECK_DEVICE=cuda: `pytest -m gpu` needs a CUDA device and torch sees none")
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

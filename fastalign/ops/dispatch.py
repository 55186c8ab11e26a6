"""Which implementation runs an op: availability, the ``auto`` choice, and the scratch-memory budget.

``backend="auto"`` picks the torch backend for CPU tensors and the fastest available GPU backend for CUDA
tensors; the environment variable ``FASTALIGN_BACKEND`` replaces that choice. A backend asked for by name that
cannot run the given inputs raises :class:`BackendUnavailableError` saying why; there is no silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

BACKEND_NAMES = ("torch", "triton", "cuda")

_DEFAULT_SCRATCH_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
_scratch_override: int | None = None


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on these inputs; the message says why."""


class BackendStatus(NamedTuple):
    available: bool
    reason: str


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status(device_type: str | None = None) -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton; Linux only)")
    if _triton_interpreting():
        return BackendStatus(True, "TRITON_INTERPRET=1: kernels run in triton's CPU interpreter (slow)")
    if device_type == "cpu":
        return BackendStatus(
            False,
            "triton kernels need CUDA tensors, the inputs are on the CPU (set TRITON_INTERPRET=1 before "
            "triton is imported to run them, slowly, in triton's interpreter)",
        )
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device is visible to torch")
    return BackendStatus(True, f"triton on {torch.cuda.get_device_name()}")


def _cuda_status() -> BackendStatus:
    return BackendStatus(False, "the CUDA C++ extension fastalign._C is not part of this build yet")


def backends() -> dict[str, BackendStatus]:
    """Report each backend as ``BackendStatus(available, reason)``.

    >>> import fastalign
    >>> fastalign.backends()["torch"].available
    True
    """
    return {
        "torch": BackendStatus(True, "chunked PyTorch; runs on any device"),
        "triton": _triton_status(),
        "cuda": _cuda_status(),
    }


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``backend`` ("auto" or a name) into the backend that runs inputs of this device and dtype."""
    if backend not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}; got {backend!r}")
    if backend == "auto":
        override = os.environ.get("FASTALIGN_BACKEND", "").strip()
        if override and override != "auto":
            if override not in BACKEND_NAMES:
                raise ValueError(
                    f"FASTALIGN_BACKEND must be one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}; got {override!r}"
                )
            backend = override
        elif device.type == "cuda" and dtype != torch.float64 and _triton_status("cuda").available:
            return "triton"
        else:
            return "torch"
    if backend == "torch":
        return backend
    if backend == "cuda":
        raise BackendUnavailableError(f"backend='cuda' is unavailable: {_cuda_status().reason}")
    status = _triton_status(device.type)
    if not status.available:
        raise BackendUnavailableError(f"backend='triton' is unavailable: {status.reason}")
    if dtype == torch.float64:
        raise BackendUnavailableError(
            "backend='triton' is unavailable for float64 inputs: its kernels take float16, bfloat16 or "
            "float32; use backend='torch' for float64"
        )
    return backend


def set_scratch_budget(nbytes: int | None) -> None:
    """Bound the extra memory one op call may use for logit tiles (``None`` restores the defaults).

    Defaults: 32 MiB for CPU tensors, 256 MiB for CUDA tensors. ``FASTALIGN_SCRATCH_MB`` sets it from the
    environment. The output, the saved per-token statistics and the gradients themselves are not counted.
    """
    global _scratch_override
    if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0):
        raise ValueError(f"nbytes must be a positive int or None, got {nbytes!r}")
    _scratch_override = nbytes


def scratch_budget(device: torch.device) -> int:
    """The scratch budget in bytes for inputs on ``device``."""
    if _scratch_override is not None:
        return _scratch_override
    from_env = os.environ.get("FASTALIGN_SCRATCH_MB")
    if from_env:
        try:
            megabytes = float(from_env)
        except ValueError:
            raise ValueError(f"FASTALIGN_SCRATCH_MB must be a number of MiB, got {from_env!r}") from None
        if megabytes <= 0:
            raise ValueError(f"FASTALIGN_SCRATCH_MB must be > 0, got {from_env!r}")
        return int(megabytes * (1 << 20))
    return _DEFAULT_SCRATCH_BYTES.get(device.type, _DEFAULT_SCRATCH_BYTES["cuda"])

"""Which implementation runs an op: availability, the ``auto`` choice, and the scratch-memory budget.

``backend="auto"`` picks the torch backend for CPU tensors and, for CUDA tensors, the backend listed for the op
in :data:`AUTO_ON_CUDA`; the environment variable ``FASTALIGN_BACKEND`` replaces that choice (for ops without
a kernel in that backend, ``auto``'s choice stands). A backend asked for by name that cannot run the given
inputs raises :class:`BackendUnavailableError` saying why; there is no silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

from fastalign.ops import _cuda_ext
from fastalign.ops._checks import check_number
from fastalign.ops.stats import TileBackward

BACKEND_NAMES = ("torch", "triton", "cuda")

# The backends with a kernel for each op family. The CUDA C++ extension covers the bandwidth-bound ops; the
# matmul-fused ones (from hidden states and the lm_head weight) are Triton's.
KERNELS = {
    "linear_stats": ("torch", "triton"),
    "logits_stats": ("torch", "triton", "cuda"),
    "policy_loss": ("torch", "triton", "cuda"),
    "dpo_loss": ("torch", "triton", "cuda"),
}

# What ``auto`` runs on CUDA tensors, per op: the fastest backend in the GPU benchmark tables of bench/results/
# (``python -m bench --preset gpu`` prints it under "fastest backend per op"). No GPU table exists yet (every
# benchmark so far ran on CPU: bench/results/core_ops-cpu.md), so every op stays on Triton, the backend its GPU
# tests cover longest, until a measurement says otherwise.
AUTO_ON_CUDA = {
    "linear_stats": "triton",
    "logits_stats": "triton",
    "policy_loss": "triton",
    "dpo_loss": "triton",
}

_DEFAULT_SCRATCH_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
_scratch_override: int | None = None

LINEAR_BACKWARD_DESIGNS = ("slabs", "tiles")
# (design, tile options) as set_linear_backward last set it; None: FASTALIGN_LINEAR_BACKWARD, else the slabs.
_linear_backward: tuple[str, TileBackward | None] | None = None


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


def _cuda_status(device_type: str | None = None) -> BackendStatus:
    if device_type is not None and device_type != "cuda":
        return BackendStatus(False, f"the CUDA kernels need CUDA tensors, the inputs are on {device_type}")
    reason = _cuda_ext.unavailable_reason()
    if reason is not None:
        return BackendStatus(False, reason)
    return BackendStatus(True, f"fastalign._C on {torch.cuda.get_device_name()}")


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


def _check_name(name: str, source: str) -> None:
    if name not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"{source} must be one of 'auto', {', '.join(map(repr, BACKEND_NAMES))}; got {name!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str = "linear_stats") -> str:
    """Turn ``backend`` ("auto" or a name) into the backend that runs ``op`` on inputs of this device and dtype.

    ``op`` is a key of :data:`KERNELS`.
    """
    _check_name(backend, "backend")
    kernels = KERNELS[op]
    if backend == "auto":
        override = os.environ.get("FASTALIGN_BACKEND", "").strip()
        _check_name(override or "auto", "FASTALIGN_BACKEND")
        if override and override != "auto" and override in kernels:
            backend = override
        elif device.type == "cuda" and dtype != torch.float64 and _triton_status("cuda").available:
            return AUTO_ON_CUDA[op]
        else:
            return "torch"
    if backend == "torch":
        return backend
    if backend not in kernels:
        raise BackendUnavailableError(
            f"backend={backend!r} has no kernel for {op.replace('_', ' ')}; it runs on {', '.join(kernels)}"
        )
    status = _cuda_status(device.type) if backend == "cuda" else _triton_status(device.type)
    if not status.available:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {status.reason}")
    if dtype == torch.float64:
        raise BackendUnavailableError(
            f"backend={backend!r} is unavailable for float64 inputs: its kernels take float16, bfloat16 or "
            "float32; use backend='torch' for float64"
        )
    return backend


def set_scratch_budget(nbytes: int | None) -> None:
    """Bound the extra memory one op call may use for logit tiles (``None`` restores the defaults).

    Defaults: 32 MiB for CPU tensors, 256 MiB for CUDA tensors. ``FASTALIGN_SCRATCH_MB`` sets it from the
    environment. The output, the saved per-token statistics and the gradients themselves are not counted.
    """
    global _scratch_override
    check_number("nbytes", nbytes, integer=True, above=0, optional=True)
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


def set_linear_backward(design: str | None = "slabs", *, grad_filter: float = 0.0, deterministic: bool = False) -> None:
    """Choose the backward of the matmul-fused log-prob ops on ``backend="triton"`` (``linear_logprobs``,
    ``linear_cross_entropy``, ``linear_stats`` and the ops and modules built on them; not the distillation loss
    or ``fused_linear_loss``, which have their own).

    ``"slabs"`` (the default): the vocabulary in slabs of the scratch budget; per slab a kernel recomputes the
    logits and writes their gradient ``[N, slab]``, then two matmuls take it (docs/core-ops.md). ``"tiles"``: one
    launch over every (token tile, vocabulary tile) recomputes the logit tile, forms its gradient in registers
    and adds both gradient dots into float32 ``d_hidden`` / ``d_weight`` with atomics: nothing ``[N, V]``-sized is
    written, but the float32 ``d_weight`` (``V × D × 4`` bytes) is held for the launch. ``grad_filter`` (tiles
    only, ≥ 0): a tile whose largest gradient magnitude is not above it is skipped (cut-cross-entropy's filter;
    0.0 skips only all-zero tiles and is exact). ``deterministic`` (tiles only): the adds into each gradient tile
    run in one fixed order behind per-tile tickets, bit-identical run to run (slower: a tile's adds wait their
    turn). The slab backward is deterministic already.

    ``FASTALIGN_LINEAR_BACKWARD=tiles`` (or ``slabs``) sets the design from the environment (tiles: exact,
    atomic); a call here wins until ``set_linear_backward(None)`` hands the choice back to the environment.

    >>> import fastalign
    >>> fastalign.set_linear_backward("tiles", grad_filter=2.0**-12)
    >>> fastalign.set_linear_backward(None)  # the environment's choice, else the slabs
    """
    global _linear_backward
    if design is None:
        if grad_filter != 0.0 or deterministic:
            raise ValueError("set_linear_backward(None) restores the default: it takes no grad_filter or deterministic")
        _linear_backward = None
        return
    if design not in LINEAR_BACKWARD_DESIGNS:
        raise ValueError(f"design must be one of {', '.join(map(repr, LINEAR_BACKWARD_DESIGNS))}; got {design!r}")
    check_number("grad_filter", grad_filter, at_least=0.0)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    if design == "slabs" and (grad_filter != 0.0 or deterministic):
        raise ValueError(
            f"grad_filter={grad_filter!r} and deterministic={deterministic!r} are options of design='tiles'; "
            "the slab backward skips nothing and is deterministic"
        )
    _linear_backward = (design, TileBackward(float(grad_filter), deterministic) if design == "tiles" else None)


def tile_backward() -> TileBackward | None:
    """The tile backward's options when it is chosen (:func:`set_linear_backward`, else
    ``FASTALIGN_LINEAR_BACKWARD``), else ``None`` (the slabs)."""
    if _linear_backward is not None:
        return _linear_backward[1]
    from_env = os.environ.get("FASTALIGN_LINEAR_BACKWARD", "").strip()
    if from_env in ("", "slabs"):
        return None
    if from_env == "tiles":
        return TileBackward()
    raise ValueError(
        f"FASTALIGN_LINEAR_BACKWARD must be one of {', '.join(map(repr, LINEAR_BACKWARD_DESIGNS))}; got {from_env!r}"
    )

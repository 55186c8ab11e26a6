"""Loading ``fastalign._C`` and the conventions of its torch-free ABI.

The extension takes device pointers as ints (``tensor.data_ptr()``, 0 for an absent optional tensor), sizes,
dtype codes and the CUDA stream handle; it never sees a torch tensor. Callers check devices, dtypes, shapes and
contiguity before calling. Launch failures raise ``RuntimeError`` with CUDA's error text.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        from fastalign import _C
    except ImportError as error:
        return None, (
            f"fastalign was installed without its CUDA extension fastalign._C ({error}); reinstall on a machine "
            "with nvcc (CUDA_HOME or PATH): FASTALIGN_BUILD_CUDA=1 pip install ."
        )
    return _C, ""


def extension() -> ModuleType:
    """The loaded ``fastalign._C``; raises ``ImportError`` saying how to build it when it is missing."""
    module, why = _load()
    if module is None:
        raise ImportError(why)
    return module


def unavailable_reason() -> str | None:
    """``None`` when the extension is built and a CUDA device is visible to it, else why not."""
    module, why = _load()
    if module is None:
        return why
    count, cuda_error = module.device_count()
    if count == 0:
        return f"fastalign._C ({module.build_info()['archs']}) sees no CUDA device: {cuda_error or 'none visible'}"
    return None


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


@contextlib.contextmanager
def launch_stream(tensor: torch.Tensor) -> Iterator[int]:
    """Launch on the CUDA tensor's device: inside the block that device is current, for torch and for the
    extension, and the handle yielded is torch's current stream there (launching on it orders the kernels with
    torch's work). After the block, an error included, torch's current device is the one it was before.

    The extension links its own CUDA runtime, whose current device torch's ``cuda.set_device`` need not move (torch
    defers it on a device without a context), so the block sets it with ``fastalign._C.set_device``, which does not
    restore it. Both runtimes act on the thread's current CUDA context, so that would also move
    ``torch.cuda.current_device()``; torch's own device guard (``torch.cuda.device``) around it puts torch's
    current device back, without creating a context on a device that has none.
    """
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        extension().set_device(index)
        yield torch.cuda.current_stream(index).cuda_stream


def ptr(tensor: torch.Tensor | None) -> int:
    """Device address of a tensor's first element, 0 for ``None`` (an absent optional input)."""
    return 0 if tensor is None else tensor.data_ptr()

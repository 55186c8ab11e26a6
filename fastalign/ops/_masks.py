"""Which mask dtypes the policy and DPO kernels read as they are, and the ``mask != 0`` copy for the others.

Both backends keep a token where its mask element is nonzero as a number, as the torch backend does.
"""

from __future__ import annotations

import torch

# Mask dtypes the Triton kernels load and test with ``!= 0`` exactly as torch does: in the interpreter, and in the
# sm_80 / sm_90 code, where a float's bits are compared with the sign masked off (-0.0 drops a token, NaN and a
# float64 1e-300 keep it; no flush to zero). Triton has no complex dtype, the kernels do not compile for float8
# masks, and the interpreter misreads bfloat16 and float8 comparisons. (A table of dtypes, kept compact.)
TRITON_MASK_DTYPES = frozenset(
    (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
     torch.uint64, torch.float16, torch.float32, torch.float64)
)  # fmt: skip

# The CUDA kernels test a floating mask's bits with the sign cleared, which is "!= 0" for IEEE-style formats
# (bfloat16, float8 e4m3fn / e5m2 included) but not for these: e8m0 has no zero (0x00 is 2^-127) and in the
# fnuz formats 0x80 is NaN, which torch keeps. Complex masks have no real layout at all.
_CUDA_REREAD = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, name)
)


def kernel_mask(mask: torch.Tensor, backend: str) -> torch.Tensor:
    """``mask`` as the ``"triton"`` or ``"cuda"`` kernels can read it: itself, or the bool ``mask != 0``."""
    if backend == "triton":
        return mask if mask.dtype in TRITON_MASK_DTYPES else mask != 0
    if mask.dtype.is_complex or mask.dtype in _CUDA_REREAD:
        return mask != 0
    return mask

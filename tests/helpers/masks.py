"""Masks of every dtype, with values a careless conversion loses: what the kernels' mask reading is tested on."""

import torch

# Every dtype a mask can be made in, the unusual ones included (complex, bfloat16, float8, unsigned).
# (A table of dtypes, kept compact: one per line would hide it.)
ALL_MASK_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex32, torch.complex64,
    torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]  # fmt: skip


def unusual_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``keep`` (bool ``[B, T]``) as a ``dtype`` mask whose kept tokens hold values a careless conversion loses
    (an imaginary unit, a float64 1e-300, subnormals, NaN, an int64 whose low 32 bits are 0) and whose dropped
    tokens hold 0 or -0.0. Whatever the dtype makes of them, the torch backend keeps the tokens where ``!= 0``."""
    if dtype.is_complex:
        on, off = [1j, 1e-300j, 1e-300, -2 + 0j, 3 + 1j], [0j, complex(-0.0, -0.0)]
        base = torch.complex128
    elif dtype.is_floating_point:
        on, off = [1.0, 1e-300, -1.0, 1e-40, float("nan"), 6e-8, 0.5], [0.0, -0.0]
        base = torch.float64
    else:
        on, off = [1, 2**40, -1, 255, 2**33 + 1], [0]
        base = torch.int64
    n = keep.numel()
    values = [torch.tensor(v, dtype=base).repeat(n // len(v) + 1)[:n].view(keep.shape) for v in (on, off)]
    return torch.where(keep, *values).to(dtype)

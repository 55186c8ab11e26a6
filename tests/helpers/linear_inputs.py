"""Inputs of the fused linear ops (hidden, weight, targets with ignored positions, bias) and the tolerance of a
backend and dtype against the float64 reference."""

import torch

from helpers.oracle import INTERPRETER_BF16_FACTOR, LOW_PRECISION_FACTOR


def make_linear_inputs(leading, width, vocab, *, with_bias=False, ignore_every=5, seed=0):
    """float64 master inputs; every ``ignore_every``-th target is ignore_index (-100)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "hidden": torch.randn(*leading, width, generator=gen, dtype=torch.float64),
        "weight": torch.randn(vocab, width, generator=gen, dtype=torch.float64) * (3 / width**0.5),
        "targets": torch.randint(0, vocab, leading, generator=gen),
    }
    if ignore_every:
        inputs["targets"].view(-1)[::ignore_every] = -100
    if with_bias:
        inputs["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64)
    return inputs


def tolerance(backend, dtype):
    interpreted_bf16 = backend == "triton" and dtype == torch.bfloat16 and not torch.cuda.is_available()
    return {"low_precision_factor": INTERPRETER_BF16_FACTOR if interpreted_bf16 else LOW_PRECISION_FACTOR}

"""Compare a fastalign op against the float64 reference, values and gradients, under the house tolerance rule.

float32 (and float64) inputs: normwise relative error <= 1e-4, the norm floored at 1e-3 — float32 forms a
log-prob as a difference of numbers of the logits' magnitude, so an output or gradient of order 1e-6 (a token of
probability 1 - 1e-6) carries an absolute error near 1e-8 in any float32 implementation, eager included.
float16/bfloat16 inputs: the error must be no larger than that of the eager computation in the same dtype
against the same float64 reference, plus slack.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FP32_RTOL = 1e-4
FP32_NORM_FLOOR = 1e-3
LOW_PRECISION_FACTOR = 1.5  # how much worse than eager low-precision PyTorch we allow
# Triton's CPU interpreter truncates float32 -> bfloat16 casts (GPUs round to nearest), which doubles the
# rounding error of every bfloat16 value a kernel stores; tests of interpreted bfloat16 kernels allow for it.
INTERPRETER_BF16_FACTOR = 3.0


def rel_error(value: torch.Tensor, reference: torch.Tensor, floor: float = 1e-6) -> float:
    """``max |value - reference| / max(max |reference|, floor)``."""
    if reference.numel() == 0:
        return 0.0
    scale = reference.abs().max().clamp_min(floor)
    return ((value.double() - reference).abs().max() / scale).item()


def _run(fn: Callable, inputs: dict[str, torch.Tensor], upstream: list[torch.Tensor] | None):
    """Outputs of ``fn(**inputs)`` and the gradients of ``Σ out·upstream`` w.r.t. floating inputs."""
    outputs = fn(**inputs)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    if upstream is None:
        gen = torch.Generator().manual_seed(1234)
        upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
    total = sum((o.double() * u).sum() for o, u in zip(outputs, upstream, strict=True))
    grads = torch.autograd.grad(total, leaves) if leaves else ()
    return [o.detach() for o in outputs], [g.detach() for g in grads], upstream


def _leaves(inputs: dict, dtype: torch.dtype | None, device: str | torch.device) -> dict:
    converted = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(device=device, dtype=dtype or value.dtype).requires_grad_(True)
        elif isinstance(value, torch.Tensor):
            value = value.to(device)
        converted[name] = value
    return converted


def assert_matches_reference(
    op: Callable,
    reference: Callable,
    inputs: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    low_precision_factor: float = LOW_PRECISION_FACTOR,
    against_eager: bool = False,
    **options,
) -> dict[str, float]:
    """Check values and gradients of ``op(**inputs, **options)`` against ``reference`` in float64.

    ``inputs`` holds float64 master copies of the floating tensors (and the integer targets).
    ``against_eager`` applies the low-precision rule to float32 too (for inputs, such as huge logits, where
    float32 itself cannot reach 1e-4). Returns the errors, for reporting.
    """
    ref_out, ref_grads, upstream = _run(lambda **kw: reference(**kw, **options), _leaves(inputs, None, "cpu"), None)
    out, grads, _ = _run(lambda **kw: op(**kw, **options), _leaves(inputs, dtype, device), upstream)
    errors = {}
    for i, (value, expected) in enumerate(zip(out + grads, ref_out + ref_grads, strict=True)):
        assert value.shape == expected.shape, f"output/grad {i}: shape {value.shape} != {expected.shape}"
        floor = FP32_NORM_FLOOR if dtype in (torch.float32, torch.float64) and not against_eager else 1e-6
        errors[f"out{i}" if i < len(out) else f"grad{i - len(out)}"] = rel_error(value.cpu(), expected, floor)
    for i, value in enumerate(out):
        expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert value.dtype == expected_dtype, f"output {i} has dtype {value.dtype}, expected {expected_dtype}"
    if dtype in (torch.float32, torch.float64) and not against_eager:
        bad = {k: v for k, v in errors.items() if v > FP32_RTOL}
        assert not bad, f"relative errors above {FP32_RTOL}: {bad}"
        return errors
    eager_out, eager_grads, _ = _run(lambda **kw: reference(**kw, **options), _leaves(inputs, dtype, device), upstream)
    for (name, error), eager_value, expected in zip(
        errors.items(), eager_out + eager_grads, ref_out + ref_grads, strict=True
    ):
        eager_error = rel_error(eager_value.cpu(), expected)
        assert error <= low_precision_factor * eager_error + 1e-3, (
            f"{name}: error {error:.3g} vs eager {dtype} error {eager_error:.3g}"
        )
    return errors

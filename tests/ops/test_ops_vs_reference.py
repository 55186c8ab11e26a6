"""Every public op, every CPU-runnable backend, against the float64 reference: values and all gradients."""

import functools

import pytest
import torch
from helpers.linear_inputs import make_linear_inputs, tolerance
from helpers.oracle import assert_matches_reference

import fastalign
from fastalign.ops import reference

# Sizes are deliberately not multiples of any tile (triton's interpreter tiles are 16/32, torch's follow the
# budget). Triton runs in the interpreter on CPU, so its sizes stay tiny.
SIZES = {"torch": ((2, 21), 48, 517), "triton": ((2, 9), 40, 101)}
# Triton kernels take 16/32-bit inputs (float64 raises, see test_backends).
BACKEND_DTYPES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in ("torch", "triton")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if not (backend == "triton" and dtype == torch.float64)
]
LOGPROB_CASES = [
    {},
    {"temperature": 0.7},
    {"softcap": 4.0},
    {"temperature": 1.3, "softcap": 2.5, "with_bias": True},
    {"with_bias": True, "return_entropy": True},
    {"temperature": 0.6, "softcap": 3.0, "return_entropy": True},
]
CROSS_ENTROPY_CASES = [
    {},
    {"reduction": "sum"},
    {"reduction": "none", "with_bias": True},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3, "softcap": 3.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "with_bias": True},
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items()) or "plain"


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("case", LOGPROB_CASES, ids=case_id)
def test_linear_logprobs(backend, dtype, case):
    options = dict(case)
    leading, width, vocab = SIZES[backend]
    inputs = make_linear_inputs(leading, width, vocab, with_bias=options.pop("with_bias", False))
    op = functools.partial(fastalign.linear_logprobs, backend=backend)
    assert_matches_reference(op, reference.linear_logprobs, inputs, dtype, **tolerance(backend, dtype), **options)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("case", [c for c in LOGPROB_CASES if "with_bias" not in c], ids=case_id)
def test_logprobs_from_logits(backend, dtype, case):
    leading, _, vocab = SIZES[backend]
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, vocab, leading, generator=gen)
    targets.view(-1)[::4] = -100
    inputs = {
        "logits": 3 * torch.randn(*leading, vocab, generator=gen, dtype=torch.float64),
        "targets": targets,
    }
    op = functools.partial(fastalign.logprobs_from_logits, backend=backend)
    assert_matches_reference(op, reference.logprobs_from_logits, inputs, dtype, **tolerance(backend, dtype), **case)


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
@pytest.mark.parametrize("case", CROSS_ENTROPY_CASES, ids=case_id)
def test_linear_cross_entropy(backend, dtype, case):
    options = dict(case)
    leading, width, vocab = SIZES[backend]
    inputs = make_linear_inputs(leading, width, vocab, with_bias=options.pop("with_bias", False))
    op = functools.partial(fastalign.linear_cross_entropy, backend=backend)
    assert_matches_reference(op, reference.linear_cross_entropy, inputs, dtype, **tolerance(backend, dtype), **options)


@pytest.mark.parametrize("leading", [(13,), (3, 5), (2, 3, 4)], ids=str)
def test_leading_shapes(leading):
    inputs = make_linear_inputs(leading, 24, 77, with_bias=True)
    logp, entropy = fastalign.linear_logprobs(**inputs, return_entropy=True, softcap=5.0)
    assert logp.shape == entropy.shape == leading
    assert_matches_reference(
        fastalign.linear_logprobs, reference.linear_logprobs, inputs, torch.float32, return_entropy=True
    )


@pytest.mark.parametrize("budget", [1 << 10, 20 << 10, 300 << 10], ids=["tiny-tiles", "small-tiles", "wide-tiles"])
def test_torch_backend_tiling(scratch_budget, budget):
    """Budgets giving 8x8, 35x36 and 40x480 tiles (several row blocks and vocabulary tiles) agree alike."""
    scratch_budget(budget)
    inputs = make_linear_inputs((40,), 32, 1031, with_bias=True)
    for op, ref, options in [
        (fastalign.linear_logprobs, reference.linear_logprobs, {"return_entropy": True, "softcap": 3.0}),
        (
            fastalign.linear_cross_entropy,
            reference.linear_cross_entropy,
            {"label_smoothing": 0.1, "z_loss": 1e-3},
        ),
    ]:
        assert_matches_reference(functools.partial(op, backend="torch"), ref, inputs, torch.float32, **options)
    logits_inputs = {"logits": torch.randn(40, 1031, dtype=torch.float64), "targets": inputs["targets"]}
    assert_matches_reference(
        functools.partial(fastalign.logprobs_from_logits, backend="torch"),
        reference.logprobs_from_logits,
        logits_inputs,
        torch.float32,
        return_entropy=True,
        temperature=0.8,
    )

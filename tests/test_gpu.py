"""GPU tests: the Triton kernels compiled for the real device (bf16 dots, autotuning, atomics), against the
float64 reference; peak-memory bounds. Marked ``gpu``: skipped without CUDA, run by bench/gpu_check.sh."""

import functools

import pytest
import torch
from oracle import assert_matches_reference
from test_ops_vs_reference import make_linear_inputs

import fastalign
from fastalign.ops import reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CASES = [
    {},
    {"temperature": 0.7, "return_entropy": True},
    {"softcap": 30.0, "with_bias": True, "return_entropy": True},
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_linear_logprobs_on_gpu(backend, dtype, case):
    options = dict(case)
    inputs = make_linear_inputs((3, 333), 320, 5003, with_bias=options.pop("with_bias", False))
    op = functools.partial(fastalign.linear_logprobs, backend=backend)
    assert_matches_reference(op, reference.linear_logprobs, inputs, dtype, device="cuda", **options)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprobs_from_logits_on_gpu(backend, dtype):
    targets = torch.randint(0, 32001, (2, 517))
    targets[:, ::7] = -100
    inputs = {"logits": 4 * torch.randn(2, 517, 32001, dtype=torch.float64), "targets": targets}
    op = functools.partial(fastalign.logprobs_from_logits, backend=backend)
    assert_matches_reference(
        op, reference.logprobs_from_logits, inputs, dtype, device="cuda", return_entropy=True, temperature=0.9
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_on_gpu(dtype):
    inputs = make_linear_inputs((2, 700), 256, 8191, with_bias=True)
    op = functools.partial(fastalign.linear_cross_entropy, backend="triton")
    assert_matches_reference(
        op, reference.linear_cross_entropy, inputs, dtype, device="cuda", label_smoothing=0.1, z_loss=1e-4
    )


def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    from fastalign.ops.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"


def test_frozen_weight_on_gpu():
    inputs = make_linear_inputs((4, 250), 256, 4099)
    hidden = inputs["hidden"].cuda().bfloat16().requires_grad_()
    weight = inputs["weight"].cuda().bfloat16()
    logp = fastalign.linear_logprobs(hidden, weight, inputs["targets"].cuda())
    logp.sum().backward()
    assert weight.grad is None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_peak_memory_stays_far_below_the_logits(backend):
    """fwd+bwd extra memory: far below one bf16 copy of the [N, V] logits eager would hold several of."""
    n, width, vocab = 8192, 1024, 65536
    hidden = torch.randn(n, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, width, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    # Warm up (autotuning) outside the measured window; gradients are pre-allocated by the warm-up.
    fastalign.linear_logprobs(hidden, weight, targets, backend=backend).sum().backward()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fastalign.linear_logprobs(hidden, weight, targets, backend=backend).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    from fastalign.ops.dispatch import scratch_budget

    # The scratch budget, float32 gradient accumulators, the new bf16 gradients, and 64 MiB of small change.
    gradient_elements = vocab * width + n * width
    bound = scratch_budget(hidden.device) + 6 * gradient_elements + (64 << 20)
    assert extra <= bound, f"extra {extra / 2**20:.0f} MiB > bound {bound / 2**20:.0f} MiB"
    assert bound < n * vocab * 2, "the bound must be below one bf16 copy of the logits to mean anything"

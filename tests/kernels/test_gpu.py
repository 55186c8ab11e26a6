"""GPU tests: the Triton kernels compiled for the real device (bf16 dots, autotuning, atomics), against the
float64 reference; peak-memory bounds. Marked ``gpu``: skipped without CUDA, run by ``bench/gpu_check.sh OUT
rest``. The fused modules and the cases that matter most are in tests/kernels/test_gpu_core.py (the check's core
step)."""

import functools

import pytest
import torch
from helpers.linear_inputs import make_linear_inputs
from helpers.oracle import assert_matches_reference

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


@pytest.mark.parametrize("backend", ["triton", "torch", "cuda"])
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


@pytest.mark.parametrize("case", ["dapo", "grpo-sequence", "dual-kl-entropy"])
def test_policy_loss_kernels_on_gpu(case):
    """The Triton policy kernels (float32) against the torch backend in float64, at realistic sizes."""
    from helpers.policy_cases import make_inputs

    options = {
        "dapo": {"loss_type": "dapo", "clip_eps_high": 0.28, "with_is_weights": True},
        "grpo-sequence": {"loss_type": "grpo", "importance_sampling_level": "sequence"},
        "dual-kl-entropy": {"dual_clip": 3.0, "kl_coef": 0.05, "with_ref": True, "entropy_coef": 0.01,
                            "with_entropy": True, "per_token_advantages": True},
    }[case]  # fmt: skip
    inputs, options = make_inputs(options, rows=64, width=1000, seed=3)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = {k: v.to(device="cuda", dtype=dtype) for k, v in inputs.items()}
        leaves["logps"].requires_grad_()
        loss, metrics = fastalign.policy_loss(**leaves, **options, backend=backend)
        (grad,) = torch.autograd.grad(loss, leaves["logps"])
        results[backend] = (loss.double(), grad.double(), {k: v.double() for k, v in metrics.items()})
    (loss, grad, metrics), (want_loss, want_grad, want_metrics) = results["triton"], results["torch"]
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_dpo_kernels_on_gpu():
    """Every DPO type through the Triton reduction + loss kernels against the torch path in float64."""
    from fastalign.ops.preference import DPO_LOSS_TYPES, dpo_loss_from_token_logps

    gen = torch.Generator().manual_seed(0)
    token_logps = -3 * torch.rand(16, 700, generator=gen, dtype=torch.float64)
    mask = torch.rand(16, 700, generator=gen) > 0.2
    ref = -500 * torch.rand(16, generator=gen, dtype=torch.float64)
    for name in DPO_LOSS_TYPES:
        smoothing = 1e-3 if name == "exo_pair" else 0.0
        got_leaf = token_logps.float().cuda().requires_grad_()
        got, sums, _ = dpo_loss_from_token_logps(got_leaf, mask.cuda(), ref.float().cuda(), loss_type=name,
                                                 label_smoothing=smoothing, backend="triton")  # fmt: skip
        want_leaf = token_logps.clone().requires_grad_()
        want, want_sums, _ = dpo_loss_from_token_logps(want_leaf, mask, ref, loss_type=name,
                                                       label_smoothing=smoothing, backend="torch")  # fmt: skip
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4, msg=name)
        (g,) = torch.autograd.grad(got.sum() + sums.sum(), got_leaf)
        (w,) = torch.autograd.grad(want.sum() + want_sums.sum(), want_leaf)
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-5, msg=name)

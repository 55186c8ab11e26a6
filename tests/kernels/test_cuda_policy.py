"""policy_loss on the CUDA C++ backend (``csrc/cuda/policy_loss.cu``).

CPU: the kernels' shared per-token math (``csrc/include/fastalign/policy_math.h``), compiled into
``fastalign._host_math``, against torch: the surrogate and its gradient at and beyond the clip bounds, the KL
estimators at and beyond the log-ratio clamp, masks of every dtype; then ``backend="cuda"`` end to end with the
host build of the kernels' passes standing in for the launches, against the float64 reference. GPU (marked):
the kernels themselves against the torch backend in float64, over every combination of options.
"""

import functools
import itertools

import numpy as np
import pytest
import torch
from helpers.policy_cases import CASES, assert_close_to, case_id, gpu_inputs, loss_and_grads, make_inputs, run

import fastalign
from fastalign.ops import _policy_kernels, policy, reference_losses
from fastalign.ops._policy_kernels import CudaLaunch, kernel_options

KL_KINDS = {"k1": 1, "k2": 2, "k3": 3}
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.fixture
def host_math():
    return pytest.importorskip("fastalign._host_math", reason="built with the CUDA extension (nvcc at install)")


def host_options(host_math, **change):
    """PolicyOptions as the kernels receive them (float32): clip range [0.8, 1.28] unless changed."""
    options = {
        "clip_low": 0.8,
        "clip_high": 1.28,
        "dual_clip": None,
        "kl_coef": 0.0,
        "kl_kind": 3,
        "entropy_coef": 0.0,
        "log_ratio_limit": policy.LOG_RATIO_LIMIT,
        "sequence_level": False,
    }
    return host_math.PolicyOptions(**{**options, **change})


def surrogate_reference(ratio, adv, low, high, dual_clip):
    """policy_terms' clipped / dual-clipped surrogate on given ratios: (loss, d loss / d ratio, flags)."""
    ratio = ratio.clone().requires_grad_()
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(low, high))
    loss = clipped
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(clipped, -adv * dual_clip), clipped)
    (grad,) = torch.autograd.grad(loss.sum(), ratio)
    dual = (adv < 0) & (clipped > -adv * dual_clip) if dual_clip is not None else torch.zeros_like(adv, dtype=bool)
    flags = [(ratio < low) & (adv < 0), (ratio > high) & (adv > 0), dual]
    return loss.detach(), grad, [flag.float() for flag in flags]


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_host_surrogate_matches_torch(host_math, dual_clip):
    """Random ratios far outside the clip range, and exact ties: the clip bounds, ratio 1, the dual-clip cap
    (ratio = c, where torch.minimum splits the gradient), ties of the max outside the range, and A = 0."""
    gen = torch.Generator().manual_seed(1)
    # Just outside the range, -A·r and -A·clip(r) round to one float32 for some A: a tie of the max outside it.
    outside = torch.nextafter(torch.tensor([0.8, 1.28]), torch.tensor([0.0, 9.0]))
    special_ratios = torch.cat([torch.tensor([0.8, 1.28, 1.0, 3.0, 0.0, 1e-9, 4.8e8, 0.5, 2.0]), outside])
    special_adv = torch.cat([torch.tensor([0.0, 1.0, -1.0, 2.5, -2.5, -1e-3]), torch.linspace(-4, 4, 400)])
    ratio = torch.cat([special_ratios.repeat_interleave(len(special_adv)), 6 * torch.rand(4000, generator=gen)])
    adv = torch.cat([special_adv.repeat(len(special_ratios)), 2 * torch.randn(4000, generator=gen)])
    loss, grad, *flags = host_math.policy_surrogate(
        ratio.numpy(), adv.numpy(), host_options(host_math, dual_clip=dual_clip)
    )
    ref_loss, ref_grad, ref_flags = surrogate_reference(ratio, adv, 0.8, 1.28, dual_clip)
    # The same float32 operations in the same order as torch's forward and autograd: equal to the bit.
    torch.testing.assert_close(torch.from_numpy(loss), ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(grad), ref_grad, rtol=0, atol=0)
    outside_tie = ((ratio < 0.8) | (ratio > 1.28)) & (-adv * ratio == -adv * ratio.clamp(0.8, 1.28)) & (adv != 0)
    assert outside_tie.any()
    for name, flag, ref_flag in zip(("low", "high", "dual"), flags, ref_flags, strict=True):
        assert torch.equal(torch.from_numpy(flag), ref_flag), name
    assert ref_flags[0].any() and ref_flags[1].any() and (dual_clip is None or ref_flags[2].any())


FLOAT32_EPS = torch.finfo(torch.float32).eps


def assert_as_accurate_as_torch(got, torch_value, exact, magnitude, name):
    """The kernel math's float32 result is as close to the float64 value as torch's float32 one is, plus 4 float32
    ulps of ``magnitude`` (the size of the terms that are summed, elementwise or normwise). Both compute the same
    float32 operations, but torch's CPU kernels round differently by vector width (AVX2 / AVX-512), so comparing
    the two directly at a few ulps depends on the CPU."""
    got, torch_value = got.double(), torch_value.double()
    bound = 2 * (torch_value - exact).abs() + 4 * FLOAT32_EPS * magnitude
    error = (got - exact).abs()
    worst = int((error - bound).argmax()) if error.dim() else 0
    assert (error <= bound).all(), (
        f"{name}: error {error.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} at element {worst}"
    )


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_host_kl_matches_torch(host_math, kind):
    """Values and d / d logps of r = ref − logps across the clamp at ±20 (bounds included, where torch.clamp's
    gradient still flows), against the float64 formula, elementwise."""
    r = torch.cat([torch.linspace(-30, 30, 601), torch.tensor([-20.0, 20.0, 0.0, -19.999, 20.001, 1e-6])])
    logps = torch.zeros_like(r, requires_grad=True)
    value = policy.kl_estimate(logps, r, kind)
    (grad,) = torch.autograd.grad(value.sum(), logps)
    logp64 = torch.zeros_like(r, dtype=torch.float64, requires_grad=True)
    exact = policy.kl_estimate(logp64, r.double(), kind)
    (exact_grad,) = torch.autograd.grad(exact.sum(), logp64)
    got_value, got_grad = host_math.policy_kl(r.numpy(), host_options(host_math, kl_kind=KL_KINDS[kind]))
    clamped = r.double().clamp(-policy.LOG_RATIO_LIMIT, policy.LOG_RATIO_LIMIT)
    magnitude = 1 + clamped.abs() + clamped.exp() + clamped**2  # every term k1, k2 or k3 sums
    assert_as_accurate_as_torch(torch.from_numpy(got_value), value.detach(), exact.detach(), magnitude, "value")
    assert_as_accurate_as_torch(torch.from_numpy(got_grad), grad, exact_grad, magnitude, "d / d logps")


# A table of dtypes, kept compact (one per line would hide it).
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64]  # fmt: skip


def mask_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros, signed zeros, NaN, tiny values and integers whose low bits are 0 (256 wraps to 0 in uint8)."""
    if dtype.is_floating_point:
        return torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), 1e-30, 1e-40, -3.0, 65536.0], dtype=dtype)
    return torch.tensor([0, 1, -1, 2, 255, 256, 65536, -3, 2**40, 0]).to(dtype)


def raw_mask(mask: torch.Tensor) -> np.ndarray:
    """The mask's bits as numpy holds them (bfloat16 has no numpy dtype: its 16-bit pattern as int16)."""
    return (mask.view(torch.int16) if mask.dtype == torch.bfloat16 else mask).numpy()


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_host_mask_keeps_like_nonzero(host_math, dtype):
    mask = mask_values(dtype)
    keeps = host_math.policy_mask_keeps(raw_mask(mask), dtype.is_floating_point)
    assert np.array_equal(keeps, (mask != 0).numpy())


def test_host_options_and_rows_reject_bad_input(host_math):
    with pytest.raises(ValueError, match="kl_kind must be 1, 2 or 3"):
        host_options(host_math, kl_kind=4)
    ones = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="old_logp must have the shape"):
        host_math.policy_rows(ones, np.ones((3, 2), np.float32), ones, ones, True, host_options(host_math))


class HostLaunch(CudaLaunch):
    """The CUDA launch's inputs (same preparation) through the kernels' passes built for the CPU."""

    def __init__(self, host_math):
        self.host_math = host_math

    def _rows(self, a, tensors):
        shape = tensors["logps"].shape

        def array(name):
            tensor = tensors[name]
            return None if tensor is None else tensor.detach().float().expand(shape).contiguous().numpy()

        mask = tensors["mask"]
        return self.host_math.policy_rows(
            array("logps"),
            array("old_logps"),
            array("advantages"),
            raw_mask(mask),
            mask.is_floating_point(),
            kernel_options(self.host_math, a),
            is_weights=array("is_weights"),
            ref_logp=array("ref_logps"),
            entropy=array("entropy"),
        )

    def forward(self, a, tensors, stats):
        stats.copy_(torch.from_numpy(self._rows(a, tensors)[0]))

    def backward(self, a, tensors, weights, grads):
        _, d_logp, d_entropy = self._rows(a, tensors)
        grads["logps"].copy_(torch.from_numpy(d_logp) * weights[:, None])
        if grads["entropy"] is not None:
            grads["entropy"].copy_(torch.from_numpy(d_entropy) * weights[:, None])


@pytest.fixture
def host_cuda(host_math, monkeypatch):
    """``policy_loss(backend="cuda")`` on CPU tensors, the host build of the kernels in place of the launches."""
    monkeypatch.setitem(_policy_kernels.LAUNCHES, "cuda", HostLaunch(host_math))
    monkeypatch.setattr(policy, "resolve_backend", lambda backend, *args: backend)
    return functools.partial(fastalign.policy_loss, backend="cuda")


HOST_CASES = [
    *CASES,
    {
        "importance_sampling_level": "sequence",
        "with_is_weights": True,
        "per_token_advantages": True,
        "with_entropy": True,
        "entropy_coef": 0.02,
        "loss_agg_mode": "seq-mean-token-sum",
    },
    {
        "importance_sampling_level": "sequence",
        "with_is_weights": "per_row",
        "kl_coef": 0.1,
        "kl_estimator": "k1",
        "with_ref": True,
        "dual_clip": 2.0,
        "loss_type": "dr_grpo",
    },
    {
        "kl_coef": 0.2,
        "kl_estimator": "k2",
        "with_ref": True,
        "dual_clip": 1.5,
        "clip_eps_low": 0.1,
        "clip_eps_high": 0.0,
        "per_token_advantages": True,
    },
]


@pytest.mark.parametrize("case", HOST_CASES, ids=case_id)
def test_cuda_path_on_host_matches_reference(host_cuda, case):
    """Loss, gradients (logps and entropy) and metrics of the kernels' passes against the float64 reference."""
    inputs, options = make_inputs(case, spread=1.0)
    ref_loss, ref_grads, _ = run(reference_losses.policy_loss, inputs, options, torch.float64)
    _, _, ref_metrics = run(functools.partial(fastalign.policy_loss, backend="torch"), inputs, options, torch.float64)
    loss, grads, metrics = run(host_cuda, inputs, options, torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for name, value in ref_metrics.items():
        torch.testing.assert_close(metrics[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    assert all(not m.requires_grad for m in metrics.values())
    assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2])), "an empty row gets no gradient"


def clamp_inputs():
    """Log-ratios and KL arguments beyond ±20 (clamped: no gradient) and exactly ±20 in float32 (the gradient
    still flows), and a row whose mean log-ratio is beyond the clamp at sequence level."""
    logps = torch.tensor([[0.0, -300.0, -1.0, -25.0, 0.0, -2.0], [-1.0, -2.0, -3.0, -1.5, -0.5, -2.5]])
    old = logps + torch.tensor([[-300.0, 300.0, 0.0, 20.0, -20.0, 0.1], [-30.0, -30.0, -30.0, -30.0, -30.0, -30.0]])
    ref = logps + torch.tensor([[25.0, -25.0, 20.0, -20.0, 0.3, -0.2], [0.1, 0.2, -0.3, 21.0, -21.0, 0.0]])
    return {
        "logps": logps,
        "old_logps": old,
        "advantages": torch.tensor([1.0, -0.5]),
        "mask": torch.ones(2, 6),
        "ref_logps": ref,
    }


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_cuda_path_on_host_clamps_log_ratios(host_cuda, level, kind):
    """As accurate as the torch backend on the same float32 values, against the torch backend in float64 (the loss,
    and the gradient normwise: exp(20) makes terms of 5e8)."""
    options = {"importance_sampling_level": level, "kl_coef": 0.3, "kl_estimator": kind}
    torch_backend = functools.partial(fastalign.policy_loss, backend="torch")
    want_loss, want_grads, _ = loss_and_grads(torch_backend, clamp_inputs(), options)
    exact_inputs = {name: value.double() for name, value in clamp_inputs().items()}
    exact_loss, exact_grads, _ = loss_and_grads(torch_backend, exact_inputs, options)
    loss, grads, _ = loss_and_grads(host_cuda, clamp_inputs(), options)
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()
    assert_as_accurate_as_torch(loss, want_loss, exact_loss, exact_loss.abs(), "loss")
    grad_error = (grads[0].double() - exact_grads[0]).abs().max()
    torch_error = (want_grads[0].double() - exact_grads[0]).abs().max()
    assert_as_accurate_as_torch(grad_error, torch_error, torch.zeros(()), exact_grads[0].abs().max(), "d / d logps")


@pytest.mark.parametrize("mask_dtype", [*MASK_DTYPES, torch.complex64], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cuda_path_on_host_dtypes(host_cuda, dtype, mask_dtype):
    """logps / entropy in each kernel dtype with float64 old_logp, ref_logp and advantages (passed as float32),
    masks of every dtype with -0.0 entries (a complex one passed as its nonzero test): as the torch backend on
    the same rounded values."""
    inputs, options = make_inputs(
        {
            "with_ref": True,
            "kl_coef": 0.1,
            "with_entropy": True,
            "entropy_coef": 0.01,
            "loss_type": "grpo",
            "per_token_advantages": True,
        }
    )
    for name in ("logps", "entropy"):
        inputs[name] = inputs[name].to(dtype).double()
    inputs["mask"] = torch.where(inputs["mask"] != 0, 1.0, -0.0).double()
    want = loss_and_grads(functools.partial(fastalign.policy_loss, backend="torch"), inputs, options)
    tensors = {
        **inputs,
        "logps": inputs["logps"].to(dtype),
        "entropy": inputs["entropy"].to(dtype),
        "mask": inputs["mask"].to(mask_dtype),
    }
    got = loss_and_grads(host_cuda, tensors, options)
    assert got[0].dtype == dtype and all(grad.dtype == dtype for grad in got[1])
    assert_close_to(got, want, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (4, 6)], ids=str)
def test_cuda_path_on_host_empty(host_cuda, shape):
    """No rows, no tokens (no launch) and an all-masked batch: loss 0, zero gradients, finite metrics."""
    logps = torch.randn(shape, requires_grad=True)
    entropy = torch.rand(shape, requires_grad=True)
    loss, metrics = host_cuda(
        logps,
        logps.detach() + 50.0,
        torch.randn(shape[0]),
        torch.zeros(shape),
        entropy=entropy,
        entropy_coef=0.1,
        loss_type="grpo",
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros(shape))
    assert torch.equal(entropy.grad, torch.zeros(shape))
    assert all(torch.isfinite(m) for m in metrics.values())


def test_cuda_backend_needs_cuda_tensors():
    with pytest.raises(fastalign.BackendUnavailableError, match="CUDA tensors"):
        fastalign.policy_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2), torch.ones(2, 3), backend="cuda")


# GPU: the kernels themselves.


def grid_case(index, level, dual_clip, kl, entropy, weights, per_token_advantages):
    case = {"importance_sampling_level": level, "loss_agg_mode": MODES[index % len(MODES)]}
    if dual_clip is not None:
        case["dual_clip"] = dual_clip
    if kl is not None:
        case.update(kl_coef=0.05, kl_estimator=kl, with_ref=True)
    if entropy:
        case.update(entropy_coef=0.01, with_entropy=True)
    if weights is not None:
        case["with_is_weights"] = weights
    if per_token_advantages:
        case["per_token_advantages"] = True
    return case


GRID = itertools.product(
    ["token", "sequence"], [None, 3.0], [None, "k1", "k2", "k3"], [False, True], [None, True, "per_row"], [False, True]
)
GPU_CASES = [grid_case(i, *combo) for i, combo in enumerate(GRID)]


def evaluate(inputs, options, dtype, backend):
    """(loss, [d logps, d entropy], metrics) on the GPU, inputs in dtype."""
    tensors = {k: v.to(device="cuda", dtype=dtype) for k, v in inputs.items()}
    return loss_and_grads(functools.partial(fastalign.policy_loss, backend=backend), tensors, options)


def assert_cuda_matches_torch(inputs, options, dtype):
    """backend="cuda" in dtype against the torch backend in float64 on the same (rounded) values."""
    rounded = {k: v.to(dtype).double() for k, v in inputs.items()}
    got = evaluate(rounded, options, dtype, "cuda")
    assert got[0].dtype == dtype and all(grad.dtype == dtype for grad in got[1])
    assert_close_to(got, evaluate(rounded, options, torch.float64, "torch"), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_cuda_matches_torch(case, dtype):
    inputs, options = gpu_inputs(case, seed=GPU_CASES.index(case))
    assert_cuda_matches_torch(inputs, options, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_cuda_clamps_log_ratios(level, kind):
    options = {"importance_sampling_level": level, "kl_coef": 0.3, "kl_estimator": kind}
    assert_cuda_matches_torch(clamp_inputs(), options, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_float16(case):
    inputs, options = gpu_inputs(case)
    assert_cuda_matches_torch(inputs, options, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 257), (3, 256), (2, 1000), (64, 513), (0, 7), (3, 0)], ids=str)
def test_cuda_shapes(shape, level):
    """B = 1, T below / at / past the block of 256 threads, many rows, and the shapes that launch nothing."""
    case = {
        "importance_sampling_level": level,
        "kl_coef": 0.05,
        "with_ref": True,
        "with_entropy": True,
        "entropy_coef": 0.01,
        "dual_clip": 3.0,
        "with_is_weights": True,
    }
    inputs, options = gpu_inputs(case, *shape)
    assert_cuda_matches_torch(inputs, options, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_all_masked_is_zero_not_nan(mode, level):
    logps = torch.randn(3, 300, device="cuda", requires_grad=True)
    entropy = torch.rand(3, 300, device="cuda", requires_grad=True)
    loss, metrics = fastalign.policy_loss(
        logps,
        logps.detach() + 50.0,
        torch.randn(3, device="cuda"),
        torch.zeros(3, 300, device="cuda"),
        entropy=entropy,
        entropy_coef=0.1,
        loss_agg_mode=mode,
        importance_sampling_level=level,
        max_completion_length=300,
        backend="cuda",
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros_like(logps))
    assert torch.equal(entropy.grad, torch.zeros_like(entropy))
    assert all(torch.isfinite(m) for m in metrics.values())


@pytest.mark.gpu
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_cuda_mask_dtypes(mask_dtype):
    """Every mask dtype, read as raw bits, keeps the tokens `mask != 0` keeps (-0.0 drops one)."""
    inputs, options = gpu_inputs({"loss_type": "grpo", "with_ref": True, "kl_coef": 0.1})
    tensors = {k: v.float().cuda() for k, v in inputs.items()}
    expected, _ = fastalign.policy_loss(**tensors, **options, backend="torch")
    tensors["mask"] = torch.where(tensors["mask"] != 0, 1.0, -0.0).to(mask_dtype)
    got, _ = fastalign.policy_loss(**tensors, **options, backend="cuda")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_cuda_mixed_dtypes_and_strides(per_token_advantages):
    """Each input in its own dtype (float64 ones passed as float32), strided advantages, per-token importance
    weights transposed, per-row ones broadcast with a token stride of 0: as the torch backend in float64."""
    case = {
        "with_ref": True,
        "kl_coef": 0.1,
        "with_entropy": True,
        "entropy_coef": 0.01,
        "with_is_weights": True,
        "per_token_advantages": per_token_advantages,
    }
    inputs, options = gpu_inputs(case)
    rows, width = inputs["logps"].shape
    dtypes = {
        "logps": torch.bfloat16,
        "ref_logps": torch.float16,
        "entropy": torch.float16,
        "advantages": torch.float32,
        "is_weights": torch.float32,
        "mask": torch.bool,
    }
    rounded = {k: v.to(dtypes.get(k, v.dtype)).double() for k, v in inputs.items()}
    want = loss_and_grads(
        functools.partial(fastalign.policy_loss, backend="torch"), {k: v.cuda() for k, v in rounded.items()}, options
    )
    tensors = {k: v.to(device="cuda", dtype=dtypes.get(k, v.dtype)) for k, v in rounded.items()}
    # Every other element of a wider buffer; the transposed copy of a [T, B] buffer.
    wide = torch.zeros(*tensors["advantages"].shape[:-1], 2 * tensors["advantages"].shape[-1], device="cuda")
    wide[..., ::2] = tensors["advantages"]
    tensors["advantages"] = wide[..., ::2]
    tensors["is_weights"] = tensors["is_weights"].t().contiguous().t()
    assert not tensors["advantages"].is_contiguous() and not tensors["is_weights"].is_contiguous()
    got = loss_and_grads(functools.partial(fastalign.policy_loss, backend="cuda"), tensors, options)
    assert_close_to(got, want, rtol=1e-2)
    per_row = torch.rand(rows, device="cuda").expand(width, rows).t()
    assert per_row.stride() == (1, 0)
    got = loss_and_grads(
        functools.partial(fastalign.policy_loss, backend="cuda"), {**tensors, "is_weights": per_row}, options
    )
    want = loss_and_grads(
        functools.partial(fastalign.policy_loss, backend="torch"),
        {**rounded, "is_weights": per_row.double().cpu()},
        options,
    )
    assert_close_to(got, want, rtol=1e-2)


@pytest.mark.gpu
def test_cuda_runs_on_the_current_stream():
    inputs, options = gpu_inputs({"importance_sampling_level": "sequence", "loss_type": "grpo"}, rows=64, width=2000)
    expected, _, _ = evaluate(inputs, options, torch.float32, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got, grads, _ = evaluate(inputs, options, torch.float32, "cuda")
    stream.synchronize()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.isfinite(grads[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_agrees_with_triton(case):
    """Same per-token math, different reduction orders: the two kernel backends agree to float32 rounding."""
    inputs, options = gpu_inputs(case, rows=16, width=1000)
    cuda_loss, cuda_grads, cuda_metrics = evaluate(inputs, options, torch.float32, "cuda")
    triton_loss, triton_grads, triton_metrics = evaluate(inputs, options, torch.float32, "triton")
    torch.testing.assert_close(cuda_loss, triton_loss, rtol=1e-5, atol=1e-7)
    for grad, other in zip(cuda_grads, triton_grads, strict=True):
        torch.testing.assert_close(grad, other, rtol=1e-5, atol=1e-8)
    for name, value in triton_metrics.items():
        torch.testing.assert_close(cuda_metrics[name], value, rtol=1e-5, atol=1e-7, msg=name)

"""dpo_loss_from_token_logps on the CUDA C++ backend.

CPU: the kernels' shared per-pair math (``csrc/include/fastalign/dpo_math.h``), compiled into
``fastalign._host_math``, against torch's autograd of the torch path's formulas in float64, every loss type
(large margins, label smoothing, discopop's tau, length averaging, weighted lists); the kernels' reading of
masks of every dtype; the CUDA launcher's arguments, run against a CPU emulation of ``fastalign._C``'s DPO
entry points; the error for CPU tensors. GPU (marked): the kernels against the torch backend in float64.
"""

import ctypes

import numpy as np
import pytest
import torch
from helpers.dpo_batches import assert_outputs_close, reference_outputs, run_backend, token_batch, upstreams
from helpers.fake_cuda import FakeCudaDevices
from helpers.masks import ALL_MASK_DTYPES, unusual_mask

import fastalign
from fastalign.ops import _cuda_ext, _dpo_kernels, _dpo_math
from fastalign.ops._masks import kernel_mask
from fastalign.ops.preference import DPO_LOSS_TYPES, LENGTH_AVERAGED_TYPES, dpo_loss_from_token_logps, dpo_loss_terms

host_math = pytest.importorskip("fastalign._host_math", reason="built with the CUDA extension (nvcc at install)")

DTYPE_OF_CODE = {code: dtype for dtype, code in _cuda_ext.DTYPE_CODES.items()}
SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def as_float32(value: float) -> float:
    """The float32 value the kernels compute with, as a Python float (so the reference uses the same one)."""
    return float(np.float32(value))


def reference_terms(loss_type, c, r, beta, smoothing, tau):
    """Loss and its derivatives in c and r: autograd of the torch path's formula in float64."""
    c = torch.as_tensor(c, dtype=torch.float64).requires_grad_()
    r = torch.as_tensor(r, dtype=torch.float64).requires_grad_()
    loss = dpo_loss_terms(loss_type, c, r, as_float32(beta), as_float32(smoothing), as_float32(tau))
    d_chosen, d_rejected = torch.autograd.grad(loss.sum(), [c, r])
    return loss.detach().numpy(), d_chosen.numpy(), d_rejected.numpy()


def logratios(scale, count=257, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = (scale * torch.randn(count, generator=gen)).numpy()
    r = (scale * torch.randn(count, generator=gen)).numpy()
    return c, r


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_host_type_terms_match_autograd(loss_type, beta):
    smoothing = SMOOTHING["exo_pair"] if loss_type == "exo_pair" else 0.0
    c, r = logratios(3.0)
    got = host_math.dpo_type_terms(DPO_LOSS_TYPES.index(loss_type), c, r, beta, smoothing, 0.05)
    for value, expected in zip(got, reference_terms(loss_type, c, r, beta, smoothing, 0.05), strict=True):
        np.testing.assert_allclose(value, expected, **TOLERANCE)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair"])
@pytest.mark.parametrize("smoothing", [0.01, 0.2, 0.45])
def test_host_type_terms_with_label_smoothing(loss_type, smoothing):
    c, r = logratios(5.0, seed=1)
    got = host_math.dpo_type_terms(DPO_LOSS_TYPES.index(loss_type), c, r, 0.3, smoothing, 0.05)
    for value, expected in zip(got, reference_terms(loss_type, c, r, 0.3, smoothing, 0.05), strict=True):
        np.testing.assert_allclose(value, expected, **TOLERANCE)


@pytest.mark.parametrize("tau", [0.01, 0.05, 1.0, 10.0])
def test_host_discopop_terms_for_each_tau(tau):
    c, r = logratios(4.0, seed=2)
    got = host_math.dpo_type_terms(DPO_LOSS_TYPES.index("discopop"), c, r, 0.5, 0.0, tau)
    for value, expected in zip(got, reference_terms("discopop", c, r, 0.5, 0.0, tau), strict=True):
        np.testing.assert_allclose(value, expected, **TOLERANCE)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_host_type_terms_stay_finite_and_exact_for_large_margins(loss_type):
    """|z| up to 2000 and log-ratios up to 4000: no overflow to inf or NaN (exp(-z) of discopop is bounded)."""
    smoothing = SMOOTHING.get(loss_type, 0.0)
    magnitudes = np.array([30.0, 90.0, 170.0, 400.0, 4000.0], dtype=np.float32)
    c = np.concatenate([magnitudes, -magnitudes, magnitudes / 2, np.zeros(5, np.float32)])
    r = np.concatenate([-magnitudes, magnitudes, np.zeros(5, np.float32), -magnitudes / 2])
    got = host_math.dpo_type_terms(DPO_LOSS_TYPES.index(loss_type), c, r, 0.5, smoothing, 0.05)
    for value, expected in zip(got, reference_terms(loss_type, c, r, 0.5, smoothing, 0.05), strict=True):
        assert np.isfinite(value).all()
        np.testing.assert_allclose(value, expected, **TOLERANCE)


def test_host_ipo_is_the_squared_gap():
    """IPO's loss (c − r − 1/(2β))² and its derivatives ±2(c − r − 1/(2β)), exactly at representable inputs."""
    c = np.array([0.0, 1.0, -3.5, 10.0], dtype=np.float32)
    r = np.array([0.0, -1.0, 2.5, 10.0], dtype=np.float32)
    loss, d_chosen, d_rejected = host_math.dpo_type_terms(DPO_LOSS_TYPES.index("ipo"), c, r, 0.25, 0.0, 0.05)
    gap = c - r - 2.0
    np.testing.assert_array_equal(loss, gap * gap)
    np.testing.assert_array_equal(d_chosen, 2 * gap)
    np.testing.assert_array_equal(d_rejected, -2 * gap)


PAIR_CASES = [
    {"loss_type": [name], "label_smoothing": SMOOTHING["exo_pair"] if name == "exo_pair" else 0.0}
    for name in DPO_LOSS_TYPES
] + [
    {"loss_type": ["sigmoid"], "label_smoothing": 0.2, "average_log_prob": True},
    {"loss_type": ["robust"], "label_smoothing": 0.1, "average_log_prob": True},
    {"loss_type": ["sigmoid", "ipo", "bco_pair"], "loss_weights": [1.0, 0.5, 0.25]},
    {"loss_type": ["robust", "sigmoid_norm"], "label_smoothing": 0.1, "average_log_prob": False},
    {"loss_type": ["sigmoid", "sigmoid", "discopop"], "loss_weights": [0.3, 0.7, 2.0], "discopop_tau": 0.5},
    {"loss_type": list(DPO_LOSS_TYPES), "label_smoothing": 1e-3, "loss_weights": [0.1 * k for k in range(12)]},
]


@pytest.mark.parametrize("case", PAIR_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_host_pair_terms_match_the_torch_path(case):
    """The per-pair combination the forward kernel runs (type bits, summed weights, length averaging, the rows'
    gradients) against autograd of the torch path's loss in the row sums, rows without tokens included."""
    gen = torch.Generator().manual_seed(4)
    pairs = 64
    sums = (-40 * torch.rand(2 * pairs, generator=gen)).double().requires_grad_()
    lengths = torch.randint(0, 60, (2 * pairs,), generator=gen).double()
    lengths[:3] = 0
    ref = (-40 * torch.rand(2 * pairs, generator=gen)).double()
    types = case["loss_type"]
    weights = case.get("loss_weights", [1.0] * len(types))
    average = case.get("average_log_prob")
    averaged = [name in LENGTH_AVERAGED_TYPES if average is None else average for name in types]
    smoothing, tau = case.get("label_smoothing", 0.0), case.get("discopop_tau", 0.05)
    plan = _dpo_math.type_plan(types, weights, averaged, 0.2, smoothing, tau)

    expected = torch.zeros(pairs, dtype=torch.float64)
    for name, weight, by_length in zip(types, weights, averaged, strict=True):
        scale = 1 / lengths.clamp_min(1) if by_length else 1.0
        policy, reference = sums * scale, ref * scale
        terms = dpo_loss_terms(
            name,
            policy[:pairs] - reference[:pairs],
            policy[pairs:] - reference[pairs:],
            as_float32(0.2),
            as_float32(smoothing),
            as_float32(tau),
        )
        expected = expected + as_float32(weight) * terms
    (row_grad,) = torch.autograd.grad(expected.sum(), sums)

    arrays = [t.detach().float().numpy() for t in (sums, lengths, ref)]
    loss, d_chosen, d_rejected = pair_terms(host_math, *arrays, pairs, plan.cuda_arguments())
    np.testing.assert_allclose(loss, expected.detach().numpy(), **TOLERANCE)
    np.testing.assert_allclose(np.concatenate([d_chosen, d_rejected]), row_grad.numpy(), **TOLERANCE)


def pair_terms(host_math, sums, lengths, ref, pairs, plan_arguments):
    """``host_math.dpo_pair_terms`` of rows ``[2B]`` (chosen rows, then rejected ones) and a plan's arguments."""
    halves = [half for values in (sums, lengths, ref) for half in (values[:pairs], values[pairs:])]
    return host_math.dpo_pair_terms(*halves, *plan_arguments)


def test_type_plan_folds_repeats_and_averaging():
    plan = _dpo_math.type_plan(["ipo", "sigmoid", "ipo"], [1.0, 2.0, 0.5], [True, False, True], 0.1, 0.0, 0.05)
    assert plan.type_bits == 0b101 and plan.averaged_bits == 0b100
    assert plan.weights == (2.0, 0.0, 1.5) + (0.0,) * 9


# A table of dtypes, kept compact (one per line would hide it).
MASK_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
               torch.bfloat16, torch.float32, torch.float64]  # fmt: skip


@pytest.mark.parametrize("dtype", MASK_DTYPES, ids=str)
def test_host_mask_reading_matches_nonzero(dtype):
    """The kernels keep a token where its mask element is nonzero as a number (−0.0 drops it, NaN keeps it)."""
    if dtype == torch.bool:
        mask = torch.tensor([True, False, True, True, False])
    elif dtype.is_floating_point:
        tiny = torch.finfo(dtype).tiny / 4  # subnormal, still nonzero
        mask = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, float("nan"), float("-inf"), tiny, -tiny], dtype=dtype)
    else:
        info = torch.iinfo(dtype)
        mask = torch.tensor([0, 1, info.max, info.min, 2, 0, 128 if info.max > 200 else 64], dtype=dtype)
    raw = mask.view(torch.uint8).numpy()
    keeps = host_math.dpo_mask_keeps(raw, *_dpo_kernels.mask_layout(dtype))
    np.testing.assert_array_equal(keeps, (mask != 0).numpy())


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALL_MASK_DTYPES, ids=str)
def test_cuda_reads_every_mask_dtype_like_torch(dtype):
    """What the CUDA launchers hand the kernels (``kernel_mask``), read as the kernels read it, keeps exactly the
    tokens where ``mask != 0``: float8 e8m0 (no zero) and the fnuz formats (0x80 is NaN) included."""
    keep = torch.rand(4, 9, generator=torch.Generator().manual_seed(0)) > 0.4
    mask = unusual_mask(keep, dtype)
    given = kernel_mask(mask, "cuda")
    raw = given.contiguous().view(torch.uint8).numpy().reshape(-1)
    keeps = host_math.dpo_mask_keeps(raw, *_dpo_kernels.mask_layout(given.dtype))
    np.testing.assert_array_equal(keeps, (mask != 0).reshape(-1).numpy())


class FakeDPOExtension:
    """``fastalign._C``'s DPO entry points emulated on CPU memory: the same arguments (addresses, sizes, dtype
    codes, strides), the kernels' per-pair math and mask reading from ``fastalign._host_math``, the reductions in
    torch. It checks how the CUDA launcher marshals its arguments, on a machine without a GPU, on the devices
    of a :class:`FakeCudaDevices`."""

    def __init__(self, devices: FakeCudaDevices):
        self.devices = devices
        self.set_device = devices.set_device

    @staticmethod
    def _at(address: int, dtype: torch.dtype, count: int) -> torch.Tensor:
        if count == 0:
            return torch.empty(0, dtype=dtype)
        buffer = (ctypes.c_uint8 * (count * dtype.itemsize)).from_address(address)
        return torch.frombuffer(buffer, dtype=dtype, count=count)

    def _keep(self, mask: int, mask_bytes: int, mask_is_float: bool, rows: int, width: int) -> torch.Tensor:
        raw = self._at(mask, torch.uint8, rows * width * mask_bytes).numpy()
        return torch.from_numpy(host_math.dpo_mask_keeps(raw, mask_bytes, mask_is_float)).view(rows, width)

    def _strided(self, address: int, stride: int, count: int) -> torch.Tensor:
        return self._at(address, torch.float32, (count - 1) * stride + 1)[:: max(stride, 1)].expand(count)

    def dpo_loss_forward(
        self,
        token_logps,
        dtype,
        mask,
        mask_bytes,
        mask_is_float,
        ref_logps,
        pairs,
        width,
        types,
        averaged,
        type_weights,
        beta,
        label_smoothing,
        discopop_tau,
        losses,
        sums,
        lengths,
        row_grad,
        stream,
    ):
        self.devices.launched(stream)
        rows = 2 * pairs
        tokens = self._at(token_logps, DTYPE_OF_CODE[dtype], rows * width).view(rows, width).float()
        keep = self._keep(mask, mask_bytes, mask_is_float, rows, width)
        row_sums = torch.where(keep, tokens, 0.0).sum(1).numpy()
        counts = keep.sum(1).float().numpy()
        ref = self._at(ref_logps, torch.float32, rows).numpy()
        plan = (types, averaged, type_weights, beta, label_smoothing, discopop_tau)
        loss, d_chosen, d_rejected = pair_terms(host_math, row_sums, counts, ref, pairs, plan)
        self._at(losses, torch.float32, pairs).copy_(torch.from_numpy(loss))
        self._at(sums, torch.float32, rows).copy_(torch.from_numpy(row_sums))
        self._at(lengths, torch.float32, rows).copy_(torch.from_numpy(counts))
        self._at(row_grad, torch.float32, rows).copy_(torch.from_numpy(np.concatenate([d_chosen, d_rejected])))

    def dpo_loss_backward(
        self,
        mask,
        mask_bytes,
        mask_is_float,
        row_grad,
        grad_losses,
        grad_losses_stride,
        grad_sums,
        grad_sums_stride,
        pairs,
        width,
        grad,
        dtype,
        stream,
    ):
        self.devices.launched(stream)
        rows = 2 * pairs
        upstream = torch.zeros(rows)
        if grad_losses:
            upstream += self._at(row_grad, torch.float32, rows) * self._strided(
                grad_losses, grad_losses_stride, pairs
            ).repeat(2)
        if grad_sums:
            upstream += self._strided(grad_sums, grad_sums_stride, rows)
        keep = self._keep(mask, mask_bytes, mask_is_float, rows, width)
        out = self._at(grad, DTYPE_OF_CODE[dtype], rows * width).view(rows, width)
        out.copy_(torch.where(keep, upstream[:, None], 0.0))


def emulated_cuda(monkeypatch):
    monkeypatch.setattr(_cuda_ext, "extension", FakeCudaDevices(monkeypatch).extension(FakeDPOExtension))


LAUNCH_CASES = [
    {"loss_type": "sigmoid", "label_smoothing": 0.1},
    {"loss_type": ["ipo", "bco_pair", "discopop"], "loss_weights": [1.0, 0.5, 2.0]},
    {"loss_type": "sigmoid_norm", "average_log_prob": False},
]


@pytest.mark.parametrize("case", LAUNCH_CASES, ids=lambda c: str(c["loss_type"]))
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["both", "losses", "sums"])
def test_cuda_launcher_arguments_on_an_emulated_extension(monkeypatch, case, mask_dtype, which):
    """The CUDA launcher's calls (addresses, sizes, mask layout, type bits, strides of upstream gradients,
    absent ones) give the torch backend's results when ``fastalign._C`` is emulated on CPU memory."""
    emulated_cuda(monkeypatch)
    token_logps, mask, ref = token_batch(dtype=torch.bfloat16)
    expected = reference_outputs(token_logps, mask, ref, upstreams(4, which), **case)
    types = [case["loss_type"]] if isinstance(case["loss_type"], str) else case["loss_type"]
    weights = case.get("loss_weights", [1.0] * len(types))
    average = case.get("average_log_prob")
    averaged = [name in LENGTH_AVERAGED_TYPES if average is None else average for name in types]
    leaf = token_logps.to(torch.bfloat16).requires_grad_()
    signed_mask = torch.where(mask, 1.0, -0.0).to(mask_dtype) if mask_dtype.is_floating_point else mask.to(mask_dtype)
    plan = _dpo_math.type_plan(types, weights, averaged, 0.1, case.get("label_smoothing", 0.0), 0.05)
    losses, sums, lengths = _dpo_kernels.dpo_from_token_logps_kernels("cuda", leaf, signed_mask, ref, plan)
    u_losses, u_sums = upstreams(4, which)
    outputs = [o for o, u in ((losses, u_losses), (sums, u_sums)) if u is not None]
    grads = [u for u in (u_losses, u_sums) if u is not None]
    (grad,) = torch.autograd.grad(outputs, leaf, grads)
    assert_outputs_close((losses, sums, lengths, grad), expected, torch.bfloat16)


def test_cuda_launcher_takes_expanded_upstream_gradients(monkeypatch):
    """``losses.sum().backward()`` hands the backward an expanded (stride 0) gradient: no copy, same result."""
    emulated_cuda(monkeypatch)
    token_logps, mask, ref = token_batch(pairs=3, width=9)
    leaf = token_logps.float().requires_grad_()
    plan = _dpo_math.type_plan(["sigmoid"], [1.0], [False], 0.1, 0.0, 0.05)
    losses, _, _ = _dpo_kernels.dpo_from_token_logps_kernels("cuda", leaf, mask, ref, plan)
    losses.sum().backward()
    expected = reference_outputs(token_logps, mask, ref, (torch.ones(3), None), loss_type="sigmoid")
    torch.testing.assert_close(leaf.grad.double(), expected[3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["losses", "sums"])
def test_triton_backend_with_one_output_unused(which):
    """The shared autograd Function passes an unused output's gradient as None to the Triton launcher too."""
    token_logps, mask, ref = token_batch(pairs=3, width=21)
    upstream = upstreams(3, which)
    expected = reference_outputs(token_logps, mask, ref, upstream, loss_type="apo_down")
    got = run_backend(token_logps, mask, ref, upstream, torch.float32, "triton", loss_type="apo_down")
    assert_outputs_close(got, expected, torch.float32)


def test_launch_errors_raise_with_the_kernel_name():
    """Bad codes reach Python as errors naming the function (checked before any launch, so no GPU needed)."""
    from fastalign import _C

    weights = [1.0] + [0.0] * 11
    forward = {
        "token_logps": 1,
        "dtype": 0,
        "mask": 1,
        "mask_bytes": 1,
        "mask_is_float": False,
        "ref_logps": 1,
        "pairs": 1,
        "width": 4,
        "types": 1,
        "averaged": 0,
        "type_weights": weights,
        "beta": 0.1,
        "label_smoothing": 0.0,
        "discopop_tau": 0.05,
        "losses": 1,
        "sums": 1,
        "lengths": 1,
        "row_grad": 1,
        "stream": 0,
    }
    errors = [
        ({"dtype": 7}, "unsupported dtype code"),
        ({"mask_bytes": 3}, "unsupported mask element width"),
        ({"types": 0}, "types must set some of the low 12 bits"),
        ({"types": 1 << 12}, "types must set some of the low 12 bits"),
    ]
    for change, message in errors:
        with pytest.raises(RuntimeError, match=rf"fastalign\._C\.dpo_loss_forward failed: {message}"):
            _C.dpo_loss_forward(**{**forward, **change})
    with pytest.raises(ValueError, match=r"type_weights must hold one weight per DPO loss type \(12\), got 11"):
        _C.dpo_loss_forward(**{**forward, "type_weights": weights[:11]})
    with pytest.raises(RuntimeError, match=r"fastalign\._C\.dpo_loss_backward failed: unsupported dtype code"):
        _C.dpo_loss_backward(1, 1, False, 1, 0, 0, 0, 0, 1, 4, 1, 9, 0)


def test_cuda_backend_on_cpu_tensors_raises():
    token_logps, mask, ref = token_batch()
    with pytest.raises(fastalign.BackendUnavailableError, match="need CUDA tensors, the inputs are on cpu"):
        dpo_loss_from_token_logps(token_logps.float(), mask, ref.float(), backend="cuda")


def test_inputs_on_other_devices_are_rejected():
    token_logps, mask, ref = token_batch()
    with pytest.raises(ValueError, match="mask is on meta but token_logps is on cpu"):
        dpo_loss_from_token_logps(token_logps, mask.to("meta"), ref)
    with pytest.raises(ValueError, match="ref_logps is on meta but token_logps is on cpu"):
        dpo_loss_from_token_logps(token_logps, mask, ref.to("meta"))


GPU_CASES = [{"loss_type": name, "label_smoothing": SMOOTHING.get(name, 0.0)} for name in DPO_LOSS_TYPES] + [
    {"loss_type": ["sigmoid", "ipo", "bco_pair", "discopop"], "loss_weights": [1.0, 0.5, 0.25, 2.0]},
    {"loss_type": ["robust", "sigmoid_norm", "apo_zero"], "label_smoothing": 0.1, "average_log_prob": True},
    {"loss_type": "hinge", "average_log_prob": True, "beta": 0.5},
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_cuda_dpo_matches_torch(dtype, case):
    """Every type and weighted lists; T = 1003 (no multiple of any vector width) and rows without tokens."""
    token_logps, mask, ref = token_batch(pairs=6, width=1003, dtype=dtype, device="cuda")
    upstream = upstreams(6, "both", device="cuda")
    expected = reference_outputs(token_logps, mask, ref, upstream, **case)
    got = run_backend(token_logps, mask, ref, upstream, dtype, "cuda", **case)
    assert_outputs_close(got, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("pairs", "width"), [(1, 1), (1, 3), (3, 7), (1, 4096), (2, 20001), (300, 64)])
@pytest.mark.parametrize("which", ["both", "losses", "sums"])
def test_cuda_dpo_shapes(dtype, pairs, width, which):
    """One pair, rows narrower than a vector (a vector spans rows in the backward), every forward block size."""
    token_logps, mask, ref = token_batch(pairs=pairs, width=width, seed=pairs + width, dtype=dtype, device="cuda")
    upstream = upstreams(pairs, which, device="cuda")
    case = {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.1]}
    expected = reference_outputs(token_logps, mask, ref, upstream, **case)
    got = run_backend(token_logps, mask, ref, upstream, dtype, "cuda", **case)
    assert_outputs_close(got, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_cuda_dpo_mask_dtypes(mask_dtype):
    """Masks of every width, −0.0 in float masks, and a mask and token rows off their 16-byte boundaries."""
    token_logps, mask, ref = token_batch(pairs=5, width=301, device="cuda")
    expected = reference_outputs(token_logps, mask, ref, upstreams(5, "both"), loss_type="sigmoid")
    float_mask = torch.where(mask, 2.0, -0.0)
    typed = float_mask.to(mask_dtype) if mask_dtype.is_floating_point else mask.to(mask_dtype)
    shifted_mask = torch.cat([typed.new_zeros(1), typed.flatten()])[1:].view_as(typed)
    shifted_tokens = torch.cat([token_logps.new_zeros(1), token_logps.flatten()]).float()[1:].view_as(token_logps)
    for tokens, keep in ((token_logps, typed), (shifted_tokens, shifted_mask)):
        got = run_backend(
            tokens, keep, ref, upstreams(5, "both", device="cuda"), torch.float32, "cuda", loss_type="sigmoid"
        )
        assert_outputs_close(got, expected, torch.float32)


@pytest.mark.gpu
def test_cuda_dpo_empty_inputs():
    """No pairs: empty outputs and gradient. No tokens (T = 0): the losses from the references alone."""
    empty = torch.empty(0, 16, device="cuda", requires_grad=True)
    losses, sums, lengths = dpo_loss_from_token_logps(
        empty, torch.ones(0, 16, dtype=torch.bool, device="cuda"), torch.empty(0, device="cuda"), backend="cuda"
    )
    (losses.sum() + sums.sum()).backward()
    assert losses.shape == (0,) and sums.shape == lengths.shape == (0,) and empty.grad.shape == (0, 16)
    token_logps, mask, ref = token_batch(pairs=3, width=0, device="cuda")
    upstream = upstreams(3, "both", device="cuda")
    expected = reference_outputs(token_logps, mask, ref, upstream, loss_type="nca_pair")
    got = run_backend(token_logps, mask, ref, upstream, torch.float32, "cuda", loss_type="nca_pair")
    assert_outputs_close(got, expected, torch.float32)


@pytest.mark.gpu
def test_cuda_dpo_matches_triton():
    """Both kernel backends through the shared autograd Function agree to float32 rounding."""
    token_logps, mask, ref = token_batch(pairs=16, width=2048, dtype=torch.bfloat16, device="cuda")
    upstream = upstreams(16, "both", device="cuda")
    case = {"loss_type": list(DPO_LOSS_TYPES), "label_smoothing": 1e-3}
    cuda = run_backend(token_logps, mask, ref, upstream, torch.bfloat16, "cuda", **case)
    triton = run_backend(token_logps, mask, ref, upstream, torch.bfloat16, "triton", **case)
    assert_outputs_close(cuda, tuple(t.detach().double().cpu() for t in triton), torch.bfloat16)

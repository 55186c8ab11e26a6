"""fastalign.linear_distill_loss: the float64 formula, the torch backend's tiling and memory, the Triton kernels
under the interpreter, the argument checks, and parity with TRL's chunked divergence (and liger-kernel's fused
linear JSD where it is installed) on the same inputs."""

from __future__ import annotations

import math
import time
import weakref

import pytest
import torch
from helpers.distill_reference import reference_distill
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from fastalign.ops.dispatch import BackendUnavailableError
from fastalign.ops.distill import linear_distill_loss

BETAS = [0.0, 0.5, 1.0, 0.3]
TEMPERATURES = [1.0, 2.0]


def make_inputs(n, v, ds, dt, *, dtype=torch.float32, ignore_every=5, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(dtype)

    sh = randn(n, ds).requires_grad_()
    sw = randn(v, ds, std=scale).requires_grad_()
    th, tw = randn(n, dt), randn(v, dt, std=scale)
    targets = torch.randint(0, v, (n,), generator=generator)
    if ignore_every:
        targets[::ignore_every] = -100
    return sh, sw, th, tw, targets


def relative_error(actual, expected, floor: float = 1e-30) -> float:
    """``max |actual − expected| / max(max |expected|, floor)``: the scale of the whole tensor, so tiny entries
    count by their absolute error (and a tensor of exact zeros, like any loss at V = 1, by ``floor``)."""
    scale = expected.double().abs().max().clamp_min(floor)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def loss_and_grads(fn, sh, sw, *, weights=None):
    """The loss (``Σ weights·loss`` for per-token losses) and its gradients w.r.t. the student's inputs."""
    sh, sw = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
    loss = fn(sh, sw)
    total = loss if weights is None else (loss * weights).sum()
    return (loss.detach(), *torch.autograd.grad(total, (sh, sw)))


def check_against_reference(sh, sw, th, tw, targets, *, tol, backend="torch", reduction="none", floor=1e-30, **options):
    weights = None
    if reduction == "none":
        # A different upstream gradient per token checks that each row's gradient follows its own coefficient.
        weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        weights = weights.to(targets.device)

    def ours(a, b):
        return linear_distill_loss(a, b, th, tw, targets, reduction=reduction, backend=backend, **options)

    def ref(a, b):
        return reference_distill(a, b, th, tw, targets, reduction=reduction, **options)

    got = loss_and_grads(ours, sh, sw, weights=None if weights is None else weights.to(sh.dtype))
    expected = loss_and_grads(ref, sh.double(), sw.double(), weights=weights)
    for name, a, b in zip(("loss", "d_student_hidden", "d_student_weight"), got, expected, strict=True):
        assert a.shape == b.shape, name
        error = relative_error(a, b, floor)
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol:g}"
    return got


# ------------------------------------------------------------------------------------- torch backend vs formula


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_torch_backend_matches_float64_reference(scratch_budget, beta, temperature):
    # A budget of a few tiles: several row blocks and vocabulary tiles, none of them a divisor of N or V.
    scratch_budget(6000)
    sh, sw, th, tw, targets = make_inputs(37, 301, 19, 23, scale=1.0)
    check_against_reference(sh, sw, th, tw, targets, beta=beta, temperature=temperature, tol=2e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_reductions(scratch_budget, reduction, beta):
    scratch_budget(6000)
    sh, sw, th, tw, targets = make_inputs(2 * 11, 157, 16, 8)
    targets = targets.reshape(2, 11)
    sh3, th3 = sh.detach().reshape(2, 11, 16), th.reshape(2, 11, 8)
    got = check_against_reference(sh3, sw, th3, tw, targets, beta=beta, temperature=1.5, reduction=reduction, tol=2e-5)
    assert got[0].shape == (targets.shape if reduction == "none" else ())
    assert got[0].dtype == torch.float32


def test_float64_inputs_compute_in_float64(scratch_budget):
    scratch_budget(6000)
    sh, sw, th, tw, targets = make_inputs(23, 129, 12, 20, dtype=torch.float64, scale=1.0)
    for beta in (0.0, 0.4, 1.0):
        got = check_against_reference(sh, sw, th, tw, targets, beta=beta, temperature=0.7, tol=1e-12)
        assert got[0].dtype == torch.float64


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    v=st.integers(1, 90),
    ds=st.integers(1, 12),
    dt=st.integers(1, 12),
    beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.01, 0.99)),
    temperature=st.floats(0.25, 4.0),
    budget=st.integers(200, 20000),
    seed=st.integers(0, 2**16),
)
def test_torch_backend_any_shape_and_options(n, v, ds, dt, beta, temperature, budget, seed):
    from fastalign import set_scratch_budget

    set_scratch_budget(budget)
    try:
        sh, sw, th, tw, targets = make_inputs(n, v, ds, dt, ignore_every=3, seed=seed, scale=1.0)
        # float32 logits of size |z| / T carry rounding errors of ~eps·|z|/T into the log-probs, which the sums and
        # the gradient's products carry on: the bound is 256 float32 ulps of the largest scaled logit (the worst
        # of 400 random draws measured 73), and at least 5e-5.
        scaled = max((sh.detach() @ sw.detach().T).abs().max().item(), (th @ tw.T).abs().max().item()) / temperature
        tol = max(5e-5, 256 * torch.finfo(torch.float32).eps * (1.0 + scaled))
        check_against_reference(sh, sw, th, tw, targets, beta=beta, temperature=temperature, tol=tol, floor=1e-3)
    finally:
        set_scratch_budget(None)


# ------------------------------------------------------------------------------------- masks and edge cases


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ignored_tokens_are_zero_and_pass_no_gradient(backend):
    sh, sw, th, tw, targets = make_inputs(9, 70, 8, 8, ignore_every=0)
    targets[[1, 4, 5]] = 7  # a custom ignore_index
    loss = linear_distill_loss(sh, sw, th, tw, targets, ignore_index=7, reduction="none", backend=backend)
    assert (loss[[1, 4, 5]] == 0).all() and (loss[[0, 2, 3, 6, 7, 8]] > 0).all()
    loss.sum().backward()
    assert (sh.grad[[1, 4, 5]] == 0).all()
    assert (sh.grad[[0, 2, 3, 6, 7, 8]] != 0).any(dim=1).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty_batches_give_zero_never_nan(backend, reduction):
    for n in (0, 4):
        sh, sw, th, tw, targets = make_inputs(n, 40, 8, 6, ignore_every=0)
        targets[:] = -100
        loss = linear_distill_loss(sh, sw, th, tw, targets, beta=0.5, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and (loss == 0).all()
        assert (sh.grad == 0).all() and (sw.grad == 0).all()


def test_huge_logits_stay_finite():
    sh, sw, th, tw, targets = make_inputs(6, 50, 8, 8)
    sh, th = (sh.detach() * 1e3).requires_grad_(), th * 1e3  # logits in the thousands
    for beta in (0.0, 0.5, 1.0):
        loss = linear_distill_loss(sh, sw, th, tw, targets, beta=beta)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sh.grad).all() and torch.isfinite(sw.grad).all()
        sh.grad = sw.grad = None


def test_identical_student_and_teacher_give_zero():
    sh, sw, _, _, targets = make_inputs(10, 64, 8, 8)
    for beta in BETAS:
        loss = linear_distill_loss(sh, sw, sh.detach(), sw.detach(), targets, beta=beta, reduction="none")
        assert loss.abs().max() < 1e-6


def test_teacher_gets_no_gradient():
    sh, sw, th, tw, targets = make_inputs(12, 50, 8, 6)
    th, tw = th.requires_grad_(), tw.requires_grad_()
    loss = linear_distill_loss(sh, sw, th, tw, targets, beta=0.3)
    loss.backward()
    assert th.grad is None and tw.grad is None
    assert sh.grad is not None and sw.grad is not None


def test_shared_head_is_a_stop_gradient_target():
    # Self-distillation through one lm_head: the teacher's use of it is detached, so the gradient is the one of a
    # frozen copy.
    sh, sw, th, _, targets = make_inputs(12, 50, 8, 8)
    loss = linear_distill_loss(sh, sw, th, sw, targets, beta=0.5)
    (shared,) = torch.autograd.grad(loss, sw)
    copy = linear_distill_loss(sh, sw, th, sw.detach().clone(), targets, beta=0.5)
    (frozen,) = torch.autograd.grad(copy, sw)
    torch.testing.assert_close(shared, frozen, rtol=0, atol=0)


def test_beta_end_points_follow_trl_convention():
    # At small beta the generalized JSD is about beta times the forward KL (the mixture leans to the student), so
    # beta = 0 is the forward KL itself, not the limit of the mixture: TRL's definition.
    sh, sw, th, tw, targets = make_inputs(16, 80, 8, 8)
    forward_kl = linear_distill_loss(sh, sw, th, tw, targets, beta=0.0)
    reverse_kl = linear_distill_loss(sh, sw, th, tw, targets, beta=1.0)
    small = linear_distill_loss(sh, sw, th, tw, targets, beta=1e-4)
    large = linear_distill_loss(sh, sw, th, tw, targets, beta=1 - 1e-4)
    assert abs(small.item() / 1e-4 - forward_kl.item()) < 1e-2 * forward_kl.item()
    assert abs(large.item() / 1e-4 - reverse_kl.item()) < 1e-2 * reverse_kl.item()


# ------------------------------------------------------------------------------------- argument checks


def _bad(**changes):
    sh, sw, th, tw, targets = make_inputs(6, 30, 8, 4)
    args = {"student_hidden": sh, "student_weight": sw, "teacher_hidden": th, "teacher_weight": tw, "targets": targets}
    args.update(changes)
    return args


BAD_INPUTS = [
    (_bad(student_hidden=[[1.0]]), {}, "student_hidden must be a torch.Tensor"),
    (_bad(teacher_weight=torch.zeros(30, 4, dtype=torch.int32)), {}, "teacher_weight must be float16"),
    (_bad(student_weight=torch.randn(30, 8, 1)), {}, r"student_weight must be 2-D \[V, D\]"),
    (_bad(student_weight=torch.randn(30, 7)), {}, "student_hidden's last dimension"),
    (_bad(teacher_hidden=torch.randn(6, 5)), {}, "teacher_hidden's last dimension"),
    (_bad(teacher_weight=torch.randn(31, 4)), {}, "teacher_weight must have student_weight's vocabulary size V = 30"),
    (_bad(teacher_hidden=torch.randn(5, 4)), {}, "teacher_hidden must have student_hidden's leading shape"),
    (
        _bad(teacher_hidden=torch.randn(6, 4).double(), teacher_weight=torch.randn(30, 4).double()),
        {},
        "student's dtype",
    ),
    (
        _bad(student_weight=torch.randn(30, 8).double()),
        {},
        "student_hidden and student_weight must have the same dtype",
    ),
    (_bad(targets=torch.zeros(5, dtype=torch.long)), {}, "targets must have shape"),
    (_bad(targets=torch.zeros(6)), {}, "targets must have an integer dtype"),
    (_bad(), {"beta": 1.5}, r"beta must be a finite number in \[0, 1\]"),
    (_bad(), {"beta": -0.1}, r"beta must be a finite number in \[0, 1\]"),
    (_bad(), {"beta": float("nan")}, "beta must be"),
    (_bad(), {"beta": True}, "beta must be"),
    (_bad(), {"temperature": 0.0}, "temperature must be a finite number > 0"),
    (_bad(), {"temperature": -1.0}, "temperature must be"),
    (_bad(), {"ignore_index": 1.5}, "ignore_index must be an int"),
    (_bad(), {"reduction": "batchmean"}, "reduction must be one of"),
    (_bad(), {"backend": "tpu"}, "backend must be one of"),
]


@pytest.mark.parametrize(("args", "options", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_name_the_argument(args, options, message):
    with pytest.raises(ValueError, match=message):
        linear_distill_loss(**args, **options)


def test_cuda_backend_is_refused_with_the_reason():
    with pytest.raises(BackendUnavailableError, match="no kernel for the distillation loss"):
        linear_distill_loss(**_bad(), backend="cuda")


# ------------------------------------------------------------------------------------- Triton (interpreter)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_triton_kernels_match_float64_reference(scratch_budget, beta, temperature):
    # Sizes that are multiples of no block: N 13 (blocks of 16), V 300 (tiles of 32, two vocabulary splits of
    # 150, backward slabs of 128 under this budget), widths 19 and 23 (inner tiles of 16).
    scratch_budget(2000)
    sh, sw, th, tw, targets = make_inputs(13, 300, 19, 23)
    check_against_reference(sh, sw, th, tw, targets, beta=beta, temperature=temperature, backend="triton", tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_within_eager_error(dtype):
    """The brief's rule: no further from float64 than eager PyTorch on the same half-precision inputs, plus slack."""
    sh, sw, th, tw, targets = make_inputs(13, 97, 24, 20, dtype=dtype)
    expected = reference_distill(sh.detach(), sw.detach(), th, tw, targets, beta=0.5, temperature=1.0)

    def eager_half():
        log_ps = torch.log_softmax(sh.detach() @ sw.detach().T, -1)
        log_pt = torch.log_softmax(th @ tw.T, -1)
        log_m = torch.logaddexp(log_ps + math.log(0.5), log_pt + math.log(0.5))
        per_token = 0.5 * (log_pt.exp() * (log_pt - log_m)).sum(-1) + 0.5 * (log_ps.exp() * (log_ps - log_m)).sum(-1)
        valid = targets != -100
        return torch.where(valid, per_token, 0).sum() / valid.sum()

    eager_error = abs(eager_half().double() - expected).item()
    for backend in ("torch", "triton"):
        got = linear_distill_loss(sh, sw, th, tw, targets, beta=0.5, backend=backend)
        assert got.dtype == torch.float32
        assert abs(got.double() - expected).item() <= eager_error + 1e-3 * expected.item(), backend


# ------------------------------------------------------------------------------------- memory


class PeakLiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors that aten ops produce (CPU), as :class:`AllocationWatcher` of
    tests/helpers/memory.py watches them, plus when they die: a storage counts once, from its first tensor until
    its last one is freed. Storages of ``existing`` tensors (the inputs) never count, views of them included."""

    def __init__(self, existing=()):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[tuple[int, int], int] = {}  # storage -> tensors alive on it
        self.current = self.peak = 0

    def _release(self, key):
        self.live[key] -= 1
        if self.live[key] == 0:
            del self.live[key]
            self.current -= key[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key[0] in self.skip or key[1] == 0:
                continue
            if key not in self.live:
                self.live[key] = 0
                self.current += key[1]
                self.peak = max(self.peak, self.current)
            self.live[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def test_peak_live_bytes_watcher_counts_what_lives():
    x = torch.randn(256, 1024)  # 1 MiB
    with PeakLiveBytes([x]) as watcher:
        view = x.T  # a view of an input: nothing new
        a = x * 2
        b = a.exp()
        del a
        c = b + 1
        del b, c, view
    assert watcher.peak == 2 * x.numel() * 4 and watcher.current == 0


def test_torch_backend_extra_peak_is_under_a_tenth_of_eager():
    """Extra peak memory (everything allocated during forward + backward, gradients included) at N=2048,
    V=32000, D=256, beta=0.5: the tiled backend against eager PyTorch with both logits materialised."""
    n, v, d = 2048, 32000, 256
    sh, sw, th, tw, targets = make_inputs(n, v, d, d, ignore_every=7, scale=0.05)

    def eager():
        log_ps = torch.log_softmax(sh @ sw.T, dim=-1)
        with torch.no_grad():
            log_pt = torch.log_softmax(th @ tw.T, dim=-1)
        log_m = torch.logaddexp(log_ps + math.log(0.5), log_pt + math.log(0.5))
        per_token = 0.5 * (log_pt.exp() * (log_pt - log_m)).sum(-1) + 0.5 * (log_ps.exp() * (log_ps - log_m)).sum(-1)
        valid = targets != -100
        return torch.where(valid, per_token, 0.0).sum() / valid.sum()

    def fused():
        return linear_distill_loss(sh, sw, th, tw, targets, beta=0.5, backend="torch")

    peaks, losses = {}, {}
    for name, run in (("eager", eager), ("fused", fused)):
        sh.grad = sw.grad = None
        start = time.perf_counter()
        with PeakLiveBytes([sh, sw, th, tw, targets]) as watcher:
            loss = run()
            loss.backward()
        peaks[name], losses[name] = watcher.peak, loss.item()
        print(f"{name}: extra peak {watcher.peak / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s")
    assert peaks["eager"] >= 2 * n * v * 4, "eager holds both logits: the watcher missed allocations"
    ratio = peaks["fused"] / peaks["eager"]
    print(f"fused / eager extra peak: {ratio:.3f}")
    assert ratio <= 0.10
    assert math.isclose(losses["fused"], losses["eager"], rel_tol=1e-5)


# ------------------------------------------------------------------------------------- peers on the same inputs


def _parity_inputs():
    return make_inputs(301, 5003, 64, 96, ignore_every=7, scale=0.2)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_parity_with_trl_chunked_divergence(beta, temperature):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    sh, sw, th, tw, targets = _parity_inputs()
    valid = targets != -100

    def trl_loss(a, b):
        divergence, _entropy = ChunkedDivergenceFunction.apply(a, b, None, th, tw, None, beta, temperature)
        # The reduction of TRL's DistillationTrainer: the mean over the counted tokens.
        return torch.where(valid, divergence, 0.0).sum() / valid.sum().clamp(min=1)

    def ours(a, b):
        return linear_distill_loss(a, b, th, tw, targets, beta=beta, temperature=temperature)

    got, expected = loss_and_grads(ours, sh, sw), loss_and_grads(trl_loss, sh, sw)
    for name, a, b in zip(("loss", "d_student_hidden", "d_student_weight"), got, expected, strict=True):
        assert relative_error(a, b) <= 1e-5, f"{name}: {relative_error(a, b):.2e}"


@pytest.mark.parametrize("beta", BETAS)
def test_parity_with_liger_fused_linear_jsd(beta):
    liger = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel (pip install fastalign[bench])")
    sh, sw, th, tw, targets = _parity_inputs()
    # liger's beta (0.8.5) has TRL's meaning; only its soft loss, in eager torch (compiled=False on CPU).
    module = liger.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=2.0, compiled=False, chunk_size=64
    )

    def ours(a, b):
        return linear_distill_loss(a, b, th, tw, targets, beta=beta, temperature=2.0)

    got = loss_and_grads(ours, sh, sw)
    expected = loss_and_grads(lambda a, b: module(a, b, th, tw, targets), sh, sw)
    for name, a, b in zip(("loss", "d_student_hidden", "d_student_weight"), got, expected, strict=True):
        assert relative_error(a, b) <= 1e-5, f"{name}: {relative_error(a, b):.2e}"


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_matches_reference(beta, dtype):
    sh, sw, th, tw, targets = make_inputs(1000, 32003, 256, 320, dtype=dtype, scale=0.1)
    sh, sw = sh.detach().cuda().requires_grad_(), sw.detach().cuda().requires_grad_()
    th, tw, targets = th.cuda(), tw.cuda(), targets.cuda()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3  # tf32 dots for float32
    check_against_reference(sh, sw, th, tw, targets, beta=beta, temperature=1.0, backend="triton", tol=tol)

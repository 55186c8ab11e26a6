"""The GPU check's core tests: what ``bench/gpu_check.sh`` runs right after the build, the kernels' correctness
in the first minutes a GPU gives. Most important first:

1. every kernel family on Triton and on the CUDA kernels (``logprobs_from_logits``, ``linear_logprobs`` /
   ``linear_cross_entropy``, ``policy_loss``, the DPO loss) against the float64 reference at two shapes per dtype
   (one aligned and realistic, one that is no multiple of any tile, each with its own options);
2. what goes wrong only when the autotuner really tunes, on a GPU: an in-place backward on a fresh autotune key
   (its benchmark runs must not read their own gradient as logits) and the call that tunes the kernels that
   accumulate into their outputs (``d_hidden`` across vocabulary slabs, ``d_bias`` by atomics);
3. the fused modules (``fastalign.nn``) on the Triton kernels, both gradient paths.

Every case names its backend and device (no ``auto``), and on CUDA the fixture below checks that Triton compiles
for the GPU rather than interpreting. ``FASTALIGN_CHECK_DEVICE=cpu`` (the check's rehearsal) runs the same cases
on the CPU at toy shapes, Triton in its interpreter; the CUDA kernels' cases are skipped there (their bodies are
the Triton cases'). Marked ``gpu`` and ``gpu_core``: a plain ``pytest`` skips them.
"""

import functools
import itertools
import os

import pytest
import torch
from helpers.dpo_batches import assert_outputs_close, reference_outputs, run_backend, token_batch, upstreams
from helpers.linear_inputs import make_linear_inputs, tolerance
from helpers.nn_batches import make_batch, reference_dpo
from helpers.oracle import assert_matches_reference, rel_error
from helpers.policy_cases import assert_close_to, gpu_inputs, loss_and_grads

import fastalign
from fastalign.kernels.triton import linear_stats as linear_kernels
from fastalign.kernels.triton import logits_stats as logits_kernels
from fastalign.ops import reference, reference_losses

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_core]
REHEARSAL = os.environ.get("FASTALIGN_CHECK_DEVICE", "").strip().lower() == "cpu"
DEVICE = "cpu" if REHEARSAL else "cuda"
ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The matmul kernels compile a set of tiles per dtype and variant: the core check takes the dtype training runs in
# and float32 (IEEE dots under torch's default allow_tf32=False); float16 is in tests/kernels/test_gpu.py.
LINEAR_DTYPES = [torch.bfloat16, torch.float32]
NO_CUDA_KERNELS = pytest.mark.skipif(REHEARSAL, reason="rehearsal on the CPU: the CUDA kernels need a GPU")
BACKENDS = ["triton", pytest.param("cuda", marks=NO_CUDA_KERNELS)]
_fresh, _fresh_width = itertools.count(1), itertools.count()  # fresh autotune keys


def on_device(gpu, rehearsal):
    return rehearsal if REHEARSAL else gpu


@pytest.fixture(autouse=True)
def on_the_check_device():
    """On a GPU run, every case runs on CUDA with Triton compiling for the device, never its interpreter."""
    if not REHEARSAL:
        from fastalign.kernels.triton.softmax_tile import INTERPRETING

        assert torch.cuda.is_available(), "these tests need a CUDA device (rehearse them: FASTALIGN_CHECK_DEVICE=cpu)"
        assert not INTERPRETING and os.environ.get("TRITON_INTERPRET", "0") != "1", "Triton interprets on a GPU run"
    yield


def shape_id(shape):
    return "x".join(map(str, shape[0])) + f"-V{shape[-2]}"


# --------------------------------------------------------------------------- 1. each family against float64

LOGITS_SHAPES = on_device(
    gpu=[((2, 517), 32001, {"temperature": 0.9}), ((3, 67), 151936, {"softcap": 20.0})],
    rehearsal=[((2, 9), 101, {"temperature": 0.9}), ((1, 5), 300, {"softcap": 20.0})],
)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOGITS_SHAPES, ids=shape_id)
def test_logprobs_from_logits(shape, dtype, backend):
    leading, vocab, options = shape
    gen = torch.Generator().manual_seed(vocab)
    targets = torch.randint(0, vocab, leading, generator=gen)
    targets.view(-1)[::7] = -100
    inputs = {"logits": 4 * torch.randn(*leading, vocab, generator=gen, dtype=torch.float64), "targets": targets}
    op = functools.partial(fastalign.logprobs_from_logits, backend=backend)
    assert_matches_reference(op, reference.logprobs_from_logits, inputs, dtype, device=DEVICE, return_entropy=True,
                             **tolerance(backend, dtype), **options)  # fmt: skip


# (leading, D, V, logprob options, cross-entropy options): the aligned shape runs the plain path users run most.
LINEAR_SHAPES = on_device(
    gpu=[((2, 128), 896, 32000, {}, {}),
         ((3, 111), 320, 5003, {"softcap": 30.0, "temperature": 0.7, "return_entropy": True},
          {"label_smoothing": 0.1, "z_loss": 1e-4})],
    rehearsal=[((2, 9), 40, 101, {}, {}),
               ((1, 7), 24, 67, {"softcap": 30.0, "temperature": 0.7, "return_entropy": True},
                {"label_smoothing": 0.1, "z_loss": 1e-4})],
)  # fmt: skip


def linear_id(shape):
    return "x".join(map(str, shape[0])) + f"-D{shape[1]}-V{shape[2]}"


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=linear_id)
def test_linear_logprobs(shape, dtype):
    leading, width, vocab, options, _ = shape
    inputs = make_linear_inputs(leading, width, vocab, with_bias=bool(options), seed=vocab)
    op = functools.partial(fastalign.linear_logprobs, backend="triton")
    assert_matches_reference(op, reference.linear_logprobs, inputs, dtype, device=DEVICE, **tolerance("triton", dtype),
                             **options)  # fmt: skip


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=linear_id)
def test_linear_cross_entropy(shape, dtype):
    leading, width, vocab, _, options = shape
    inputs = make_linear_inputs(leading, width, vocab, with_bias=bool(options), seed=vocab + 1)
    op = functools.partial(fastalign.linear_cross_entropy, backend="triton")
    assert_matches_reference(op, reference.linear_cross_entropy, inputs, dtype, device=DEVICE,
                             **tolerance("triton", dtype), **options)  # fmt: skip


POLICY_SHAPES = on_device(
    gpu=[(64, 1024, {"loss_type": "dapo", "clip_eps_high": 0.28, "with_is_weights": True}),
         (3, 4099, {"importance_sampling_level": "sequence", "dual_clip": 3.0, "kl_coef": 0.05, "with_ref": True,
                    "entropy_coef": 0.01, "with_entropy": True, "per_token_advantages": True}),
         # Few long rows: each row split across 19 blocks on 132 SMs (row_split.h's choose_splits), the token
         # level's partial sums and the sequence level's two extra passes (3 x 4099 above: 2 blocks a row).
         (2, 40000, {"loss_type": "dapo", "clip_eps_high": 0.28, "with_is_weights": True}),
         (2, 40000, {"importance_sampling_level": "sequence", "dual_clip": 3.0, "kl_coef": 0.05, "with_ref": True,
                     "entropy_coef": 0.01, "with_entropy": True, "per_token_advantages": True})],
    rehearsal=[(5, 37, {"loss_type": "dapo", "clip_eps_high": 0.28, "with_is_weights": True}),
               (4, 20, {"importance_sampling_level": "sequence", "dual_clip": 3.0, "kl_coef": 0.05, "with_ref": True,
                        "entropy_coef": 0.01, "with_entropy": True, "per_token_advantages": True})],
)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", POLICY_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_policy_loss(shape, dtype, backend):
    """The kernels in ``dtype`` against the torch backend in float64 on the same (rounded) values, with log-ratios
    beyond the clamp on some tokens and an empty row."""
    rows, width, case = shape
    if REHEARSAL and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("triton's interpreter fails converting bfloat16 in the policy kernels (numpy has no bfloat16)")
    inputs, options = gpu_inputs(case, rows=rows, width=width, seed=rows)
    rounded = {k: v.to(dtype).double() for k, v in inputs.items()}

    def evaluate(backend, dtype):
        tensors = {k: v.to(device=DEVICE, dtype=dtype) for k, v in rounded.items()}
        return loss_and_grads(functools.partial(fastalign.policy_loss, backend=backend), tensors, options)

    got = evaluate(backend, dtype)
    assert got[0].device.type == DEVICE and all(grad.dtype == dtype for grad in got[1])
    assert_close_to(got, evaluate("torch", torch.float64), 1e-5 if dtype == torch.float32 else 1e-2)


DPO_WEIGHTED = {"loss_type": ["sigmoid", "ipo", "bco_pair", "discopop"], "loss_weights": [1.0, 0.5, 0.25, 2.0]}
DPO_AVERAGED = {"loss_type": ["robust", "sigmoid_norm"], "label_smoothing": 0.1, "average_log_prob": True}
DPO_SHAPES = on_device(gpu=[(6, 1003, DPO_WEIGHTED), (300, 64, DPO_AVERAGED)],
                       rehearsal=[(2, 37, DPO_WEIGHTED), (3, 9, DPO_AVERAGED)])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", DPO_SHAPES, ids=lambda s: f"{s[0]}pairs-T{s[1]}")
def test_dpo_loss(shape, dtype, backend):
    """dpo_loss_from_token_logps (reductions, weighted types, the token gradient) against the torch backend in
    float64, with rows that have no tokens."""
    pairs, width, case = shape
    token_logps, mask, ref = token_batch(pairs=pairs, width=width, seed=width, dtype=dtype, device=DEVICE)
    upstream = upstreams(pairs, "both", device=DEVICE)
    expected = reference_outputs(token_logps, mask, ref, upstream, **case)
    assert_outputs_close(run_backend(token_logps, mask, ref, upstream, dtype, backend, **case), expected, dtype)


# --------------------------------------------------------------------------- 2. in place and tuning into outputs


def logits_gradient(logits, targets, weights, backend, inplace, softcap):
    """d/d logits of Σ w·(logp + entropy/2) through logprobs_from_logits."""
    leaf = logits.detach().clone().requires_grad_()
    source = leaf * 1  # an in-place backward needs a non-leaf that nothing else reads
    logp, entropy = fastalign.logprobs_from_logits(source, targets, softcap=softcap, return_entropy=True,
                                                   inplace_backward=inplace, backend=backend)  # fmt: skip
    ((logp + 0.5 * entropy) * weights.to(logp)).sum().backward()
    return leaf.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 20.0], ids=["plain", "softcap"])
def test_in_place_backward_on_a_fresh_autotune_key(softcap, dtype, backend):
    """The first backward per autotune key tunes the Triton gradient kernel, benchmarking each config several
    times on the buffers it is given: in place, each run would read the previous run's gradient as logits. That
    first in-place gradient must equal the out-of-place one (the same elementwise formula: to the bit) and match
    the float64 reference. Each case takes a vocabulary no other call used, so its key is fresh."""
    rows, vocab = on_device(gpu=(257, 24001 + 2 * next(_fresh)), rehearsal=(5, 37 + 2 * next(_fresh)))
    gen = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(rows, vocab, generator=gen)).to(device=DEVICE, dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    weights = torch.randn(rows, generator=gen).to(DEVICE)
    kernel = logits_kernels.logits_grad_kernel
    tuned = len(kernel.cache)
    really_tunes = backend == "triton" and not REHEARSAL  # the interpreter has one config, never benchmarked
    in_place = logits_gradient(logits, targets, weights, backend, True, softcap)
    if really_tunes:
        assert len(kernel.configs) > 1 and len(kernel.cache) == tuned + 1, "the in-place call did not tune"
    out_of_place = logits_gradient(logits, targets, weights, backend, False, softcap)
    if really_tunes:
        assert len(kernel.cache) == tuned + 1, "the out-of-place call tuned again instead of reusing the winner"
    assert torch.equal(in_place, out_of_place), f"in place differs: max {(in_place - out_of_place).abs().max():.3g}"
    expected = logits_gradient(logits.cpu().double(), targets.cpu(), weights.cpu(), "torch", False, softcap)
    bound = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # a rounding of the output
    assert rel_error(in_place.cpu(), expected) <= bound


@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=str)
def test_linear_call_that_tunes_accumulates_once(scratch_budget, dtype):
    """The backward adds ``d_hidden`` slab by slab in a Triton matmul (its autotuner restores the accumulator
    between benchmark runs) and ``d_bias`` by atomics (reset to zero between them): the call that tunes them,
    on a fresh (D, V) key with a scratch budget small enough for several slabs, must give what the next call
    gives and match the float64 reference."""
    fresh, widening = next(_fresh), next(_fresh_width)
    leading, width, vocab, slab = on_device(gpu=((3, 173), 256 + 16 * widening, 6001 + 2 * fresh, 256),
                                            rehearsal=((2, 9), 16 + 16 * widening, 301 + 2 * fresh, 128))  # fmt: skip
    scratch_budget(leading[0] * leading[1] * slab * dtype.itemsize)  # slabs of `slab` columns: 24 on the GPU
    inputs = make_linear_inputs(leading, width, vocab, with_bias=True, seed=vocab)
    kernels = [linear_kernels.linear_stats_fwd_kernel, linear_kernels.linear_grad_logits_kernel,
               linear_kernels.matmul_accumulate_kernel]  # fmt: skip
    tuned = [len(kernel.cache) for kernel in kernels]

    def grads():
        leaves = {k: v.to(device=DEVICE, dtype=dtype).requires_grad_() if v.is_floating_point() else v.to(DEVICE)
                  for k, v in inputs.items()}  # fmt: skip
        logp, entropy = fastalign.linear_logprobs(**leaves, return_entropy=True, backend="triton")
        (logp.sum() + 0.5 * entropy.sum()).backward()
        return [leaves[name].grad.double().cpu() for name in ("hidden", "weight", "bias")]

    first = grads()
    if not REHEARSAL:
        assert all(len(kernel.cache) > count for kernel, count in zip(kernels, tuned, strict=True)), "no tuning"
    again = grads()
    same = 1e-5 if dtype == torch.float32 else 1e-2  # d_bias sums by atomics, in whatever order they land
    for name, got, repeat in zip(("d_hidden", "d_weight", "d_bias"), first, again, strict=True):
        assert rel_error(got, repeat) <= same, f"{name}: the tuning call differs from the next"
    op = functools.partial(fastalign.linear_logprobs, backend="triton")
    assert_matches_reference(op, reference.linear_logprobs, inputs, dtype, device=DEVICE, return_entropy=True,
                             **tolerance("triton", dtype))  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=str)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=linear_id)
def test_tile_backward(shape, dtype, deterministic):
    """``set_linear_backward("tiles")`` against float64 (both ops, the shapes above); deterministic, the call that
    tunes (its autotuner zeroes the accumulators and tickets between benchmark runs) and the next give the same
    bits."""
    leading, width, vocab, logprob_options, _ = shape
    inputs = make_linear_inputs(leading, width, vocab, with_bias=bool(logprob_options), seed=vocab + 2)
    fastalign.set_linear_backward("tiles", deterministic=deterministic)
    try:
        op = functools.partial(fastalign.linear_logprobs, backend="triton")
        assert_matches_reference(op, reference.linear_logprobs, inputs, dtype, device=DEVICE,
                                 **tolerance("triton", dtype), **logprob_options)  # fmt: skip
        op = functools.partial(fastalign.linear_cross_entropy, backend="triton")
        assert_matches_reference(op, reference.linear_cross_entropy, inputs, dtype, device=DEVICE,
                                 **tolerance("triton", dtype))  # fmt: skip
        if deterministic:

            def grads():
                hidden, weight = (
                    inputs[k].to(device=DEVICE, dtype=dtype).requires_grad_() for k in ("hidden", "weight")
                )
                targets = inputs["targets"].to(DEVICE)
                fastalign.linear_logprobs(hidden, weight, targets, backend="triton").sum().backward()
                return hidden.grad, weight.grad

            first, again = grads(), grads()
            assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True)), "not bit-identical"
    finally:
        fastalign.set_linear_backward(None)


# --------------------------------------------------------------------------- 3. the fused modules

MODULE_SHAPE = on_device(gpu=(8, 300, 40, 256, 4099), rehearsal=(4, 7, 2, 24, 97))  # rows, T, prompt, D, V


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "grad-in-forward"])
@pytest.mark.parametrize("module", ["dpo", "grpo", "ce"])
@pytest.mark.parametrize("dtype", LINEAR_DTYPES, ids=str)
def test_modules(dtype, module, fused):
    """The modules on the Triton kernels (both gradient paths) against the float64 composition on materialised
    logits: float32 within 1e-4, bfloat16 within eager bfloat16's own error (x1.5)."""
    rows, length, prompt, width, vocab = MODULE_SHAPE
    hidden, weight, targets = make_batch(rows, length, prompt, seed=4, dim=width, vocab=vocab)
    zeros = torch.zeros(rows // 2, dtype=torch.float64)
    advantages = torch.linspace(-1, 1, rows, dtype=torch.float64)
    old_logp = torch.full(targets.shape, -5.0, dtype=torch.float64)

    def ours(hidden, weight, targets):
        if module == "dpo":
            z = zeros.to(hidden)
            loss_fn = fastalign.nn.LinearDPOLoss(gradient_in_forward=fused, backend="triton")
            return loss_fn(hidden, weight, targets, ref_chosen_logps=z, ref_rejected_logps=z)[0]
        if module == "grpo":
            loss_fn = fastalign.nn.LinearPolicyLoss(loss_type="grpo", gradient_in_forward=fused, backend="triton")
            as_float = {"device": hidden.device, "dtype": torch.float32}  # old log-probs come from a float32 op
            return loss_fn(hidden, weight, targets, old_logp.to(**as_float), advantages.to(**as_float))[0]
        return fastalign.nn.LinearCrossEntropy(gradient_in_forward=fused, backend="triton")(hidden, weight, targets)

    def composed(hidden, weight, targets):
        if module == "dpo":
            return reference_dpo(hidden, weight, targets, torch.zeros(rows, dtype=hidden.dtype, device=hidden.device))
        if module == "grpo":
            logp = reference.linear_logprobs(hidden, weight, targets)
            return reference_losses.policy_loss(logp, old_logp.to(logp), advantages.to(logp), targets != -100,
                                                loss_type="grpo")  # fmt: skip
        return reference.linear_cross_entropy(hidden, weight, targets)

    inputs = {"hidden": hidden, "weight": weight, "targets": targets}
    assert_matches_reference(ours, composed, inputs, dtype, device=DEVICE, **tolerance("triton", dtype))


@NO_CUDA_KERNELS
def test_widening_add_matmul_takes_cublas_float32_output():
    """fused_linear_loss adds each chunk's bf16 ``gradᵀ @ rows`` into the float32 weight gradient straight from
    cuBLAS (``out_dtype``): no bf16 [V, D] temporary, and the sum rounded once, in float32."""
    from helpers.memory import AllocationWatcher

    from fastalign.ops import _torch_backend

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(1000, 300, device=DEVICE, generator=gen).to(torch.bfloat16)
    b = torch.randn(300, 200, device=DEVICE, generator=gen).to(torch.bfloat16)
    start = torch.randn(1000, 200, device=DEVICE, generator=gen)
    assert _torch_backend._widening_addmm(start, a), "this torch refuses out_dtype=float32 with a float32 self"
    for overwrite in (False, True):
        out = torch.full_like(start, float("nan")) if overwrite else start.clone()
        with AllocationWatcher() as watcher:
            _torch_backend.add_matmul(out, a, b, overwrite=overwrite)
        assert not watcher.allocated, watcher.allocated
        expected = a.double() @ b.double() + (0 if overwrite else start.double())
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)

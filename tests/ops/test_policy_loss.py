"""policy_loss and value_loss against the per-token reference (float64, gradients included), their metrics,
empty rows, and bad input."""

import functools
import inspect
import re

import pytest
import torch
from helpers.masks import ALL_MASK_DTYPES, unusual_mask
from helpers.policy_cases import CASES, case_id, make_inputs, run
from hypothesis import given, settings
from hypothesis import strategies as st

import fastalign
from fastalign.ops import reference_losses

BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_policy_loss_matches_reference(backend, case):
    inputs, options = make_inputs(case)
    ref_loss, ref_grads, _ = run(reference_losses.policy_loss, inputs, options, torch.float64)
    dtype = torch.float64 if backend == "torch" else torch.float32
    loss, grads, metrics = run(functools.partial(fastalign.policy_loss, backend=backend), inputs, options, dtype)
    tolerance = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(loss.double(), ref_loss, **tolerance)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad.double(), ref_grad, **tolerance)
    assert all(not m.requires_grad for m in metrics.values())
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2])), "an empty row gets no gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_metrics(backend):
    case = {"kl_coef": 0.1, "with_ref": True, "with_entropy": True, "dual_clip": 2.0}
    inputs, options = make_inputs(case, rows=8, width=16, spread=1.0)
    options = {**options, "clip_eps_high": 0.3, "entropy_coef": 0.0}
    tensors = {k: v.float() for k, v in inputs.items()}
    _, metrics = fastalign.policy_loss(**tensors, **options, backend=backend)
    keep = tensors["mask"] != 0
    ratio = torch.exp(tensors["logps"] - tensors["old_logps"])
    adv = tensors["advantages"][:, None].expand_as(ratio)
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.3))
    expected = {
        "clip_frac_low": ((ratio < 0.8) & (adv < 0))[keep].float().mean(),
        "clip_frac_high": ((ratio > 1.3) & (adv > 0))[keep].float().mean(),
        "clip_frac_dual": ((adv < 0) & (clipped > -adv * 2.0))[keep].float().mean(),
        "ratio_mean": ratio[keep].mean(),
        "kl_mean": reference_losses._kl(tensors["logps"], tensors["ref_logps"], "k3")[keep].mean(),
        "entropy_mean": tensors["entropy"][keep].mean(),
    }
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0 and metrics["clip_frac_dual"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_all_masked_is_zero_not_nan(backend, mode):
    logps = torch.randn(3, 4, requires_grad=True)
    loss, metrics = fastalign.policy_loss(
        logps, logps.detach() + 50.0, torch.randn(3), torch.zeros(3, 4), loss_agg_mode=mode, backend=backend
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logps.grad, torch.zeros_like(logps))
    assert all(torch.isfinite(m) for m in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_dtypes_agree(backend, mask_dtype):
    inputs, options = make_inputs({"loss_type": "grpo", "with_ref": True, "kl_coef": 0.1})
    tensors = {k: v.float() for k, v in inputs.items()}
    expected, _ = fastalign.policy_loss(**tensors, **options, backend="torch")
    tensors["mask"] = tensors["mask"].to(mask_dtype)
    got, _ = fastalign.policy_loss(**tensors, **options, backend=backend)
    torch.testing.assert_close(got, expected)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALL_MASK_DTYPES, ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_takes_every_mask_dtype_like_torch(dtype, level):
    """The Triton path keeps exactly the tokens where ``mask != 0``, as the torch backend does, for a mask of any
    dtype: loss, every metric and both gradients (the backward kernel reads the mask too)."""
    case = {"with_ref": True, "kl_coef": 0.1, "with_entropy": True, "entropy_coef": 0.01, "dual_clip": 3.0}
    inputs, options = make_inputs(case, rows=6, width=13, spread=1.0)
    options["importance_sampling_level"] = level
    keep = inputs.pop("mask") != 0
    mask = unusual_mask(keep, dtype)
    if dtype in (torch.float64, torch.complex128):  # the test's own premise: the 1e-300 tokens stay nonzero
        assert torch.equal(mask != 0, keep) and (mask.abs() == 1e-300).any()
    results = {}
    for backend in ("torch", "triton"):
        tensors = {k: v.float() for k, v in inputs.items()}
        leaves = [tensors["logps"].requires_grad_(), tensors["entropy"].requires_grad_()]
        loss, metrics = fastalign.policy_loss(**tensors, mask=mask, **options, backend=backend)
        results[backend] = (loss.detach(), metrics, torch.autograd.grad(loss, leaves))
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = results["triton"], results["torch"]
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(metrics, want_metrics)
    torch.testing.assert_close(grads, want_grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_log_ratios_stay_finite(backend):
    logps = torch.tensor([[0.0, -300.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-300.0, 0.0, -1.0]])
    loss, _ = fastalign.policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 3), backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    width=st.integers(1, 11),
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]),
    level=st.sampled_from(["token", "sequence"]),
    dual=st.sampled_from([None, 2.0]),
    backend=st.sampled_from(BACKENDS),
)
def test_policy_loss_properties(rows, width, seed, mode, level, dual, backend):
    case = {
        "loss_agg_mode": mode,
        "importance_sampling_level": level,
        "dual_clip": dual,
        "kl_coef": 0.03,
        "with_ref": True,
    }
    inputs, options = make_inputs(case, rows=max(rows, 3), width=width, seed=seed)
    ref_loss, ref_grads, _ = run(reference_losses.policy_loss, inputs, options, torch.float64)
    loss, grads, _ = run(functools.partial(fastalign.policy_loss, backend=backend), inputs, options, torch.float32)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0].double(), ref_grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip_range", [0.2, None])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_matches_reference(clip_range, mode):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    old = values.detach() + 0.5 * torch.randn(4, 7, generator=gen, dtype=torch.float64)
    returns = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=gen) > 0.3).double()
    loss = fastalign.value_loss(values, old, returns, mask, clip_range=clip_range, loss_agg_mode=mode)
    ref = reference_losses.value_loss(values, old, returns, mask, clip_range=clip_range, loss_agg_mode=mode)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(torch.autograd.grad(loss, values)[0], torch.autograd.grad(ref, values)[0])


def good():
    return {
        "logps": torch.randn(2, 3),
        "old_logps": torch.randn(2, 3),
        "advantages": torch.randn(2),
        "mask": torch.ones(2, 3),
    }


POLICY_ERRORS = [
    ({"old_logps": torch.randn(2, 4)}, "old_logps must have shape (2, 3) like logps"),
    ({"mask": torch.ones(3, 3)}, "mask must have shape (2, 3) like logps"),
    ({"advantages": torch.randn(3)}, "advantages must be [B] = (2,) or [B, T] = (2, 3)"),
    ({"logps": torch.randn(6)}, "logps must be [B, T]"),
    ({"loss_type": "ppo2"}, "loss_type must be one of"),
    ({"loss_agg_mode": "token-sum"}, "loss_agg_mode must be one of"),
    ({"kl_estimator": "k4", "ref_logps": torch.randn(2, 3)}, "kl_estimator must be one of"),
    ({"dual_clip": 1.0}, "dual_clip must be None or a number > 1"),
    ({"kl_coef": 0.1}, "kl_coef is nonzero but ref_logps is None"),
    ({"kl_coef": -1.0, "ref_logps": torch.randn(2, 3)}, "kl_coef must be >= 0"),
    ({"entropy_coef": 0.1}, "entropy_coef is nonzero but entropy is None"),
    ({"importance_sampling_level": "batch"}, "importance_sampling_level must be one of"),
    ({"clip_eps_low": 1.5}, "clip_eps_low must be < 1"),
    ({"clip_eps_high": -0.1}, "clip_eps_high must be a finite number >= 0"),
    ({"max_completion_length": 0, "loss_type": "dr_grpo"}, "max_completion_length must be None or an int > 0"),
    ({"num_items_in_batch": 10, "loss_type": "grpo"}, "num_items_in_batch applies to token-mean aggregation only"),
    (
        {"logps": torch.randn(2, 0), "old_logps": torch.randn(2, 0), "mask": torch.ones(2, 0), "loss_type": "dr_grpo"},
        "seq-mean-token-sum-norm (loss_type='dr_grpo') needs a length",
    ),
    ({"loss_type": "cispo"}, "loss_type='cispo' caps the ratio at clip_eps_high itself"),
    (
        {"loss_type": "sapo", "importance_sampling_level": "sequence"},
        "loss_type='sapo' is a token-level objective: importance_sampling_level='sequence' is refused",
    ),
    ({"loss_type": "vespo", "dual_clip": 3.0}, "dual_clip applies to the clipped surrogate"),
    ({"loss_type": "cispo", "clip_eps_high": 5.0, "delta": 2.0}, "delta applies to the clipped surrogate"),
    ({"loss_type": "luspo"}, "loss_type='luspo' scales each sequence's GSPO loss by its length"),
    ({"delta": 0.0}, "delta must be None or a number > 0"),
    ({"sapo_temperature_neg": 0.0}, "sapo_temperature_neg must be a finite number > 0"),
    ({"vespo_lambda_pos": -1.0}, "vespo_lambda_pos must be a finite number > 0"),
    ({"vespo_k_neg": float("nan")}, "vespo_k_neg must be a finite number"),
    ({"top_entropy_quantile": 0.5}, "top_entropy_quantile < 1 needs entropy"),
    ({"top_entropy_quantile": 1.5}, "top_entropy_quantile must be in [0, 1]"),
    (
        {"top_entropy_quantile": 0.5, "entropy_coef": 0.01, "entropy": torch.rand(2, 3)},
        "top_entropy_quantile < 1 with entropy_coef != 0 is refused",
    ),
    ({"off_policy_mask_threshold": float("inf")}, "off_policy_mask_threshold must be None or a finite number"),
    ({"sampler_logps": torch.randn(2, 4)}, "sampler_logps must have shape (2, 3) like logps"),
    (
        {"loss_type": "vespo", "is_weights": torch.ones(2)},
        "loss_type='vespo' folds per-token importance weights into its sequence weight: is_weights must be [B, T]",
    ),
]


@pytest.mark.parametrize(("change", "message"), POLICY_ERRORS, ids=[m for _, m in POLICY_ERRORS])
def test_policy_loss_rejects(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fastalign.policy_loss(**{**good(), **change})


def test_value_loss_rejects():
    with pytest.raises(ValueError, match=re.escape("returns must have shape (2, 3) like values")):
        fastalign.value_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(3, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="clip_range must be None or a number >= 0"):
        fastalign.value_loss(*[torch.randn(2, 3)] * 3, torch.ones(2, 3), clip_range=-1.0)


def test_the_old_keyword_names_still_work_and_warn():
    """logp / old_logp / ref_logp are the deprecated names of logps / old_logps / ref_logps (one release)."""
    inputs, options = make_inputs({"kl_coef": 0.1, "with_ref": True})
    expected, expected_metrics = fastalign.policy_loss(**inputs, **options)
    old_names = {"logp": inputs["logps"], "old_logp": inputs["old_logps"], "ref_logp": inputs["ref_logps"]}
    rest = {k: v for k, v in inputs.items() if k not in ("logps", "old_logps", "ref_logps")}
    with pytest.warns(DeprecationWarning, match=re.escape("policy_loss(logp=...) is deprecated")):
        loss, metrics = fastalign.policy_loss(**old_names, **rest, **options)
    assert torch.equal(loss, expected) and metrics.keys() == expected_metrics.keys()
    with pytest.raises(TypeError, match="the deprecated name of ref_logps"):
        fastalign.policy_loss(**inputs, ref_logp=inputs["ref_logps"], **options)
    logps, ref_logps = inputs["logps"], inputs["ref_logps"]
    with pytest.warns(DeprecationWarning, match=re.escape("kl_estimate(ref_logp=...)")):
        kl = fastalign.ops.policy.kl_estimate(logps, ref_logp=ref_logps, estimator="k3")
    assert torch.equal(kl, fastalign.ops.policy.kl_estimate(logps, ref_logps, "k3"))


def test_options_bundle_equals_the_keywords():
    inputs, options = make_inputs({"loss_type": "grpo", "dual_clip": 3.0, "kl_coef": 0.05, "with_ref": True})
    bundle = fastalign.ops.PolicyLossOptions(**options)
    assert torch.equal(
        fastalign.policy_loss(**inputs, options=bundle)[0], fastalign.policy_loss(**inputs, **options)[0]
    )
    with pytest.raises(TypeError, match="not both"):
        fastalign.policy_loss(**inputs, options=bundle, kl_coef=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'clip_eps'"):
        fastalign.policy_loss(**inputs, clip_eps=0.1)
    with pytest.raises(ValueError, match=re.escape("dual_clip must be None or a number > 1")):
        fastalign.ops.PolicyLossOptions(dual_clip=0.5)
    shown = inspect.signature(fastalign.policy_loss).parameters
    assert {"logps", "options", "backend", "clip_eps_low", "max_completion_length"} <= set(shown)
    assert shown["clip_eps_low"].default == 0.2 and "option_fields" not in shown

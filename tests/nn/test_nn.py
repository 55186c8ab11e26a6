"""The fused-linear modules against the reference composition (materialised float64 logits, then the reference
loss), with gradients into hidden and weight, on every CPU-runnable backend; and no [N, V] tensor on the way."""

import re

import pytest
import torch
from helpers.memory import AllocationWatcher
from helpers.nn_batches import VOCAB, make_batch, reference_dpo

import fastalign
from fastalign.ops import reference, reference_losses

BACKENDS = ["torch", "triton"]


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def assert_close_all(got, expected, dtype):
    tolerance = {"rtol": 2e-5, "atol": 2e-6} if dtype == torch.float32 else {}
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, **tolerance)


# gradient_in_forward: the autograd path (False) and the gradient formed in the forward sweep (True).
FUSED = [pytest.param(False, id="autograd"), pytest.param(True, id="grad-in-forward")]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{"label_smoothing": 0.1}, {"z_loss": 1e-3, "reduction": "sum", "softcap": 4.0}])
def test_linear_cross_entropy_module(backend, fused, options):
    hidden, weight, targets = make_batch()
    bias = torch.randn(VOCAB, dtype=torch.float64)
    h, w, b = hidden.float().requires_grad_(), weight.float().requires_grad_(), bias.float().requires_grad_()
    module = fastalign.nn.LinearCrossEntropy(gradient_in_forward=fused, backend=backend, **options)
    loss = module(h, w, targets, bias=b)
    rh, rw, rb = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()
    ref = reference.linear_cross_entropy(rh, rw, targets, bias=rb, **options)
    assert_close_all([loss, *grads_of(loss, h, w, b)], [ref, *grads_of(ref, rh, rw, rb)], torch.float32)


POLICY_CASES = [
    {"loss_type": "dapo", "clip_eps_high": 0.28},
    {"loss_type": "grpo", "kl_coef": 0.05, "with_ref": True, "temperature": 0.7},
    {"importance_sampling_level": "sequence", "entropy_coef": 0.01},
    {"loss_agg_mode": "seq-mean-token-sum-norm", "dual_clip": 3.0, "softcap": 5.0},
    {"loss_type": "cispo", "clip_eps_high": 1.1},
    {"loss_type": "sapo", "kl_coef": 0.05, "with_ref": True},
    # VESPO's weight needs each row whole: the fused path's chunks must keep rows together.
    {"loss_type": "vespo", "temperature": 0.7},
    {"loss_type": "luspo", "importance_sampling_level": "sequence", "delta": 1.1},
    # The off-policy mask needs whole rows in the fused chunks; the top-entropy mask runs the unfused path.
    {"off_policy_mask_threshold": 0.0},
    {"top_entropy_quantile": 0.4, "loss_type": "grpo"},
]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", POLICY_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_linear_policy_loss_module(backend, case, fused):
    options = dict(case)
    with_ref = options.pop("with_ref", False)
    temperature, softcap = options.pop("temperature", 1.0), options.pop("softcap", None)
    hidden, weight, targets = make_batch()
    mask = targets != -100
    gen = torch.Generator().manual_seed(1)
    old_logps = reference.linear_logprobs(hidden, weight, targets, temperature=temperature, softcap=softcap)
    old_logps = old_logps + 0.3 * torch.randn(old_logps.shape, generator=gen, dtype=torch.float64) * mask
    ref_logps = old_logps + 0.2 * torch.randn(old_logps.shape, generator=gen, dtype=torch.float64) if with_ref else None
    advantages = torch.randn(hidden.shape[0], generator=gen, dtype=torch.float64)

    module = fastalign.nn.LinearPolicyLoss(
        temperature=temperature, softcap=softcap, gradient_in_forward=fused, backend=backend, **options
    )
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    ref_float = None if ref_logps is None else ref_logps.float()
    loss, metrics = module(h, w, targets, old_logps.float(), advantages.float(), ref_logps=ref_float)

    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    need_entropy = options.get("entropy_coef", 0.0) != 0 or options.get("top_entropy_quantile", 1.0) < 1
    out = reference.linear_logprobs(
        rh, rw, targets, temperature=temperature, softcap=softcap, return_entropy=need_entropy
    )
    logps, entropy = out if need_entropy else (out, None)
    ref_loss = reference_losses.policy_loss(
        logps, old_logps, advantages, mask, ref_logps=ref_logps, entropy=entropy, **options
    )
    assert_close_all([loss, *grads_of(loss, h, w)], [ref_loss, *grads_of(ref_loss, rh, rw)], torch.float32)
    assert ("entropy_mean" in metrics) == need_entropy
    # The metrics, from the kernels' or the chunks' own per-row sums, equal the torch op's on the same log-probs.
    with torch.no_grad():
        out = fastalign.linear_logprobs(
            h, w, targets, temperature=temperature, softcap=softcap, return_entropy=need_entropy
        )
    logps_f, entropy_f = out if need_entropy else (out, None)
    _, want = fastalign.policy_loss(
        logps_f,
        old_logps.float(),
        advantages.float(),
        mask,
        ref_logps=ref_float,
        entropy=entropy_f,
        backend="torch",
        **options,
    )
    assert metrics.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert not metrics[name].requires_grad


DPO_CASES = [
    {},
    {"loss_type": "ipo", "beta": 0.5},
    {"loss_type": ["sigmoid", "sppo_hard"], "loss_weights": [1.0, 0.1], "rpo_alpha": 0.5},
    {"loss_type": "robust", "label_smoothing": 0.1, "average_log_prob": True},
    {"loss_type": "apo_zero", "precomputed": True},
    {"loss_type": "sigmoid", "reference_free": True, "average_log_prob": True},  # SimPO-style
]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DPO_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "sigmoid")
def test_linear_dpo_loss_module(backend, case, fused):
    options = dict(case)
    precomputed, reference_free = options.pop("precomputed", False), options.pop("reference_free", False)
    hidden, weight, targets = make_batch(rows=6)
    gen = torch.Generator().manual_seed(2)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    ref_sums = reference.linear_logprobs(ref_hidden, weight, targets).sum(-1)
    if reference_free:
        ref_sums = torch.zeros_like(ref_sums)
    module = fastalign.nn.LinearDPOLoss(gradient_in_forward=fused, backend=backend, **options)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    if precomputed or reference_free:
        loss, metrics = module(
            h, w, targets, ref_chosen_logps=ref_sums[:3].float(), ref_rejected_logps=ref_sums[3:].float()
        )
    else:
        loss, metrics = module(h, w, targets, ref_hidden=ref_hidden.float(), ref_weight=weight.float())
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = reference_dpo(rh, rw, targets, ref_sums, **options)
    assert_close_all([loss, *grads_of(loss, h, w)], [ref_loss, *grads_of(ref_loss, rh, rw)], torch.float32)
    beta = options.get("beta", 0.1)
    sums = reference.linear_logprobs(hidden, weight, targets).sum(-1)
    torch.testing.assert_close(
        metrics["chosen_rewards"].double(), beta * (sums[:3] - ref_sums[:3]), rtol=1e-5, atol=1e-5
    )
    assert ("nll_loss" in metrics) == ("rpo_alpha" in options)
    assert 0 <= metrics["reward_accuracy"] <= 1


@pytest.mark.parametrize("budget", [1 << 10, 6 << 10], ids=["two-sweeps", "one-unit-per-chunk"])
def test_vespo_weights_each_row_whole_under_a_small_budget(scratch_budget, budget):
    """VESPO's weight is a function of a whole row's log-ratios: chunks smaller than a row must not split it."""
    scratch_budget(budget)
    hidden, weight, targets = make_batch(rows=6)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    gen = torch.Generator().manual_seed(3)
    old_logps = reference.linear_logprobs(hidden, weight, targets)
    old_logps = old_logps + 0.3 * torch.randn(old_logps.shape, generator=gen, dtype=torch.float64)
    advantages = torch.linspace(-1, 1, 6, dtype=torch.float64)
    policy = fastalign.nn.LinearPolicyLoss(loss_type="vespo", gradient_in_forward=True)
    loss, _ = policy(h, w, targets, old_logps.float(), advantages.float())
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logps = reference.linear_logprobs(rh, rw, targets)
    ref = reference_losses.policy_loss(logps, old_logps, advantages, targets != -100, loss_type="vespo")
    assert_close_all([loss, *grads_of(loss, h, w)], [ref, *grads_of(ref, rh, rw)], torch.float32)


@pytest.mark.parametrize("budget", [1 << 10, 6 << 10], ids=["two-sweeps", "one-unit-per-chunk"])
def test_units_larger_than_the_budget_fall_back_to_two_sweeps(scratch_budget, budget):
    """DPO pairs and GSPO rows that do not fit the budget are still exact (statistics, then recompute)."""
    scratch_budget(budget)
    hidden, weight, targets = make_batch(rows=6)
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    zeros = torch.zeros(3)
    loss, _ = fastalign.nn.LinearDPOLoss(gradient_in_forward=True)(
        h, w, targets, ref_chosen_logps=zeros, ref_rejected_logps=zeros
    )
    rh, rw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_dpo(rh, rw, targets, torch.zeros(6, dtype=torch.float64))
    assert_close_all([loss, *grads_of(loss, h, w)], [ref, *grads_of(ref, rh, rw)], torch.float32)
    old_logps = reference.linear_logprobs(hidden, weight, targets).float()
    advantages = torch.linspace(-1, 1, 6)
    policy = fastalign.nn.LinearPolicyLoss(importance_sampling_level="sequence", gradient_in_forward=True)
    loss, _ = policy(h, w, targets, old_logps + 0.1, advantages)
    logps = reference.linear_logprobs(rh, rw, targets)
    ref = reference_losses.policy_loss(
        logps, old_logps.double() + 0.1, advantages.double(), targets != -100, importance_sampling_level="sequence"
    )
    assert_close_all([loss, *grads_of(loss, h, w)], [ref, *grads_of(ref, rh, rw)], torch.float32)


@pytest.mark.parametrize("fused", FUSED)
def test_linear_policy_loss_rejects_mismatched_inputs(fused):
    hidden, weight, targets = make_batch()
    module = fastalign.nn.LinearPolicyLoss(gradient_in_forward=fused)
    h = hidden.float().requires_grad_()
    with pytest.raises(ValueError, match=re.escape("old_logps must have shape (4, 7) like logps")):
        module(h, weight.float(), targets, torch.zeros(4, 6), torch.zeros(4))
    with pytest.raises(ValueError, match=re.escape("advantages must be [B] = (4,) or [B, T] = (4, 7)")):
        module(h, weight.float(), targets, torch.zeros(4, 7), torch.zeros(5))


def test_gradient_in_forward_is_skipped_without_a_gradient():
    hidden, weight, targets = make_batch()
    with torch.no_grad():
        loss = fastalign.nn.LinearCrossEntropy(gradient_in_forward=True)(hidden, weight, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden, weight, targets))


def test_linear_dpo_loss_rejects_bad_input():
    hidden, weight, targets = make_batch(rows=4)
    module = fastalign.nn.LinearDPOLoss()
    with pytest.raises(ValueError, match="LinearDPOLoss needs a reference"):
        module(hidden, weight, targets)
    with pytest.raises(ValueError, match=re.escape("targets must be [2B, T]")):
        module(hidden[:3], weight, targets[:3], ref_hidden=hidden[:3], ref_weight=weight)
    with pytest.raises(ValueError, match=re.escape("ref_chosen_logps must be a [B] = (2,) tensor")):
        module(hidden, weight, targets, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fastalign.nn.LinearDPOLoss(loss_type="orpo")


@pytest.mark.parametrize(
    "module_call",
    [
        lambda h, w, t: fastalign.nn.LinearPolicyLoss(loss_type="grpo", entropy_coef=0.01)(
            h, w, t, torch.zeros(t.shape), torch.ones(t.shape[0])
        )[0],
        lambda h, w, t: fastalign.nn.LinearDPOLoss(rpo_alpha=1.0)(
            h, w, t, ref_chosen_logps=torch.zeros(t.shape[0] // 2), ref_rejected_logps=torch.zeros(t.shape[0] // 2)
        )[0],
    ],
    ids=["policy", "dpo"],
)
def test_modules_never_hold_full_logits(scratch_budget, module_call):
    rows, width, vocab, dim = 8, 64, 4096, 16  # [512 tokens, 4096] float32 = 8 MiB
    budget = 256 << 10
    scratch_budget(budget)
    hidden = torch.randn(rows, width, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    targets = torch.randint(0, vocab, (rows, width))
    with AllocationWatcher() as watcher:
        module_call(hidden, weight, targets).backward()
    allowed = {(rows * width, dim), (vocab, dim), tuple(hidden.shape)}
    largest = max(size for shape, size in watcher.produced if shape not in allowed)
    assert largest <= budget


@pytest.mark.parametrize("fused", FUSED)
def test_linear_policy_loss_old_keywords_and_options_bundle(fused):
    """forward(old_logp=, ref_logp=) still works, with a DeprecationWarning; options= equals the keywords."""
    hidden, weight, targets = make_batch()
    h, w = hidden.float().requires_grad_(), weight.float()
    old_logps = reference.linear_logprobs(hidden, weight, targets).float() + 0.1
    advantages = torch.linspace(-1, 1, 4)
    keywords = {"loss_type": "grpo", "kl_coef": 0.05}
    module = fastalign.nn.LinearPolicyLoss(gradient_in_forward=fused, **keywords)
    bundled = fastalign.nn.LinearPolicyLoss(
        gradient_in_forward=fused, options=fastalign.ops.PolicyLossOptions(**keywords)
    )
    assert module.options == bundled.options
    expected, _ = bundled(h, w, targets, old_logps, advantages, ref_logps=old_logps - 0.2)
    with pytest.warns(DeprecationWarning, match=re.escape("LinearPolicyLoss(ref_logp=...) is deprecated")):
        loss, _ = module(h, w, targets, old_logp=old_logps, advantages=advantages, ref_logp=old_logps - 0.2)
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)

"""dpo_loss (every loss type, lists with weights) and reward_loss against the per-pair reference, float64,
gradients included; label-smoothing ranges and other bad input."""

import re

import pytest
import torch
from helpers.masks import ALL_MASK_DTYPES, unusual_mask
from hypothesis import given, settings
from hypothesis import strategies as st

import fastalign
from fastalign.ops import reference_losses
from fastalign.ops.preference import DPO_LOSS_TYPES, dpo_loss_from_token_logps

SMOOTHING = {"sigmoid": 0.1, "robust": 0.2, "exo_pair": 1e-3}


def sequence_logps(pairs=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected, ref_chosen, ref_rejected = (
        -10 * torch.rand(pairs, generator=gen, dtype=torch.float64) - 1 for _ in range(4)
    )
    return chosen, rejected, ref_chosen, ref_rejected


def check_against_reference(values, **options):
    leaves = [v.clone().requires_grad_() for v in values]
    losses, chosen_rewards, rejected_rewards = fastalign.dpo_loss(*leaves, **options)
    ref_leaves = [v.clone().requires_grad_() for v in values]
    ref_losses, ref_chosen, ref_rejected = reference_losses.dpo_loss(*ref_leaves, **options)
    torch.testing.assert_close(losses, ref_losses)
    torch.testing.assert_close(chosen_rewards, ref_chosen)
    torch.testing.assert_close(rejected_rewards, ref_rejected)
    upstream = torch.linspace(0.5, 1.5, losses.shape[0], dtype=torch.float64)
    grads = torch.autograd.grad((losses * upstream).sum(), leaves)
    ref_grads = torch.autograd.grad((ref_losses * upstream).sum(), ref_leaves)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad)
    assert not chosen_rewards.requires_grad


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_each_dpo_loss_type(loss_type, beta):
    required = {"label_smoothing": 0.05} if loss_type == "exo_pair" else {}  # EXO takes log(label_smoothing)
    check_against_reference(sequence_logps(), beta=beta, loss_type=loss_type, **required)
    if loss_type in SMOOTHING:
        check_against_reference(
            sequence_logps(seed=1), beta=beta, loss_type=loss_type, label_smoothing=SMOOTHING[loss_type]
        )


def test_dpo_loss_list_with_weights():
    check_against_reference(
        sequence_logps(), loss_type=["sigmoid", "bco_pair", "sppo_hard"], loss_weights=[0.8, 0.2, 1.0]
    )
    check_against_reference(sequence_logps(), loss_type=["apo_zero", "hinge"])


def test_sigmoid_dpo_is_the_paper_formula():
    chosen, rejected, ref_chosen, ref_rejected = sequence_logps()
    losses, _, _ = fastalign.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    logits = 0.3 * ((chosen - ref_chosen) - (rejected - ref_rejected))
    torch.testing.assert_close(losses, -torch.log(torch.sigmoid(logits)))


def test_discopop_stays_finite_for_very_negative_margins():
    losses, _, _ = fastalign.dpo_loss(
        torch.tensor([-900.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), loss_type="discopop"
    )
    assert torch.isfinite(losses).all()


@settings(max_examples=50, deadline=None)
@given(
    pairs=st.integers(0, 9),
    seed=st.integers(0, 1000),
    loss_type=st.sampled_from(DPO_LOSS_TYPES),
    beta=st.floats(0.01, 2.0),
)
def test_dpo_properties(pairs, seed, loss_type, beta):
    values = sequence_logps(pairs, seed)
    options = {"beta": beta, "loss_type": loss_type, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    losses, _, _ = fastalign.dpo_loss(*values, **options)
    assert losses.shape == (pairs,) and torch.isfinite(losses).all()
    if pairs:
        check_against_reference(values, **options)


DPO_ERRORS = [
    ({"loss_type": "kto"}, "loss_type must be one of"),
    ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "loss_weights must have one weight per loss type"),
    ({"loss_type": []}, "loss_type must name at least one loss"),
    ({"beta": 0.0}, "beta must be a finite number > 0"),
    ({"loss_type": "exo_pair"}, "label_smoothing for loss_type 'exo_pair' must be in (0.0, 1.0)"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing for loss_type 'robust' must be in [0.0, 0.5)"),
    ({"label_smoothing": 0.7}, "label_smoothing for loss_type 'sigmoid' must be in [0.0, 0.5]"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1 would be ignored: none of the loss types"),
    ({"discopop_tau": 0.0, "loss_type": "discopop"}, "discopop_tau must be a number > 0"),
]


@pytest.mark.parametrize(("options", "message"), DPO_ERRORS, ids=[m for _, m in DPO_ERRORS])
def test_dpo_loss_rejects(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fastalign.dpo_loss(*sequence_logps(), **options)


def test_dpo_loss_rejects_mismatched_shapes():
    chosen, rejected, ref_chosen, ref_rejected = sequence_logps()
    with pytest.raises(ValueError, match=re.escape("rejected_logps must have shape (6,) like chosen_logps")):
        fastalign.dpo_loss(chosen, rejected[:4], ref_chosen, ref_rejected)
    with pytest.raises(ValueError, match="must be a 1-D float tensor"):
        fastalign.dpo_loss(chosen[:, None], rejected, ref_chosen, ref_rejected)


@pytest.mark.parametrize("margin", [None, 0.5, "per_pair"])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_matches_reference(margin, center):
    gen = torch.Generator().manual_seed(5)
    chosen = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    if margin == "per_pair":
        margin = torch.rand(7, generator=gen, dtype=torch.float64)
    loss = fastalign.reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=center)
    ref = reference_losses.reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=center)
    torch.testing.assert_close(loss, ref)
    for grad, ref_grad in zip(
        torch.autograd.grad(loss, [chosen, rejected]), torch.autograd.grad(ref, [chosen, rejected]), strict=True
    ):
        torch.testing.assert_close(grad, ref_grad)


def test_reward_loss_takes_center_rewards_coef_as_a_deprecated_name():
    chosen, rejected = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    expected = fastalign.reward_loss(chosen, rejected, center_rewards_coefficient=0.01)
    with pytest.warns(DeprecationWarning, match=re.escape("reward_loss(center_rewards_coef=...) is deprecated")):
        assert torch.equal(fastalign.reward_loss(chosen, rejected, center_rewards_coef=0.01), expected)
    with pytest.raises(TypeError, match="the deprecated name of center_rewards_coefficient"):
        fastalign.reward_loss(chosen, rejected, center_rewards_coef=0.01, center_rewards_coefficient=0.01)


def test_dpo_options_bundle_equals_the_keywords():
    values = sequence_logps()
    keywords = {"beta": 0.2, "loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5], "label_smoothing": 0.1}
    options = fastalign.ops.DPOLossOptions(**keywords)
    assert options.types == ["sigmoid", "ipo"] and options.weights == [1.0, 0.5]
    got, want = fastalign.dpo_loss(*values, options=options), fastalign.dpo_loss(*values, **keywords)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    token_logps, mask, ref = token_inputs()
    got = dpo_loss_from_token_logps(token_logps, mask, ref, options=options)
    want = dpo_loss_from_token_logps(token_logps, mask, ref, **keywords)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    with pytest.raises(TypeError, match="not both"):
        fastalign.dpo_loss(*values, options=options, beta=0.3)


def test_reward_loss_edge_cases():
    assert fastalign.reward_loss(torch.zeros(0), torch.zeros(0)).item() == 0.0
    heads = torch.randn(4, 1)
    torch.testing.assert_close(fastalign.reward_loss(heads, -heads), fastalign.reward_loss(heads[:, 0], -heads[:, 0]))
    with pytest.raises(ValueError, match="margin must be a number or a \\[B\\] tensor"):
        fastalign.reward_loss(torch.zeros(3), torch.zeros(3), margin=torch.zeros(2))


def token_inputs(pairs=3, width=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    token_logps = -3 * torch.rand(2 * pairs, width, generator=gen, dtype=torch.float64)
    mask = torch.rand(2 * pairs, width, generator=gen) > 0.3
    mask[:, 0] = True
    ref = -20 * torch.rand(2 * pairs, generator=gen, dtype=torch.float64)
    return token_logps, mask, ref


FROM_TOKEN_CASES = [
    {"loss_type": name, "label_smoothing": SMOOTHING.get(name, 0.0) if name == "exo_pair" else 0.0}
    for name in DPO_LOSS_TYPES
] + [
    {"loss_type": "sigmoid", "label_smoothing": 0.2, "average_log_prob": True},
    {"loss_type": ["sigmoid", "ipo", "bco_pair"], "loss_weights": [1.0, 0.5, 0.25]},
    {"loss_type": ["robust", "sigmoid_norm"], "label_smoothing": 0.1, "average_log_prob": False},
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", FROM_TOKEN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_dpo_from_token_logps_matches_composition(backend, case):
    """The fused reduction + loss equals summing the tokens and calling the reference per type."""
    token_logps, mask, ref = token_inputs()
    dtype = torch.float64 if backend == "torch" else torch.float32
    leaf = token_logps.to(dtype).requires_grad_()
    losses, sums, lengths = dpo_loss_from_token_logps(leaf, mask, ref.to(dtype), beta=0.2, backend=backend, **case)
    ref_leaf = token_logps.clone().requires_grad_()
    ref_sums = (ref_leaf * mask).sum(-1)
    ref_lengths = mask.sum(-1).double()
    types = [case["loss_type"]] if isinstance(case["loss_type"], str) else case["loss_type"]
    weights = case.get("loss_weights") or [1.0] * len(types)
    pairs = mask.shape[0] // 2
    ref_losses = torch.zeros(pairs, dtype=torch.float64)
    for name, weight in zip(types, weights, strict=True):
        average = case.get("average_log_prob")
        scale = 1 / ref_lengths if (name in ("ipo", "sigmoid_norm") if average is None else average) else 1.0
        policy, reference = ref_sums * scale, ref * scale
        pair_losses, _, _ = reference_losses.dpo_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            beta=0.2,
            loss_type=name,
            label_smoothing=case.get("label_smoothing", 0.0) if name in SMOOTHING else 0.0,
        )
        ref_losses = ref_losses + weight * pair_losses
    tolerance = {} if backend == "torch" else {"rtol": 2e-5, "atol": 2e-5}
    torch.testing.assert_close(losses.double(), ref_losses, **tolerance)
    torch.testing.assert_close(sums.double(), ref_sums, **tolerance)
    torch.testing.assert_close(lengths.double(), ref_lengths)
    upstream = torch.linspace(0.5, 1.5, pairs, dtype=torch.float64)
    (grad,) = torch.autograd.grad((losses.double() * upstream).sum() + 0.3 * sums[:pairs].double().sum(), leaf)
    (ref_grad,) = torch.autograd.grad((ref_losses * upstream).sum() + 0.3 * ref_sums[:pairs].sum(), ref_leaf)
    torch.testing.assert_close(grad.double(), ref_grad, **tolerance)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", ALL_MASK_DTYPES, ids=str)
def test_dpo_triton_takes_every_mask_dtype_like_torch(dtype):
    """The DPO Triton path keeps exactly the tokens where ``mask != 0`` for a mask of any dtype (it used to fail
    to run for bfloat16 and float8 masks): losses, sums, lengths and the gradient."""
    token_logps, mask, ref = token_inputs()
    keep = mask != 0
    unusual = unusual_mask(keep, dtype)
    results = {}
    for backend in ("torch", "triton"):
        leaf = token_logps.float().requires_grad_()
        outputs = dpo_loss_from_token_logps(leaf, unusual, ref.float(), beta=0.2, loss_type="sigmoid", backend=backend)
        grad = torch.autograd.grad(outputs[0].sum() + outputs[1].sum(), leaf)[0]
        results[backend] = (*[o.detach() for o in outputs], grad)
    torch.testing.assert_close(results["triton"], results["torch"])

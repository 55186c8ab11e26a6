"""Edge cases of the public ops: ignored and empty inputs, huge logits, frozen heads, strided inputs."""

import functools
import math

import pytest
import torch
from helpers.linear_inputs import make_linear_inputs
from helpers.oracle import assert_matches_reference

import fastalign
from fastalign.ops import reference

BACKENDS = ["torch", "triton"]


def leaves(inputs, dtype=torch.float32):
    return {k: v.to(dtype).requires_grad_() if v.is_floating_point() else v.clone() for k, v in inputs.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_cross_entropy_is_zero_with_zero_gradients(backend, reduction):
    inputs = leaves(make_linear_inputs((3, 7), 16, 50, with_bias=True))
    inputs["targets"].fill_(-100)
    loss = fastalign.linear_cross_entropy(
        **inputs, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, backend=backend
    )
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    for name in ("hidden", "weight", "bias"):
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name])), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_positions_are_exactly_zero_and_pass_no_gradient(backend):
    inputs = leaves(make_linear_inputs((4, 9), 24, 70, ignore_every=3))
    ignored = inputs["targets"] == -100
    logp, entropy = fastalign.linear_logprobs(**inputs, return_entropy=True, temperature=0.9, backend=backend)
    assert torch.equal(logp[ignored], torch.zeros_like(logp[ignored]))
    assert torch.equal(entropy[ignored], torch.zeros_like(entropy[ignored]))
    assert (logp[~ignored] < 0).all() and (entropy[~ignored] > 0).all()
    (logp.exp() * torch.randn_like(logp) + entropy * torch.randn_like(entropy)).sum().backward()
    # Each hidden row feeds only its own token, so ignored rows get exactly zero gradient.
    assert torch.equal(inputs["hidden"].grad[ignored], torch.zeros_like(inputs["hidden"].grad[ignored]))
    assert inputs["hidden"].grad[~ignored].abs().sum(-1).min() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("leading", [(0,), (2, 0)], ids=str)
def test_empty_inputs_give_empty_outputs(backend, leading):
    inputs = leaves(make_linear_inputs(leading, 8, 30, with_bias=True))
    logp, entropy = fastalign.linear_logprobs(**inputs, return_entropy=True, backend=backend)
    assert logp.shape == entropy.shape == leading
    loss = fastalign.linear_cross_entropy(**inputs, backend=backend)
    assert loss.item() == 0.0
    (loss + logp.sum() + entropy.sum()).backward()
    assert torch.equal(inputs["weight"].grad, torch.zeros_like(inputs["weight"]))
    assert inputs["hidden"].grad.shape == inputs["hidden"].shape
    logits = torch.randn(*leading, 30, requires_grad=True)
    assert fastalign.logprobs_from_logits(logits, inputs["targets"], backend=backend).shape == leading


# Logits of ±3e38 overflow to -inf when centred (exp gives 0, as intended); triton's interpreter warns on it.
@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_stay_finite_and_accurate(backend):
    inputs = make_linear_inputs((2, 9), 16, 60, with_bias=True)
    inputs["hidden"] = inputs["hidden"] * 1e3  # logits of order 1e4
    errors = assert_matches_reference(
        functools.partial(fastalign.linear_logprobs, backend=backend),
        reference.linear_logprobs,
        inputs,
        torch.float32,
        against_eager=True,
        return_entropy=True,
    )
    assert all(math.isfinite(e) for e in errors.values())
    logits = torch.full((3, 40), 3e38)
    logits[:, 0] = -3e38
    logp = fastalign.logprobs_from_logits(logits, torch.tensor([0, 1, 2]), backend=backend)
    assert torch.isfinite(logp[1:]).all() and logp[0] == -math.inf


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_infinity_logits_are_excluded(backend):
    """A bias of -inf bans tokens: they get probability 0 and no NaN appears anywhere."""
    inputs = leaves(make_linear_inputs((2, 5), 8, 40, with_bias=True, ignore_every=0))
    with torch.no_grad():
        inputs["bias"][20:] = -math.inf
    inputs["targets"].clamp_(max=19)
    logp, entropy = fastalign.linear_logprobs(**inputs, return_entropy=True, backend=backend)
    kept = {k: (v[:20].detach() if k in ("weight", "bias") else v) for k, v in inputs.items()}
    ref_logp, ref_entropy = reference.linear_logprobs(**kept, return_entropy=True)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, ref_entropy, rtol=1e-5, atol=1e-5)
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(inputs["hidden"].grad).all() and torch.isfinite(inputs["weight"].grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gives_hidden_gradient_only(backend):
    inputs = make_linear_inputs((3, 8), 24, 90)
    hidden = inputs["hidden"].float().requires_grad_()
    weight = inputs["weight"].float()
    logp = fastalign.linear_logprobs(hidden, weight, inputs["targets"], backend=backend)
    (grad,) = torch.autograd.grad(logp.sum(), hidden)
    ref_hidden = inputs["hidden"].clone().requires_grad_()
    ref = reference.linear_logprobs(ref_hidden, inputs["weight"], inputs["targets"])
    (ref_grad,) = torch.autograd.grad(ref.sum(), ref_hidden)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_gradient_style_composition(backend):
    """The outputs are an autograd op: a clipped-ratio loss with an entropy bonus sits on top of them."""

    def ppo_like(op, hidden, weight, targets):
        logp, entropy = op(hidden, weight, targets, return_entropy=True, temperature=0.8)
        ratio = torch.exp(logp - logp.detach() + 0.1)
        advantages = torch.linspace(-1, 1, logp.shape[-1], dtype=logp.dtype)
        clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        return clipped.mean() - 0.01 * entropy.mean()

    inputs = make_linear_inputs((4, 6), 16, 64)
    assert_matches_reference(
        lambda **kw: ppo_like(functools.partial(fastalign.linear_logprobs, backend=backend), **kw),
        lambda **kw: ppo_like(reference.linear_logprobs, **kw),
        inputs,
        torch.float32,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    inputs = make_linear_inputs((5, 3), 16, 50, with_bias=True)
    hidden = inputs["hidden"].float().transpose(0, 1)  # [3, 5, D], not contiguous
    weight = inputs["weight"].float().T.contiguous().T  # column-major [V, D]
    targets = inputs["targets"].T
    logp = fastalign.linear_logprobs(hidden, weight, targets, bias=inputs["bias"].float(), backend=backend)
    ref = reference.linear_logprobs(hidden.double(), weight.double(), targets, bias=inputs["bias"])
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-5)
    wide = torch.randn(3, 5, 80)
    logits = wide[..., 10:60]  # rows strided by 80
    logp = fastalign.logprobs_from_logits(logits, targets, backend=backend)
    torch.testing.assert_close(logp, reference.logprobs_from_logits(logits, targets), rtol=1e-5, atol=1e-5)


def test_inference_under_no_grad():
    inputs = make_linear_inputs((2, 4), 8, 20)
    with torch.no_grad():
        logp = fastalign.linear_logprobs(inputs["hidden"].requires_grad_(), inputs["weight"], inputs["targets"])
    assert logp.grad_fn is None

"""fastalign.nn.LinearPolicyLoss against liger-kernel's chunked GRPO loss (``LigerFusedLinearGRPOLoss``, its
torch path) on the same hidden states, head and options, on the CPU: every loss type both have, delta, the
bias-corrected KL and the rollout-engine importance weights. Both compute from the formulas in float32, so the
loss and the gradients of the hidden states and the head agree to float32 rounding (≤ 1e-5 relative)."""

import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

import fastalign

B, T, D, V = 4, 7, 16, 53
CASES = {
    "dapo": {"loss_type": "dapo"},
    "grpo-kl": {"loss_type": "grpo", "beta": 0.1},
    "bnpo": {"loss_type": "bnpo"},
    "dr_grpo": {"loss_type": "dr_grpo", "max_completion_length": T},
    "cispo": {"loss_type": "cispo", "epsilon_high": 1.1},
    "sapo": {"loss_type": "sapo"},
    "sapo-kl-temperatures": {"loss_type": "sapo", "beta": 0.05, "sapo_temperature_pos": 0.7, "sapo_temperature_neg": 2},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    "vespo": {"loss_type": "vespo", "vespo_k_neg": 2.5, "vespo_lambda_pos": 2.0},
    "delta": {"loss_type": "dapo", "delta": 1.1},
    "gspo-bias-corrected-kl": {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.1,
                               "use_bias_correction_kl": True},
    "bias-corrected-kl": {"loss_type": "dapo", "beta": 0.1, "use_bias_correction_kl": True},
    "is-weights": {"loss_type": "dapo", "vllm": True},
    "vespo-is-weights": {"loss_type": "vespo", "vllm": True},
}  # fmt: skip
SHARED = ("loss_type", "max_completion_length", "importance_sampling_level", "delta", "use_bias_correction_kl")
SHARED += ("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg")


def inputs():
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(B, T, D, generator=gen), 0.3 * torch.randn(V, D, generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones(B, T)
    mask[1, 5:], mask[3, 2:] = 0, 0
    with torch.no_grad():
        logps = fastalign.linear_logprobs(hidden, weight, targets)
    old = logps + 0.3 * torch.randn(B, T, generator=gen)
    ref = logps + 0.3 * torch.randn(B, T, generator=gen)
    # The engine's ratios are exactly 1 off the mask, as TRL forms them (exp of a masked log-ratio difference).
    is_weights = torch.where(mask.bool(), 0.75 + 0.5 * torch.rand(B, T, generator=gen), 1.0)
    return hidden, weight, targets, mask, old, ref, torch.randn(B, generator=gen), is_weights


def loss_and_grads(loss_fn, hidden, weight):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight)
    return [loss.detach(), *torch.autograd.grad(loss, [hidden, weight])]


@pytest.mark.parametrize("name", CASES)
def test_linear_policy_loss_matches_liger_grpo(name):
    case = dict(CASES[name])
    use_is = case.pop("vllm", False)
    beta, epsilon_high = case.pop("beta", 0.0), case.pop("epsilon_high", 0.28)
    hidden, weight, targets, mask, old, ref, advantages, is_weights = inputs()
    liger = LigerFusedLinearGRPOLoss(
        compiled=False, use_ref_model=beta != 0, beta=beta, epsilon_low=0.2, epsilon_high=epsilon_high, **case
    )
    ours = fastalign.nn.LinearPolicyLoss(
        clip_eps_low=0.2, clip_eps_high=epsilon_high, kl_coef=beta, kl_estimator="k3", **case
    )
    extra = {"ref_per_token_logps": ref if beta else None, "vllm_is_ratio": is_weights if use_is else None}

    def theirs(h, w):
        return liger(h, w, targets, mask, advantages, old_per_token_logps=old, **extra)[0]

    def mine(h, w):
        kwargs = {"ref_logps": ref if beta else None, "is_weights": is_weights if use_is else None}
        return ours(h, w, targets, old, advantages, mask=mask.bool(), **kwargs)[0]

    assert set(case) <= set(SHARED)
    for got, want in zip(loss_and_grads(mine, hidden, weight), loss_and_grads(theirs, hidden, weight), strict=True):
        scale = want.abs().max()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(scale))

"""The differentiable public ops: argument checks, autograd, backend dispatch. Imports nothing above it."""

from fastalign.ops.advantages import gae, group_advantages
from fastalign.ops.cross_entropy import linear_cross_entropy
from fastalign.ops.dispatch import (
    BackendStatus,
    BackendUnavailableError,
    backends,
    set_linear_backward,
    set_scratch_budget,
)
from fastalign.ops.distill import linear_distill_loss
from fastalign.ops.logprobs import linear_logprobs, logprobs_from_logits
from fastalign.ops.policy import PolicyLossOptions, policy_loss, value_loss
from fastalign.ops.preference import DPOLossOptions, dpo_loss, dpo_loss_from_token_logps, reward_loss

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "DPOLossOptions",
    "PolicyLossOptions",
    "backends",
    "dpo_loss",
    "dpo_loss_from_token_logps",
    "gae",
    "group_advantages",
    "linear_cross_entropy",
    "linear_distill_loss",
    "linear_logprobs",
    "logprobs_from_logits",
    "policy_loss",
    "reward_loss",
    "set_linear_backward",
    "set_scratch_budget",
    "value_loss",
]

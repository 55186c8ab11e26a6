"""fastalign: fused kernels and thin trainers for aligning language models.

The public ops compute what alignment training needs straight from hidden states and the lm_head weight,
without materialising the ``[tokens, vocab]`` logits, and the losses of every RL / preference stage on top.
"""

from fastalign import nn
from fastalign.ops import (
    BackendStatus,
    BackendUnavailableError,
    backends,
    dpo_loss,
    dpo_loss_from_token_logps,
    gae,
    group_advantages,
    linear_cross_entropy,
    linear_logprobs,
    logprobs_from_logits,
    policy_loss,
    reward_loss,
    set_scratch_budget,
    value_loss,
)

__version__ = "0.1.0"

# The trainers pull in transformers.Trainer, accelerate and datasets: imported on first use, so that
# `import fastalign` for the ops stays light.
_TRAINER_NAMES = (
    "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig",
    "RewardTrainer", "SFTConfig", "SFTTrainer",
)  # fmt: skip
# fastalign.models (patch_model) is imported on first use as well.
_MODEL_NAMES = ("patch_model", "unpatch_model")


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from fastalign import trainers

        return getattr(trainers, name)
    if name in _MODEL_NAMES:
        from fastalign.models import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'fastalign' has no attribute {name!r}")


__all__ = [
    *_TRAINER_NAMES,
    *_MODEL_NAMES,
    "BackendStatus",
    "BackendUnavailableError",
    "__version__",
    "backends",
    "dpo_loss",
    "dpo_loss_from_token_logps",
    "gae",
    "group_advantages",
    "linear_cross_entropy",
    "linear_logprobs",
    "logprobs_from_logits",
    "nn",
    "policy_loss",
    "reward_loss",
    "set_scratch_budget",
    "value_loss",
]

"""fastalign: fused kernels and thin trainers for aligning language models.

The public ops compute what alignment training needs straight from hidden states and the lm_head weight,
without materialising the ``[tokens, vocab]`` logits, and the losses of every RL / preference stage on top.

Every name here is imported on first use: ``import fastalign`` itself loads neither torch nor transformers, so
the ``fastalign`` command answers ``--help`` and argument errors without them, and ``import fastalign`` for the
ops never pulls in the trainers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_OPS_NAMES = (
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
)
# The trainers pull in transformers.Trainer, accelerate and datasets.
_TRAINER_NAMES = (
    "DistillConfig",
    "DistillTrainer",
    "DPOConfig",
    "DPOTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
)
_MODEL_NAMES = ("patch_model", "unpatch_model")
_HOME = {
    **dict.fromkeys(_OPS_NAMES, "fastalign.ops"),
    **dict.fromkeys(_TRAINER_NAMES, "fastalign.trainers"),
    **dict.fromkeys(_MODEL_NAMES, "fastalign.models.patch"),
    "nn": "fastalign.nn",
}


def __getattr__(name: str):
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'fastalign' has no attribute {name!r}")
    module = importlib.import_module(home)
    value = module if name == "nn" else getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__all__ = [*_OPS_NAMES, *_TRAINER_NAMES, *_MODEL_NAMES, "__version__", "nn"]

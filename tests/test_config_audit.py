"""Every trainer config field is honoured, or refused when set: the refusals, with the field named, before any
model loads; and an inventory that maps each field the configs declare to the test showing it is honoured or to
its refusal, so that a new field cannot go unaudited."""

import math

import pytest

from fastalign.trainers.configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig

BASE = {"output_dir": "unused", "use_cpu": True, "report_to": [], "bf16": False}
CONFIGS = (SFTConfig, RewardConfig, DPOConfig, GRPOConfig, PPOConfig)
ONLINE = (GRPOConfig, PPOConfig)
ONLINE_REFUSED = [
    ("train_sampling_strategy", "group_by_length"), ("dataloader_num_workers", 2),
    ("dataloader_persistent_workers", True),
    ("include_num_input_tokens_seen", "all"), ("auto_find_batch_size", True), ("neftune_noise_alpha", 5.0),
    ("remove_unused_columns", True), ("label_smoothing_factor", 0.1),
]  # fmt: skip

# (config, field, value, what the message says): refused when the config is built.
REFUSED = [
    *[(c, "per_device_train_batch_size", 0, "per_device_train_batch_size must be an int >= 1") for c in CONFIGS],
    *[(c, "learning_rate", -1e-5, "learning_rate must be a finite number >= 0") for c in CONFIGS],
    (SFTConfig, "learning_rate", math.nan, "learning_rate must be a finite number >= 0"),
    (SFTConfig, "per_device_eval_batch_size", 0, "per_device_eval_batch_size must be an int >= 1"),
    (SFTConfig, "gradient_accumulation_steps", 0, "gradient_accumulation_steps must be an int >= 1"),
    (SFTConfig, "label_smoothing_factor", 2, r"label_smoothing_factor must be a number in \[0, 1\]"),
    (SFTConfig, "label_smoothing_factor", -0.1, r"label_smoothing_factor must be a number in \[0, 1\]"),
    (RewardConfig, "center_rewards_coefficient", -1.0, "center_rewards_coefficient must be None or a finite"),
    (RewardConfig, "label_smoothing_factor", 0.1, "label_smoothing_factor=0.1: RewardTrainer does not honour"),
    (RewardConfig, "backend", "triton", "backend='triton': RewardTrainer does not honour"),
    (DPOConfig, "label_smoothing_factor", 0.1, "DPO's own label smoothing is the label_smoothing field"),
    (DPOConfig, "f_alpha_divergence_coef", 0.3, "f_alpha_divergence_coef=0.3: DPOTrainer does not honour"),
    (DPOConfig, "ref_model_mixup_alpha", 0.5, "ref_model_mixup_alpha=0.5: DPOTrainer does not honour"),
    (DPOConfig, "ref_model_sync_steps", 64, "ref_model_sync_steps=64: DPOTrainer does not honour"),
    (GRPOConfig, "beta", -0.5, "beta must be a finite number >= 0"),
    (GRPOConfig, "epsilon", -0.1, "epsilon must be a finite number >= 0"),
    (GRPOConfig, "entropy_coef", -0.1, "entropy_coef must be a finite number >= 0"),
    (GRPOConfig, "epsilon_high", -0.1, "epsilon_high must be None or a number >= 0"),
    (GRPOConfig, "num_completions_to_print", 0, "num_completions_to_print must be None or >= 1"),
    (PPOConfig, "dataset_num_proc", 4, "dataset_num_proc=4: PPOTrainer does not honour"),
    *[(c, name, value, f"{name}=.*: {c.__name__[:-6]}Trainer does not honour") for c in ONLINE
      for name, value in ONLINE_REFUSED],
]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "name", "value", "message"), REFUSED, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, _ in REFUSED]
)
def test_refused_when_the_config_is_built(config, name, value, message):
    with pytest.raises(ValueError, match=message):
        config(**{**BASE, name: value})


def test_grpo_eval_batches_are_whole_groups():
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size \(6 completions\) must be a multiple of"):
        GRPOConfig(**BASE, num_generations=4, per_device_eval_batch_size=6, eval_strategy="steps", eval_steps=1)
    GRPOConfig(**BASE, num_generations=4, per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=1)


@pytest.mark.parametrize("config", CONFIGS)
def test_defaults_are_accepted(config):
    config(**BASE)

"""Thin trainers over the fused ops, on ``transformers.Trainer``, with TRL 1.x's names and defaults."""

from fastalign.trainers.configs import (
    DistillConfig,
    DPOConfig,
    GRPOConfig,
    ModelConfig,
    PPOConfig,
    RewardConfig,
    ScriptArguments,
    SFTConfig,
)
from fastalign.trainers.distill import DistillTrainer
from fastalign.trainers.dpo import DPOTrainer, prepare_dpo_dataset
from fastalign.trainers.grpo import GRPOTrainer
from fastalign.trainers.ppo import PPOTrainer
from fastalign.trainers.reward import RewardTrainer
from fastalign.trainers.sft import SFTTrainer, prepare_sft_dataset

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "DistillConfig",
    "DistillTrainer",
    "GRPOConfig",
    "GRPOTrainer",
    "ModelConfig",
    "PPOConfig",
    "PPOTrainer",
    "RewardConfig",
    "RewardTrainer",
    "SFTConfig",
    "SFTTrainer",
    "ScriptArguments",
    "prepare_dpo_dataset",
    "prepare_sft_dataset",
]

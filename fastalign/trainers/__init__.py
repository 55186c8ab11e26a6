"""Thin trainers over the fused ops, on ``transformers.Trainer``, with TRL 1.x's names and defaults."""

from fastalign.trainers.configs import ModelConfig, ScriptArguments, SFTConfig
from fastalign.trainers.sft import SFTTrainer, prepare_sft_dataset

__all__ = ["ModelConfig", "SFTConfig", "SFTTrainer", "ScriptArguments", "prepare_sft_dataset"]

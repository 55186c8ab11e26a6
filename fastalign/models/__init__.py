"""Hugging Face model adapters: backbone -> hidden states and lm_head access for the fused ops, value/reward heads,
and patch_model (one model's forward(labels=...) through the fused cross-entropy)."""

from fastalign.models.causal_lm import (
    CausalLMAdapter,
    load_causal_lm,
    select_attention_implementation,
    shift_labels,
    unwrap_peft,
)
from fastalign.models.heads import PolicyAndValueModel, ValueHeadModel, load_reward_model, sequence_rewards
from fastalign.models.patch import patch_model, unpatch_model

__all__ = [
    "CausalLMAdapter",
    "PolicyAndValueModel",
    "ValueHeadModel",
    "load_causal_lm",
    "load_reward_model",
    "patch_model",
    "select_attention_implementation",
    "sequence_rewards",
    "shift_labels",
    "unpatch_model",
    "unwrap_peft",
]

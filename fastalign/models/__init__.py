"""Hugging Face model adapters: backbone -> hidden states and lm_head access for the fused ops, value/reward heads."""

from fastalign.models.causal_lm import (
    CausalLMAdapter,
    load_causal_lm,
    select_attention_implementation,
    shift_labels,
    unwrap_peft,
)
from fastalign.models.heads import ValueHeadModel, load_reward_model, sequence_rewards

__all__ = [
    "CausalLMAdapter",
    "ValueHeadModel",
    "load_causal_lm",
    "load_reward_model",
    "select_attention_implementation",
    "sequence_rewards",
    "shift_labels",
    "unwrap_peft",
]

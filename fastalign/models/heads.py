"""Scalar heads on a causal-LM backbone: a per-token value head (PPO critic), the policy and value model PPO trains
as one module, and a sequence reward model."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from fastalign.models.causal_lm import CausalLMAdapter, _text_config, resolve_attention, unwrap_peft
from fastalign.models.paths import check_model_path

__all__ = ["PolicyAndValueModel", "ValueHeadModel", "load_reward_model", "sequence_rewards"]


class ValueHeadModel(torch.nn.Module):
    """A causal-LM backbone plus ``nn.Linear(D, 1)``: one value per token, the PPO critic.

    Built from a causal LM (its lm_head is dropped: a critic never needs it), a bare backbone (``AutoModel``)
    or a ``PeftModel`` around either (the LoRA layers stay in the backbone). The head is kept in float32
    whatever the backbone dtype, because value regression targets are small differences of returns. Save and
    load with ``state_dict()`` / ``load_state_dict()``.

    ``forward(input_ids [B, T], attention_mask [B, T] | None, position_ids=None) -> values [B, T]`` float32.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        model = unwrap_peft(model)
        # base_model is the decoder stack for a *ForCausalLM and the model itself for an AutoModel backbone.
        self.backbone = model.base_model
        hidden_size = _text_config(model.config).hidden_size
        self.value_head = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        # Small init so the first values are near zero but the backbone still receives a gradient.
        torch.nn.init.normal_(self.value_head.weight, std=1.0 / (hidden_size + 1))
        torch.nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> ValueHeadModel:
        """Load the backbone only (``AutoModel``, no lm_head weights in memory) and add a fresh value head."""
        from transformers import AutoModel

        if dtype is not None:
            kwargs["dtype"] = dtype
        attn_implementation = resolve_attention(AutoModel, name_or_path, attn_implementation, kwargs)
        backbone = AutoModel.from_pretrained(name_or_path, attn_implementation=attn_implementation, **kwargs)
        return cls(backbone)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )[0]
        return self.value_head(hidden.float()).squeeze(-1)


class PolicyAndValueModel(torch.nn.Module):
    """The policy (a causal LM, or a ``PeftModel`` around one) and the value model side by side: the one module
    ``Trainer`` optimises, so both sets of parameters share its optimiser (TRL's ``PolicyAndValueWrapper``).

    ``forward(input_ids, attention_mask, position_ids) -> (hidden [B, T, D], values [B, T])``: the policy
    backbone's last hidden states (no lm_head) and the value of every position (float32).

    ``forward(..., head=fn)`` returns ``fn(hidden, weight, bias, values)`` instead, with the lm_head ``weight
    [V, D]`` and ``bias [V] | None``: a loss on the lm_head computed *inside* this module's forward, which is
    what a distributed wrapper runs (DDP then finds the lm_head in the graph; FSDP2, sharding this module as
    the root, has gathered the lm_head and the embeddings there). ``values=False`` skips the value model
    (``fn`` gets ``None``). A forward that returned only the hidden states, with the loss applied after it,
    would not do: ``Trainer`` wraps a module that is not a ``PreTrainedModel`` in DDP with
    ``find_unused_parameters=True``, which would mark the lm_head unused (its gradient then fails the reducer),
    and FSDP2 hands out the gathered lm_head only inside the root's forward.
    """

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.adapter = CausalLMAdapter(policy)  # holds no parameters: a view of the policy

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None], Any] | None = None,
        values: bool = True,
    ) -> Any:
        hidden = self.adapter.hidden_states(input_ids, attention_mask, position_ids=position_ids)
        value = self.value_model(input_ids, attention_mask, position_ids=position_ids) if values else None
        if head is None:
            return hidden, value
        return head(hidden, self.adapter.weight, self.adapter.bias, value)

    @classmethod
    def from_policy(cls, policy: torch.nn.Module, value_model: torch.nn.Module | None = None) -> PolicyAndValueModel:
        """The policy beside ``value_model``, by default a value model initialised from a copy of the policy's
        backbone (TRL initialises it from the reward model or the SFT policy; the policy is what is always at
        hand) with a fresh value head. Under PEFT the copy drops the LoRA layers and trains fully."""
        if value_model is None:
            peft = sys.modules.get("peft")
            if peft is not None and isinstance(policy, peft.PeftModel):
                base = copy.deepcopy(policy).unload()  # the base weights without LoRA layers
            else:
                base = copy.deepcopy(policy)
            value_model = ValueHeadModel(base).requires_grad_(True)
        return cls(policy, value_model)

    def save_value_model(self, output_dir: str) -> None:
        """The value model's state dict as ``output_dir/value_model.safetensors``."""
        import safetensors.torch

        state = {k: v.contiguous() for k, v in self.value_model.state_dict().items()}
        safetensors.torch.save_file(state, os.path.join(output_dir, "value_model.safetensors"))

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        for module in (unwrap_peft(self.policy), getattr(self.value_model, "backbone", self.value_model)):
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        for module in (unwrap_peft(self.policy), getattr(self.value_model, "backbone", self.value_model)):
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()


def load_reward_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    pad_token_id: int | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """``AutoModelForSequenceClassification.from_pretrained(num_labels=1)``: a scalar reward model.

    ``pad_token_id`` is written into the config when given: the model pools at the last token that is not
    ``pad_token_id`` (see :func:`sequence_rewards`), and without one it cannot score a padded batch.
    """
    from transformers import AutoModelForSequenceClassification

    check_model_path(name_or_path)  # a missing local folder: FileNotFoundError, not a hub repo-id error
    attn_implementation = resolve_attention(
        AutoModelForSequenceClassification, name_or_path, attn_implementation, kwargs
    )
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, num_labels=1, attn_implementation=attn_implementation, **kwargs
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def sequence_rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar reward per row: the score head at the row's last non-pad token.

    Uses the Hugging Face model's own pooling (``logits[:, 0]`` of ``*ForSequenceClassification``): it takes
    the rightmost position whose token is not ``config.pad_token_id``, so both left and right padding work.
    Caveat of that rule: if the pad token is also the EOS token, a trailing EOS counts as padding and the score
    is read at the token before it.

    Args:
        model: a ``*ForSequenceClassification`` with ``num_labels=1`` (see :func:`load_reward_model`).
        input_ids: ``[B, T]`` int64. attention_mask: ``[B, T]``, 1 = token, 0 = pad.

    Returns:
        ``[B]`` float32 rewards.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, 0].float()

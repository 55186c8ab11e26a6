"""Scalar heads on a causal-LM backbone: a per-token value head (PPO critic) and a sequence reward model."""

from __future__ import annotations

from typing import Any

import torch

from fastalign.models.causal_lm import _text_config, resolve_attention, unwrap_peft
from fastalign.models.paths import check_model_path

__all__ = ["ValueHeadModel", "load_reward_model", "sequence_rewards"]


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

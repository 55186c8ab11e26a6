"""Supervised fine-tuning (and pre-training: SFT on ``text`` with packing) on ``transformers.Trainer``.

The loss is :func:`fastalign.linear_cross_entropy` on the backbone's hidden states and the lm_head weight, so
the ``[tokens, vocab]`` logits never exist; everything else (optimiser, schedule, logging, checkpoints in
safetensors, resume) is ``transformers.Trainer``'s. Constructor keywords and config fields follow TRL 1.x.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedModel, Trainer

from fastalign.data import SFTCollator, pack_sequences, require_format, tokenize_dataset
from fastalign.models import shift_labels
from fastalign.trainers._common import (
    FusedLossTrainerMixin,
    ItemCount,
    LossInputs,
    LossOutput,
    NumTokensLogMixin,
    TrainTokenCount,
    load_policy_and_tokenizer,
    prepare_splits,
    set_pad_token,
)
from fastalign.trainers._guards import FiniteLossMixin, ResumeMixin
from fastalign.trainers.configs import SFTConfig


def prepare_sft_dataset(dataset: datasets.Dataset, tokenizer: Any, args: SFTConfig) -> datasets.Dataset:
    """Tokenise (unless ``input_ids`` are already there) and, with ``args.packing``, pack into ``max_length`` rows.

    Raises ``ValueError`` naming the missing columns when the dataset is in no SFT format.
    """
    if "input_ids" in dataset.column_names:
        return dataset
    if args.dataset_text_field != "text" and args.dataset_text_field in dataset.column_names:
        dataset = dataset.rename_column(args.dataset_text_field, "text")
    require_format(dataset, "sft")
    completion_only = True if args.completion_only_loss is None else args.completion_only_loss
    tokenized = tokenize_dataset(
        dataset, tokenizer, "sft", num_proc=args.dataset_num_proc,
        max_length=None if args.packing else args.max_length, completion_only_loss=completion_only,
    )  # fmt: skip
    if not args.packing:
        return tokenized
    if args.max_length is None:
        raise ValueError("packing=True needs max_length (the packed rows' length)")
    return datasets.Dataset.from_list(pack_sequences(tokenized, args.max_length))


def _uses_flash_attention(model: nn.Module) -> bool:
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    return implementation.startswith("flash_attention")


class SFTTrainer(FiniteLossMixin, ResumeMixin, NumTokensLogMixin, FusedLossTrainerMixin, Trainer):
    """SFT with fastalign's fused cross-entropy (TRL's ``SFTTrainer`` keywords).

    Args:
        model: a causal LM, or its name/path (loaded with :func:`fastalign.models.load_causal_lm`).
        args: :class:`SFTConfig` (default: ``output_dir="fastalign-sft"``).
        train_dataset / eval_dataset: ``datasets.Dataset`` in a TRL SFT format (``text``, ``messages``,
            ``prompt`` + ``completion``) or already tokenised (``input_ids`` [+ ``completion_mask``]).
        processing_class: the tokenizer (default: loaded from the model's name).
        peft_config: a ``peft`` config: the model is wrapped with ``peft.get_peft_model``.
    """

    signature_columns = ("input_ids", "completion_mask", "labels", "position_ids")

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: SFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else SFTConfig(output_dir="fastalign-sft")
        model, processing_class = load_policy_and_tokenizer(model, processing_class)
        if args.eos_token is not None:
            processing_class.eos_token = args.eos_token
        set_pad_token(processing_class, args.pad_token)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        train_dataset, eval_dataset = prepare_splits(
            train_dataset, eval_dataset, lambda split: prepare_sft_dataset(split, processing_class, args)
        )
        if data_collator is None:
            # Packed rows go padding-free whenever the attention can separate documents by position_ids.
            padding_free = args.padding_free or (args.packing and _uses_flash_attention(model))
            data_collator = SFTCollator(processing_class.pad_token_id, padding_free=padding_free)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )  # fmt: skip
        self._train_tokens = TrainTokenCount()

    def compute_loss(
        self, model: nn.Module, inputs: LossInputs, return_outputs: bool = False, num_items_in_batch: ItemCount = None
    ) -> LossOutput:
        """Mean next-token cross-entropy over the label tokens of the whole (gradient-accumulated) batch, with
        ``label_smoothing_factor`` as the fused op's label smoothing (``Trainer``'s ``LabelSmoother`` is the same
        ``(1 - ε)·nll + ε·mean over the vocabulary of -log p``).

        ``num_items_in_batch`` (counted by ``Trainer`` over every micro-batch of the optimiser step) makes the
        loss a token mean over the step rather than a mean of micro-batch means, as transformers' own loss does.
        """
        targets = shift_labels(inputs["labels"])
        loss_sum = self._adapter(model).cross_entropy_loss(
            inputs["input_ids"], inputs.get("attention_mask"), targets, position_ids=inputs.get("position_ids"),
            reduction="sum", label_smoothing=self.args.label_smoothing_factor, backend=self.args.backend,
        )  # fmt: skip
        loss = self._token_mean(loss_sum, num_items_in_batch, targets)
        if model.training:
            self._watch_loss(loss, {})
            mask = inputs.get("attention_mask")
            self._train_tokens.add(mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel()))
        return (loss, {}) if return_outputs else loss

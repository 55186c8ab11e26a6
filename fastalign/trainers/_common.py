"""Pieces every fastalign trainer shares: the adapter cache, the columns Trainer keeps, dataset preparation for
the train and eval splits, the pad token, and switching dropout off."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastalign.models import CausalLMAdapter, load_causal_lm

LossInputs = dict[str, torch.Tensor]
"""A micro-batch as ``Trainer.compute_loss`` gets it from the collator."""
LossOutput = torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]
"""What ``compute_loss`` returns: the loss, or ``(loss, metrics)`` with ``return_outputs=True``."""
ItemCount = torch.Tensor | int | None
"""``compute_loss``'s ``num_items_in_batch``: Trainer's count of label tokens over the optimiser step, or None."""


class TrainTokenCount:
    """Training tokens seen so far (TRL's ``num_tokens`` metric): added on the device every step, summed over
    the processes and read on the host only when the trainer logs."""

    def __init__(self) -> None:
        self.total = 0
        self._pending: torch.Tensor | None = None

    def add(self, tokens: torch.Tensor) -> None:
        """Count ``tokens`` (an integer scalar tensor) more tokens of this process."""
        tokens = tokens.detach().reshape(1)
        self._pending = tokens if self._pending is None else self._pending + tokens

    def read(self, accelerator: Any) -> int:
        """The running total over all processes (every process must call it, as ``Trainer.log`` does)."""
        if self._pending is not None:
            self.total += int(accelerator.gather(self._pending).sum().item())
            self._pending = None
        return self.total


class NumTokensLogMixin:
    """For ``Trainer`` subclasses that count their training tokens in ``self._train_tokens``
    (:class:`TrainTokenCount`): training logs get TRL's ``num_tokens``."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            logs = {**logs, "num_tokens": float(self._train_tokens.read(self.accelerator))}
        super().log(logs, start_time)


class FusedLossTrainerMixin:
    """For ``transformers.Trainer`` subclasses whose loss runs the backbone through a :class:`CausalLMAdapter`.

    ``signature_columns``: the dataset columns the collator reads (Trainer drops every other column unless
    told which to keep).
    """

    signature_columns: tuple[str, ...] = ()

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = list(self.signature_columns)

    def _adapter(self, model: nn.Module) -> CausalLMAdapter:
        """The adapter of ``model`` as Trainer passes it (wrapped in DDP / sharded by FSDP2 in multi-process runs:
        the adapter runs the fused loss through the wrapper, see :meth:`CausalLMAdapter.fused_forward`)."""
        adapters = self.__dict__.setdefault("_adapters", {})
        if id(model) not in adapters:
            adapters[id(model)] = CausalLMAdapter(model)
        return adapters[id(model)]

    def _token_mean(
        self, loss_sum: torch.Tensor, num_items_in_batch: torch.Tensor | int | None, targets: torch.Tensor
    ) -> torch.Tensor:
        """``loss_sum`` (this process's summed token losses, float32 scalar) as its share of the step's token mean.

        The divisor is ``num_items_in_batch`` (Trainer's count of label tokens over the optimiser step's
        micro-batches) or, without one, the non-ignored ``targets`` of this micro-batch. With
        ``average_tokens_across_devices`` Trainer sums that count over the processes, while DDP and FSDP average
        the gradients over them: the share is scaled by the number of processes so that the averaged gradient is
        the gradient of the global token mean (what ``Trainer.compute_loss`` does for a model's own loss).
        """
        if num_items_in_batch is None:
            return loss_sum / (targets != -100).sum().clamp_min(1)
        tokens = torch.as_tensor(num_items_in_batch, device=loss_sum.device).clamp_min(1)
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return loss_sum * processes / tokens


class LossOnlyPredictionMixin:
    """For ``Trainer`` subclasses whose evaluation reads only the loss: ``prediction_step`` returns
    ``(loss, None, None)`` (there are no logits to return: the fused losses never build them)."""

    def prediction_step(
        self, model: nn.Module, inputs: Any, prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def prepare_splits(train_dataset: Any, eval_dataset: Any, prepare: Callable[[Any], Any]) -> tuple[Any, Any]:
    """``prepare`` applied to the train split and to the eval split (or to each of a dict of eval splits)."""
    if train_dataset is not None:
        train_dataset = prepare(train_dataset)
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: prepare(split) for name, split in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = prepare(eval_dataset)
    return train_dataset, eval_dataset


def load_policy_and_tokenizer(model: Any, processing_class: Any) -> tuple[nn.Module, Any]:
    """A causal LM given by name/path is loaded (:func:`fastalign.models.load_causal_lm`); a missing tokenizer
    is the model's own."""
    if isinstance(model, str):
        model = load_causal_lm(model)
    if processing_class is None:
        from transformers import AutoTokenizer

        processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
    return model, processing_class


def set_pad_token(tokenizer: Any, pad_token: str | None) -> None:
    """The configured pad token, else the tokenizer's own, else its EOS token (as TRL)."""
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def disable_dropout(model: nn.Module) -> None:
    """Set the probability of every ``nn.Dropout*`` module (LoRA dropout included) and every float
    ``attention_dropout`` attribute (Hugging Face attention modules read it in the forward) to 0."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


class BufferedMetricsMixin:
    """Metrics appended per step as tensors (no host sync in the training step) and averaged in ``log()``,
    one read per metric per logging interval; eval metrics get the ``eval_`` prefix."""

    def _metric_buffers(self) -> dict[str, dict[str, list]]:
        return self.__dict__.setdefault("_metrics", {"train": defaultdict(list), "eval": defaultdict(list)})

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        buffers = self._metric_buffers()[mode]
        averaged = {
            name: float(torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in values]).mean())
            for name, values in buffers.items()
            if values
        }
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        super().log({**logs, **averaged}, start_time)
        buffers.clear()


def sync_engine_weights(trainer: Any, model: nn.Module) -> None:
    """Push ``model``'s weights to ``trainer.engine`` once per optimiser step, before the first generation that
    follows it (TRL guards vLLM's weight loading by ``global_step`` the same way). Step 0 needs none: the engine
    was built from the same weights; a resumed run is past step 0, so its first generation loads the
    checkpoint's weights."""
    step = trainer.state.global_step
    if step != trainer.__dict__.get("_engine_synced_step", 0):
        trainer.engine.sync_weights(model)
        trainer._engine_synced_step = step


def data_seed(args: Any) -> int:
    """The seed of the trainer's own data samplers: ``data_seed`` when set, else ``seed`` (as ``Trainer``)."""
    return args.seed if args.data_seed is None else args.data_seed

"""Bradley-Terry reward modelling on ``transformers.Trainer`` (TRL 1.x's ``RewardTrainer`` keywords and config).

The model is a ``*ForSequenceClassification`` with ``num_labels=1``; each batch holds ``2B`` rows (the ``B``
chosen sequences, then the ``B`` rejected ones, :class:`fastalign.data.RewardCollator`), the model's own pooling
reads one score per row at its last non-pad token, and the loss is :func:`fastalign.reward_loss`
(``mean(−log σ(r_chosen − r_rejected − margin))`` plus the optional centring term). Optimiser, schedule,
checkpoints and resume are ``transformers.Trainer``'s.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import datasets
import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, Trainer

from fastalign.data import RewardCollator, tokenize_dataset
from fastalign.models import load_reward_model
from fastalign.ops.preference import reward_loss
from fastalign.trainers._common import TrainTokenCount, disable_dropout, prepare_splits
from fastalign.trainers._guards import FiniteLossMixin, ResumeMixin
from fastalign.trainers.configs import RewardConfig

# Columns the collator reads; Trainer drops every other column unless told which to keep.
_REWARD_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids", "margin"]
# Per-batch statistics, in the order of the rows of ``RewardTrainer._metrics[mode]``.
_MEAN_STATS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected", "mean_reward")


def prepare_reward_dataset(dataset: datasets.Dataset, tokenizer: Any, args: RewardConfig) -> datasets.Dataset:
    """Tokenise a preference dataset (unless it already has ``chosen_ids`` and ``rejected_ids``) and, with
    ``args.max_length``, drop the pairs whose chosen or rejected sequence (prompt included) is longer (as TRL).

    Accepts explicit (``prompt``, ``chosen``, ``rejected``) and implicit-prompt (``chosen``, ``rejected``) pairs,
    standard or conversational, and an optional ``margin`` column.

    Raises:
        ValueError: the dataset is in no preference format (the message names the missing column), or no pair
            is at most ``max_length`` tokens long.
    """
    columns = dataset.column_names or []
    if not {"chosen_ids", "rejected_ids"} <= set(columns):
        dataset = tokenize_dataset(dataset, tokenizer, "reward", num_proc=args.dataset_num_proc)
    if args.max_length is None:
        return dataset
    max_length = args.max_length

    def fits(example: dict[str, Any]) -> bool:
        prompt = len(example.get("prompt_ids") or [])
        return prompt + max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= max_length

    if not isinstance(dataset, datasets.Dataset):  # an IterableDataset: filtered lazily, nothing to count
        return dataset.filter(fits)
    before = len(dataset)
    dataset = dataset.filter(fits, num_proc=args.dataset_num_proc)
    if len(dataset) == 0 and before > 0:
        raise ValueError(f"every one of the {before} pairs is longer than max_length={max_length} tokens")
    if len(dataset) < before:
        warnings.warn(
            f"dropped {before - len(dataset)} of {before} pairs longer than max_length={max_length} tokens",
            stacklevel=2,
        )
    return dataset


def _seq_cls_peft_config(peft_config: Any) -> Any:
    """A copy of ``peft_config`` with ``task_type="SEQ_CLS"`` (peft then trains the score head too)."""
    task_type = getattr(peft_config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    if task_type is None:
        peft_config = copy.copy(peft_config)
        peft_config.task_type = "SEQ_CLS"
    elif task_type != "SEQ_CLS":
        raise ValueError(
            f"peft_config.task_type is {task_type!r}; a reward model needs 'SEQ_CLS' (or None), under which peft "
            "also trains the score head"
        )
    return peft_config


class RewardTrainer(FiniteLossMixin, ResumeMixin, Trainer):
    """Reward-model training on preference pairs (TRL's ``RewardTrainer`` keywords).

    Args:
        model: an ``AutoModelForSequenceClassification`` with ``num_labels=1``, or its name/path (loaded with
            :func:`fastalign.models.load_reward_model`). Its config's ``pad_token_id`` is set to the tokenizer's:
            the model pools at each row's last non-pad token.
        args: :class:`RewardConfig` (default: ``output_dir="fastalign-reward"``).
        data_collator: default :class:`fastalign.data.RewardCollator`.
        train_dataset / eval_dataset: ``datasets.Dataset`` of preference pairs (``chosen``, ``rejected``, optional
            ``prompt`` and ``margin``; standard or conversational) or already tokenised (``chosen_ids``,
            ``rejected_ids``, optional ``prompt_ids``, ``margin``).
        processing_class: the tokenizer (default: loaded from the model's name).
        peft_config: a ``peft`` config; the model is wrapped with ``peft.get_peft_model`` as a ``SEQ_CLS`` task
            (a ``task_type`` of None is set to it), so the score head is trained in full next to the adapters.

    Logged (averaged over the batches since the previous log; ``eval_``-prefixed in evaluation): ``accuracy``
    (share of pairs with ``r_chosen > r_rejected``), ``margin`` (mean ``r_chosen − r_rejected``),
    ``rewards/chosen``, ``rewards/rejected``, ``min_reward``, ``mean_reward``, ``max_reward`` and ``num_tokens``
    (non-pad tokens trained on so far).
    """

    # compute_loss returns each micro-batch's mean: Trainer divides it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: RewardConfig | None = None,
        data_collator: Any = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else RewardConfig(output_dir="fastalign-reward")
        if isinstance(model, str):
            model = load_reward_model(model)
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"a reward model has one output per sequence; this model has num_labels="
                f"{getattr(model.config, 'num_labels', None)} (build it with num_labels=1, or pass its name)"
            )
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        text_config = model.config.get_text_config()
        if args.eos_token is not None:
            _require_token(processing_class, args.eos_token, "eos_token")
            processing_class.eos_token = args.eos_token
            text_config.eos_token_id = processing_class.eos_token_id
        pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
        _require_token(processing_class, pad_token, "pad_token")
        processing_class.pad_token = pad_token
        text_config.pad_token_id = processing_class.pad_token_id  # the model pools at the last non-pad token
        if peft_config is not None:
            from peft import PeftModel, get_peft_model

            if isinstance(model, PeftModel):
                raise ValueError("pass either a PeftModel or a peft_config, not both (merge the adapter first)")
            model = get_peft_model(model, _seq_cls_peft_config(peft_config))
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
        if args.disable_dropout:
            disable_dropout(model)
        train_dataset, eval_dataset = prepare_splits(
            train_dataset, eval_dataset, lambda split: prepare_reward_dataset(split, processing_class, args)
        )
        if data_collator is None:
            data_collator = RewardCollator(processing_class.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )  # fmt: skip
        # Evaluation calls compute_loss only when the model can return a loss and there are no label columns.
        self.can_return_loss = True
        self.label_names = []
        # Per batch: a [len(_MEAN_STATS) + 2] tensor (the means, then min and max reward), kept on the device
        # until log() reads them all with one transfer.
        self._metrics: dict[str, list[torch.Tensor]] = {"train": [], "eval": []}
        self._train_tokens = TrainTokenCount()

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = _REWARD_COLUMNS

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluate``; a dataset passed here is prepared as in ``__init__`` (a ``str`` names one of the
        eval datasets given there)."""
        if not isinstance(eval_dataset, str):
            _, eval_dataset = prepare_splits(
                None, eval_dataset, lambda split: prepare_reward_dataset(split, self.processing_class, self.args)
            )
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """:func:`fastalign.reward_loss` of the chosen rows' scores against the rejected rows' (mean over pairs).

        ``num_items_in_batch`` is unused: the loss is a mean over the micro-batch's pairs, and ``Trainer`` divides
        it by the gradient-accumulation steps (``loss_is_scaled_for_ga = False``), as TRL.
        """
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards = outputs.logits[:, 0].float()
        chosen, rejected = rewards.chunk(2)
        loss = reward_loss(
            chosen,
            rejected,
            margin=inputs.get("margin"),
            center_rewards_coefficient=self.args.center_rewards_coefficient,
        )
        self._record(model, chosen.detach(), rejected.detach(), inputs["attention_mask"])
        if model.training:
            self._watch_loss(loss, {} if inputs.get("margin") is None else {"margin": inputs["margin"]})
        return (loss, outputs) if return_outputs else loss

    def _record(self, model: nn.Module, chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor) -> None:
        """Keep one batch's statistics on the device (no host synchronisation)."""
        mode = "train" if model.training else "eval"
        rewards = torch.cat([chosen, rejected])
        stats = torch.stack([
            (chosen > rejected).float().mean(), (chosen - rejected).mean(), chosen.mean(), rejected.mean(),
            rewards.mean(), rewards.min(), rewards.max(),
        ])  # fmt: skip
        self._metrics[mode].append(stats)
        if mode == "train":
            self._train_tokens.add(mask.sum())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the reward metrics averaged since the previous log (gathered over processes) to ``logs``."""
        mode = "train" if self.model.training else "eval"
        metrics: dict[str, float] = {}
        if self._metrics[mode]:
            stats = self.accelerator.gather(torch.stack(self._metrics[mode]))  # [batches (x processes), 7]
            means = stats[:, : len(_MEAN_STATS)].mean(0)
            summary = torch.cat([means, stats[:, -2].min().reshape(1), stats[:, -1].max().reshape(1)]).tolist()
            metrics = dict(zip([*_MEAN_STATS, "min_reward", "max_reward"], summary, strict=True))
            self._metrics[mode].clear()
        total_tokens = self._train_tokens.read(self.accelerator)
        if metrics:
            metrics["num_tokens"] = float(total_tokens)
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)


def _require_token(tokenizer: Any, token: str | None, name: str) -> None:
    if token is None or token not in tokenizer.get_vocab():
        raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")

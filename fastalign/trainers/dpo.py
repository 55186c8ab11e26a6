"""Direct preference optimisation on ``transformers.Trainer``, with TRL 1.x's keywords, config and metric names.

The policy's sequence log-probs never go through the ``[2B, T, V]`` logits: the backbone's hidden states and the
lm_head weight go into :class:`fastalign.nn.LinearDPOLoss`, which on CUDA also forms the hidden/weight gradients
during its forward sweep (one fewer ``[tokens, V]`` matmul than recomputing the logits in the backward) and
evaluates every requested loss type in one kernel. The reference's summed log-probs come from the same fused
log-prob op under ``no_grad``, from one of:

* ``ref_model``: a separate model, frozen and in eval mode;
* the policy with its adapters disabled, when the policy is a PEFT model (``peft_config`` or a ``PeftModel``) and no
  ``ref_model`` is given (the base model: what a freshly initialised LoRA starts from);
* ``precompute_ref_log_probs=True``: one pass over the dataset before training (with ``ref_model``, the adapters
  disabled, or the policy as it is at construction), stored as ``ref_chosen_logps`` / ``ref_rejected_logps``
  columns, so no reference model is kept during training;
* otherwise a frozen copy of the model, made at construction (TRL loads a second copy of the same checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedModel, Trainer

from fastalign.data import IGNORE_INDEX, PreferenceCollator, tokenize_dataset
from fastalign.models import CausalLMAdapter, load_causal_lm, shift_labels, unwrap_peft
from fastalign.nn import LinearDPOLoss
from fastalign.trainers._common import (
    FusedLossTrainerMixin,
    ItemCount,
    LossInputs,
    LossOnlyPredictionMixin,
    LossOutput,
    disable_dropout,
    prepare_splits,
    set_pad_token,
)
from fastalign.trainers._guards import FiniteLossMixin, ResumeMixin
from fastalign.trainers.configs import DPOConfig

# The precomputed reference log-probs' columns.
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# TRL's metric names, in the order they are logged.
METRIC_NAMES = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)  # fmt: skip


@dataclass
class DPOCollator(PreferenceCollator):
    """:class:`~fastalign.data.PreferenceCollator` (``2B`` rows, chosen first) that also passes on precomputed
    reference log-probs: ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` float32 when every example has them."""

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        for column in _REF_COLUMNS:
            if all(e.get(column) is not None for e in examples):
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


def prepare_dpo_dataset(dataset: datasets.Dataset, tokenizer: Any, args: DPOConfig) -> datasets.Dataset:
    """Tokenise a preference dataset (unless ``chosen_ids`` / ``rejected_ids`` are already there) and truncate it
    as TRL's ``truncation_mode="keep_start"``: each ``prompt + completion`` keeps its first ``max_length`` tokens,
    and pairs whose prompt alone has ``max_length`` tokens or more are dropped (no completion token would be left).

    Raises ``ValueError`` naming the missing columns when the dataset is not in the preference format.
    """
    columns = set(dataset.column_names)
    if not {"chosen_ids", "rejected_ids"} <= columns:
        dataset = tokenize_dataset(dataset, tokenizer, "dpo", num_proc=args.dataset_num_proc)
    if args.max_length is None:
        return dataset
    max_length = args.max_length

    def fits(example: Mapping[str, Any]) -> bool:
        return len(example.get("prompt_ids") or []) < max_length

    def truncate(example: Mapping[str, Any]) -> dict[str, list[int]]:
        prompt = list(example.get("prompt_ids") or [])
        budget = max_length - len(prompt)
        return {"prompt_ids": prompt, "chosen_ids": example["chosen_ids"][:budget],
                "rejected_ids": example["rejected_ids"][:budget]}  # fmt: skip

    kept = dataset.filter(fits, num_proc=args.dataset_num_proc)
    if len(kept) == 0 and len(dataset) > 0:
        raise ValueError(f"every prompt has at least max_length={max_length} tokens: no completion token is left")
    return kept.map(truncate, num_proc=args.dataset_num_proc)


def _is_peft_model(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


@contextlib.contextmanager
def _no_activation_checkpointing(model: nn.Module) -> Iterator[None]:
    """Turn gradient checkpointing off for a forward without gradient (it would only recompute for nothing)."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in switched:
            module.gradient_checkpointing = True


def _dpo_loss_module(args: DPOConfig, adapter: CausalLMAdapter) -> LinearDPOLoss:
    """TRL's loss list as one :class:`LinearDPOLoss`: the ``sft`` type (mean NLL of the chosen completion tokens,
    TRL's definition) is the module's ``rpo_alpha`` term with the ``sft`` weight."""
    weights = args.loss_weights or [1.0] * len(args.loss_type)
    types = [name for name in args.loss_type if name != "sft"]
    type_weights = [w for name, w in zip(args.loss_type, weights, strict=True) if name != "sft"]
    sft_weight = sum(w for name, w in zip(args.loss_type, weights, strict=True) if name == "sft")
    if not types:  # sft alone: a zero-weight DPO term keeps the module's reference bookkeeping
        types, type_weights = ["sigmoid"], [0.0]
    return LinearDPOLoss(
        beta=args.beta, loss_type=types, label_smoothing=args.label_smoothing, discopop_tau=args.discopop_tau,
        loss_weights=type_weights, rpo_alpha=sft_weight if "sft" in args.loss_type else None,
        ignore_index=IGNORE_INDEX, temperature=adapter.logit_temperature, softcap=adapter.softcap,
        backend=args.backend,
    )  # fmt: skip


class DPOTrainer(FiniteLossMixin, ResumeMixin, LossOnlyPredictionMixin, FusedLossTrainerMixin, Trainer):
    """DPO and its variants with fastalign's fused log-probs (TRL's ``DPOTrainer`` keywords and metrics).

    Args:
        model: a causal LM, a ``peft.PeftModel``, or a name/path (loaded with
            :func:`fastalign.models.load_causal_lm` and ``args.model_init_kwargs``).
        ref_model: the reference model (a model or a name/path); default: see the module docstring.
        args: :class:`DPOConfig` (default: ``output_dir="fastalign-dpo"``).
        train_dataset / eval_dataset: ``datasets.Dataset`` in TRL's preference format (``chosen``, ``rejected``,
            optional ``prompt``; standard or conversational) or tokenised (``prompt_ids``, ``chosen_ids``,
            ``rejected_ids``).
        processing_class: the tokenizer (default: loaded from the model's name).
        peft_config: a ``peft`` config: the model is wrapped with ``peft.get_peft_model``.

    Logged (TRL 1.x names, averaged over the micro-batches since the last log): ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` and
    ``num_tokens`` (tokens trained on so far); ``eval_``-prefixed in evaluation. TRL's ``entropy``,
    ``logits/*`` and ``mean_token_accuracy`` need full-vocabulary statistics the fused DPO path does not form,
    and are not logged.
    """

    signature_columns = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")

    # compute_loss returns the micro-batch's mean over pairs; Trainer divides it by the accumulation steps (as TRL).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PreTrainedModel | str,
        ref_model: PreTrainedModel | str | None = None,
        args: DPOConfig | None = None,
        data_collator: Any = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | dict[str, datasets.Dataset] | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else DPOConfig(output_dir="fastalign-dpo")
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args must be a DPOConfig, got {type(args).__name__}")
        # trust_remote_code lives in ModelConfig (the command line's flag); pass it here through model_init_kwargs.
        init_kwargs = dict(args.model_init_kwargs or {})
        if isinstance(model, str):
            model = load_causal_lm(model, **init_kwargs)
        if isinstance(ref_model, str):
            ref_model = load_causal_lm(ref_model, **init_kwargs)
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model cannot be the same object; leave ref_model out for a frozen copy")
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        set_pad_token(processing_class, args.pad_token)
        if args.padding_free:
            warnings.warn("padding_free is not available for DPO (as in TRL 1.x): batches are padded", stacklevel=2)
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if args.router_aux_loss_coef is None and getattr(text_config, "router_aux_loss_coef", 0.0):
            warnings.warn(
                "the model is a mixture of experts: fastalign's DPOTrainer trains without its load-balancing "
                "auxiliary loss (TRL adds it)",
                stacklevel=2,
            )

        if peft_config is not None:
            if _is_peft_model(model):
                raise ValueError("pass either a PeftModel or a peft_config with a plain model, not both")
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if _is_peft_model(model) and args.gradient_checkpointing:
            model.enable_input_require_grads()
        use_adapters_off = ref_model is None and _is_peft_model(model)
        if ref_model is None and not use_adapters_off and not args.precompute_ref_log_probs:
            ref_model = copy.deepcopy(unwrap_peft(model))
        if args.disable_dropout:
            disable_dropout(model)
            if ref_model is not None:
                disable_dropout(ref_model)
        if ref_model is not None:
            ref_model.requires_grad_(False)
            ref_model.eval()

        train_dataset, eval_dataset = prepare_splits(
            train_dataset, eval_dataset, lambda split: prepare_dpo_dataset(split, processing_class, args)
        )
        if data_collator is None:
            data_collator = DPOCollator(processing_class.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )  # fmt: skip
        # The DPO loss takes no token count: skip Trainer's per-step count of label tokens (a host sync).
        self.model_accepts_loss_kwargs = False
        self.loss_fn = _dpo_loss_module(args, self._adapter(self.model))
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._total_train_tokens: torch.Tensor | int = 0  # this process's, since this run started
        self._resumed_train_tokens = 0  # every process's, before the checkpoint this run resumed from

        if args.precompute_ref_log_probs:
            batch = args.precompute_ref_batch_size
            self.train_dataset = self._precompute(self.train_dataset, batch or args.per_device_train_batch_size)
            eval_batch = batch or args.per_device_eval_batch_size
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {n: self._precompute(d, eval_batch) for n, d in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._precompute(self.eval_dataset, eval_batch)
            self.ref_model = None  # the stored columns are the reference from now on

    # ----------------------------------------------------------------------------------------------- reference

    @staticmethod
    def _targets(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Next-token targets: the completion tokens, -100 on prompt and padding."""
        labels = inputs.get("labels")
        if labels is None:
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        return shift_labels(labels)

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The reference model for a ``no_grad`` forward: ``ref_model``, else the policy with its adapters
        disabled (PEFT), else the policy itself (only before training, for ``precompute_ref_log_probs``)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy = self.accelerator.unwrap_model(self.model)
        adapters_off = policy.disable_adapter() if _is_peft_model(policy) else contextlib.nullcontext()
        with adapters_off, _no_activation_checkpointing(policy):
            yield self.model

    def compute_ref_log_probs(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the completions of a collated batch: ``(chosen [B], rejected [B])``
        float32, without gradient."""
        targets = self._targets(inputs)
        with torch.no_grad(), self._reference() as reference:
            token_logps = self._adapter(reference).token_logprobs(
                inputs["input_ids"], inputs.get("attention_mask"), targets, backend=self.args.backend
            )
        summed = token_logps.sum(-1)
        pairs = summed.shape[0] // 2
        return summed[:pairs], summed[pairs:]

    def _precompute(self, dataset: datasets.Dataset | None, batch_size: int) -> datasets.Dataset | None:
        """``dataset`` with ``ref_chosen_logps`` / ``ref_rejected_logps`` columns (one pass, in dataset order)."""
        if dataset is None:
            return None
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError("precompute_ref_log_probs=True needs a map-style datasets.Dataset")
        dataset = dataset.remove_columns([c for c in _REF_COLUMNS if c in dataset.column_names])
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)  # fmt: skip
        chosen, rejected = [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    ref_chosen, ref_rejected = self.compute_ref_log_probs(batch)
                chosen.append(ref_chosen.float().cpu())
                rejected.append(ref_rejected.float().cpu())
        finally:
            self.model.train(was_training)
        chosen_column = torch.cat(chosen).tolist() if chosen else []
        rejected_column = torch.cat(rejected).tolist() if rejected else []
        dataset = dataset.add_column("ref_chosen_logps", chosen_column)
        return dataset.add_column("ref_rejected_logps", rejected_column)

    # ---------------------------------------------------------------------------------------------------- loss

    def compute_loss(
        self, model: nn.Module, inputs: LossInputs, return_outputs: bool = False, num_items_in_batch: ItemCount = None
    ) -> LossOutput:
        """Mean over the micro-batch's pairs of the configured DPO loss(es); records TRL's metrics (detached,
        on device: nothing here waits for the device)."""
        mode = "train" if self.model.training else "eval"
        targets = self._targets(inputs)
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif self.args.precompute_ref_log_probs:
            raise ValueError(
                "precompute_ref_log_probs=True but the batch has no ref_chosen_logps / ref_rejected_logps: a custom "
                "data_collator must pass those columns on (fastalign.trainers.dpo.DPOCollator does)"
            )
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(inputs)
        loss, metrics = self._adapter(model).fused_forward(
            lambda hidden, weight, bias: self.loss_fn(
                hidden, weight, targets, bias=bias, ref_chosen_logps=ref_chosen.float(),
                ref_rejected_logps=ref_rejected.float(),
            ),
            inputs["input_ids"], inputs.get("attention_mask"),
        )  # fmt: skip
        record = self._metrics[mode]
        record["rewards/chosen"].append(metrics["chosen_rewards"].mean())
        record["rewards/rejected"].append(metrics["rejected_rewards"].mean())
        record["rewards/accuracies"].append(metrics["reward_accuracy"])
        record["rewards/margins"].append(metrics["reward_margin"])
        record["logps/chosen"].append(metrics["chosen_logps"].mean())
        record["logps/rejected"].append(metrics["rejected_logps"].mean())
        if mode == "train" and "attention_mask" in inputs:
            self._total_train_tokens = self._total_train_tokens + inputs["attention_mask"].sum()
        if mode == "train":
            self._watch_loss(loss, {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected})
        return (loss, metrics) if return_outputs else loss

    def _tokens_so_far(self) -> int:
        local = torch.as_tensor(self._total_train_tokens, device=self.args.device).double().reshape(1)
        return self._resumed_train_tokens + round(float(self.accelerator.gather(local).sum()))

    def _resume_tokens(self, total: int) -> None:
        self._resumed_train_tokens, self._total_train_tokens = total, 0

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the metrics recorded since the last log (one device-to-host copy for all of them)."""
        mode = "train" if self.model.training else "eval"
        record = self._metrics[mode]
        names = [name for name in METRIC_NAMES if record.get(name)]
        values: dict[str, float] = {}
        if names:
            local = torch.stack([torch.stack([v.double() for v in record[name]]).mean() for name in names])
            if mode == "train" and isinstance(self._total_train_tokens, torch.Tensor):
                local = torch.cat([local, self._total_train_tokens.reshape(1).to(local)])
            rows = self.accelerator.gather(local.unsqueeze(0)).tolist()  # [processes, K]: the one host sync
            values = {name: sum(row[k] for row in rows) / len(rows) for k, name in enumerate(names)}
            if len(rows[0]) > len(names):
                values["num_tokens"] = self._resumed_train_tokens + round(sum(row[-1] for row in rows))
        if mode == "eval":
            values = {f"eval_{key}": value for key, value in values.items()}
        logs.update(values)
        super().log(logs, start_time)
        record.clear()

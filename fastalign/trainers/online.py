"""The base of the trainers that sample their own data (GRPO, PPO, distillation): what they share, and none of
their losses.

One rollout: the :class:`RepeatSampler` hands over dataset rows, each prompt ``num_generations`` times in a row;
:meth:`OnlineTrainer._rollout` samples their completions with the rollout engine and scores them (a
:class:`Rollout`); the subclass's ``_generate_and_score`` turns that into the tensors its loss reads (a
:class:`PolicyBatch`); :meth:`OnlineTrainer._prepare_inputs` cuts it into micro-batches and serves one per
training step, to ``compute_loss``, which runs the subclass's ``_loss``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedModel, Trainer

from fastalign.data import require_format, tokenize_prompt
from fastalign.models import unwrap_peft
from fastalign.models.causal_lm import CausalLMAdapter, _is_fsdp2
from fastalign.ops.logprobs import linear_logprobs
from fastalign.rewards import reward_function_name, score
from fastalign.rewards.resolve import resolve_reward_funcs
from fastalign.rollout import HFGenerateEngine, RolloutBatch, SamplingParams
from fastalign.trainers._common import (
    BufferedMetricsMixin,
    FusedLossTrainerMixin,
    ItemCount,
    LossOnlyPredictionMixin,
    LossOutput,
    data_seed,
    disable_dropout,
    load_policy_and_tokenizer,
    set_pad_token,
    sync_engine_weights,
)
from fastalign.trainers._guards import FiniteLossMixin, ResumeMixin

RewardFuncs = Callable[..., list] | str | PreTrainedModel | Sequence[Callable[..., list] | str | PreTrainedModel]

PER_BATCH = {"per_batch": True}
"""Metadata of a batch field that describes the whole batch (a token count), not its rows: ``select`` drops it."""


class RepeatSampler(Sampler[int]):
    """Dataset indices for the online trainers: shuffled chunks of ``prompts_per_generation`` prompts; each chunk
    is yielded ``repeat_count`` times (once per micro-batch it feeds) and every index in it ``num_generations``
    times in a row. Incomplete chunks at the end are dropped.

    With ``processes > 1`` (the sampler of a dataloader that accelerate shards, handing batch ``k`` to process
    ``k % processes``) chunks go out in rounds of ``processes``: each repeat of a round yields one chunk per
    process, so every process gets its own prompts and all the repeats of them; an incomplete round is dropped.
    """

    def __init__(
        self,
        size: int,
        num_generations: int,
        prompts_per_generation: int,
        repeat_count: int,
        seed: int,
        processes: int = 1,
    ):
        self.size, self.num_generations = size, num_generations
        self.prompts_per_generation, self.repeat_count, self.processes = prompts_per_generation, repeat_count, processes
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Trainer's hook (through accelerate's loader) before each epoch: the order is a function of the seed and
        the epoch, so a run resumed in epoch ``k`` sees the prompts the uninterrupted run saw."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # iterated again without set_epoch (a plain loop): the next epoch's order
        order = torch.randperm(self.size, generator=generator).tolist()
        per_round = self.prompts_per_generation * self.processes
        for r in range(len(order) // per_round):
            chunks = [
                order[r * per_round + p * self.prompts_per_generation :][: self.prompts_per_generation]
                for p in range(self.processes)
            ]
            for _ in range(self.repeat_count):
                for chunk in chunks:
                    for index in chunk:
                        yield from [index] * self.num_generations

    def __len__(self) -> int:
        rounds = self.size // (self.prompts_per_generation * self.processes)
        return rounds * self.processes * self.prompts_per_generation * self.num_generations * self.repeat_count


@dataclass
class Rollout:
    """Completions sampled for dataset rows, and their rewards: ``N`` rows, each prompt's completions contiguous.

    Attributes:
        rows: the ``N`` dataset rows (a prompt's row once per completion).
        batch: the engine's :class:`~fastalign.rollout.RolloutBatch`.
        per_function: ``[N, F]`` float32, each reward function's reward (NaN where it does not apply).
        rewards: ``[N]`` float32, their weighted sum (:func:`fastalign.rewards.score`).
    """

    rows: list[dict]
    batch: RolloutBatch
    per_function: torch.Tensor
    rewards: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, rows: slice) -> Rollout:
        return Rollout(self.rows[rows], self.batch.select(rows), self.per_function[rows], self.rewards[rows])

    def concat(self, others: Sequence[Rollout], pad_token_id: int) -> Rollout:
        """This rollout, then ``others``, as one (prompts and completions padded as :meth:`RolloutBatch.concat`)."""
        parts = [self, *others]
        return Rollout(
            [row for part in parts for row in part.rows],
            RolloutBatch.concat([part.batch for part in parts], pad_token_id),
            torch.cat([part.per_function for part in parts]),
            torch.cat([part.rewards for part in parts]),
        )


@dataclass
class PolicyBatch:
    """Prompt + completion rows and what a policy loss reads, on the trainer's device: ``N`` rows, ``P`` prompt and
    ``C`` completion columns. Subclasses add their loss's fields; one that is per batch has ``PER_BATCH`` metadata.

    Attributes:
        input_ids, attention_mask, position_ids: ``[N, P + C]`` int64, the left-padded prompt then the completion;
            positions count real tokens only, as during generation.
        completion_ids: ``[N, C]`` int64. completion_mask: ``[N, C]`` int64, 1 on the tokens the loss reads.
        old_logps, ref_logps: ``[N, C]`` float32 log-probs of the sampling policy and of the reference (0 off
            the mask), at the sampling temperature.
        advantages: ``[N]`` (one per completion) or ``[N, C]`` (per token) float32.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    advantages: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | torch.Tensor):
        """The rows ``rows`` (a slice or an index tensor) of every per-row field; the per-batch ones are None."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.metadata.get("per_batch") or value is None:
                values[field.name] = None
            else:
                values[field.name] = value[rows.to(value.device) if isinstance(rows, torch.Tensor) else rows]
        return type(self)(**values)

    @classmethod
    def from_mapping(cls, inputs: Mapping[str, Any]):
        """A batch given as a dict of the fields' names (as ``bench/train_step.py`` builds one); other keys are
        ignored, and a per-batch field given once per row is read from its first row."""
        values = {}
        for field in dataclasses.fields(cls):
            value = inputs.get(field.name)
            if field.metadata.get("per_batch") and isinstance(value, torch.Tensor) and value.dim() > 0:
                value = value.reshape(-1)[0]
            values[field.name] = value
        return cls(**values)


def completion_targets(batch: PolicyBatch) -> torch.Tensor:
    """``[N, C]`` completion token ids, -100 off the completion mask."""
    return batch.completion_ids.masked_fill(batch.completion_mask == 0, -100)


def completion_positions(sequence: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """The positions ``[N, C, ...]`` of a prompt + completion tensor ``[N, P + C, ...]`` (hidden states, values)
    that predict the ``C`` completion tokens (shifted by one)."""
    return sequence[:, -completion_ids.shape[1] - 1 : -1]


def check_generation_under_fsdp2(generator: nn.Module, trained: nn.Module) -> None:
    """Let ``HFGenerateEngine`` sample from the model being trained when FSDP2 shards it, or refuse.

    FSDP2 gathers the parameters of its root group (embeddings, final norm, lm_head) in the root module's
    forward, and each decoder layer's in the layer's forward, with collectives every process must join. Generating
    on the root itself works as long as every process runs as many forwards: generate does so (it keeps stepping
    after its own completions are done) when ``synced_gpus`` is on, which it turns on by itself only for models
    that transformers sharded; accelerate's ``fully_shard`` sets no such mark, so it is set here. A generating
    module *inside* the root (PPO's policy inside ``PolicyAndValueModel``) would read sharded weights: refused.
    """
    if not _is_fsdp2(trained):
        return
    if generator is not trained:
        raise ValueError(
            f"rollouts with HFGenerateEngine on {type(generator).__name__}, a part of the FSDP2-sharded "
            f"{type(trained).__name__}, are not supported: its embeddings and lm_head are gathered only in the "
            "sharded module's own forward. Pass a rollout_engine that holds its own copy of the weights (vLLM), "
            "or train with DDP"
        )
    # transformers' generate reads this mark (is_fsdp_managed_module) to default to synced_gpus=True.
    generator._is_fsdp_managed_module = True


def _rows(rows: list[dict]) -> list[dict]:
    return rows


class OnlineTrainer(
    FiniteLossMixin, ResumeMixin, BufferedMetricsMixin, LossOnlyPredictionMixin, FusedLossTrainerMixin, Trainer
):
    """What GRPO, PPO and distillation share on ``transformers.Trainer``: the policy and its tokenizer, PEFT, the reward
    functions and weights, the reference model (a frozen copy of the policy, or under PEFT the base model with the
    adapters off), the rollout engine and its weight sync, the repeat-sampler dataloaders, rollouts and their
    scores, the sequence tensors of a batch, completion log-probs, and micro-batches served from one rollout.

    A subclass sets ``dataset_format`` (for :func:`fastalign.data.require_format`), ``batch_type``,
    ``unscorable`` (:func:`fastalign.rewards.score`'s) and ``scored`` (False: no reward functions); in
    ``__init__`` ``_rollout_rows`` / ``_eval_rows`` (the rows of a training / evaluation rollout) and
    ``_micro_batches_per_rollout`` (the training steps one rollout feeds); and defines
    ``_generate_and_score(rows, mode) -> batch``, ``_micro_batches(batch, mode)`` (the batch cut for those steps)
    and ``_loss(model, batch) -> (loss, metrics, watched)``.
    """

    signature_columns = ()
    dataset_format: ClassVar[str]
    batch_type: ClassVar[type[PolicyBatch]] = PolicyBatch
    unscorable: ClassVar[str] = "nan"
    scored: ClassVar[bool] = True
    _rollout_rows: int
    _eval_rows: int
    _micro_batches_per_rollout: int

    def __init__(
        self,
        model: PreTrainedModel | str,
        reward_funcs: RewardFuncs | None,
        args: Any,
        train_dataset: Any,
        eval_dataset: Any,
        processing_class: Any,
        peft_config: Any,
        rollout_engine: Any,
        *,
        kl_coef: float,
        max_completion_length: int,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        ref_model: nn.Module | None = None,
        reward_model: str | None = None,
        eos_token_id: int | None = None,
        trained_module: Callable[[nn.Module], nn.Module] | None = None,
        **kwargs: Any,
    ):
        """The subclass's public arguments (TRL's), then what its config names its own way: ``kl_coef`` (no
        reference model when 0), the sampling's ``max_completion_length`` / ``min_p`` / ``repetition_penalty``,
        ``ref_model`` (default: a frozen copy of the policy, or the PEFT base with the adapters off),
        ``reward_model`` (a path put before ``reward_funcs``), ``eos_token_id`` (default: the tokenizer's) and
        ``trained_module`` (policy -> the module Trainer optimises; default: the policy)."""
        sampling = SamplingParams(
            num_generations=args.num_generations,
            max_completion_length=max_completion_length,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k or None,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
        model, processing_class = load_policy_and_tokenizer(model, processing_class)
        set_pad_token(processing_class, None)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        for dataset in (train_dataset, eval_dataset):
            if dataset is not None:
                require_format(dataset, self.dataset_format)
        self.reward_funcs, self.reward_weights = [], []
        if self.scored:
            self.reward_funcs, self.reward_weights = resolve_reward_funcs(
                reward_funcs,
                args.reward_weights or None,
                reward_model=reward_model,
                tokenizer=processing_class,
                max_completion_length=max_completion_length,
            )
        peft = sys.modules.get("peft")
        self._reference_is_base = (
            ref_model is None and kl_coef != 0 and peft is not None and isinstance(model, peft.PeftModel)
        )
        if ref_model is None and kl_coef != 0 and not self._reference_is_base:
            ref_model = copy.deepcopy(unwrap_peft(model))
        self.ref_model = None if ref_model is None else ref_model.requires_grad_(False).eval()
        trained = model if trained_module is None else trained_module(model)
        if args.disable_dropout:
            for module in (trained, self.ref_model):
                if module is not None:
                    disable_dropout(module)
        super().__init__(
            model=trained,
            args=args,
            data_collator=_rows,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        # The subclass's loss is normalised as the step needs; Trainer must not count label tokens or rescale.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        self.eos_token_id = processing_class.eos_token_id if eos_token_id is None else eos_token_id
        self.sampling = sampling
        self.engine = rollout_engine if rollout_engine is not None else self._default_engine()
        self._step = 0
        self._buffered: list[PolicyBatch] | None = None
        self._metrics = self._metric_buffers()

    # ------------------------------------------------------------------------------------------------ set-up

    @property
    def policy(self) -> nn.Module:
        return self.model

    def _default_engine(self, batch_size: int | None = None) -> Any:
        return HFGenerateEngine(
            self.policy,
            pad_token_id=self.processing_class.pad_token_id,
            eos_token_id=self.eos_token_id,
            batch_size=batch_size,
        )

    def get_train_dataloader(self) -> DataLoader:
        """Each item is one rollout's rows (``_rollout_rows``: prompts × ``num_generations``), handed over once
        per micro-batch it feeds (``_micro_batches_per_rollout``); :meth:`_prepare_inputs` rolls out on the
        first and serves the micro-batches from a buffer."""
        rows, processes = self._rollout_rows, self.accelerator.num_processes
        return self._repeat_loader(self.train_dataset, rows, self._micro_batches_per_rollout, processes)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        """Batches of ``_eval_rows`` completions: whole groups of ``num_generations``."""
        rows, group = self._eval_rows, self.args.num_generations
        if rows % group:
            raise ValueError(
                f"per_device_eval_batch_size ({rows} completions) must be a multiple of num_generations ({group})"
            )
        return self._repeat_loader(eval_dataset if eval_dataset is not None else self.eval_dataset, rows, 1)

    def _repeat_loader(self, dataset: Any, rows: int, repeats: int, processes: int = 1) -> DataLoader:
        """Batches of ``rows`` completions (``rows / num_generations`` prompts), each handed over ``repeats``
        times in a row (see :class:`RepeatSampler`)."""
        group = self.args.num_generations
        sampler = RepeatSampler(len(dataset), group, rows // group, repeats, data_seed(self.args), processes)
        loader = DataLoader(dataset, batch_size=rows, sampler=sampler, collate_fn=_rows)
        return self.accelerator.prepare(loader)

    # ---------------------------------------------------------------------------------------------- rollout

    def _prepare_inputs(self, rows: list[dict]) -> PolicyBatch:
        """Trainer's hook: a training step's micro-batch. A new rollout every ``_micro_batches_per_rollout`` steps,
        cut into micro-batches served in order; in evaluation, one rollout of every batch of rows."""
        if not self.model.training:
            return self._micro_batches(self._generate_and_score(rows, "eval"), "eval")[0]
        position = self._step % self._micro_batches_per_rollout
        if position == 0 or self._buffered is None:
            self._buffered = self._micro_batches(self._generate_and_score(rows, "train"), "train")
        self._step += 1
        return self._buffered[position % len(self._buffered)]

    def _before_sampling(self) -> None:
        """A generation's first steps: stop on a non-finite loss (NaN weights would fail in sampling without
        saying why), then give the engine the weights of the last optimiser step."""
        self._stop_if_loss_was_not_finite()
        sync_engine_weights(self, self.policy)

    def _sample(self, rows: list[dict]) -> tuple[list[dict], RolloutBatch]:
        """Sample ``num_generations`` completions for each distinct prompt of ``rows`` (each given
        ``num_generations`` times in a row): the rows, one per completion, and the engine's batch."""
        group = self.args.num_generations
        if isinstance(self.engine, HFGenerateEngine):
            check_generation_under_fsdp2(self.engine.model, self.model)
        unique = rows[::group]
        prompts = [
            tokenize_prompt(row, self.processing_class, max_prompt_length=self.args.max_prompt_length)["prompt_ids"]
            for row in unique
        ]
        batch = self.engine.generate(prompts, self.sampling)
        return [row for row in unique for _ in range(group)], batch

    def _rollout(self, rows: list[dict]) -> Rollout:
        """:meth:`_sample`, and the completions scored."""
        rows, batch = self._sample(rows)
        return Rollout(rows, batch, *self._score(rows, batch))

    def _score(self, rows: list[dict], batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-function rewards ``[N, F]`` and their weighted sum ``[N]`` (:func:`fastalign.rewards.score`).
        Completions are decoded without special tokens, as messages when the prompts are conversational; every
        other column of ``rows`` reaches the reward functions."""
        completion_ids = [
            ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask, strict=True)
        ]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = [row["prompt"] for row in rows]
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "prompt_ids")}
        funcs, weights = self.reward_funcs, self.reward_weights
        return score(funcs, weights, prompts, completions, completion_ids, columns, unscorable=self.unscorable)

    @torch.no_grad()
    def _policy_batch(self, batch: RolloutBatch, loss_mask: torch.Tensor | None = None) -> PolicyBatch:
        """The sequence tensors of ``batch`` on the trainer's device; ``loss_mask`` (default: the completion mask)
        is the batch's ``completion_mask``, the attention still covers every completion token."""
        device = self.args.device
        prompt_mask = batch.prompt_mask.to(device)
        completion_ids = batch.completion_ids.to(device)
        attention_mask = torch.cat([prompt_mask, batch.completion_mask.to(device)], dim=1)
        return self.batch_type(
            input_ids=torch.cat([batch.prompt_ids.to(device), completion_ids], dim=1),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(dim=1) - 1).clamp_min(0),
            completion_ids=completion_ids,
            completion_mask=(batch.completion_mask if loss_mask is None else loss_mask).to(device),
        )

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def _shuffled_parts(self, batch: PolicyBatch, parts: int, shuffles: int = 1) -> list[PolicyBatch]:
        """``shuffles`` shuffles of the batch's rows (seeded by the optimiser step), each cut into ``parts`` equal
        micro-batches (shuffled as TRL does, so that a micro-batch mixes prompts)."""
        rows = len(batch)
        if rows % parts:
            raise ValueError(f"{rows} rows cannot be cut into {parts} equal micro-batches")
        size = rows // parts
        generator = torch.Generator().manual_seed(self.args.seed + self.state.global_step)
        out = []
        for _ in range(shuffles):
            order = torch.randperm(rows, generator=generator)
            out += [batch.select(order[i * size : (i + 1) * size]) for i in range(parts)]
        return out

    # ------------------------------------------------------------------------------------------- log-probs

    def _token_logps(
        self, adapter: CausalLMAdapter, batch: PolicyBatch, hidden: torch.Tensor, weight: torch.Tensor, bias: Any
    ) -> torch.Tensor:
        """``[N, C]`` float32 log-probs of the completion tokens at the sampling temperature (0 off the mask),
        from the hidden states ``[N, P + C, D]`` and the lm_head ``weight`` / ``bias`` of ``adapter``'s model."""
        return linear_logprobs(
            completion_positions(hidden, batch.completion_ids),
            weight,
            completion_targets(batch),
            bias=bias,
            softcap=adapter.softcap,
            temperature=self.args.temperature * adapter.logit_temperature,
            backend=self.args.backend,
        )

    @torch.no_grad()
    def _completion_logps(self, model: nn.Module, batch: PolicyBatch) -> torch.Tensor:
        """:meth:`_token_logps` of ``model`` without gradient. ``model`` is the policy (the bare module under DDP:
        no gradient, so no wrapper and no collective; the FSDP2 root, whose forward gathers the sharded weights)
        or the reference model."""
        adapter = self._adapter(model)
        logps = functools.partial(self._token_logps, adapter, batch)
        return adapter.fused_forward(logps, batch.input_ids, batch.attention_mask, batch.position_ids)

    def _policy_logps(self, batch: PolicyBatch) -> torch.Tensor:
        return self._completion_logps(self.model, batch)

    def _reference_logps(self, batch: PolicyBatch) -> torch.Tensor:
        if self._reference_is_base:
            with self.policy.disable_adapter():
                return self._policy_logps(batch)
        return self._completion_logps(self.ref_model, batch)

    # ------------------------------------------------------------------------------------------------- loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: PolicyBatch | Mapping[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: ItemCount = None,
    ) -> LossOutput:
        """Trainer's hook: the subclass's ``_loss`` on one micro-batch (``num_items_in_batch`` is unused: the
        subclass normalises). Its metrics are kept as tensors (read once, when logged); in training the loss and
        the inputs it names are watched for non-finite values."""
        batch = inputs if isinstance(inputs, PolicyBatch) else self.batch_type.from_mapping(inputs)
        loss, metrics, watched = self._loss(model, batch)
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        if model.training:
            self._watch_loss(loss, watched)
        return (loss, metrics) if return_outputs else loss

    # -------------------------------------------------------------------------------------------------- logs

    def _log_completions(self, mode: str, batch: RolloutBatch, per_function: torch.Tensor) -> None:
        """TRL's completion metrics: mean length, the share cut at the length limit, each function's mean reward
        (NaN rewards left out). Tensors, read when logged."""
        metrics = self._metrics[mode]
        metrics["completions/mean_length"].append(batch.completion_mask.sum(dim=1).float().mean())
        metrics["completions/clipped_ratio"].append(batch.truncated.float().mean())
        for function, column in zip(self.reward_funcs, per_function.T, strict=True):
            metrics[f"rewards/{reward_function_name(function)}/mean"].append(torch.nanmean(column))

    def _sample_table(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, list]:
        """The columns TRL's ``log_completions`` prints (the next :meth:`log` prints them when the trainer keeps
        them as ``_completions_sample``): prompt, completion, each reward function's reward and the advantage
        ``[N]``, for the first ``num_completions_to_print`` rows (all: ``None``) of this process's rollout."""
        rows, batch, per_function = rollout.rows, rollout.batch, rollout.per_function
        count = len(rows) if self.args.num_completions_to_print is None else self.args.num_completions_to_print
        ids = [row[mask.bool()].tolist() for row, mask in zip(batch.completion_ids, batch.completion_mask, strict=True)]
        texts = self.processing_class.batch_decode(ids[:count], skip_special_tokens=True)
        table = {"step": [self.state.global_step] * len(texts), "prompt": [row["prompt"] for row in rows[:count]]}
        table["completion"] = texts
        for function, column in zip(self.reward_funcs, per_function.T.tolist(), strict=True):
            table[reward_function_name(function)] = column[:count]
        table["advantage"] = advantages.tolist()[:count]
        return table

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's logging, then the sample table of the last rollout's completions when one is kept."""
        super().log(logs, start_time)
        sample = self.__dict__.pop("_completions_sample", None)
        if sample is not None and self.model.training and self.accelerator.is_main_process:
            print(format_completions(sample), flush=True)


def format_completions(table: dict[str, list]) -> str:
    """A plain-text table of a completions sample (one row per completion, newlines shown as ``\\n``)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):  # conversational: the last message's content
            value = value[-1].get("content", value) if value and isinstance(value[-1], dict) else value
        return str(value).replace("\n", "\\n")

    names = list(table)
    cells = [[cell(value) for value in column] for column in table.values()]
    widths = [max([len(name)] + [len(text) for text in column]) for name, column in zip(names, cells, strict=True)]
    lines = [" | ".join(name.ljust(width) for name, width in zip(names, widths, strict=True))]
    lines.append("-+-".join("-" * width for width in widths))
    for row in zip(*cells, strict=True):
        lines.append(" | ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)))
    return "\n".join(lines)

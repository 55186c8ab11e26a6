"""GRPO (and DAPO / Dr. GRPO / GSPO through the config) on ``transformers.Trainer``.

One optimiser step, as in TRL 1.x: the sampler hands over a *generation batch* of prompts, each repeated
``num_generations`` times; the rollout engine samples the completions, the reward functions score them,
:func:`fastalign.group_advantages` turns the rewards into advantages, and the batch is cut into
``steps_per_generation`` micro-batches that are trained on ``num_iterations`` times. The loss is
:class:`fastalign.nn.LinearPolicyLoss` on the backbone's hidden states and the lm_head weight: the per-token
log-probs of the policy, the old policy and the reference all come from the fused ops, never from full logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedModel

from fastalign.nn import LinearPolicyLoss
from fastalign.ops.advantages import group_advantages
from fastalign.ops.policy import GENERATION_NORMALISED_LOSS_TYPES
from fastalign.rollout import HFGenerateEngine, RolloutBatch, sampler_importance_weights
from fastalign.trainers._common import NumTokensLogMixin, TrainTokenCount, data_seed
from fastalign.trainers.configs import GRPOConfig
from fastalign.trainers.dynamic_sampling import dynamic_sampling, endless_rows
from fastalign.trainers.online import (
    PER_BATCH,
    OnlineTrainer,
    PolicyBatch,
    RewardFuncs,
    Rollout,
    completion_positions,
    completion_targets,
)


@dataclass
class GRPOBatch(PolicyBatch):
    """A :class:`~fastalign.trainers.online.PolicyBatch` with GRPO's advantages ``[N]`` (one per completion) and:

    Attributes:
        is_weights: float32 importance weights of the vLLM sampler (``[N, C]`` in the token modes of
            ``vllm_importance_sampling_mode``, ``[N]`` in the sequence modes), or None.
        sampler_logps: ``[N, C]`` the vLLM engine's log-probs (the off-policy mask's sampler), or None.
        batch_tokens / generation_tokens: float32 scalars, the completion tokens of this micro-batch / of its
            whole generation batch summed over the processes (bnpo's / dapo's divisors).
    """

    is_weights: torch.Tensor | None = None
    sampler_logps: torch.Tensor | None = None
    batch_tokens: torch.Tensor | None = dataclasses.field(default=None, metadata=PER_BATCH)
    generation_tokens: torch.Tensor | None = dataclasses.field(default=None, metadata=PER_BATCH)


class GRPOTrainer(NumTokensLogMixin, OnlineTrainer):
    """GRPO with fastalign's fused policy loss (TRL's ``GRPOTrainer`` keywords).

    Args:
        model: a causal LM, or its name/path.
        reward_funcs: TRL's contract: ``f(prompts, completions, completion_ids, **columns) -> list[float | None]``
            (``None``: not applicable to that row), a reward model (``num_labels=1``) or its path, or a list of
            them, combined with ``args.reward_weights``.
        args: :class:`GRPOConfig`.
        train_dataset / eval_dataset: datasets with a ``prompt`` column (standard or conversational); every
            other column is handed to the reward functions.
        processing_class: the tokenizer (left padding is not needed: the rollout engine pads).
        peft_config: a ``peft`` config; with ``beta > 0`` the reference is the base model with adapters off.
        rollout_engine: a :class:`fastalign.rollout.RolloutEngine`; default: ``HFGenerateEngine`` on the model
            being trained, or ``VLLMEngine`` with ``args.use_vllm``.
    """

    dataset_format = "grpo"
    batch_type = GRPOBatch

    def __init__(
        self,
        model: PreTrainedModel | str,
        reward_funcs: RewardFuncs,
        args: GRPOConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        rollout_engine: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else GRPOConfig(output_dir="fastalign-grpo")
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            peft_config,
            rollout_engine,
            kl_coef=args.beta,
            max_completion_length=args.max_completion_length,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            **kwargs,
        )
        self._train_tokens = TrainTokenCount()
        self._refill: Iterator[dict] | None = None
        self._rollout_rows, self._eval_rows = args.generation_batch_size, args.per_device_eval_batch_size
        self._micro_batches_per_rollout = args.steps_per_generation * args.num_iterations

    def _default_engine(self) -> Any:
        if not self.args.use_vllm:
            return super()._default_engine()
        from fastalign.rollout import VLLMEngine

        return VLLMEngine(
            self.model.config._name_or_path,
            gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
            tensor_parallel_size=self.args.vllm_tensor_parallel_size,
        )

    def _loss_module(self) -> LinearPolicyLoss:
        adapter, args = self._adapter(self.model), self.args
        options = args.policy_loss_options()
        temperature = args.temperature * adapter.logit_temperature
        return LinearPolicyLoss(temperature=temperature, softcap=adapter.softcap, options=options, backend=args.backend)

    # ------------------------------------------------------------------------------------------- generation

    def _generate_and_score(self, rows: list[dict], mode: str) -> GRPOBatch:
        """One generation batch: completions, rewards, advantages, and the old and reference log-probs."""
        args = self.args
        self._before_sampling()
        rollout = self._rollout(rows)
        if mode == "train" and args.dynamic_sampling:
            rollout = dynamic_sampling(
                rollout,
                self._more_rollouts,
                group=args.num_generations,
                metrics=self._metrics["train"],
                max_resample_rounds=args.max_resample_rounds,
                pad_token_id=self.processing_class.pad_token_id,
            )
        advantages, all_rewards = self._advantages(rollout.rewards)
        generated = rollout.batch
        mask = generated.completion_mask.clone()
        if args.mask_truncated_completions:
            mask[generated.truncated] = 0
        batch = self._policy_batch(generated, mask)
        batch.old_logps = self._old_logps(batch, generated)
        if args.beta != 0:
            batch.ref_logps = self._reference_logps(batch)
        sampler_logps = None
        if args.use_vllm and generated.sampler_logps is not None:
            sampler_logps = generated.sampler_logps.to(batch.completion_mask.device)
        if args.off_policy_mask_threshold is not None:  # the mask's sampler, as TRL (None: old_logps)
            batch.sampler_logps = sampler_logps
        if sampler_logps is not None and args.vllm_importance_sampling_correction:
            batch.is_weights = sampler_importance_weights(
                batch.old_logps,
                sampler_logps,
                batch.completion_mask,
                mode=args.vllm_importance_sampling_mode,
                clip_min=args.vllm_importance_sampling_clip_min,
                clip_max=args.vllm_importance_sampling_clip_max,
            )
        batch.advantages = advantages.to(batch.completion_mask.device)
        self._log_generation(mode, rollout, all_rewards)
        if mode == "train" and args.log_completions:
            self._completions_sample = self._sample_table(rollout, advantages)
        return batch

    def _more_rollouts(self, prompts: int) -> Rollout:
        if self._refill is None:
            # Each process refills from its own stream of prompts (the same one would repeat them on every process).
            self._refill = endless_rows(self.train_dataset, data_seed(self.args) + 1 + self.accelerator.process_index)
        rows = [row for _ in range(prompts) for row in [next(self._refill)] * self.args.num_generations]
        return self._rollout(rows)

    def _old_logps(self, batch: GRPOBatch, generated: RolloutBatch) -> torch.Tensor:
        """The policy's log-probs at sampling time. On policy with the HF engine on the training model, the
        sampler's own log-probs are exactly that; otherwise one forward without gradient."""
        args = self.args
        on_policy = args.num_iterations == 1 and args.steps_per_generation <= args.gradient_accumulation_steps
        if on_policy and isinstance(self.engine, HFGenerateEngine) and generated.sampler_logps is not None:
            return generated.sampler_logps.to(batch.completion_ids.device)
        return self._policy_logps(batch)

    def _advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's advantages ``[N]`` and the rewards of every process ``[N × processes]``.

        Groups are whole on each process, but ``scale_rewards="batch"`` divides by the standard deviation of the
        whole step's rewards: the rewards are gathered (every process holds ``N`` rows), the advantages computed
        on all of them, as one process would on the global batch, and this process's rows kept."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return _advantages_of(rewards, self.args.num_generations, self.args.scale_rewards), rewards
        device = self.accelerator.device
        everyone = self.accelerator.gather(rewards.to(device)).cpu()
        advantages = _advantages_of(everyone, self.args.num_generations, self.args.scale_rewards)
        rows = rewards.shape[0]
        start = self.accelerator.process_index * rows
        return advantages[start : start + rows], everyone

    def _micro_batches(self, batch: GRPOBatch, mode: str) -> list[GRPOBatch]:
        """``steps_per_generation`` shuffled micro-batches (the whole batch in evaluation), each given two token
        counts summed over the processes: its own completion tokens (bnpo's divisor) and the whole generation
        batch's (dapo's). One all-reduce per generation batch."""
        parts = self._shuffled_parts(batch, self.args.steps_per_generation) if mode == "train" else [batch]
        counts = torch.stack([part.completion_mask.sum() for part in parts]).float()
        if self.accelerator.num_processes > 1:
            counts = self._sum_over_processes(counts)
        for part, count in zip(parts, counts, strict=True):
            part.batch_tokens, part.generation_tokens = count, counts.sum()
        return parts

    # ------------------------------------------------------------------------------------------------- loss

    def _normaliser(self, batch: GRPOBatch) -> torch.Tensor | None:
        """The token count of the token-mean loss types, per process.

        dapo, cispo, vespo: the generation batch's completion tokens per optimiser step, so that the
        micro-batches' losses add up to a token mean over the step (TRL's normaliser of all three); bnpo: the
        micro-batch's tokens. Both counts are summed over the processes and divided by their number, because DDP /
        FSDP average the gradients over the processes: the result is the gradient of one process's loss on the
        global batch (TRL divides dapo's gathered count the same way; its bnpo normalises per process). grpo,
        sapo, dr_grpo and luspo average over rows, and every process holds as many rows, so their per-process
        means average to the global one."""
        processes = self.accelerator.num_processes
        if self.args.loss_type == "bnpo":
            return batch.batch_tokens.clamp_min(1) / processes
        if self.args.loss_type not in GENERATION_NORMALISED_LOSS_TYPES:
            return None
        tokens = batch.generation_tokens * self.args.gradient_accumulation_steps
        return tokens / self.args.steps_per_generation / processes

    def _loss(self, model: nn.Module, batch: GRPOBatch):
        loss_module, targets = self._loss_module(), completion_targets(batch)
        options = {"mask": batch.completion_mask, "ref_logps": batch.ref_logps, "is_weights": batch.is_weights}
        options["sampler_logps"] = batch.sampler_logps
        options["num_items_in_batch"] = self._normaliser(batch)

        def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
            hidden = completion_positions(hidden, batch.completion_ids)
            return loss_module(hidden, weight, targets, batch.old_logps, batch.advantages, bias=bias, **options)

        # One forward of the model as Trainer hands it over (DDP wrapper / FSDP2 root): gradients synchronised,
        # the lm_head gathered (see CausalLMAdapter.fused_forward).
        loss, metrics = self._adapter(model).fused_forward(
            policy_loss, batch.input_ids, batch.attention_mask, batch.position_ids
        )
        if self.args.loss_type not in GENERATION_NORMALISED_LOSS_TYPES:
            # Trainer does not divide by the accumulation steps here (loss_is_scaled_for_ga); these modes average
            # per micro-batch, so the step's loss is their mean.
            loss = loss / self.args.gradient_accumulation_steps
        mask = batch.completion_mask
        watched = {"advantages (from the rewards)": batch.advantages, "old_logps": (batch.old_logps, mask)}
        for name in ("ref_logps", "is_weights"):
            value = getattr(batch, name)
            if value is not None:
                watched[name] = (value, mask) if value.dim() == 2 else value
        return loss, metrics, watched

    # -------------------------------------------------------------------------------------------------- logs

    def _log_generation(self, mode: str, rollout: Rollout, rewards: torch.Tensor) -> None:
        metrics = self._metrics[mode]
        metrics["reward"].append(torch.nanmean(rewards))  # unscorable (NaN) completions left out
        group_std = rewards.view(-1, self.args.num_generations).std(dim=1)
        metrics["reward_std"].append(torch.nanmean(group_std))
        metrics["frac_reward_zero_std"].append((group_std == 0).float().mean())
        self._log_completions(mode, rollout.batch, rollout.per_function)
        if mode == "train":
            # TRL's num_tokens: prompt + completion tokens generated for training so far, over all processes.
            self._train_tokens.add(rollout.batch.prompt_mask.sum() + rollout.batch.completion_mask.sum())


def _advantages_of(rewards: torch.Tensor, group: int, scale: str, eps: float = 1e-4) -> torch.Tensor:
    """:func:`fastalign.group_advantages`, except that a NaN reward (an unscorable completion: every reward
    function returned ``None``) is left out of its group's mean and standard deviation and gets advantage 0, as
    TRL 1.16's GRPO does (``group_advantages`` would turn its whole group, or with ``scale="batch"`` the whole
    batch, into NaN). A group (or batch) with fewer than two scorable rewards has standard deviation 0."""
    unscorable = torch.isnan(rewards)
    if not unscorable.any():
        return group_advantages(rewards, group, scale=scale, eps=eps)
    grouped = rewards.double().view(-1, group)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = grouped - mean
    if scale != "none":  # the unbiased std of each group's (or the batch's) scorable rewards
        pooled = grouped if scale == "group" else grouped.reshape(1, -1)
        deviations = pooled - torch.nanmean(pooled, dim=1, keepdim=True)
        count = (~torch.isnan(pooled)).sum(dim=1, keepdim=True)
        std = (torch.nansum(deviations.square(), dim=1, keepdim=True) / (count - 1).clamp_min(1)).sqrt()
        advantages = advantages / (std + eps)  # [groups, 1] or [1, 1]: broadcast over the rows
    return advantages.reshape(-1).nan_to_num(nan=0.0).to(rewards.dtype)

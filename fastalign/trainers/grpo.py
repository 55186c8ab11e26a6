"""GRPO (and DAPO / Dr. GRPO / GSPO through the config) on ``transformers.Trainer``.

One optimiser step, as in TRL 1.x: the sampler hands over a *generation batch* of prompts, each repeated
``num_generations`` times; the rollout engine samples the completions, the reward functions score them,
:func:`fastalign.group_advantages` turns the rewards into advantages, and the batch is cut into
``steps_per_generation`` micro-batches that are trained on ``num_iterations`` times. The loss is
:class:`fastalign.nn.LinearPolicyLoss` on the backbone's hidden states and the lm_head weight: the per-token
log-probs of the policy, the old policy and the reference all come from the fused ops, never from full logits.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedModel, Trainer

from fastalign.data import require_format, tokenize_prompt
from fastalign.models import unwrap_peft
from fastalign.models.causal_lm import _is_fsdp2
from fastalign.nn import LinearPolicyLoss
from fastalign.ops.advantages import group_advantages
from fastalign.ops.logprobs import linear_logprobs
from fastalign.rewards import reward_function_name, score
from fastalign.rewards.resolve import resolve_reward_funcs
from fastalign.rollout import HFGenerateEngine, RolloutBatch, SamplingParams, truncated_importance_weights
from fastalign.trainers._common import (
    BufferedMetricsMixin,
    FusedLossTrainerMixin,
    NumTokensLogMixin,
    TrainTokenCount,
    data_seed,
    disable_dropout,
    load_policy_and_tokenizer,
    set_pad_token,
    sync_engine_weights,
)
from fastalign.trainers._guards import FiniteLossMixin, ResumeMixin
from fastalign.trainers.configs import GRPOConfig

RewardFuncs = Callable[..., list] | str | PreTrainedModel | Sequence[Callable[..., list] | str | PreTrainedModel]


def rollout_groups(trainer: Trainer, rows: list[dict]) -> tuple[list[dict], RolloutBatch]:
    """Sample ``num_generations`` completions for each distinct prompt of ``rows`` (each given repeated
    ``num_generations`` times) with the trainer's engine; returns the rows aligned with the batch's rows."""
    args = trainer.args
    if isinstance(trainer.engine, HFGenerateEngine):
        _check_generation_under_fsdp2(trainer.engine.model, trainer.model)
    unique = rows[:: args.num_generations]
    prompts = [
        tokenize_prompt(row, trainer.processing_class, max_prompt_length=args.max_prompt_length)["prompt_ids"]
        for row in unique
    ]
    batch = trainer.engine.generate(prompts, trainer.sampling)
    return [row for row in unique for _ in range(args.num_generations)], batch


def _check_generation_under_fsdp2(generator: nn.Module, trained: nn.Module) -> None:
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


def score_rollout(
    trainer: Trainer, rows: list[dict], batch: RolloutBatch, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-function rewards ``[N, F]`` (NaN where not applicable) and their weighted sum ``[N]`` of a rollout
    batch, with the trainer's ``reward_funcs`` / ``reward_weights``; ``options`` go to
    :func:`fastalign.rewards.score`. Completions are decoded without special tokens, as messages when the prompts
    are conversational; every other column of ``rows`` reaches the reward functions."""
    tokenizer = trainer.processing_class
    completion_ids = [
        ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask, strict=True)
    ]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompts = [row["prompt"] for row in rows]
    completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
    columns = {key: [row[key] for row in rows] for key in rows[0] if key not in ("prompt", "prompt_ids")}
    return score(trainer.reward_funcs, trainer.reward_weights, prompts, completions, completion_ids, columns, **options)


class RepeatSampler(Sampler[int]):
    """Dataset indices for GRPO: shuffled chunks of ``prompts_per_generation`` prompts; each chunk is yielded
    ``repeat_count`` times (one per micro-batch it feeds, times ``num_iterations``) and every index in it
    ``num_generations`` times in a row. Incomplete chunks at the end are dropped.

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
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=self.generator).tolist()
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


class GRPOTrainer(
    FiniteLossMixin, ResumeMixin, NumTokensLogMixin, BufferedMetricsMixin, FusedLossTrainerMixin, Trainer
):
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

    signature_columns = ()

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
        model, processing_class = load_policy_and_tokenizer(model, processing_class)
        set_pad_token(processing_class, None)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        for dataset in (train_dataset, eval_dataset):
            if dataset is not None:
                require_format(dataset, "grpo")
        self.reward_funcs, self.reward_weights = resolve_reward_funcs(
            reward_funcs, args.reward_weights or None, tokenizer=processing_class,
            max_completion_length=args.max_completion_length,
        )  # fmt: skip
        if args.disable_dropout:
            disable_dropout(model)
        self.ref_model = None
        peft = sys.modules.get("peft")
        self._reference_is_base = args.beta != 0 and peft is not None and isinstance(model, peft.PeftModel)
        if args.beta != 0 and not self._reference_is_base:
            self.ref_model = copy.deepcopy(unwrap_peft(model)).requires_grad_(False).eval()
        super().__init__(
            model=model, args=args, data_collator=lambda rows: rows, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )  # fmt: skip
        # The loss is normalised here (see _normaliser); Trainer must not count label tokens or rescale.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        self.engine = rollout_engine if rollout_engine is not None else self._default_engine()
        self.sampling = SamplingParams(
            num_generations=args.num_generations, max_completion_length=args.max_completion_length,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )  # fmt: skip
        self._step = 0
        self._train_tokens = TrainTokenCount()
        self._buffered: list[dict[str, torch.Tensor]] | None = None
        self._refill: Iterator[dict] | None = None
        self._metrics = self._metric_buffers()

    # ------------------------------------------------------------------------------------------------ set-up

    def _default_engine(self) -> Any:
        if self.args.use_vllm:
            from fastalign.rollout import VLLMEngine

            return VLLMEngine(
                self.model.config._name_or_path, gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
                tensor_parallel_size=self.args.vllm_tensor_parallel_size,
            )  # fmt: skip
        tokenizer = self.processing_class
        return HFGenerateEngine(self.model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    def _loss_module(self) -> LinearPolicyLoss:
        adapter = self._adapter(self.model)
        return LinearPolicyLoss(
            temperature=self.args.temperature * adapter.logit_temperature, softcap=adapter.softcap,
            clip_eps_low=self.args.epsilon, clip_eps_high=self.args.epsilon_high, kl_coef=self.args.beta,
            kl_estimator="k3", loss_type=self.args.loss_type,
            importance_sampling_level=self.args.importance_sampling_level, entropy_coef=self.args.entropy_coef,
            max_completion_length=self.args.max_completion_length, backend=self.args.backend,
        )  # fmt: skip

    def get_train_dataloader(self) -> DataLoader:
        """Each item is a whole generation batch (``generation_batch_size`` rows: prompts × num_generations),
        repeated once per micro-batch it feeds and per iteration; :meth:`_prepare_inputs` generates on the
        first of them and serves the micro-batches from a buffer."""
        args = self.args
        sampler = RepeatSampler(
            len(self.train_dataset), args.num_generations, args.generation_batch_size // args.num_generations,
            args.steps_per_generation * args.num_iterations, data_seed(args), self.accelerator.num_processes,
        )  # fmt: skip
        loader = DataLoader(
            self.train_dataset, batch_size=args.generation_batch_size, sampler=sampler, collate_fn=lambda rows: rows
        )
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        """Batches of ``per_device_eval_batch_size`` completions: whole groups of ``num_generations``."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        size, group = self.args.per_device_eval_batch_size, self.args.num_generations
        if size % group:
            raise ValueError(
                f"per_device_eval_batch_size ({size} completions) must be a multiple of num_generations ({group})"
            )
        sampler = RepeatSampler(len(dataset), group, size // group, 1, data_seed(self.args))
        loader = DataLoader(dataset, batch_size=size, sampler=sampler, collate_fn=lambda r: r)
        return self.accelerator.prepare(loader)

    # ------------------------------------------------------------------------------------------- generation

    def _prepare_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not self.model.training:
            inputs = self._generate_and_score(rows, "eval")
            self._count_tokens([inputs])
            return inputs
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffered is None:
            batch = self._generate_and_score(rows, "train")
            self._buffered = _split_rows(batch, self.args.steps_per_generation, self.args.seed + self._step)
            self._count_tokens(self._buffered)
        inputs = self._buffered[self._step % self.args.steps_per_generation]
        self._step += 1
        return inputs

    def _generate_and_score(self, rows: list[dict], mode: str) -> dict[str, torch.Tensor]:
        args = self.args
        self._stop_if_loss_was_not_finite()  # NaN weights would fail in sampling, without saying why
        sync_engine_weights(self, self.model)
        rows, batch = rollout_groups(self, rows)
        per_function, rewards = score_rollout(self, rows, batch)
        if mode == "train" and args.dynamic_sampling:
            rows, batch, per_function, rewards = self._dynamic_sampling(rows, batch, per_function, rewards)
        advantages, all_rewards = self._advantages(rewards)
        mask = batch.completion_mask.clone()
        if args.mask_truncated_completions:
            mask[batch.truncated] = 0
        inputs = self._training_tensors(batch, mask)
        inputs["advantages"] = advantages.to(self.model.device)
        self._log_generation(mode, batch, per_function, all_rewards)
        if mode == "train" and args.log_completions:
            self._completions_sample = self._sample_table(rows, batch, per_function, advantages)
        return inputs

    def _sample_table(self, rows, batch: RolloutBatch, per_function: torch.Tensor, advantages: torch.Tensor):
        """The columns TRL's ``log_completions`` prints: prompt, completion, each reward function's reward and
        the advantage, for the first ``num_completions_to_print`` rows of this process's generation batch."""
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
        super().log(logs, start_time)
        sample = self.__dict__.pop("_completions_sample", None)
        if sample is not None and self.model.training and self.accelerator.is_main_process:
            print(format_completions(sample), flush=True)

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

    def _count_tokens(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """Give every row of each micro-batch in ``parts`` (one generation batch) two token counts summed over the
        processes: ``batch_tokens`` (its micro-batch's completion tokens, bnpo's divisor) and
        ``generation_tokens`` (the whole generation batch's, dapo's). One all-reduce per generation batch."""
        counts = torch.stack([part["completion_mask"].sum() for part in parts]).float()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        for part, count in zip(parts, counts, strict=True):
            rows = part["completion_mask"].shape[0]
            part["batch_tokens"] = count.expand(rows)
            part["generation_tokens"] = counts.sum().expand(rows)

    def _dynamic_sampling(self, rows, batch, per_function, rewards):
        """DAPO: keep groups whose rewards differ (the others have zero advantage and teach nothing) and sample
        more prompts until the generation batch is full again, or ``max_resample_rounds`` are used up (then the
        remaining places are filled with dropped groups)."""
        groups = rewards.numel() // self.args.num_generations
        needed = groups
        kept: list[tuple[list[dict], RolloutBatch, torch.Tensor, torch.Tensor]] = []
        dropped = []
        pending = (rows, batch, per_function, rewards)
        for round_ in range(self.args.max_resample_rounds + 1):
            for group in _split_groups(*pending, self.args.num_generations):
                (kept if group[3].std() > 0 else dropped).append(group)
            if len(kept) >= needed or round_ == self.args.max_resample_rounds:
                break  # (no refill after the last round: it would be sampled and never looked at)
            pending = self._more_rollouts(needed - len(kept))
            self._metrics["train"]["dynamic_sampling/resampled_prompts"].append(float(needed - len(kept)))
        self._metrics["train"]["dynamic_sampling/kept_groups"].append(float(min(len(kept), needed)))
        chosen = (kept + dropped)[:needed]
        return _concat_groups(chosen, self.processing_class.pad_token_id)

    def _more_rollouts(self, prompts: int):
        if self._refill is None:
            # Each process refills from its own stream of prompts (the same one would repeat them on every process).
            self._refill = _cycle(self.train_dataset, data_seed(self.args) + 1 + self.accelerator.process_index)
        rows = [row for _ in range(prompts) for row in [next(self._refill)] * self.args.num_generations]
        rows, batch = rollout_groups(self, rows)
        per_function, rewards = score_rollout(self, rows, batch)
        return rows, batch, per_function, rewards

    @torch.no_grad()
    def _training_tensors(self, batch: RolloutBatch, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        device = self.model.device
        prompt_ids, prompt_mask = batch.prompt_ids.to(device), batch.prompt_mask.to(device)
        completion_ids, mask = batch.completion_ids.to(device), mask.to(device)
        attention_mask = torch.cat([prompt_mask, batch.completion_mask.to(device)], dim=1)
        inputs = {
            "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
            "attention_mask": attention_mask,
            # Prompts are left-padded: positions count real tokens only, as they did during generation.
            "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp_min(0),
            "completion_ids": completion_ids,
            "completion_mask": mask,
        }
        inputs["old_logps"] = self._old_logps(inputs, batch)
        if self.args.beta != 0:
            inputs["ref_logps"] = self._reference_logps(inputs)
        if self.args.use_vllm and self.args.vllm_importance_sampling_correction and batch.sampler_logps is not None:
            inputs["is_weights"] = truncated_importance_weights(
                inputs["old_logps"], batch.sampler_logps.to(device), mask, self.args.vllm_importance_sampling_cap
            )
        return inputs

    def _old_logps(self, inputs: dict[str, torch.Tensor], batch: RolloutBatch) -> torch.Tensor:
        """The policy's log-probs at sampling time. On policy with the HF engine on the training model, the
        sampler's own log-probs are exactly that; otherwise one forward without gradient."""
        on_policy = (
            self.args.num_iterations == 1 and self.args.steps_per_generation <= self.args.gradient_accumulation_steps
        )
        if on_policy and isinstance(self.engine, HFGenerateEngine) and batch.sampler_logps is not None:
            return batch.sampler_logps.to(inputs["completion_ids"].device)
        return self._completion_logps(self.model, inputs)

    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._reference_is_base:
            with self.model.disable_adapter():
                return self._completion_logps(self.model, inputs)
        return self._completion_logps(self.ref_model, inputs)

    @torch.no_grad()
    def _completion_logps(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[N, C]`` float32 log-probs of the completion tokens at the sampling temperature (0 off the mask).

        ``model`` is ``self.model`` (the bare module under DDP: no gradient, so no wrapper and no collective; the
        FSDP2 root, whose forward gathers the sharded weights) or the reference model."""
        adapter = self._adapter(model)
        targets = _completion_targets(inputs)

        def logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return linear_logprobs(
                _completion_positions(hidden, targets), weight, targets, bias=bias, softcap=adapter.softcap,
                temperature=self.args.temperature * adapter.logit_temperature, backend=self.args.backend,
            )  # fmt: skip

        return adapter.fused_forward(logprobs, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"])

    # ------------------------------------------------------------------------------------------------- loss

    def _normaliser(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The token count of the token-mean loss types, per process.

        dapo: the generation batch's completion tokens per optimiser step, so that the micro-batches' losses add
        up to a token mean over the step; bnpo: the micro-batch's tokens. Both counts are summed over the
        processes and divided by their number, because DDP / FSDP average the gradients over the processes: the
        result is the gradient of one process's loss on the global batch (TRL divides dapo's gathered count the
        same way; its bnpo normalises per process). grpo and dr_grpo average over rows, and every process holds
        as many rows, so their per-process means average to the global one."""
        processes = self.accelerator.num_processes
        if self.args.loss_type == "bnpo":
            return inputs["batch_tokens"][0].clamp_min(1) / processes
        if self.args.loss_type != "dapo":
            return None
        tokens = inputs["generation_tokens"][0]
        return tokens * self.args.gradient_accumulation_steps / self.args.steps_per_generation / processes

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = _completion_targets(inputs)
        loss_module, normaliser = self._loss_module(), self._normaliser(inputs)

        def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
            return loss_module(
                _completion_positions(hidden, targets), weight, targets, inputs["old_logps"], inputs["advantages"],
                mask=inputs["completion_mask"], ref_logp=inputs.get("ref_logps"), is_weights=inputs.get("is_weights"),
                num_items_in_batch=normaliser, bias=bias,
            )  # fmt: skip

        # One forward of the model as Trainer hands it over (DDP wrapper / FSDP2 root): gradients synchronised,
        # the lm_head gathered (see CausalLMAdapter.fused_forward).
        loss, metrics = self._adapter(model).fused_forward(
            policy_loss, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        )
        if self.args.loss_type != "dapo":
            # Trainer does not divide by the accumulation steps here (loss_is_scaled_for_ga); these modes average
            # per micro-batch, so the step's loss is their mean.
            loss = loss / self.args.gradient_accumulation_steps
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)  # tensors: read once, when logged
        if model.training:
            mask = inputs["completion_mask"]
            watched = {"advantages (from the rewards)": inputs["advantages"], "old_logps": (inputs["old_logps"], mask)}
            for name in ("ref_logps", "is_weights"):
                if inputs.get(name) is not None:
                    watched[name] = (inputs[name], mask) if inputs[name].dim() == 2 else inputs[name]
            self._watch_loss(loss, watched)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    # -------------------------------------------------------------------------------------------------- logs

    def _log_generation(self, mode: str, batch: RolloutBatch, per_function: torch.Tensor, rewards: torch.Tensor):
        metrics = self._metrics[mode]
        metrics["reward"].append(float(torch.nanmean(rewards)))  # unscorable (NaN) completions left out
        group_std = rewards.view(-1, self.args.num_generations).std(dim=1)
        metrics["reward_std"].append(float(torch.nanmean(group_std)))
        metrics["frac_reward_zero_std"].append(float((group_std == 0).float().mean()))
        metrics["completions/mean_length"].append(float(batch.completion_mask.sum(dim=1).float().mean()))
        metrics["completions/clipped_ratio"].append(float(batch.truncated.float().mean()))
        if mode == "train":
            # TRL's num_tokens: prompt + completion tokens generated for training so far, over all processes.
            self._train_tokens.add(batch.prompt_mask.sum() + batch.completion_mask.sum())
        for function, column in zip(self.reward_funcs, per_function.T, strict=True):
            metrics[f"rewards/{reward_function_name(function)}/mean"].append(float(torch.nanmean(column)))


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


def _completion_targets(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, C]`` completion token ids, -100 off the completion mask."""
    return inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


def _completion_positions(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The hidden states ``[N, C, D]`` that predict the ``C`` completion tokens (the prompt + completion sequence
    ``[N, P + C, D]`` shifted by one)."""
    completion = targets.shape[1]
    return hidden[:, -completion - 1 : -1]


def _split_rows(batch: dict[str, torch.Tensor], parts: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Shuffle the generation batch's rows and cut them into ``parts`` micro-batches (TRL shuffles too, so a
    micro-batch mixes groups)."""
    rows = next(iter(batch.values())).shape[0]
    if rows % parts:
        raise ValueError(f"{rows} rows cannot be cut into {parts} equal micro-batches")
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    size = rows // parts
    return [
        {key: value[order[i * size : (i + 1) * size].to(value.device)] for key, value in batch.items()}
        for i in range(parts)
    ]


def _split_groups(rows, batch: RolloutBatch, per_function, rewards, group_size: int):
    for start in range(0, rewards.numel(), group_size):
        part = slice(start, start + group_size)
        yield rows[part], _slice_batch(batch, part), per_function[part], rewards[part]


def _slice_batch(batch: RolloutBatch, part: slice) -> RolloutBatch:
    return RolloutBatch(
        prompt_ids=batch.prompt_ids[part], prompt_mask=batch.prompt_mask[part],
        completion_ids=batch.completion_ids[part], completion_mask=batch.completion_mask[part],
        truncated=batch.truncated[part],
        sampler_logps=None if batch.sampler_logps is None else batch.sampler_logps[part],
    )  # fmt: skip


def _pad_to(tensor: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    pad = tensor.new_full((tensor.shape[0], missing), value)
    return torch.cat([pad, tensor] if left else [tensor, pad], dim=1)


def _concat_groups(groups, pad_id: int):
    """Groups from different rollouts (different prompt and completion widths) joined into one batch."""
    batches = [g[1] for g in groups]
    prompt_width = max(b.prompt_ids.shape[1] for b in batches)
    completion_width = max(b.completion_ids.shape[1] for b in batches)

    def joined(name: str, width: int, value: float, left: bool) -> torch.Tensor:
        return torch.cat([_pad_to(getattr(b, name), width, value, left) for b in batches])

    sampler = None
    if all(b.sampler_logps is not None for b in batches):
        sampler = joined("sampler_logps", completion_width, 0.0, False)
    batch = RolloutBatch(
        prompt_ids=joined("prompt_ids", prompt_width, pad_id, True),
        prompt_mask=joined("prompt_mask", prompt_width, 0, True),
        completion_ids=joined("completion_ids", completion_width, pad_id, False),
        completion_mask=joined("completion_mask", completion_width, 0, False),
        truncated=torch.cat([b.truncated for b in batches]),
        sampler_logps=sampler,
    )
    rows = [row for g in groups for row in g[0]]
    return rows, batch, torch.cat([g[2] for g in groups]), torch.cat([g[3] for g in groups])


def _cycle(dataset: datasets.Dataset, seed: int) -> Iterator[dict]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        for index in torch.randperm(len(dataset), generator=generator).tolist():
            yield dataset[index]

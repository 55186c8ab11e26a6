"""PPO with a value model (RLHF) on ``transformers.Trainer``, with TRL's ``PPOTrainer`` fields and metrics.

One rollout, as in TRL: the sampler hands over a batch of prompts (``num_generations`` rows each, 1 by default);
the rollout engine samples the completions and the reward functions score them (one scalar per sequence,
minus ``missing_eos_penalty`` for completions without EOS). Without gradient, the policy gives the old
log-probs, the reference its log-probs and the value model its values, all over prompt + completion. The
per-token rewards are ``−kl_coef·KL_t(π_old‖π_ref)`` plus the score at the last completion token (TRL's default;
or the KL goes into the loss with ``kl_in_reward=False``); :func:`fastalign.gae` gives advantages and returns,
and the advantages are whitened over the batch. The batch is then trained on ``num_ppo_epochs`` times in
``num_mini_batches`` shuffled mini-batches, one optimiser step each.

The policy and the value model sit in one :class:`PolicyAndValueModel`, the module ``Trainer`` optimises, so one
optimiser holds both. The policy term is :class:`fastalign.nn.LinearPolicyLoss` on the backbone's hidden states
and the lm_head weight (``objective="clip"``) or the KL-penalty objective on :func:`fastalign.linear_logprobs`
(``objective="kl_penalty"``); neither materialises the ``[tokens, vocab]`` logits. The value term is
:func:`fastalign.value_loss`, clipped with ``cliprange_value``, times ``vf_coef``.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from typing import Any

import datasets
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer

from fastalign.data import require_format
from fastalign.models import CausalLMAdapter, ValueHeadModel, unwrap_peft
from fastalign.nn import LinearPolicyLoss
from fastalign.ops.advantages import gae
from fastalign.ops.logprobs import linear_logprobs
from fastalign.ops.policy import LOG_RATIO_LIMIT, kl_estimate, value_loss
from fastalign.rewards import reward_function_name
from fastalign.rewards.resolve import resolve_reward_funcs
from fastalign.rollout import HFGenerateEngine, SamplingParams
from fastalign.trainers._common import (
    BufferedMetricsMixin,
    FusedLossTrainerMixin,
    data_seed,
    disable_dropout,
    load_policy_and_tokenizer,
    set_pad_token,
    sync_engine_weights,
)
from fastalign.trainers._guards import FiniteLossMixin, ResumeMixin
from fastalign.trainers.configs import PPOConfig
from fastalign.trainers.grpo import RepeatSampler, RewardFuncs, rollout_groups, score_rollout

__all__ = ["PPOTrainer", "PolicyAndValueModel", "adapt_kl_coef", "masked_whiten"]


class PolicyAndValueModel(nn.Module):
    """The policy (a causal LM, or a ``PeftModel`` around one) and the value model side by side: the one module
    ``Trainer`` optimises, so both sets of parameters share its optimiser (TRL's ``PolicyAndValueWrapper``).

    ``forward(input_ids, attention_mask, position_ids) -> (hidden [B, T, D], values [B, T])``: the policy
    backbone's last hidden states (no lm_head) and the value of every position (float32).

    ``forward(..., head=fn)`` returns ``fn(hidden, weight, bias, values)`` instead, with the lm_head ``weight
    [V, D]`` and ``bias [V] | None``: a loss on the lm_head computed *inside* this module's forward, which is
    what a distributed wrapper runs (DDP then finds the lm_head in the graph; FSDP2, sharding this module as
    the root, has gathered the lm_head and the embeddings there). ``values=False`` skips the value model
    (``fn`` gets ``None``).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module):
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

    def activation_checkpointing_enable(self, **kwargs: Any) -> None:
        for module in (unwrap_peft(self.policy), getattr(self.value_model, "backbone", self.value_model)):
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        for module in (unwrap_peft(self.policy), getattr(self.value_model, "backbone", self.value_model)):
            if hasattr(module, "activation_checkpointing_disable"):
                module.activation_checkpointing_disable()


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    *,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """TRL's ``masked_whiten``: ``(x − mean) / sqrt(var + 1e-8)`` with the mean and the unbiased variance over the
    masked entries; ``shift_mean=False`` adds the mean back (reward whitening). 0 off the mask.

    ``reduce_sum``: sums a tensor over the processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``); the mean
    and variance are then those of the masked entries of every process (two small all-reduces).
    """
    keep = mask != 0
    reduce_sum = reduce_sum if reduce_sum is not None else (lambda tensor: tensor)
    total, count = reduce_sum(torch.stack([torch.where(keep, values, 0.0).sum(), keep.sum().to(values.dtype)]))
    mean = total / count.clamp_min(1)
    variance = reduce_sum(torch.where(keep, (values - mean).square(), 0.0).sum()) / (count - 1).clamp_min(1)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, 0.0)


def adapt_kl_coef(beta: torch.Tensor, kl: torch.Tensor, target_kl: float) -> torch.Tensor:
    """The PPO paper's adaptive KL coefficient: ``β × 2`` when the measured KL exceeds ``1.5 × target_kl``,
    ``β / 2`` when it is below ``target_kl / 1.5``, else unchanged (tensor ops: no host sync)."""
    factor = torch.where(kl > 1.5 * target_kl, 2.0, torch.where(kl < target_kl / 1.5, 0.5, 1.0))
    return beta * factor.to(beta.dtype)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    keep = mask != 0
    return torch.where(keep, values.float(), 0.0).sum() / keep.sum().clamp_min(1)


def _default_value_model(model: nn.Module) -> ValueHeadModel:
    """A value model initialised from a copy of the policy's backbone (TRL initialises it from the reward model
    or the SFT policy; the policy is what is always at hand) with a fresh value head. Under PEFT the copy drops
    the LoRA layers and trains fully."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        base = copy.deepcopy(model).unload()  # the base weights without LoRA layers
    else:
        base = copy.deepcopy(model)
    return ValueHeadModel(base).requires_grad_(True)


class PPOTrainer(FiniteLossMixin, ResumeMixin, BufferedMetricsMixin, FusedLossTrainerMixin, Trainer):
    """PPO with a learned value model and fastalign's fused policy loss (TRL's ``PPOTrainer`` keywords).

    Args:
        model: the policy, a causal LM or its name/path.
        reward_funcs: TRL's reward-function contract (``f(prompts, completions, completion_ids, **columns) ->
            list[float | None]``), a reward model (``num_labels=1``) or its path, or a list of them, combined
            with ``args.reward_weights``; ``None``: ``args.reward_model_path``.
        args: :class:`PPOConfig`.
        train_dataset / eval_dataset: datasets with a ``prompt`` column (standard or conversational); the other
            columns go to the reward functions.
        processing_class: the tokenizer.
        value_model: a module ``(input_ids, attention_mask, position_ids=None) -> [B, T]`` values, e.g. a
            :class:`fastalign.models.ValueHeadModel`; default: one built on a copy of the policy's backbone.
        ref_model: the reference policy; default: a frozen copy of the policy, or with ``peft_config`` the
            base model with the adapters disabled. None is kept when ``kl_coef == 0``.
        peft_config: a ``peft`` config for the policy.
        rollout_engine: a :class:`fastalign.rollout.RolloutEngine`; default: ``HFGenerateEngine`` on the policy.
    """

    signature_columns = ()

    def __init__(
        self,
        model: PreTrainedModel | str,
        reward_funcs: RewardFuncs | None = None,
        args: PPOConfig | None = None,
        train_dataset: datasets.Dataset | None = None,
        eval_dataset: datasets.Dataset | None = None,
        processing_class: Any = None,
        value_model: nn.Module | None = None,
        ref_model: nn.Module | None = None,
        peft_config: Any = None,
        rollout_engine: Any = None,
        **kwargs: Any,
    ):
        args = args if args is not None else PPOConfig(output_dir="fastalign-ppo")
        model, processing_class = load_policy_and_tokenizer(model, processing_class)
        set_pad_token(processing_class, None)
        for dataset in (train_dataset, eval_dataset):
            if dataset is not None:
                require_format(dataset, "ppo")
        if reward_funcs is None and args.reward_model_path is None:
            raise ValueError("PPOTrainer needs reward_funcs or args.reward_model_path")
        self.reward_funcs, self.reward_weights = resolve_reward_funcs(
            reward_funcs, args.reward_weights or None, tokenizer=processing_class,
            reward_model=args.reward_model_path if reward_funcs is None else None,
            max_completion_length=args.response_length,
        )  # fmt: skip
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if value_model is None:
            value_model = _default_value_model(model)
        peft = sys.modules.get("peft")
        self._reference_is_base = (
            ref_model is None and args.kl_coef != 0 and peft is not None and isinstance(model, peft.PeftModel)
        )
        if ref_model is None and args.kl_coef != 0 and not self._reference_is_base:
            ref_model = copy.deepcopy(unwrap_peft(model))
        self.ref_model = None if ref_model is None else ref_model.requires_grad_(False).eval()
        if args.disable_dropout:
            for module in (model, value_model, self.ref_model):
                if module is not None:
                    disable_dropout(module)
        super().__init__(
            model=PolicyAndValueModel(model, value_model), args=args, data_collator=lambda rows: rows,
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )  # fmt: skip
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        # The loss is a token mean per micro-batch divided here by the accumulation steps (as TRL's PPO).
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        tokenizer = self.processing_class
        self.eos_token_id = args.stop_token_id if args.stop_token_id is not None else tokenizer.eos_token_id
        self.engine = rollout_engine if rollout_engine is not None else self._default_engine()
        self.sampling = SamplingParams(
            num_generations=args.num_generations, max_completion_length=args.response_length,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None,
        )  # fmt: skip
        self.kl_penalty_beta = torch.tensor(float(args.kl_penalty_coef), device=self.args.device)
        self._step = 0
        self._rollout: list[dict[str, torch.Tensor]] | None = None
        self._metrics = self._metric_buffers()

    # ------------------------------------------------------------------------------------------------ set-up

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).value_model

    def _default_engine(self) -> HFGenerateEngine:
        return HFGenerateEngine(
            self.policy, pad_token_id=self.processing_class.pad_token_id, eos_token_id=self.eos_token_id,
            batch_size=max(1, self.args.local_rollout_forward_batch_size // self.args.num_generations),
        )  # fmt: skip

    def _loss_module(self) -> LinearPolicyLoss:
        adapter = self._adapter(self.policy)
        kl_in_loss = not self.args.kl_in_reward and self.args.kl_coef != 0
        return LinearPolicyLoss(
            temperature=self.args.temperature * adapter.logit_temperature, softcap=adapter.softcap,
            clip_eps_low=self.args.cliprange, kl_coef=self.args.kl_coef if kl_in_loss else 0.0,
            # With the KL in the reward, the old log-probs stand in as "reference" with a zero coefficient:
            # the k2 estimate's mean is then TRL's approxkl, 0.5·mean((logp − old)²), at no extra cost.
            kl_estimator="k3" if kl_in_loss else "k2", loss_agg_mode="token-mean", backend=self.args.backend,
        )  # fmt: skip

    @property
    def _micro_batches_per_rollout(self) -> int:
        args = self.args
        return args.gradient_accumulation_steps * args.num_mini_batches * args.num_ppo_epochs

    def get_train_dataloader(self) -> DataLoader:
        """Each item is a whole rollout batch (``rollout_batch_size`` rows), repeated once per micro-batch it
        feeds over the PPO epochs; :meth:`_prepare_inputs` rolls out on the first and serves the rest from a
        buffer."""
        args = self.args
        sampler = RepeatSampler(
            len(self.train_dataset), args.num_generations, args.rollout_batch_size // args.num_generations,
            self._micro_batches_per_rollout, data_seed(args), self.accelerator.num_processes,
        )  # fmt: skip
        loader = DataLoader(
            self.train_dataset, batch_size=args.rollout_batch_size, sampler=sampler, collate_fn=lambda rows: rows
        )
        return self.accelerator.prepare(loader)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        prompts = self.args.per_device_eval_batch_size
        sampler = RepeatSampler(len(dataset), self.args.num_generations, prompts, 1, data_seed(self.args))
        loader = DataLoader(
            dataset, batch_size=prompts * self.args.num_generations, sampler=sampler, collate_fn=lambda r: r
        )
        return self.accelerator.prepare(loader)

    # ---------------------------------------------------------------------------------------------- rollout

    def _prepare_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not self.model.training:
            return self._generate_and_score(rows, "eval")
        position = self._step % self._micro_batches_per_rollout
        if position == 0 or self._rollout is None:
            adaptive = self.args.objective == "kl_penalty" and self.args.target_kl is not None
            if self._rollout is not None and adaptive:
                self._adapt_kl_penalty(self._rollout[: self._micro_batches_per_epoch])
            batch = self._generate_and_score(rows, "train")
            self._rollout = self._micro_batches(batch, self.args.seed + self._step)
        inputs = self._rollout[position]
        self._step += 1
        return inputs

    @property
    def _micro_batches_per_epoch(self) -> int:
        return self.args.gradient_accumulation_steps * self.args.num_mini_batches

    def _micro_batches(self, batch: dict[str, torch.Tensor], seed: int) -> list[dict[str, torch.Tensor]]:
        """``num_ppo_epochs`` shuffles of the rollout's rows, each cut into its micro-batches; consecutive runs
        of ``gradient_accumulation_steps`` micro-batches form the mini-batches (TRL's order)."""
        rows = batch["input_ids"].shape[0]
        parts = self._micro_batches_per_epoch
        size = rows // parts
        generator = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(self.args.num_ppo_epochs):
            order = torch.randperm(rows, generator=generator)
            for i in range(parts):
                index = order[i * size : (i + 1) * size]
                out.append({key: value[index.to(value.device)] for key, value in batch.items()})
        return out

    @torch.no_grad()
    def _generate_and_score(self, rows: list[dict], mode: str) -> dict[str, torch.Tensor]:
        """The rollout batch with everything the PPO update reads: token tensors, old log-probs, old values,
        per-token rewards, advantages and returns."""
        args = self.args
        self._stop_if_loss_was_not_finite()  # NaN weights would fail in sampling, without saying why
        sync_engine_weights(self, self.policy)
        device = self.args.device
        rows, batch = rollout_groups(self, rows)
        per_function, scores = score_rollout(self, rows, batch, unscorable="zero")
        scores = scores.to(device)
        truncated = batch.truncated.to(device)
        if args.missing_eos_penalty is not None:
            scores = scores - args.missing_eos_penalty * truncated.float()
        mask = batch.completion_mask.to(device)
        attention_mask = torch.cat([batch.prompt_mask.to(device), mask], dim=1)
        inputs = {
            "input_ids": torch.cat([batch.prompt_ids.to(device), batch.completion_ids.to(device)], dim=1),
            "attention_mask": attention_mask,
            # Prompts are left-padded: positions count real tokens only, as they did during generation.
            "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp_min(0),
            "completion_ids": batch.completion_ids.to(device),
            "completion_mask": mask,
        }
        old = [self._policy_forward(part) for part in self._chunks(inputs)]
        inputs["old_logps"] = torch.cat([logps for logps, _ in old])
        inputs["old_values"] = torch.cat([values for _, values in old]) * mask
        kl_estimator = args.kl_estimator if args.kl_in_reward else "k3"
        kl = torch.zeros_like(inputs["old_logps"])
        if args.kl_coef != 0:
            inputs["ref_logps"] = torch.cat([self._reference_logps(part) for part in self._chunks(inputs)])
            kl = kl_estimate(inputs["old_logps"], inputs["ref_logps"], kl_estimator) * mask
        inputs["scores"] = scores
        inputs["rewards"] = token_rewards(kl, scores, mask, args.kl_coef if args.kl_in_reward else 0.0)
        # Whitened over the rollouts of every process: the statistics of one process on the global batch.
        reduce_sum = self._sum_over_processes if self.accelerator.num_processes > 1 else None
        rewards = inputs["rewards"]
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, reduce_sum=reduce_sum)
        advantages, inputs["returns"] = gae(rewards, inputs["old_values"], mask, gamma=args.gamma, lam=args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask, reduce_sum=reduce_sum)
        inputs["advantages"] = advantages
        self._log_rollout(mode, inputs, kl, truncated, per_function)
        return inputs

    def _chunks(self, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Row chunks of ``local_rollout_forward_batch_size`` (the no-gradient forwards of the rollout)."""
        size = self.args.local_rollout_forward_batch_size
        rows = inputs["input_ids"].shape[0]
        return [{k: v[start : start + size] for k, v in inputs.items()} for start in range(0, rows, size)]

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="sum")

    def _logprobs_head(self, inputs: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``(hidden [N, P + C, D], weight, bias, values) -> [N, C]`` float32 completion log-probs at the sampling
        temperature (0 off the mask)."""
        adapter = self._adapter(self.policy)
        targets = _targets(inputs)

        def logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: Any):
            return linear_logprobs(
                _completion_positions(hidden, targets), weight, targets, bias=bias, softcap=adapter.softcap,
                temperature=self.args.temperature * adapter.logit_temperature, backend=self.args.backend,
            )  # fmt: skip

        return logprobs

    @torch.no_grad()
    def _policy_forward(
        self, inputs: dict[str, torch.Tensor], values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Completion log-probs ``[N, C]`` and values ``[N, C]`` (float32; ``None`` with ``values=False``) of the
        current policy and value model, without gradient, in one forward of the module ``Trainer`` optimises:
        unwrapped from DDP (no gradient, nothing to synchronise), but under FSDP2 the sharded root itself, whose
        forward gathers the policy's embeddings and lm_head."""
        logprobs = self._logprobs_head(inputs)

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, value: Any):
            value = None if value is None else _completion_positions(value, inputs["completion_ids"]).float()
            return logprobs(hidden, weight, bias, None), value

        module = self.accelerator.unwrap_model(self.model)
        ids, attention, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        return module(ids, attention, positions, head=head, values=values)

    @torch.no_grad()
    def _reference_logps(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._reference_is_base:
            with self.policy.disable_adapter():
                return self._policy_forward(inputs, values=False)[0]
        logprobs = self._logprobs_head(inputs)
        adapter = self._adapter(self.ref_model)
        return adapter.fused_forward(
            lambda hidden, weight, bias: logprobs(hidden, weight, bias, None),
            inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------- loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        args = self.args
        mask = inputs["completion_mask"]
        tokens = self._token_normaliser(inputs)

        def losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor):
            hidden = _completion_positions(hidden, inputs["completion_ids"])
            values = _completion_positions(values, inputs["completion_ids"])
            if args.objective == "clip":
                policy_loss, metrics = self._clip_loss(hidden, weight, bias, inputs, tokens)
            else:
                policy_loss, metrics = self._kl_penalty_loss(hidden, weight, bias, inputs, tokens)
            old_values, returns = inputs["old_values"], inputs["returns"]
            vf_loss = value_loss(values, old_values, returns, mask, clip_range=args.cliprange_value)
            if tokens is not None:  # this process's token mean as its share of the global one
                vf_loss = vf_loss * (mask != 0).sum() / tokens
            with torch.no_grad():
                clipped = old_values + (values - old_values).clamp(-args.cliprange_value, args.cliprange_value)
                clipfrac = (clipped - returns).square() > (values - returns).square()
                metrics["val/clipfrac_avg"] = _masked_mean(clipfrac, mask)
            return policy_loss, vf_loss, metrics

        # The whole loss runs inside the forward of the module as Trainer hands it over (DDP wrapper / FSDP2 root).
        policy_loss, vf_loss, metrics = model(
            inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], head=losses
        )
        loss = (policy_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps
        metrics["loss/policy_avg"] = policy_loss.detach()
        metrics["loss/value_avg"] = vf_loss.detach()
        mode = "train" if model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)  # tensors: read once, when logged
        if model.training:
            # a batch built outside _prepare_inputs (bench.train_step) may carry no scores
            watched = {"scores (from the rewards)": inputs["scores"]} if "scores" in inputs else {}
            for name in ("advantages", "returns", "old_logps", "old_values", "ref_logps"):
                if name in inputs:
                    watched[name] = (inputs[name], mask)
            self._watch_loss(loss, watched)
        return (loss, metrics) if return_outputs else loss

    def _token_normaliser(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """With several processes: the micro-batch's completion tokens summed over the processes, divided by their
        number. A token mean divided by it instead of this process's count averages (as DDP / FSDP average the
        gradients) to the token mean of one process on the global micro-batch. ``None`` in one process."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return None
        tokens = (inputs["completion_mask"] != 0).sum().float()
        return self._sum_over_processes(tokens).clamp_min(1) / processes

    def _clip_loss(self, hidden, weight, bias, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None):
        """TRL's clipped surrogate, ``max(−A·ratio, −A·clip(ratio, 1 ± cliprange))`` as a token mean (over
        ``tokens`` when given), on the hidden states ``[N, C, D]`` through :class:`LinearPolicyLoss`."""
        kl_in_loss = not self.args.kl_in_reward and self.args.kl_coef != 0
        loss, stats = self._loss_module()(
            hidden, weight, _targets(inputs), inputs["old_logps"], inputs["advantages"],
            mask=inputs["completion_mask"], ref_logp=inputs["ref_logps"] if kl_in_loss else inputs["old_logps"],
            num_items_in_batch=tokens, bias=bias,
        )  # fmt: skip
        metrics = {
            "policy/clipfrac_avg": stats["clip_frac_low"] + stats["clip_frac_high"],
            "val/ratio": stats["ratio_mean"],
        }
        metrics["objective/kl_loss" if kl_in_loss else "policy/approxkl_avg"] = stats["kl_mean"]
        return loss, metrics

    def _kl_penalty_loss(self, hidden, weight, bias, inputs: dict[str, torch.Tensor], tokens: torch.Tensor | None):
        """The PPO paper's KL-penalty objective as a loss: ``−ratio·A + β·KL_t(π_old‖π)`` per token (k1:
        ``old − logp``, k3: ``ratio − 1 − log ratio``), token mean (over ``tokens`` when given); ``β`` adapts
        after each rollout."""
        args = self.args
        adapter = self._adapter(self.policy)
        mask, old = inputs["completion_mask"], inputs["old_logps"]
        logp = linear_logprobs(
            hidden, weight, _targets(inputs), bias=bias, softcap=adapter.softcap,
            temperature=args.temperature * adapter.logit_temperature, backend=args.backend,
        )  # fmt: skip
        keep = mask != 0
        log_ratio = torch.where(keep, logp - old, 0.0).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        ratio = torch.exp(log_ratio)
        kl_old = kl_estimate(old, logp, args.kl_penalty_estimator)  # KL(π_old‖π) on samples of π_old
        per_token = -inputs["advantages"] * ratio + self.kl_penalty_beta * kl_old
        metrics = {}
        if not args.kl_in_reward and args.kl_coef != 0:
            kl_ref = kl_estimate(logp, inputs["ref_logps"], "k3")
            per_token = per_token + args.kl_coef * kl_ref
            metrics["objective/kl_loss"] = _masked_mean(kl_ref.detach(), mask)
        if tokens is None:
            loss = _masked_mean(per_token, mask)
        else:
            loss = torch.where(mask != 0, per_token, 0.0).sum() / tokens
        with torch.no_grad():
            metrics["policy/approxkl_avg"] = 0.5 * _masked_mean(log_ratio.square(), mask)
            metrics["policy/kl_old_avg"] = _masked_mean(kl_old, mask)
            metrics["val/ratio"] = _masked_mean(ratio, mask)
            metrics["objective/kl_penalty_beta"] = self.kl_penalty_beta.clone()
        return loss, metrics

    @torch.no_grad()
    def _adapt_kl_penalty(self, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """After a rollout's update: ``d = E[KL(π_old‖π)]`` over its batch (one forward, no gradient), then
        :func:`adapt_kl_coef`. ``d`` is the k3 estimate whatever ``kl_penalty_estimator``: the policy was just fit
        to these samples, which biases k1 (it can even turn negative); k3 is never negative."""
        total = torch.zeros((), device=self.args.device)
        tokens = torch.zeros((), device=self.args.device)
        for part in micro_batches:
            logp, _ = self._policy_forward(part, values=False)
            keep = part["completion_mask"] != 0
            total += torch.where(keep, kl_estimate(part["old_logps"], logp, "k3"), 0.0).sum()
            tokens += keep.sum()
        if self.accelerator.num_processes > 1:  # every process adapts β alike, from the whole batch
            total, tokens = self._sum_over_processes(torch.stack([total, tokens]))
        kl = total / tokens.clamp_min(1)
        self._metrics["train"]["objective/kl_penalty_measured"].append(kl)
        self.kl_penalty_beta = adapt_kl_coef(self.kl_penalty_beta, kl, self.args.target_kl)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach()
        return loss, None, None

    # --------------------------------------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy as a Hugging Face model (adapters only under PEFT), the value model's state dict as
        ``value_model.safetensors`` beside it."""
        import safetensors.torch

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        wrapper = self.model
        self.model = self.policy
        try:
            super()._save(output_dir)
        finally:
            self.model = wrapper
        if self.args.should_save:
            state = {k: v.contiguous() for k, v in self.value_model.state_dict().items()}
            safetensors.torch.save_file(state, os.path.join(output_dir, "value_model.safetensors"))

    # -------------------------------------------------------------------------------------------------- logs

    def _log_rollout(self, mode, inputs, kl, truncated, per_function) -> None:
        """TRL's rollout metrics, as tensors (read when logged)."""
        metrics = self._metrics[mode]
        mask = inputs["completion_mask"]
        scores = inputs["scores"]
        kl_coef = self.args.kl_coef if self.args.kl_in_reward else 0.0
        mean_kl = kl.sum(dim=1).mean()
        metrics["objective/kl"].append(mean_kl)
        metrics["objective/entropy"].append((-inputs["old_logps"] * mask).sum(dim=1).mean())
        metrics["objective/non_score_reward"].append(-kl_coef * mean_kl)
        metrics["objective/rlhf_reward"].append(scores.mean() - kl_coef * mean_kl)
        metrics["objective/scores"].append(scores.mean())
        metrics["val/num_eos_tokens"].append((~truncated).sum().float())
        metrics["completions/mean_length"].append(mask.sum(dim=1).float().mean())
        metrics["completions/clipped_ratio"].append(truncated.float().mean())
        for function, column in zip(self.reward_funcs, per_function.T, strict=True):
            metrics[f"rewards/{reward_function_name(function)}/mean"].append(torch.nanmean(column))


def token_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF's objective ``max E[score] − β·KL(π‖π_ref)``: ``−kl_coef·kl_t`` on every
    completion token plus the sequence score on its last one; 0 off the mask. ``kl``, ``mask``: ``[N, C]``;
    ``scores``: ``[N]``."""
    keep = mask != 0
    rewards = torch.where(keep, -kl_coef * kl, 0.0)
    last = (keep.long().cumsum(dim=1) * keep).argmax(dim=1)  # the last masked-in column of each row
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += torch.where(keep.any(dim=1), scores.to(rewards.dtype), 0.0)
    return rewards


def _targets(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


def _completion_positions(sequence: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    """The positions ``[N, C, ...]`` of a prompt + completion tensor ``[N, P + C, ...]`` that predict the ``C``
    completion tokens (shifted by one)."""
    completion = completion_ids.shape[1]
    return sequence[:, -completion - 1 : -1]

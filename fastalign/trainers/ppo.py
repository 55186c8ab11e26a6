"""PPO with a value model (RLHF) on ``transformers.Trainer``, with TRL's ``PPOTrainer`` fields and metrics.

One rollout, as in TRL: the sampler hands over a batch of prompts (``num_generations`` rows each, 1 by default);
the rollout engine samples the completions and the reward functions score them (one scalar per sequence,
minus ``missing_eos_penalty`` for completions without EOS). Without gradient, the policy gives the old
log-probs, the reference its log-probs and the value model its values, all over prompt + completion. The
per-token rewards are ``−kl_coef·KL_t(π_old‖π_ref)`` plus the score at the last completion token (TRL's default;
or the KL goes into the loss with ``kl_in_reward=False``); :func:`fastalign.gae` gives advantages and returns,
and the advantages are whitened over the batch. The batch is then trained on ``num_ppo_epochs`` times in
``num_mini_batches`` shuffled mini-batches, one optimiser step each.

One optimiser trains the policy and the value model, side by side in a :class:`PolicyAndValueModel`. The policy
term is :class:`fastalign.nn.LinearPolicyLoss` (``objective="clip"``) or :mod:`~fastalign.trainers.kl_penalty`'s
objective, neither with ``[tokens, vocab]`` logits; the value term is the clipped value loss times ``vf_coef``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import datasets
import torch
from torch import nn
from transformers import PreTrainedModel

from fastalign.models.heads import PolicyAndValueModel
from fastalign.nn import LinearPolicyLoss
from fastalign.ops.policy import kl_estimate
from fastalign.trainers.configs import PPOConfig
from fastalign.trainers.kl_penalty import adapt_kl_coef, kl_penalty_loss, measured_kl
from fastalign.trainers.online import (
    OnlineTrainer,
    PolicyBatch,
    RewardFuncs,
    completion_positions,
    completion_targets,
)
from fastalign.trainers.ppo_math import (
    advantages_and_returns,
    clipped_value_loss,
    masked_whiten,
    rollout_metrics,
    token_rewards,
)

__all__ = ["PPOTrainer", "PolicyAndValueModel", "adapt_kl_coef", "masked_whiten"]


@dataclasses.dataclass
class PPOBatch(PolicyBatch):
    """A :class:`~fastalign.trainers.online.PolicyBatch` with PPO's per-token advantages ``[N, C]`` and:

    Attributes:
        old_values, returns, rewards: ``[N, C]`` float32, the value model's values at rollout time, GAE's
            returns and the per-token rewards (0 off the mask). scores: ``[N]`` float32, the sequence scores.
    """

    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class PPOTrainer(OnlineTrainer):
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

    dataset_format = "ppo"
    batch_type = PPOBatch
    unscorable = "zero"

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
        if reward_funcs is None and args.reward_model_path is None:
            raise ValueError("PPOTrainer needs reward_funcs or args.reward_model_path")
        super().__init__(
            model,
            reward_funcs,
            args,
            train_dataset,
            eval_dataset,
            processing_class,
            peft_config,
            rollout_engine,
            kl_coef=args.kl_coef,
            max_completion_length=args.response_length,
            ref_model=ref_model,
            trained_module=functools.partial(PolicyAndValueModel.from_policy, value_model=value_model),
            reward_model=args.reward_model_path if reward_funcs is None else None,
            eos_token_id=args.stop_token_id,
            **kwargs,
        )
        self.kl_penalty_beta = torch.tensor(float(args.kl_penalty_coef), device=self.args.device)
        self._kl_in_loss = not args.kl_in_reward and args.kl_coef != 0
        self._rollout_rows = args.rollout_batch_size
        self._eval_rows = args.per_device_eval_batch_size * args.num_generations  # that many prompts
        self._micro_batches_per_epoch = args.gradient_accumulation_steps * args.num_mini_batches
        self._micro_batches_per_rollout = self._micro_batches_per_epoch * args.num_ppo_epochs

    @property
    def policy(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).value_model

    def _default_engine(self) -> Any:
        return super()._default_engine(max(1, self.args.local_rollout_forward_batch_size // self.args.num_generations))

    def _loss_module(self) -> LinearPolicyLoss:
        adapter, args = self._adapter(self.policy), self.args
        # With the KL in the reward, the old log-probs stand in as "reference" with a zero coefficient: the k2
        # estimate's mean is then TRL's approxkl, 0.5·mean((logp − old)²), at no extra cost.
        kl = {"kl_coef": args.kl_coef, "kl_estimator": "k3"} if self._kl_in_loss else {"kl_estimator": "k2"}
        temperature = args.temperature * adapter.logit_temperature
        options = {"softcap": adapter.softcap, "clip_eps_low": args.cliprange, "backend": args.backend, **kl}
        return LinearPolicyLoss(temperature=temperature, **options)

    # ---------------------------------------------------------------------------------------------- rollout

    def _prepare_inputs(self, rows: list[dict]) -> PPOBatch:
        """Before the rollout that follows an update, the KL-penalty objective's β adapts (``target_kl``)."""
        adaptive = self.args.objective == "kl_penalty" and self.args.target_kl is not None
        after_update = self._buffered is not None and self._step % self._micro_batches_per_rollout == 0
        if self.model.training and adaptive and after_update:
            self._adapt_kl_penalty(self._buffered[: self._micro_batches_per_epoch])
        return super()._prepare_inputs(rows)

    def _micro_batches(self, batch: PPOBatch, mode: str) -> list[PPOBatch]:
        """``num_ppo_epochs`` shuffles of the rollout's rows, each cut into its micro-batches; consecutive runs
        of ``gradient_accumulation_steps`` micro-batches form the mini-batches (TRL's order)."""
        if mode != "train":
            return [batch]
        return self._shuffled_parts(batch, self._micro_batches_per_epoch, self.args.num_ppo_epochs)

    @torch.no_grad()
    def _generate_and_score(self, rows: list[dict], mode: str) -> PPOBatch:
        """The rollout batch with everything the PPO update reads: token tensors, old log-probs, old values,
        per-token rewards, advantages and returns."""
        args = self.args
        self._before_sampling()
        rollout = self._rollout(rows)
        batch = self._policy_batch(rollout.batch)
        mask, truncated = batch.completion_mask, rollout.batch.truncated.to(args.device)
        batch.scores = rollout.rewards.to(args.device)
        if args.missing_eos_penalty is not None:
            batch.scores = batch.scores - args.missing_eos_penalty * truncated.float()
        old = [self._policy_forward(part) for part in self._chunks(batch)]
        batch.old_logps = torch.cat([logps for logps, _ in old])
        batch.old_values = torch.cat([values for _, values in old]) * mask
        kl = torch.zeros_like(batch.old_logps)
        if args.kl_coef != 0:
            batch.ref_logps = torch.cat([self._reference_logps(part) for part in self._chunks(batch)])
            kl = kl_estimate(batch.old_logps, batch.ref_logps, args.kl_estimator if args.kl_in_reward else "k3") * mask
        batch.rewards = token_rewards(kl, batch.scores, mask, args.kl_coef if args.kl_in_reward else 0.0)
        # Whitened over the rollouts of every process: the statistics of one process on the global batch.
        reduce_sum = self._sum_over_processes if self.accelerator.num_processes > 1 else None
        whiten = {"rewards": args.whiten_rewards, "advantages": args.whiten_advantages, "reduce_sum": reduce_sum}
        batch.advantages, batch.returns = advantages_and_returns(batch, args.gamma, args.lam, **whiten)
        kl_coef = args.kl_coef if args.kl_in_reward else 0.0
        for name, value in rollout_metrics(batch, kl, truncated, kl_coef).items():
            self._metrics[mode][name].append(value)
        self._log_completions(mode, rollout.batch, rollout.per_function)
        return batch

    def _chunks(self, batch: PPOBatch) -> list[PPOBatch]:
        """Row chunks of ``local_rollout_forward_batch_size`` (the no-gradient forwards of the rollout)."""
        size = self.args.local_rollout_forward_batch_size
        return [batch.select(slice(start, start + size)) for start in range(0, len(batch), size)]

    @torch.no_grad()
    def _policy_forward(self, batch: PPOBatch, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Completion log-probs ``[N, C]`` and values ``[N, C]`` (float32; ``None`` with ``values=False``) of the
        current policy and value model, without gradient, in one forward of the module ``Trainer`` optimises:
        unwrapped from DDP (no gradient, nothing to synchronise), but under FSDP2 the sharded root itself, whose
        forward gathers the policy's embeddings and lm_head."""
        logps = functools.partial(self._token_logps, self._adapter(self.policy), batch)
        module = self.accelerator.unwrap_model(self.model)

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: Any, values: Any):
            return logps(hidden, weight, bias), values

        out = module(batch.input_ids, batch.attention_mask, batch.position_ids, head=head, values=values)
        return out[0], None if out[1] is None else completion_positions(out[1], batch.completion_ids).float()

    def _policy_logps(self, batch: PPOBatch) -> torch.Tensor:
        return self._policy_forward(batch, values=False)[0]

    # ------------------------------------------------------------------------------------------------- loss

    def _loss(self, model: nn.Module, batch: PPOBatch):
        # The whole loss runs inside the forward of the module as Trainer hands it over (DDP wrapper / FSDP2 root).
        head = functools.partial(self._losses, batch, self._token_normaliser(batch))
        policy_loss, vf_loss, metrics = model(batch.input_ids, batch.attention_mask, batch.position_ids, head=head)
        loss = (policy_loss + self.args.vf_coef * vf_loss) / self.args.gradient_accumulation_steps
        metrics["loss/policy_avg"] = policy_loss.detach()
        metrics["loss/value_avg"] = vf_loss.detach()
        # a batch built outside _prepare_inputs (bench.train_step) may carry no scores
        watched = {} if batch.scores is None else {"scores (from the rewards)": batch.scores}
        for name in ("advantages", "returns", "old_logps", "old_values", "ref_logps"):
            if (value := getattr(batch, name)) is not None:
                watched[name] = (value, batch.completion_mask)
        return loss, metrics, watched

    def _losses(self, batch: PPOBatch, tokens: torch.Tensor | None, hidden, weight, bias, values):
        """``(policy loss, value loss, metrics)`` from the hidden states ``[N, P + C, D]``, the lm_head and the
        values ``[N, P + C]``: the clipped surrogate or the KL-penalty objective, and the clipped value loss
        (each a token mean, over ``tokens`` when given)."""
        args, mask = self.args, batch.completion_mask
        if args.objective == "clip":
            policy_loss, metrics = self._clip_loss(hidden, weight, bias, batch, tokens)
        else:
            logps = self._token_logps(self._adapter(self.policy), batch, hidden, weight, bias)
            kl = {"ref_logps": batch.ref_logps, "kl_coef": args.kl_coef} if self._kl_in_loss else {}
            options = {"beta": self.kl_penalty_beta, "estimator": args.kl_penalty_estimator, "tokens": tokens, **kl}
            policy_loss, metrics = kl_penalty_loss(logps, batch.old_logps, batch.advantages, mask, **options)
        values = completion_positions(values, batch.completion_ids)
        vf_loss, metrics["val/clipfrac_avg"] = clipped_value_loss(
            values, batch.old_values, batch.returns, mask, args.cliprange_value, tokens
        )
        return policy_loss, vf_loss, metrics

    def _token_normaliser(self, batch: PPOBatch) -> torch.Tensor | None:
        """With several processes: the micro-batch's completion tokens summed over the processes, divided by their
        number. A token mean divided by it instead of this process's count averages (as DDP / FSDP average the
        gradients) to the token mean of one process on the global micro-batch. ``None`` in one process."""
        processes = self.accelerator.num_processes
        if processes == 1:
            return None
        tokens = (batch.completion_mask != 0).sum().float()
        return self._sum_over_processes(tokens).clamp_min(1) / processes

    def _clip_loss(self, hidden, weight, bias, batch: PPOBatch, tokens: torch.Tensor | None):
        """TRL's clipped surrogate, ``max(−A·ratio, −A·clip(ratio, 1 ± cliprange))`` as a token mean (over
        ``tokens`` when given), on the hidden states through :class:`LinearPolicyLoss`."""
        hidden, targets = completion_positions(hidden, batch.completion_ids), completion_targets(batch)
        reference = batch.ref_logps if self._kl_in_loss else batch.old_logps
        options = {"mask": batch.completion_mask, "ref_logps": reference, "num_items_in_batch": tokens, "bias": bias}
        loss, stats = self._loss_module()(hidden, weight, targets, batch.old_logps, batch.advantages, **options)
        metrics = {"policy/clipfrac_avg": stats["clip_frac_low"] + stats["clip_frac_high"]}
        metrics["val/ratio"] = stats["ratio_mean"]
        metrics["objective/kl_loss" if self._kl_in_loss else "policy/approxkl_avg"] = stats["kl_mean"]
        return loss, metrics

    @torch.no_grad()
    def _adapt_kl_penalty(self, micro_batches: list[PPOBatch]) -> None:
        """After a rollout's update: β adapts (:func:`adapt_kl_coef`) to the KL of the policy from the sampling
        policy over the rollout's batch (:func:`~fastalign.trainers.kl_penalty.measured_kl`, one forward)."""
        parts = ((part.old_logps, self._policy_logps(part), part.completion_mask) for part in micro_batches)
        reduce_sum = self._sum_over_processes if self.accelerator.num_processes > 1 else None
        kl = measured_kl(parts, self.args.device, reduce_sum)
        self._metrics["train"]["objective/kl_penalty_measured"].append(kl)
        self.kl_penalty_beta = adapt_kl_coef(self.kl_penalty_beta, kl, self.args.target_kl)

    # --------------------------------------------------------------------------------------------- saving

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy as a Hugging Face model (adapters only under PEFT), the value model's state dict as
        ``value_model.safetensors`` beside it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        wrapper, self.model = self.model, self.policy
        try:
            super()._save(output_dir)
        finally:
            self.model = wrapper
        if self.args.should_save:
            self.accelerator.unwrap_model(wrapper).save_value_model(output_dir)

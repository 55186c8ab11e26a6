"""PPO's tensor math beside its policy loss: the per-token rewards of RLHF's objective, advantages and returns
(GAE, TRL's masked whitening), the clipped value loss, the rollout's metrics and masked means."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastalign.ops.advantages import gae
from fastalign.ops.policy import value_loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The float32 mean of ``values`` where ``mask`` is nonzero (0 for an empty mask)."""
    keep = mask != 0
    return torch.where(keep, values.float(), 0.0).sum() / keep.sum().clamp_min(1)


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


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, clipfrac)``: :func:`fastalign.value_loss` of ``values`` ``[N, C]`` clipped to ``old_values ±
    clip_range`` (a token mean over ``mask``, or this process's share of one over ``tokens`` when given) and
    TRL's ``val/clipfrac_avg``, the share of masked tokens where the clipped loss is the larger (detached)."""
    loss = value_loss(values, old_values, returns, mask, clip_range=clip_range)
    if tokens is not None:  # this process's token mean as its share of the global one
        loss = loss * (mask != 0).sum() / tokens
    with torch.no_grad():
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipfrac = (clipped - returns).square() > (values - returns).square()
    return loss, masked_mean(clipfrac, mask)


def advantages_and_returns(
    batch: Any,
    gamma: float,
    lam: float,
    *,
    rewards: bool = False,
    advantages: bool = True,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fastalign.gae` of a PPO batch's per-token ``rewards`` and ``old_values`` ``[N, C]`` over its
    completion mask: ``(advantages, returns)``, the rewards whitened first with ``rewards`` (the mean kept) and
    the advantages after with ``advantages`` (:func:`masked_whiten`, over every process with ``reduce_sum``)."""
    mask, token_rewards = batch.completion_mask, batch.rewards
    if rewards:
        token_rewards = masked_whiten(token_rewards, mask, shift_mean=False, reduce_sum=reduce_sum)
    advantage, returns = gae(token_rewards, batch.old_values, mask, gamma=gamma, lam=lam)
    if advantages:
        advantage = masked_whiten(advantage, mask, reduce_sum=reduce_sum)
    return advantage, returns


def rollout_metrics(batch: Any, kl: torch.Tensor, truncated: torch.Tensor, kl_coef: float) -> dict[str, torch.Tensor]:
    """TRL's rollout metrics of a PPO batch (``kl`` ``[N, C]`` the per-token KL, ``truncated`` ``[N]``, ``kl_coef``
    its weight in the reward), as tensors: read when logged."""
    mean_kl, score = kl.sum(dim=1).mean(), batch.scores.mean()
    return {
        "objective/kl": mean_kl,
        "objective/entropy": (-batch.old_logps * batch.completion_mask).sum(dim=1).mean(),
        "objective/non_score_reward": -kl_coef * mean_kl,
        "objective/rlhf_reward": score - kl_coef * mean_kl,
        "objective/scores": score,
        "val/num_eos_tokens": (~truncated).sum().float(),
    }

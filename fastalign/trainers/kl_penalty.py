"""The PPO paper's KL-penalty objective (PPO's ``objective="kl_penalty"``), the KL it measures after an update and
the coefficient β that adapts to it."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fastalign.ops.policy import LOG_RATIO_LIMIT, kl_estimate
from fastalign.trainers.ppo_math import masked_mean


def kl_penalty_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: torch.Tensor,
    estimator: str,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``−ratio·A + β·KL_t(π_old‖π)`` per token as a loss (``estimator`` k1: ``old − logp``, k3: ``ratio − 1 −
    log ratio``), plus ``kl_coef·KL_t(π‖π_ref)`` (k3) when ``ref_logps`` is given; the token mean over ``mask``,
    or the masked sum over ``tokens`` when given (a process's share of the global mean).

    Args:
        logps, old_logps: ``[N, C]`` float32 log-probs of the policy and of the sampling policy.
        advantages: ``[N, C]``. mask: ``[N, C]``, nonzero on the tokens the loss reads.
        beta: the penalty's coefficient, a scalar tensor (it adapts, see :func:`adapt_kl_coef`).

    Returns:
        ``(loss, metrics)``: TRL's ``policy/approxkl_avg`` and ``val/ratio``, ``policy/kl_old_avg``,
        ``objective/kl_penalty_beta`` and, with a reference, ``objective/kl_loss`` (detached).
    """
    keep = mask != 0
    log_ratio = torch.where(keep, logps - old_logps, 0.0).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    kl_old = kl_estimate(old_logps, logps, estimator)  # KL(π_old‖π) on samples of π_old
    per_token = -advantages * ratio + beta * kl_old
    metrics = {}
    if ref_logps is not None:
        kl_ref = kl_estimate(logps, ref_logps, "k3")
        per_token = per_token + kl_coef * kl_ref
        metrics["objective/kl_loss"] = masked_mean(kl_ref.detach(), mask)
    loss = masked_mean(per_token, mask) if tokens is None else torch.where(keep, per_token, 0.0).sum() / tokens
    with torch.no_grad():
        metrics["policy/approxkl_avg"] = 0.5 * masked_mean(log_ratio.square(), mask)
        metrics["policy/kl_old_avg"] = masked_mean(kl_old, mask)
        metrics["val/ratio"] = masked_mean(ratio, mask)
        metrics["objective/kl_penalty_beta"] = beta.clone()
    return loss, metrics


def adapt_kl_coef(beta: torch.Tensor, kl: torch.Tensor, target_kl: float) -> torch.Tensor:
    """The PPO paper's adaptive KL coefficient: ``β × 2`` when the measured KL exceeds ``1.5 × target_kl``,
    ``β / 2`` when it is below ``target_kl / 1.5``, else unchanged (tensor ops: no host sync)."""
    factor = torch.where(kl > 1.5 * target_kl, 2.0, torch.where(kl < target_kl / 1.5, 0.5, 1.0))
    return beta * factor.to(beta.dtype)


def measured_kl(
    parts: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    device: torch.device | str,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``E[KL(π_old‖π)]``, the k3 estimate over the masked tokens of ``(old_logps, logps, mask)`` parts (summed
    over the processes by ``reduce_sum`` when given): the KL that :func:`adapt_kl_coef` compares with its target.
    k3 whatever the loss's estimator: the policy was just fit to these samples, which biases k1 (it can even
    turn negative); k3 is never negative."""
    total, tokens = torch.zeros((), device=device), torch.zeros((), device=device)
    for old_logps, logps, mask in parts:
        keep = mask != 0
        total += torch.where(keep, kl_estimate(old_logps, logps, "k3"), 0.0).sum()
        tokens += keep.sum()
    if reduce_sum is not None:  # every process adapts β alike, from the whole batch
        total, tokens = reduce_sum(torch.stack([total, tokens]))
    return total / tokens.clamp_min(1)

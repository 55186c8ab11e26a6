"""Advantage estimators: GAE for PPO, group-normalised rewards for GRPO. No gradient flows through them."""

from __future__ import annotations

import torch

from fastalign.ops._checks import check_number

GROUP_SCALES = ("group", "batch", "none")


def _check_same(name: str, value: object, shape: torch.Size) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like rewards, got {tuple(value.shape)}")
    return value


def _check_unit(name: str, value: object) -> float:
    check_number(name, value, at_least=0, at_most=1, finite=False)
    return float(value)


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked tokens of each row (verl's recursion).

    Going backwards over t: ``δ_t = r_t + γ·V_next − V_t`` and ``A_t = δ_t + γλ·A_next``, where ``V_next`` and
    ``A_next`` belong to the next *masked-in* token of the row (0 after the row's last one). Masked-out positions
    are skipped — they neither add a TD error nor break the chain — and get advantage and return 0.
    ``returns = advantages + values``. No whitening here (the PPO trainer whitens).

    Args:
        rewards, values, mask: ``[B, T]``; rewards typically hold the sequence reward at the last completion
            token plus per-token penalties.
        gamma, lam: discount and GAE λ, in [0, 1].

    Returns:
        ``(advantages, returns)``, both ``[B, T]``, zero where ``mask`` is 0.

    Example:
        >>> import torch, fastalign
        >>> rewards = torch.zeros(2, 4); rewards[:, -1] = torch.tensor([1.0, -1.0])
        >>> advantages, returns = fastalign.gae(rewards, torch.zeros(2, 4), torch.ones(2, 4), gamma=1.0, lam=1.0)
        >>> advantages[0].tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2:
        raise ValueError(f"rewards must be a [B, T] tensor, got {getattr(rewards, 'shape', type(rewards).__name__)}")
    _check_same("values", values, rewards.shape)
    _check_same("mask", mask, rewards.shape)
    gamma, lam = _check_unit("gamma", gamma), _check_unit("lam", lam)
    dtype = torch.promote_types(values.dtype, rewards.dtype)
    keep = (mask != 0).to(dtype)
    rewards, values = rewards.to(dtype), values.to(dtype)
    next_value = torch.zeros(rewards.shape[0], dtype=dtype, device=rewards.device)
    running = torch.zeros_like(next_value)
    advantages = torch.zeros_like(values)
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = keep[:, t]
        running = step * (delta + gamma * lam * running) + (1 - step) * running
        next_value = step * values[:, t] + (1 - step) * next_value
        advantages[:, t] = running * step
    return advantages, (advantages + values) * keep


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str | bool = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by a standard deviation (TRL's rule).

    Rewards come in contiguous groups of ``group_size`` (the completions of one prompt). ``scale="group"``:
    ``(r − group mean) / (group std + eps)``; ``"batch"``: divide by the whole batch's std instead; ``"none"``:
    only subtract the group mean (Dr. GRPO). Standard deviations are unbiased (Bessel), as ``torch.std``; a
    group of one has std 0. ``True``/``False`` mean ``"group"``/``"none"``, as in TRL's ``scale_rewards``.

    Args:
        rewards: ``[N]`` with ``N`` a multiple of ``group_size``.

    Returns:
        ``[N]`` advantages (no gradient).

    Example:
        >>> import torch, fastalign
        >>> fastalign.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), group_size=2, scale="none").tolist()
        [0.5, -0.5, 0.0, 0.0]
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a 1-D float tensor [N], got {getattr(rewards, 'shape', type(rewards))}")
    check_number("group_size", group_size, integer=True, at_least=1)
    if rewards.shape[0] % group_size != 0:
        raise ValueError(f"the batch of {rewards.shape[0]} rewards is not a multiple of group_size={group_size}")
    if isinstance(scale, bool):
        scale = "group" if scale else "none"
    if scale not in GROUP_SCALES:
        raise ValueError(f"scale must be one of {GROUP_SCALES} (or a bool), got {scale!r}")
    check_number("eps", eps, at_least=0, finite=False)
    rewards = rewards.detach()
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + eps)
    elif scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)

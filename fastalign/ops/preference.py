"""Preference losses: the DPO family (TRL 1.x formulas) and the Bradley-Terry reward-model loss."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Valid label_smoothing per loss type: (low, high, high inclusive); types absent from this table ignore it.
_SMOOTHING_RANGES = {
    "sigmoid": (0.0, 0.5, True),  # conservative DPO
    "robust": (0.0, 0.5, False),
    "exo_pair": (0.0, 1.0, False),  # strictly positive: the loss takes log(label_smoothing)
}
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
    "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip
# Loss types whose sequence log-probs are length-averaged (TRL 1.x averages inside these two).
LENGTH_AVERAGED_TYPES = ("ipo", "sigmoid_norm")
# exp(-z) in discopop is bounded so that exp(-z) * sigmoid(z / tau) is 0, not inf * 0, for very negative z.
_DISCOPOP_EXP_LIMIT = 80.0


def dpo_loss_terms(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
) -> torch.Tensor:
    """Per-pair loss of one type from ``logratio = logp − ref_logp`` of the chosen and rejected answers."""
    c, r = chosen_logratios, rejected_logratios
    margin = c - r
    z = beta * margin
    ls = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)).square()
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta).square() + (r + 0.5 / beta).square()
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":
        modulation = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp((-z).clamp(max=_DISCOPOP_EXP_LIMIT)) * modulation
    return -F.logsigmoid(z)  # sigmoid_norm: the caller passes length-averaged log-probs


def check_dpo_options(
    loss_type: str | Sequence[str], beta: float, label_smoothing: float, discopop_tau: float, loss_weights
) -> tuple[list[str], list[float]]:
    """Validate and return ``(loss types, weights)``."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    for name in types:
        if name not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES} (or a list of them), got {name!r}")
    if loss_weights is None:
        weights = [1.0] * len(types)
    else:
        weights = [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss type: got {len(weights)} weights for {len(types)} types"
            )
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if isinstance(discopop_tau, bool) or not isinstance(discopop_tau, (int, float)) or discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be a number > 0, got {discopop_tau!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise ValueError(f"label_smoothing must be a number, got {label_smoothing!r}")
    smoothed = [name for name in types if name in _SMOOTHING_RANGES]
    if label_smoothing != 0 and not smoothed:
        raise ValueError(
            f"label_smoothing={label_smoothing} would be ignored: none of the loss types {types} uses it "
            f"(only {sorted(_SMOOTHING_RANGES)} do)"
        )
    for name in smoothed:
        low, high, high_inclusive = _SMOOTHING_RANGES[name]
        inside = low <= label_smoothing and (label_smoothing <= high if high_inclusive else label_smoothing < high)
        if name == "exo_pair":
            inside = inside and label_smoothing > 0
        if not inside:
            bracket = "]" if high_inclusive else ")"
            opening = "(" if name == "exo_pair" else "["
            hint = " (the EXO paper recommends 1e-3)" if name == "exo_pair" else ""
            raise ValueError(
                f"label_smoothing for loss_type {name!r} must be in {opening}{low}, {high}{bracket}, "
                f"got {label_smoothing}{hint}"
            )
    return types, weights


def _check_sequence_values(**tensors: torch.Tensor) -> torch.Tensor:
    first_name, first = next(iter(tensors.items()))
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a 1-D float tensor [B], got {value.dtype} {tuple(value.shape)}")
        if value.shape != first.shape:
            raise ValueError(f"{name} must have shape {tuple(first.shape)} like {first_name}, got {tuple(value.shape)}")
        if value.device != first.device:
            raise ValueError(f"{name} is on {value.device} but {first_name} is on {first.device}")
    return first


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family of preference losses, per pair, from sequence log-probs.

    With ``c = chosen_logps − ref_chosen_logps``, ``r = rejected_logps − ref_rejected_logps`` and ``z = β(c − r)``
    (TRL 1.x formulas):

    ==============  ===================================================================================
    ``sigmoid``     ``−(1−ε) log σ(z) − ε log σ(−z)`` (DPO; ε > 0 is conservative DPO, as in TRL < 1.0)
    ``hinge``       ``relu(1 − z)`` (SLiC)
    ``ipo``         ``(c − r − 1/(2β))²`` (IPO; pass length-averaged log-probs, as TRL averages inside)
    ``robust``      ``(−(1−ε) log σ(z) + ε log σ(−z)) / (1 − 2ε)`` (rDPO), ε in [0, 0.5)
    ``exo_pair``    ``σ(z)(log σ(z) − log(1−ε)) + σ(−z)(log σ(−z) − log ε)`` (EXO), ε in (0, 1)
    ``nca_pair``    ``−log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)``
    ``bco_pair``    ``−log σ(βc) − log σ(−βr)`` (TRL 1.x: no running mean of rewards)
    ``sppo_hard``   ``(c − 1/(2β))² + (r + 1/(2β))²``
    ``apo_zero``    ``1 − σ(βc) + σ(βr)``;  ``apo_down``: ``σ(βc) + 1 − σ(z)``
    ``discopop``    ``−log σ(z)(1 − m) + exp(−z)·m`` with ``m = σ(z/τ)``
    ``sigmoid_norm`` ``−log σ(z)`` on length-averaged log-probs (as ``ipo``, the caller averages)
    ==============  ===================================================================================

    A list of types sums them per pair with ``loss_weights`` (default 1 each), as TRL combines them.
    ``label_smoothing`` applies to the types that use it (``sigmoid``, ``robust``, ``exo_pair``); it is an error
    when none of the given types uses it. Reference-free variants (SimPO/CPO style): pass
    zeros as the reference log-probs.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]`` sequence log-probs
            (sums over completion tokens, or length-averaged). Gradient flows into all four.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])`` with ``rewards = β·(logp − ref_logp)``,
        detached. Take ``losses.mean()`` for the batch loss.

    Example:
        >>> import torch, fastalign
        >>> chosen, rejected = torch.tensor([-5.0, -7.0], requires_grad=True), torch.tensor([-6.0, -6.5])
        >>> losses, chosen_rewards, rejected_rewards = fastalign.dpo_loss(chosen, rejected, chosen.detach(),
        ...                                                               rejected + 0.5, beta=0.1)
        >>> losses.mean().backward()
    """
    _check_sequence_values(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )  # fmt: skip
    types, weights = check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, loss_weights)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = sum(
        weight * dpo_loss_terms(name, chosen_logratios, rejected_logratios, beta, label_smoothing, discopop_tau)
        for name, weight in zip(types, weights, strict=True)
    )
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_rewards_coef: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry reward-model loss (TRL's RewardTrainer).

    ``mean(−log σ(r_chosen − r_rejected − margin)) + center_rewards_coef · mean((r_chosen + r_rejected)²)``;
    the centring term keeps rewards near zero (Eisenstein et al.). An empty batch gives 0.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards (``[B, 1]`` from a reward head is accepted).
        margin: a number or ``[B]`` per-pair margins (e.g. from preference strength), no gradient.

    Example:
        >>> import torch, fastalign
        >>> chosen = torch.randn(8, requires_grad=True)
        >>> fastalign.reward_loss(chosen, torch.randn(8), center_rewards_coef=0.01).backward()
    """
    if isinstance(chosen_rewards, torch.Tensor) and chosen_rewards.dim() == 2 and chosen_rewards.shape[1] == 1:
        chosen_rewards = chosen_rewards.squeeze(1)
    if isinstance(rejected_rewards, torch.Tensor) and rejected_rewards.dim() == 2 and rejected_rewards.shape[1] == 1:
        rejected_rewards = rejected_rewards.squeeze(1)
    _check_sequence_values(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        if isinstance(margin, torch.Tensor):
            if margin.shape not in (torch.Size([]), chosen_rewards.shape):
                raise ValueError(f"margin must be a number or a [B] tensor, got shape {tuple(margin.shape)}")
            margin = margin.detach()
        elif isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(f"margin must be a number, a [B] tensor or None, got {margin!r}")
        difference = difference - margin
    count = max(chosen_rewards.shape[0], 1)
    loss = -F.logsigmoid(difference).sum() / count
    if center_rewards_coef is not None:
        if isinstance(center_rewards_coef, bool) or not isinstance(center_rewards_coef, (int, float)):
            raise ValueError(f"center_rewards_coef must be a number or None, got {center_rewards_coef!r}")
        loss = loss + center_rewards_coef * (chosen_rewards + rejected_rewards).square().sum() / count
    return loss


def dpo_loss_from_token_logps(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
    average_log_prob: bool | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family from per-token log-probs of ``2B`` rows (chosen rows first, then rejected rows).

    Reduces each row to its sum over ``mask`` and applies :func:`dpo_loss` per type, with length-averaged
    log-probs for types that take them (``average_log_prob=None``: ``ipo`` and ``sigmoid_norm``, as TRL 1.x;
    ``True``: every type; ``False``: none). On CUDA the reduction, every type and the backward are one kernel
    launch each (Triton, or CUDA C++ with ``backend="cuda"``), with no ``[2B, T]`` intermediate.

    Args:
        token_logps: ``[2B, T]`` float (gradient flows into it). mask: ``[2B, T]``, nonzero on completion tokens.
        ref_logps: ``[2B]`` summed reference log-probs (no gradient; zeros for reference-free losses).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``(losses [B], sums [2B], lengths [2B])``: the weighted per-pair loss, each row's summed log-prob (both
        differentiable) and its number of completion tokens.
    """
    if not isinstance(token_logps, torch.Tensor) or token_logps.dim() != 2 or token_logps.shape[0] % 2:
        raise ValueError(f"token_logps must be [2B, T], got {getattr(token_logps, 'shape', token_logps)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != token_logps.shape:
        raise ValueError(f"mask must have token_logps' shape {tuple(token_logps.shape)}")
    if not isinstance(ref_logps, torch.Tensor) or ref_logps.shape != token_logps.shape[:1]:
        raise ValueError(f"ref_logps must be [2B] = ({token_logps.shape[0]},)")
    for name, value in (("mask", mask), ("ref_logps", ref_logps)):
        if value.device != token_logps.device:
            raise ValueError(f"{name} is on {value.device} but token_logps is on {token_logps.device}")
    types, weights = check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, loss_weights)
    averaged = [name in LENGTH_AVERAGED_TYPES if average_log_prob is None else bool(average_log_prob) for name in types]
    from fastalign.ops.dispatch import resolve_backend

    chosen_backend = resolve_backend(backend, token_logps.device, token_logps.dtype, "dpo_loss")
    if chosen_backend != "torch":
        from fastalign.ops._dpo_kernels import dpo_from_token_logps_kernels, type_plan

        plan = type_plan(types, weights, averaged, beta, label_smoothing, discopop_tau)
        return dpo_from_token_logps_kernels(chosen_backend, token_logps, mask, ref_logps, plan)
    keep = mask != 0
    sums = torch.where(keep, token_logps, 0.0).sum(-1)
    lengths = keep.sum(-1).to(sums.dtype)
    pairs = token_logps.shape[0] // 2
    ref_logps = ref_logps.detach().to(sums.dtype)
    losses = sums.new_zeros(pairs)
    for name, weight, average in zip(types, weights, averaged, strict=True):
        scale = 1.0 / lengths.clamp_min(1) if average else 1.0
        policy, reference = sums * scale, ref_logps * scale
        losses = losses + weight * dpo_loss_terms(
            name, policy[:pairs] - reference[:pairs], policy[pairs:] - reference[pairs:], beta, label_smoothing,
            discopop_tau,
        )  # fmt: skip
    return losses, sums, lengths

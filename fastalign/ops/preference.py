"""Preference losses: the DPO family (TRL 1.x formulas) and the Bradley-Terry reward-model loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastalign.ops._checks import check_number
from fastalign.ops._dpo_kernels import dpo_from_token_logps_kernels
from fastalign.ops._dpo_math import (
    DPO_LOSS_TYPES,
    LENGTH_AVERAGED_TYPES,
    DPOLossOptions,
    averaged_types,
    dpo_loss_terms,
    options_plan,
    weighted_pair_losses,
)
from fastalign.ops._options import options_from, renamed_keywords, with_option_fields
from fastalign.ops.dispatch import resolve_backend

__all__ = [
    "DPO_LOSS_TYPES",
    "LENGTH_AVERAGED_TYPES",
    "DPOLossOptions",
    "dpo_loss",
    "dpo_loss_from_token_logps",
    "dpo_loss_terms",
    "reward_loss",
]


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


@with_option_fields(DPOLossOptions)
def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    options: DPOLossOptions | None = None,
    **option_fields,
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

    The options are a :class:`DPOLossOptions` (``options=``) or its fields as keywords (``beta=0.1``,
    ``loss_type="sigmoid"``, ``label_smoothing=0.0``, ``discopop_tau=0.05``, ``loss_weights=None``).
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
        >>> reference = (chosen.detach(), rejected + 0.5)
        >>> losses, chosen_rewards, rejected_rewards = fastalign.dpo_loss(chosen, rejected, *reference, beta=0.1)
        >>> losses.mean().backward()
    """
    sequence_logps = {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps}
    _check_sequence_values(**sequence_logps, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    options = options_from(DPOLossOptions, options, option_fields, "dpo_loss")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = weighted_pair_losses(options, chosen_logratios, rejected_logratios)
    beta = options.beta
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@renamed_keywords(center_rewards_coef="center_rewards_coefficient")
def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: float | torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry reward-model loss (TRL's RewardTrainer).

    ``mean(−log σ(r_chosen − r_rejected − margin)) + center_rewards_coefficient · mean((r_chosen + r_rejected)²)``;
    the centring term keeps rewards near zero (Eisenstein et al.). An empty batch gives 0.

    Args:
        chosen_rewards, rejected_rewards: ``[B]`` scalar rewards (``[B, 1]`` from a reward head is accepted).
        margin: a number or ``[B]`` per-pair margins (e.g. from preference strength), no gradient.
        center_rewards_coefficient: TRL's name (``RewardConfig.center_rewards_coefficient``); the keyword
            ``center_rewards_coef`` is its deprecated name.

    Example:
        >>> import torch, fastalign
        >>> chosen = torch.randn(8, requires_grad=True)
        >>> fastalign.reward_loss(chosen, torch.randn(8), center_rewards_coefficient=0.01).backward()
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
        else:
            check_number("margin", margin, finite=False, why="or a [B] tensor")
        difference = difference - margin
    count = max(chosen_rewards.shape[0], 1)
    loss = -F.logsigmoid(difference).sum() / count
    if center_rewards_coefficient is not None:
        check_number("center_rewards_coefficient", center_rewards_coefficient, finite=False)
        loss = loss + center_rewards_coefficient * (chosen_rewards + rejected_rewards).square().sum() / count
    return loss


@with_option_fields(DPOLossOptions)
def dpo_loss_from_token_logps(
    token_logps: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    average_log_prob: bool | None = None,
    options: DPOLossOptions | None = None,
    backend: str = "auto",
    **option_fields,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO family from per-token log-probs of ``2B`` rows (chosen rows first, then rejected rows).

    Reduces each row to its sum over ``mask`` and applies :func:`dpo_loss` per type, with length-averaged
    log-probs for types that take them (``average_log_prob=None``: ``ipo`` and ``sigmoid_norm``, as TRL 1.x;
    ``True``: every type; ``False``: none). On CUDA the reduction, every type and the backward are one kernel
    launch each (Triton, or CUDA C++ with ``backend="cuda"``), with no ``[2B, T]`` intermediate.

    Args:
        token_logps: ``[2B, T]`` float (gradient flows into it). mask: ``[2B, T]``, nonzero on completion tokens.
        ref_logps: ``[2B]`` summed reference log-probs (no gradient; zeros for reference-free losses).
        options: a :class:`DPOLossOptions`, or its fields as keywords, as for :func:`dpo_loss`.
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
    options = options_from(DPOLossOptions, options, option_fields, "dpo_loss_from_token_logps")
    chosen_backend = resolve_backend(backend, token_logps.device, token_logps.dtype, "dpo_loss")
    if chosen_backend != "torch":
        plan = options_plan(options, average_log_prob)
        return dpo_from_token_logps_kernels(chosen_backend, token_logps, mask, ref_logps, plan)
    keep = mask != 0
    sums = torch.where(keep, token_logps, 0.0).sum(-1)
    lengths = keep.sum(-1).to(sums.dtype)
    pairs = token_logps.shape[0] // 2
    ref_logps = ref_logps.detach().to(sums.dtype)
    losses = sums.new_zeros(pairs)
    averaged = averaged_types(options, average_log_prob)
    for name, weight, average in zip(options.types, options.weights, averaged, strict=True):
        scale = 1.0 / lengths.clamp_min(1) if average else 1.0
        policy, reference = sums * scale, ref_logps * scale
        chosen_logratios, rejected_logratios = policy[:pairs] - reference[:pairs], policy[pairs:] - reference[pairs:]
        terms = dpo_loss_terms(
            name, chosen_logratios, rejected_logratios, options.beta, options.label_smoothing, options.discopop_tau
        )
        losses = losses + weight * terms
    return losses, sums, lengths

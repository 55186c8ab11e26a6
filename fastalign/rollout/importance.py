"""Importance sampling for the trainer / rollout-engine mismatch (TRL's ``vllm_importance_sampling_*``): the
engine samples with its own numerics (``sampler_logps``), the loss is for the trainer's policy (the old log-probs
recomputed by the training model), and the ratio between them, truncated or masked, weights the policy term."""

from __future__ import annotations

import math

import torch

from fastalign.ops._checks import check_number

__all__ = ["IMPORTANCE_SAMPLING_MODES", "sampler_importance_weights", "truncated_importance_weights"]

# TRL's vllm_importance_sampling_mode values: per token or per sequence (the product of the token ratios), then
# clamped into [clip_min, clip_max] (truncate) or set to 0 outside it (mask).
IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def check_importance_sampling_options(mode: str, clip_min: float | None, clip_max: float | None) -> None:
    """The checks of TRL's GRPOConfig on the mode and its bounds (a ``ValueError`` names the option)."""
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"mode must be one of {IMPORTANCE_SAMPLING_MODES}, got {mode!r}")
    check_number("clip_min", clip_min, at_least=0, optional=True)
    check_number("clip_max", clip_max, above=0, finite=False, optional=True)
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"clip_min ({clip_min}) must be less than clip_max ({clip_max})")
    if mode.endswith("_truncate") and clip_min is None and clip_max is None:
        raise ValueError(f"mode {mode!r} truncates: at least one of clip_min or clip_max must be set")


def sampler_importance_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """Importance weights ``π_trainer / π_sampler`` of the completion tokens, per token or per sequence.

    With ``Δ_t = trainer_logps − sampler_logps`` on masked-in tokens: ``token_*`` modes weight each token by
    ``ρ_t = exp(Δ_t)``, ``sequence_*`` modes each sequence by ``ρ = exp(Σ_t Δ_t)``; ``*_truncate`` clamps ``ρ``
    into ``[clip_min, clip_max]`` (a ``None`` bound is not applied), ``*_mask`` sets it to 0 outside that range
    (TRL's TIS / MIS, ``vllm_importance_sampling_mode``; its defaults ``sequence_mask``, ``clip_max=3``). Pass the
    result as ``policy_loss(is_weights=...)``; loss type ``vespo`` needs a token mode.

    Args:
        trainer_logps: ``[N, C]`` log-probs of the completion tokens under the training model (no gradient).
        sampler_logps: ``[N, C]`` the engine's log-probs of the same tokens (:attr:`RolloutBatch.sampler_logps`);
            NaN where the engine gave none: that token counts as ratio 1 (``Δ = 0``).
        mask: ``[N, C]`` nonzero on completion tokens.
        mode, clip_min, clip_max: as above; ``clip_min`` ``>= 0``, ``clip_max`` ``> 0`` and above ``clip_min``.

    Returns:
        float32, detached: ``[N, C]`` (token modes; 1 before the bounds where ``mask`` is 0) or ``[N]``
        (sequence modes).
    """
    check_importance_sampling_options(mode, clip_min, clip_max)
    if trainer_logps.shape != sampler_logps.shape or trainer_logps.shape != mask.shape or trainer_logps.dim() != 2:
        raise ValueError(
            f"shape mismatch: trainer_logps {tuple(trainer_logps.shape)}, sampler_logps "
            f"{tuple(sampler_logps.shape)}, mask {tuple(mask.shape)} must all be [N, C]"
        )
    with torch.no_grad():
        diff = trainer_logps.detach().float() - sampler_logps.detach().float().to(trainer_logps.device)
        keep = mask.to(device=diff.device).bool() & ~torch.isnan(diff)
        diff = torch.where(keep, diff, 0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1)
        ratio = torch.exp(diff)
        if mode.endswith("_truncate"):
            return ratio.clamp(min=clip_min, max=clip_max)
        low = -math.inf if clip_min is None else float(clip_min)
        high = math.inf if clip_max is None else float(clip_max)
        return torch.where((ratio >= low) & (ratio <= high), ratio, 0.0)


def truncated_importance_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 3.0,
) -> torch.Tensor:
    """Token-level truncated importance weights ``min(exp(trainer − sampler), cap)``: the ``token_truncate``
    mode of :func:`sampler_importance_weights` with ``clip_max = cap`` and no lower bound.

    Args:
        trainer_logps: ``[N, C]`` log-probs of the completion tokens under the training model.
        sampler_logps: ``[N, C]`` the engine's log-probs of the same tokens (:attr:`RolloutBatch.sampler_logps`).
        mask: ``[N, C]`` nonzero on completion tokens.
        cap: upper truncation (``> 0``); 3.0 is TRL's default ``vllm_importance_sampling_clip_max``.

    Returns:
        ``[N, C]`` float32, detached: the truncated ratio on masked-in tokens, exactly 1 where ``mask`` is 0 and
        where either log-prob is NaN (unavailable from the engine), as TRL does.
    """
    check_number("cap", cap, above=0, finite=False)
    return sampler_importance_weights(trainer_logps, sampler_logps, mask, mode="token_truncate", clip_max=cap)

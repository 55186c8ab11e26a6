"""Truncated importance sampling for the trainer / rollout-engine mismatch (TRL's ``vllm_importance_sampling``)."""

from __future__ import annotations

import torch

from fastalign.ops._checks import check_number

__all__ = ["truncated_importance_weights"]


def truncated_importance_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 3.0,
) -> torch.Tensor:
    """Token-level truncated importance weights ``min(exp(trainer − sampler), cap)``.

    The completions were sampled by the engine (``sampler_logps``) but the loss is for the trainer's policy
    (``trainer_logps``, the old/behaviour log-probs recomputed by the training model, no gradient); weighting the
    per-token loss by this ratio, truncated at ``cap``, corrects the mismatch (TRL's
    ``vllm_importance_sampling_correction`` with ``vllm_importance_sampling_mode="token_truncate"`` and
    ``vllm_importance_sampling_clip_max = cap``, no lower bound). Pass the result as ``policy_loss(is_weights=...)``.

    Args:
        trainer_logps: ``[N, C]`` log-probs of the completion tokens under the training model.
        sampler_logps: ``[N, C]`` the engine's log-probs of the same tokens (:attr:`RolloutBatch.sampler_logps`).
        mask: ``[N, C]`` nonzero on completion tokens.
        cap: upper truncation (``> 0``); 3.0 is TRL 1.16's default ``vllm_importance_sampling_clip_max``
            (formerly ``vllm_importance_sampling_cap``).

    Returns:
        ``[N, C]`` float32, detached: the truncated ratio on masked-in tokens, exactly 1 where ``mask`` is 0 and
        where either log-prob is NaN (unavailable from the engine), as TRL does.
    """
    check_number("cap", cap, above=0, finite=False)
    if trainer_logps.shape != sampler_logps.shape or trainer_logps.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: trainer_logps {tuple(trainer_logps.shape)}, sampler_logps "
            f"{tuple(sampler_logps.shape)}, mask {tuple(mask.shape)} must all be [N, C]"
        )
    with torch.no_grad():
        diff = trainer_logps.detach().float() - sampler_logps.detach().float().to(trainer_logps.device)
        keep = mask.to(device=diff.device).bool() & ~torch.isnan(diff)
        diff = torch.where(keep, diff, 0.0)
        return torch.exp(diff).clamp(max=float(cap))

"""Host side of the Triton policy loss: launches, the reduction of per-row sums over B, and the autograd."""

from __future__ import annotations

import torch

from fastalign.kernels.triton import policy_loss as kernels
from fastalign.ops.policy import LOG_RATIO_LIMIT, PolicyArgs, row_weights

_KL_KIND = {"k1": 1, "k2": 2, "k3": 3}


def _row_and_token_strides(tensor: torch.Tensor | None) -> tuple[int, int]:
    """``[B, 1]`` per-sequence values broadcast over tokens with a token stride of 0."""
    if tensor is None:
        return 0, 0
    return tensor.stride(0), (0 if tensor.shape[1] == 1 else tensor.stride(1))


def _launch_args(a: PolicyArgs, tensors: dict[str, torch.Tensor]) -> tuple[list, dict]:
    rows, width = tensors["logp"].shape
    advantages = a.advantages
    weights = a.is_weights
    positional = [
        rows, width, width, *_row_and_token_strides(advantages), *_row_and_token_strides(weights),
        a.clip_low, a.clip_high, a.dual_clip or 0.0, a.kl_coef, a.entropy_coef, LOG_RATIO_LIMIT,
    ]  # fmt: skip
    flags = {
        "SEQUENCE": a.sequence_level,
        "HAS_REF": a.ref_logp is not None,
        "HAS_ENTROPY": a.entropy is not None,
        "HAS_IS": weights is not None,
        "DUAL": a.dual_clip is not None,
        "KL_KIND": _KL_KIND[a.kl_estimator],
    }
    return positional, flags


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, entropy, a: PolicyArgs, tensors: dict[str, torch.Tensor]):
        positional, flags = _launch_args(a, tensors)
        rows = logp.shape[0]
        stats = torch.zeros(kernels.STAT_ROWS, rows, dtype=torch.float32, device=logp.device)
        if rows > 0 and logp.shape[1] > 0:
            kernels.policy_loss_fwd_kernel[(rows,)](
                tensors["logp"], tensors["old_logp"], tensors["ref_logp"], tensors["entropy"], a.advantages,
                tensors["mask"], tensors["is_weights"], stats, *positional, **flags,
            )  # fmt: skip
        counts = stats[kernels.COUNT]
        weights = row_weights(
            counts, a.mode, width=logp.shape[1], max_completion_length=a.max_completion_length,
            num_items_in_batch=a.num_items_in_batch,
        )  # fmt: skip
        loss = (stats[kernels.LOSS] * weights).sum()
        tokens = counts.sum().clamp_min(1)
        metrics = [stats[i].sum() / tokens for i in (kernels.LOW_CLIP, kernels.HIGH_CLIP, kernels.DUAL_CLIP,
                                                      kernels.RATIO, kernels.KL, kernels.ENTROPY)]  # fmt: skip
        ctx.a, ctx.tensors = a, tensors
        ctx.save_for_backward(weights)
        ctx.mark_non_differentiable(*metrics)
        return (loss.to(logp.dtype), *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *unused_metric_grads):
        (weights,) = ctx.saved_tensors
        a, tensors = ctx.a, ctx.tensors
        logp = tensors["logp"]
        rows = logp.shape[0]
        grad_logp = torch.zeros_like(logp)
        grad_entropy = torch.zeros_like(tensors["entropy"]) if a.entropy is not None else None
        if rows > 0 and logp.shape[1] > 0:
            positional, flags = _launch_args(a, tensors)
            kernels.policy_loss_bwd_kernel[(rows,)](
                logp, tensors["old_logp"], tensors["ref_logp"], a.advantages, tensors["mask"], tensors["is_weights"],
                (weights * grad_loss).to(torch.float32).contiguous(), grad_logp,
                grad_logp if grad_entropy is None else grad_entropy, *positional, **flags,
            )  # fmt: skip
        return grad_logp, grad_entropy, None, None


def policy_loss_triton(a: PolicyArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logp = a.logp.contiguous()
    # Absent optional inputs are passed as logp, never read (their flags are off).
    tensors = {
        "logp": logp,
        "old_logp": a.old_logp.detach().contiguous(),
        "ref_logp": logp if a.ref_logp is None else a.ref_logp.detach().contiguous(),
        "entropy": logp if a.entropy is None else a.entropy.contiguous(),
        "mask": a.mask.contiguous(),
        "is_weights": logp if a.is_weights is None else a.is_weights.detach(),
    }
    outputs = _PolicyLoss.apply(logp, a.entropy, a, tensors)
    loss, low, high, dual, ratio, kl, entropy = outputs
    metrics = {"clip_frac_low": low, "clip_frac_high": high, "clip_frac_dual": dual, "ratio_mean": ratio}
    if a.ref_logp is not None:
        metrics["kl_mean"] = kl
    if a.entropy is not None:
        metrics["entropy_mean"] = entropy
    return loss, metrics

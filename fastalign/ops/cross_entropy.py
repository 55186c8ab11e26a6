"""Fused linear cross-entropy: the SFT / pre-training loss from hidden states without the logits."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastalign.ops._checks import check_number
from fastalign.ops.logprobs import linear_stats

_REDUCTIONS = ("mean", "sum", "none")


def check_cross_entropy_options(reduction: str, label_smoothing: float, z_loss: float) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    check_number("label_smoothing", label_smoothing, at_least=0, at_most=1, finite=False)
    check_number("z_loss", z_loss, at_least=0)


def cross_entropy_terms(
    target_logp: torch.Tensor,
    lse: torch.Tensor,
    sum_logits: torch.Tensor | None,
    vocab_size: int | torch.Tensor,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """The per-token loss ``(1 - ε)·(lse - l_y) + ε·(lse - Σ_j l_j / V) + z_loss·lse²`` from the token's
    statistics (``[N]`` each; ``sum_logits`` is read only when ``label_smoothing > 0``)."""
    loss = -target_logp
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_logits / vocab_size)
    if z_loss > 0:
        loss = loss + z_loss * lse.square()
    return loss


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str = "auto",
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, never materialising the logits.

    Per token: ``(1 - ε)·(lse - l_y) + ε·(lse - mean_j l_j) + z_loss·lse²`` where ``l`` are the (softcapped)
    logits and ``ε = label_smoothing`` — label smoothing exactly as ``torch.nn.functional.cross_entropy``
    defines it, z-loss as in PaLM. ``reduction="mean"`` averages over non-ignored tokens; when every token is
    ignored the loss is 0 with zero gradients (never NaN).

    Args:
        hidden: ``[..., D]``; weight: ``[V, D]``; targets: ``[...]`` integer; bias: optional ``[V]``.
        reduction: ``"mean" | "sum" | "none"`` (``"none"`` returns a loss per token, shaped like targets).
        label_smoothing: in ``[0, 1]``. z_loss: coefficient ``>= 0``. softcap: ``None`` or > 0.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        process_group, vocab_start: vocabulary parallelism, as for :func:`fastalign.linear_logprobs`: ``weight``
            and ``bias`` are this rank's shard, ``targets`` full-vocabulary ids; the loss is the full-vocabulary
            loss (label smoothing averages over the global vocabulary), the same on every rank.

    Returns:
        float32 (float64 for float64 inputs) scalar, or per-token losses for ``reduction="none"``.

    Example:
        >>> import torch, fastalign
        >>> hidden = torch.randn(4, 9, 32, requires_grad=True)
        >>> weight = torch.randn(1000, 32, requires_grad=True)
        >>> targets = torch.randint(0, 1000, (4, 9))
        >>> loss = fastalign.linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1)
        >>> loss.backward()
    """
    check_cross_entropy_options(reduction, label_smoothing, z_loss)
    (lse, target_logp, _, sum_logits), prepared = linear_stats(
        hidden,
        weight,
        bias,
        targets,
        softcap=softcap,
        ignore_index=ignore_index,
        need_entropy=False,
        need_sum=label_smoothing > 0,
        backend=backend,
        process_group=process_group,
        vocab_start=vocab_start,
    )
    per_token = cross_entropy_terms(target_logp, lse, sum_logits, prepared.vocab_size, label_smoothing, z_loss)
    loss = prepared.finish(per_token)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / prepared.valid.sum().clamp_min(1)

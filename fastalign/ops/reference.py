"""Eager reference implementations: the specification the fused backends are tested against.

They materialise the full ``[tokens, vocab]`` logits, so they are only for tests and small inputs. They compute
in the inputs' dtype upcast to at least float32 (tests pass float64 copies to get a float64 reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transform_logits(logits: torch.Tensor, *, temperature: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)`` when ``softcap`` is set, then divided by ``temperature``."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def logprobs_from_logits(logits, targets, *, temperature=1.0, softcap=None, ignore_index=-100, return_entropy=False):
    """Log-prob of ``targets`` (and entropy) under ``softmax(transform(logits))``; 0 at ``ignore_index``.

    ``logits [..., V]``, integer ``targets [...]``; returns ``logp`` (or ``(logp, entropy)``) shaped like
    ``targets``, in the logits' dtype upcast to at least float32."""
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    scaled = transform_logits(logits.to(compute_dtype), temperature=temperature, softcap=softcap)
    log_probs = torch.log_softmax(scaled, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0).long()
    logp = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, torch.where(valid, entropy, 0.0)


def linear_logprobs(hidden, weight, targets, *, bias=None, **options):
    """:func:`logprobs_from_logits` of ``hidden [..., D] @ weight [V, D].T + bias [V]``, with its ``options``."""
    return logprobs_from_logits(F.linear(hidden, weight, bias), targets, **options)


def linear_cross_entropy(
    hidden,
    weight,
    targets,
    *,
    bias=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """``F.cross_entropy`` of the (softcapped) logits ``hidden [..., D] @ weight [V, D].T + bias`` plus
    ``z_loss * logsumexp**2`` per token; mean over kept tokens (``reduction="mean"``), their sum, or per token."""
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = transform_logits(F.linear(hidden, weight, bias).to(compute_dtype), softcap=softcap)
    logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1).long()
    per_token = F.cross_entropy(
        logits, flat_targets, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = flat_targets != ignore_index
    if z_loss:
        per_token = per_token + torch.where(valid, z_loss * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    if reduction == "none":
        return per_token.reshape(targets.shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp_min(1)

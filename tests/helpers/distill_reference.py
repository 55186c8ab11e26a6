"""The distillation loss from its formula in float64 (the ops' and the trainer's tests)."""

import torch


def reference_distill(sh, sw, th, tw, targets, *, beta, temperature, ignore_index=-100, reduction="mean"):
    """The loss from its formula in float64, both ``[N, V]`` logits materialised (tests only)."""
    log_ps = torch.log_softmax(sh.double() @ sw.double().T / temperature, dim=-1)
    log_pt = torch.log_softmax(th.double() @ tw.double().T / temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if beta == 0:
        per_token = (pt * (log_pt - log_ps)).sum(-1)  # KL(p_t || p_s)
    elif beta == 1:
        per_token = (ps * (log_ps - log_pt)).sum(-1)  # KL(p_s || p_t)
    else:
        log_m = torch.log((1 - beta) * ps + beta * pt)
        per_token = beta * (pt * (log_pt - log_m)).sum(-1) + (1 - beta) * (ps * (log_ps - log_m)).sum(-1)
    valid = targets.reshape(-1) != ignore_index
    per_token = torch.where(valid, per_token.reshape(-1), 0.0)
    if reduction == "none":
        return per_token.reshape(targets.shape)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp_min(1)

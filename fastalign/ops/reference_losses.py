"""Reference implementations of the alignment losses, written from their formulas one row and one token at a
time. Slow and obvious on purpose: the vectorised torch code and the Triton kernels are tested against them."""

from __future__ import annotations

import math

import torch

from fastalign.ops._dpo_math import DPOLossOptions
from fastalign.ops._options import renamed_keywords
from fastalign.ops._policy_math import PolicyLossOptions


def _log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x)) if x >= 0 else x - torch.log1p(torch.exp(x))


def _kl(logps: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    r = torch.clamp(ref - logps, -20.0, 20.0)
    if estimator in ("k1", "kl"):
        return -r
    if estimator in ("k2", "mse"):
        return r * r / 2
    return torch.exp(r) - r - 1


@renamed_keywords(logp="logps", old_logp="old_logps", ref_logp="ref_logps")
def policy_loss(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    ref_logps=None,
    entropy=None,
    num_items_in_batch=None,
    is_weights=None,
    sampler_logps=None,
    **options,
) -> torch.Tensor:
    """The loss only (metrics are checked separately); ``options`` as :class:`PolicyLossOptions`' fields."""
    o = PolicyLossOptions(**options)
    entropy_threshold = None
    if o.top_entropy_quantile < 1:
        kept = entropy.detach()[mask != 0]
        entropy_threshold = float(torch.quantile(kept, 1 - o.top_entropy_quantile)) if kept.numel() else math.inf
    low = o.clip_eps_low
    high = low if o.clip_eps_high is None else o.clip_eps_high
    sequence = o.importance_sampling_level == "sequence"
    rows, width = logps.shape
    row_sums, row_counts = [], []
    for i in range(rows):
        tokens = [t for t in range(width) if mask[i, t] != 0]
        if sequence and tokens:
            seq_log_ratio = sum(logps[i, t] - old_logps[i, t].detach() for t in tokens) / len(tokens)
        if o.loss_type == "vespo":
            # log w = Σ clamp(log ratio) + Σ clamp(log is_weight), each and the sum in [log 1e-8, 20].
            log_w = sum(float(torch.clamp(logps[i, t] - old_logps[i, t], -20.0, 20.0).detach()) for t in tokens)
            if is_weights is not None:
                log_w += sum(min(max(math.log(float(is_weights[i, t])), math.log(1e-8)), 20.0) for t in tokens)
            log_w = min(max(log_w, math.log(1e-8)), 20.0)
        if o.off_policy_mask_threshold is not None:
            sampler = old_logps if sampler_logps is None else sampler_logps
            gap = sum(float(sampler[i, t] - logps[i, t].detach()) for t in tokens) / max(len(tokens), 1)
        total = torch.zeros((), dtype=logps.dtype)
        for t in tokens:
            a = advantages[i] if advantages.dim() == 1 else advantages[i, t]
            log_ratio = seq_log_ratio if sequence else logps[i, t] - old_logps[i, t]
            ratio = torch.exp(torch.clamp(log_ratio, -20.0, 20.0))
            if o.loss_type == "cispo":
                loss = -torch.clamp(ratio, max=high).detach() * a * logps[i, t]
            elif o.loss_type == "sapo":
                tau = o.sapo_temperature_pos if a > 0 else o.sapo_temperature_neg
                loss = -(4.0 / tau) / (1.0 + torch.exp(-tau * (ratio - 1.0))) * a
            elif o.loss_type == "vespo":
                k, lam = (o.vespo_k_pos, o.vespo_lambda_pos) if a >= 0 else (o.vespo_k_neg, o.vespo_lambda_neg)
                phi = math.exp(lam) * math.exp(log_w) ** k * math.exp(-lam * math.exp(log_w))
                loss = -phi * a * logps[i, t]
            else:
                unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
                loss = torch.maximum(-a * unclipped, -a * torch.clamp(ratio, 1 - low, 1 + high))
            if o.dual_clip is not None and a < 0:
                loss = torch.minimum(loss, -a * o.dual_clip)
            if is_weights is not None and o.loss_type != "vespo":
                loss = loss * (is_weights[i] if is_weights.dim() == 1 else is_weights[i, t])
            if o.off_policy_mask_threshold is not None and a < 0 and gap > o.off_policy_mask_threshold:
                loss = loss * 0.0  # DeepSeek-V3.2: an off-policy sequence with a negative advantage
            if entropy_threshold is not None and float(entropy[i, t].detach()) < entropy_threshold:
                loss = loss * 0.0  # not among the top-entropy tokens
            if ref_logps is not None and o.kl_coef:
                kl = _kl(logps[i, t], ref_logps[i, t], o.kl_estimator)
                loss = loss + o.kl_coef * (kl * ratio if o.use_bias_correction_kl else kl)
            if entropy is not None and o.entropy_coef:
                loss = loss - o.entropy_coef * entropy[i, t]
            total = total + loss
        row_sums.append(total)
        row_counts.append(len(tokens))
    return _aggregate(row_sums, row_counts, width, o.aggregation, num_items_in_batch, o.max_completion_length)


def _aggregate(row_sums, row_counts, width, mode, num_items_in_batch=None, max_completion_length=None):
    rows = len(row_sums)
    if mode == "token-mean":
        denominator = num_items_in_batch if num_items_in_batch is not None else max(sum(row_counts), 1)
        return sum(row_sums) / denominator
    if mode == "seq-mean-token-mean":
        return sum(s / max(n, 1) for s, n in zip(row_sums, row_counts, strict=True)) / max(rows, 1)
    if mode == "seq-mean-token-sum":
        return sum(row_sums) / max(rows, 1)
    return sum(row_sums) / (max(rows, 1) * (max_completion_length or width))


def value_loss(values, old_values, returns, mask, *, clip_range=0.2, loss_agg_mode="token-mean") -> torch.Tensor:
    row_sums, row_counts = [], []
    for i in range(values.shape[0]):
        total, count = torch.zeros((), dtype=values.dtype), 0
        for t in range(values.shape[1]):
            if mask[i, t] == 0:
                continue
            loss = (values[i, t] - returns[i, t]) ** 2
            if clip_range is not None:
                delta = torch.clamp(values[i, t] - old_values[i, t], -clip_range, clip_range)
                loss = torch.maximum(loss, (old_values[i, t] + delta - returns[i, t]) ** 2)
            total, count = total + loss, count + 1
        row_sums.append(total)
        row_counts.append(count)
    return 0.5 * _aggregate(row_sums, row_counts, values.shape[1], loss_agg_mode)


def gae(rewards, values, mask, *, gamma=1.0, lam=0.95) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = torch.zeros_like(values)
    for i in range(rewards.shape[0]):
        kept = [t for t in range(rewards.shape[1]) if mask[i, t] != 0]
        running, next_value = 0.0, 0.0
        for t in reversed(kept):
            delta = rewards[i, t].item() + gamma * next_value - values[i, t].item()
            running = delta + gamma * lam * running
            next_value = values[i, t].item()
            advantages[i, t] = running
    keep = (mask != 0).to(values.dtype)
    return advantages, (advantages + values) * keep


def group_advantages(rewards, group_size, *, scale="group", eps=1e-4) -> torch.Tensor:
    values = rewards.tolist()
    batch_mean = sum(values) / len(values) if values else 0.0
    batch_std = math.sqrt(sum((v - batch_mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    out = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((v - mean) ** 2 for v in group) / (len(group) - 1)) if len(group) > 1 else 0.0
        for v in group:
            if scale in ("group", True):
                out.append((v - mean) / (std + eps))
            elif scale == "batch":
                out.append((v - mean) / (batch_std + eps))
            else:
                out.append(v - mean)
    return torch.tensor(out, dtype=rewards.dtype)


def dpo_pair_loss(loss_type, c, r, *, beta, label_smoothing, discopop_tau) -> torch.Tensor:
    """One pair's loss from its chosen and rejected log-ratios (0-d tensors)."""
    z, ls = beta * (c - r), label_smoothing
    sig = torch.sigmoid
    if loss_type == "sigmoid":
        return -(1 - ls) * _log_sigmoid(z) - ls * _log_sigmoid(-z)
    if loss_type == "hinge":
        return torch.clamp(1 - z, min=0)
    if loss_type == "ipo":
        return (c - r - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - ls) * _log_sigmoid(z) + ls * _log_sigmoid(-z)) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        return sig(z) * (_log_sigmoid(z) - math.log(1 - ls)) + sig(-z) * (_log_sigmoid(-z) - math.log(ls))
    if loss_type == "nca_pair":
        return -_log_sigmoid(beta * c) - 0.5 * _log_sigmoid(-beta * c) - 0.5 * _log_sigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -_log_sigmoid(beta * c) - _log_sigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - sig(beta * c) + sig(beta * r)
    if loss_type == "apo_down":
        return sig(beta * c) + 1 - sig(z)
    if loss_type == "discopop":
        m = sig(z / discopop_tau)
        return -_log_sigmoid(z) * (1 - m) + torch.exp(-z) * m
    return -_log_sigmoid(z)  # sigmoid_norm on length-averaged inputs


def dpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **options
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``options`` as :class:`DPOLossOptions`' fields."""
    o = DPOLossOptions(**options)
    losses = []
    for i in range(chosen_logps.shape[0]):
        c = chosen_logps[i] - ref_chosen_logps[i]
        r = rejected_logps[i] - ref_rejected_logps[i]
        pair = {"beta": o.beta, "label_smoothing": o.label_smoothing, "discopop_tau": o.discopop_tau}
        losses.append(sum(w * dpo_pair_loss(name, c, r, **pair) for name, w in zip(o.types, o.weights, strict=True)))
    stacked = torch.stack(losses) if losses else chosen_logps.new_zeros(0)
    return (
        stacked,
        o.beta * (chosen_logps - ref_chosen_logps).detach(),
        o.beta * (rejected_logps - ref_rejected_logps).detach(),
    )


@renamed_keywords(center_rewards_coef="center_rewards_coefficient")
def reward_loss(chosen_rewards, rejected_rewards, *, margin=None, center_rewards_coefficient=None) -> torch.Tensor:
    total = torch.zeros((), dtype=chosen_rewards.dtype)
    centre = torch.zeros((), dtype=chosen_rewards.dtype)
    count = chosen_rewards.shape[0]
    for i in range(count):
        m = 0.0 if margin is None else (margin[i] if isinstance(margin, torch.Tensor) and margin.dim() else margin)
        total = total - _log_sigmoid(chosen_rewards[i] - rejected_rewards[i] - m)
        centre = centre + (chosen_rewards[i] + rejected_rewards[i]) ** 2
    loss = total / max(count, 1)
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * centre / max(count, 1)
    return loss

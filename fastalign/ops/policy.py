"""PPO / GRPO policy loss and the clipped value loss, over ``[B, T]`` per-token tensors.

Semantics follow TRL's GRPOTrainer and verl's ``core_algos`` (which agree on everything below unless a docstring
says which one is followed). The torch implementation here is the CPU path and the reference of the Triton
kernels in ``fastalign/kernels/triton/policy_loss.py`` and the CUDA ones in ``csrc/cuda/policy_loss.cu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fastalign.ops.dispatch import resolve_backend

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# TRL's loss_type names for the same aggregations (dapo: token-mean over num_items_in_batch).
LOSS_TYPES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
KL_ESTIMATORS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Log-ratios are clamped like verl's, so exp() stays finite and no 0 * inf reaches a gradient.
LOG_RATIO_LIMIT = 20.0


def _check_bt(name: str, value: object, shape: torch.Size | None = None, like: str = "logp") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is None:
        if value.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(value.shape)}")
    elif value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like {like}, got {tuple(value.shape)}")
    return value


def _check_float(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_per_row_or_token(name: str, value: object, shape: torch.Size) -> torch.Tensor:
    """``[B]`` (one value per sequence) or ``[B, T]`` (per token); returned as ``[B, 1]`` or ``[B, T]``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    _check_float(name, value)
    if value.shape == shape[:1]:
        return value.unsqueeze(-1)
    if value.shape == shape:
        return value
    raise ValueError(f"{name} must be [B] = ({shape[0]},) or [B, T] = {tuple(shape)}, got {tuple(value.shape)}")


def resolve_aggregation(loss_agg_mode: str, loss_type: str | None) -> str:
    """``loss_type`` (TRL's name), when given, decides the aggregation; otherwise ``loss_agg_mode`` does."""
    if loss_type is not None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)} or None, got {loss_type!r}")
        return LOSS_TYPES[loss_type]
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    return loss_agg_mode


def check_aggregation_args(
    mode: str, width: int, max_completion_length: int | None, num_items_in_batch: object
) -> None:
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length <= 0
    ):
        raise ValueError(f"max_completion_length must be a positive int or None, got {max_completion_length!r}")
    if mode == "seq-mean-token-sum-norm" and max_completion_length is None and width == 0:
        raise ValueError(
            "seq-mean-token-sum-norm (loss_type='dr_grpo') needs a length: pass max_completion_length "
            "(the mask has no token dimension to default to)"
        )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a 1-element tensor, got {num_items_in_batch.shape}"
                )
        elif (
            isinstance(num_items_in_batch, bool)
            or not isinstance(num_items_in_batch, (int, float))
            or num_items_in_batch <= 0
        ):
            raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch!r}")


def row_weights(
    counts: torch.Tensor,
    mode: str,
    *,
    width: int,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B]`` weights such that ``loss = Σ_b weight_b · (row b's masked loss sum)``, from the rows' token counts.

    * ``token-mean``: ``1 / Σ mask``, or ``1 / num_items_in_batch`` (the global token count across
      gradient-accumulation steps and ranks) when given.
    * ``seq-mean-token-mean``: ``1 / (B · n_b)``: the mean over the B rows of each row's token mean (TRL's
      ``grpo``); a row with an empty mask contributes 0 and still counts in B, as in TRL.
    * ``seq-mean-token-sum``: ``1 / B``: the mean over rows of each row's token sum.
    * ``seq-mean-token-sum-norm``: ``1 / (B · max_completion_length)``, default ``T`` (TRL's ``dr_grpo``).
    """
    n_rows = max(counts.shape[0], 1)
    if mode == "token-mean":
        total = num_items_in_batch if num_items_in_batch is not None else counts.sum().clamp_min(1)
        return torch.ones_like(counts) / total
    if mode == "seq-mean-token-mean":
        return 1.0 / (n_rows * counts.clamp_min(1))
    if mode == "seq-mean-token-sum":
        return torch.full_like(counts, 1.0 / n_rows)
    length = max_completion_length if max_completion_length is not None else width
    return torch.full_like(counts, 1.0 / (n_rows * length))


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` (or ``[B, 1]``, broadcast) per-token loss over the tokens where ``mask`` is set, with
    the weights of :func:`row_weights`."""
    keep = mask != 0
    row_sums = torch.where(keep, per_token, 0.0).sum(-1)
    weights = row_weights(
        keep.sum(-1).to(row_sums.dtype), mode, width=mask.shape[-1], max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )  # fmt: skip
    return (row_sums * weights).sum()


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate with ``r = ref_logp − logp`` (clamped to ±20 as in verl).

    k1 = −r, k2 = r²/2, k3 = exp(r) − r − 1 (Schulman's low-variance estimator; verl's ``low_var_kl``).
    """
    r = (ref_logp - logp).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r.square()
    return torch.exp(r) - r - 1.0


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg_mode: str = "token-mean",
    loss_type: str | None = None,
    importance_sampling_level: str = "token",
    entropy_coef: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped-surrogate PPO / GRPO / DAPO / Dr. GRPO / GSPO policy loss.

    Per token, with ``ratio = exp(logp − old_logp)`` and ``A`` the advantage::

        loss = max(−A·ratio, −A·clip(ratio, 1 − clip_eps_low, 1 + clip_eps_high))
        if dual_clip = c > 1 and A < 0: loss = min(loss, −A·c)          (verl's dual-clip PPO)
        loss *= is_weights                                               (rollout-engine correction)
        loss += kl_coef · KL(logp, ref_logp)  − entropy_coef · entropy

    ``importance_sampling_level="sequence"`` (GSPO) replaces the token log-ratio by its masked mean over the
    sequence, gradient flowing through every token, as TRL does. The KL and entropy terms are not multiplied by
    ``is_weights`` (TRL and verl agree). Log-ratios are clamped to ±20 as in verl; TRL does not clamp.

    Args:
        logp: ``[B, T]`` log-probs of the completion tokens under the policy (gradient flows into it).
        old_logp: ``[B, T]`` under the policy that sampled them (no gradient).
        advantages: ``[B]`` per sequence (GRPO) or ``[B, T]`` per token (PPO); no gradient.
        mask: ``[B, T]``, nonzero on completion tokens. A row with an empty mask contributes nothing, no NaN.
        ref_logp: ``[B, T]`` under the reference policy, for the KL term. entropy: ``[B, T]`` (gradient flows).
        kl_coef: weight of the KL term, ``>= 0``. kl_estimator: ``"k1" | "k2" | "k3"`` (aliases ``"kl"``,
            ``"mse"``, ``"low_var_kl"``).
        loss_agg_mode / loss_type: see :func:`aggregate`; ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``,
            ``dapo``) wins when given. num_items_in_batch: the global completion-token count for ``token-mean``.
        is_weights: ``[B]`` or ``[B, T]`` truncated importance weights (no gradient).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    Returns:
        ``(loss, metrics)``: a scalar, and detached scalar tensors (no host sync): ``clip_frac_low`` (tokens
        with A < 0 whose ratio is below 1 − clip_eps_low), ``clip_frac_high`` (A > 0, ratio above
        1 + clip_eps_high), ``clip_frac_dual`` (A < 0 where the dual clip binds), ``ratio_mean``, and
        ``kl_mean`` / ``entropy_mean`` when ``ref_logp`` / ``entropy`` are given — all token means over ``mask``.

    Example:
        >>> import torch, fastalign
        >>> logp = torch.randn(4, 6, requires_grad=True)
        >>> loss, metrics = fastalign.policy_loss(logp, logp.detach() + 0.1, torch.randn(4), torch.ones(4, 6))
        >>> loss.backward()
    """
    args = check_policy_args(
        logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        loss_agg_mode=loss_agg_mode, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        entropy_coef=entropy_coef, max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, is_weights=is_weights,
    )  # fmt: skip
    chosen = resolve_backend(backend, logp.device, logp.dtype, "policy_loss")
    if chosen == "torch":
        return policy_loss_torch(args)
    from fastalign.ops._policy_kernels import LAUNCHES, policy_loss_kernels

    return policy_loss_kernels(args, LAUNCHES[chosen])


@dataclass(frozen=True)
class PolicyArgs:
    """Checked and normalised arguments of :func:`policy_loss`: advantages and weights as ``[B, 1]`` or
    ``[B, T]``, the clip bounds as ratios, the aggregation resolved."""

    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logp: torch.Tensor | None
    entropy: torch.Tensor | None
    clip_low: float
    clip_high: float
    dual_clip: float | None
    kl_coef: float
    kl_estimator: str
    mode: str
    sequence_level: bool
    entropy_coef: float
    max_completion_length: int | None
    num_items_in_batch: int | float | torch.Tensor | None
    is_weights: torch.Tensor | None


def check_policy_args(
    logp, old_logp, advantages, mask, *, ref_logp, entropy, clip_eps_low, clip_eps_high, dual_clip, kl_coef,
    kl_estimator, loss_agg_mode, loss_type, importance_sampling_level, entropy_coef, max_completion_length,
    num_items_in_batch, is_weights,
) -> PolicyArgs:  # fmt: skip
    logp = _check_bt("logp", logp)
    _check_float("logp", logp)
    shape = logp.shape
    old_logp = _check_bt("old_logp", old_logp, shape)
    mask = _check_bt("mask", mask, shape)
    advantages = _check_per_row_or_token("advantages", advantages, shape)
    if ref_logp is not None:
        ref_logp = _check_bt("ref_logp", ref_logp, shape)
    if entropy is not None:
        entropy = _check_bt("entropy", entropy, shape)
    if is_weights is not None:
        is_weights = _check_per_row_or_token("is_weights", is_weights, shape)
    for name, tensor in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy)):
        if tensor is not None:
            _check_float(name, tensor)
    devices = {t.device for t in (logp, old_logp, mask, advantages, ref_logp, entropy, is_weights) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    for name, value in (("clip_eps_low", clip_eps_low), ("clip_eps_high", clip_eps_high)):
        if (value is not None or name == "clip_eps_low") and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if clip_eps_low >= 1:
        raise ValueError(f"clip_eps_low must be < 1 (the lower clip is 1 - clip_eps_low), got {clip_eps_low}")
    if dual_clip is not None and (
        isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)) or dual_clip <= 1
    ):
        raise ValueError(f"dual_clip must be None or a number > 1, got {dual_clip!r}")
    for name, value in (("kl_coef", kl_coef), ("entropy_coef", entropy_coef)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if kl_coef < 0:
        raise ValueError(
            f"kl_coef must be >= 0 (a negative coefficient rewards moving away from the reference), got {kl_coef}"
        )
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
    if kl_coef != 0 and ref_logp is None:
        raise ValueError("kl_coef is nonzero but ref_logp is None: the KL term needs the reference log-probs")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef is nonzero but entropy is None")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )
    mode = resolve_aggregation(loss_agg_mode, loss_type)
    check_aggregation_args(mode, shape[1], max_completion_length, num_items_in_batch)
    if num_items_in_batch is not None and mode != "token-mean":
        raise ValueError(f"num_items_in_batch applies to token-mean aggregation only, not {mode!r}")
    return PolicyArgs(
        logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp, entropy=entropy,
        clip_low=1.0 - float(clip_eps_low),
        clip_high=1.0 + float(clip_eps_low if clip_eps_high is None else clip_eps_high),
        dual_clip=None if dual_clip is None else float(dual_clip), kl_coef=float(kl_coef),
        kl_estimator=KL_ESTIMATORS[kl_estimator], mode=mode, sequence_level=importance_sampling_level == "sequence",
        entropy_coef=float(entropy_coef), max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch, is_weights=is_weights,
    )  # fmt: skip


@dataclass(frozen=True)
class PolicyTerms:
    """Per-token pieces of the policy loss, ``[B, T]`` (or ``[B, 1]`` at sequence level)."""

    per_token: torch.Tensor
    ratio: torch.Tensor
    clipped_loss: torch.Tensor
    kl: torch.Tensor | None


def policy_terms(a: PolicyArgs) -> PolicyTerms:
    """The per-token loss before aggregation; autograd flows into ``a.logp`` and ``a.entropy``."""
    keep = a.mask != 0
    log_ratio = torch.where(keep, a.logp - a.old_logp.detach(), 0.0)
    if a.sequence_level:
        log_ratio = log_ratio.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    advantages = a.advantages.detach()
    clipped_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(a.clip_low, a.clip_high))
    per_token = clipped_loss
    if a.dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(clipped_loss, -advantages * a.dual_clip), clipped_loss)
    if a.is_weights is not None:
        per_token = per_token * a.is_weights.detach()
    kl = None
    if a.ref_logp is not None:
        kl = kl_estimate(a.logp, a.ref_logp.detach(), a.kl_estimator)
        if a.kl_coef != 0:
            per_token = per_token + a.kl_coef * kl
    if a.entropy is not None and a.entropy_coef != 0:
        per_token = per_token - a.entropy_coef * a.entropy
    return PolicyTerms(per_token, ratio, clipped_loss, kl)


@torch.no_grad()
def policy_metrics(a: PolicyArgs, terms: PolicyTerms) -> dict[str, torch.Tensor]:
    """Detached token means over the mask (no host sync)."""
    keep = a.mask != 0
    tokens = keep.sum().clamp_min(1)
    advantages, ratio = a.advantages, terms.ratio
    dtype = terms.per_token.dtype

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(keep, x.to(dtype), 0).sum() / tokens

    metrics = {
        "clip_frac_low": token_mean((ratio < a.clip_low) & (advantages < 0)),
        "clip_frac_high": token_mean((ratio > a.clip_high) & (advantages > 0)),
        "clip_frac_dual": token_mean((advantages < 0) & (terms.clipped_loss > -advantages * a.dual_clip))
        if a.dual_clip is not None
        else torch.zeros((), dtype=dtype, device=ratio.device),
        "ratio_mean": token_mean(ratio),
    }
    if terms.kl is not None:
        metrics["kl_mean"] = token_mean(terms.kl)
    if a.entropy is not None:
        metrics["entropy_mean"] = token_mean(a.entropy)
    return metrics


def policy_loss_torch(a: PolicyArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Composed torch ops; autograd provides the gradient into ``logp`` and ``entropy``."""
    terms = policy_terms(a)
    loss = aggregate(
        terms.per_token, a.mask, a.mode, max_completion_length=a.max_completion_length,
        num_items_in_batch=a.num_items_in_batch,
    )  # fmt: skip
    return loss, policy_metrics(a, terms)


def policy_chunk_loss(
    a: PolicyArgs, weights: torch.Tensor, index: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor | None
) -> torch.Tensor:
    """The part of the aggregated policy loss that falls on the tokens ``index`` (into the flattened ``[B, T]``).

    ``logp`` / ``entropy`` are those tokens' values (differentiable); ``weights`` are the batch's
    :func:`row_weights`. At token level any set of tokens works; at sequence level ``index`` must cover whole
    rows, in order (the sequence ratio needs all of a row's tokens).
    """
    width = a.mask.shape[1]

    def pick(tensor: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        if cols is None:
            return tensor[rows]
        return tensor[rows, cols if tensor.shape[1] == width else 0].unsqueeze(0)

    if a.sequence_level:
        rows, cols = index.view(-1, width)[:, 0] // width, None
        logp, entropy = logp.view(-1, width), None if entropy is None else entropy.view(-1, width)
        token_weights = weights[rows].unsqueeze(-1)
    else:
        rows, cols = index // width, index % width
        logp, entropy = logp.unsqueeze(0), None if entropy is None else entropy.unsqueeze(0)
        token_weights = weights[rows].unsqueeze(0)
    sub = replace(
        a, logp=logp, entropy=entropy, old_logp=pick(a.old_logp, rows, cols), mask=pick(a.mask, rows, cols),
        advantages=pick(a.advantages, rows, cols), ref_logp=pick(a.ref_logp, rows, cols),
        is_weights=pick(a.is_weights, rows, cols),
    )  # fmt: skip
    per_token = policy_terms(sub).per_token
    return (torch.where(sub.mask != 0, per_token, 0.0) * token_weights).sum()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
    loss_agg_mode: str = "token-mean",
) -> torch.Tensor:
    """PPO's clipped value loss: ``0.5 · max((v − R)², (v_old + clip(v − v_old, ±clip_range) − R)²)`` per token,
    aggregated over ``mask`` like the policy loss (verl's ``compute_value_loss``). ``clip_range=None`` disables
    clipping. All tensors ``[B, T]``; the gradient flows into ``values`` only.

    Example:
        >>> import torch, fastalign
        >>> values = torch.randn(2, 5, requires_grad=True)
        >>> fastalign.value_loss(values, values.detach(), torch.randn(2, 5), torch.ones(2, 5)).backward()
    """
    values = _check_bt("values", values)
    _check_float("values", values)
    for name, tensor in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        _check_bt(name, tensor, values.shape, like="values")
    if clip_range is not None and (
        isinstance(clip_range, bool) or not isinstance(clip_range, (int, float)) or clip_range < 0
    ):
        raise ValueError(f"clip_range must be None or a number >= 0, got {clip_range!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    check_aggregation_args(loss_agg_mode, values.shape[1], None, None)
    returns = returns.detach()
    per_token = (values - returns).square()
    if clip_range is not None:
        old_values = old_values.detach()
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        per_token = torch.maximum(per_token, (clipped - returns).square())
    return 0.5 * aggregate(per_token, mask, loss_agg_mode)

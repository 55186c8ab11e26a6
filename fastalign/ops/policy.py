"""PPO / GRPO policy loss and the clipped value loss, over ``[B, T]`` per-token tensors.

Semantics follow TRL's GRPOTrainer and verl's ``core_algos`` (which agree on everything below unless a docstring
says which one is followed). The math lives in :mod:`fastalign.ops._policy_math`: its torch implementation is the
CPU path and the reference of the Triton kernels in ``fastalign/kernels/triton/policy_loss.py`` and the CUDA ones
in ``csrc/cuda/policy_loss.cu``, whose host side is :mod:`fastalign.ops._policy_kernels`.
"""

from __future__ import annotations

import torch

from fastalign.ops._checks import check_number
from fastalign.ops._options import options_from, renamed_keywords, with_option_fields
from fastalign.ops._policy_kernels import LAUNCHES, policy_loss_kernels
from fastalign.ops._policy_math import (
    GENERATION_NORMALISED_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOG_RATIO_LIMIT,
    LOSS_AGG_MODES,
    LOSS_TYPES,
    PolicyLossOptions,
    aggregate,
    check_aggregation_args,
    check_bt,
    check_float,
    check_policy_args,
    kl_estimate,
    policy_loss_torch,
)
from fastalign.ops.dispatch import resolve_backend

__all__ = [
    "GENERATION_NORMALISED_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_ESTIMATORS",
    "LOG_RATIO_LIMIT",
    "LOSS_AGG_MODES",
    "LOSS_TYPES",
    "PolicyLossOptions",
    "kl_estimate",
    "policy_loss",
    "value_loss",
]


@renamed_keywords(logp="logps", old_logp="old_logps", ref_logp="ref_logps")
@with_option_fields(PolicyLossOptions)
def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    num_items_in_batch: int | float | torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    options: PolicyLossOptions | None = None,
    backend: str = "auto",
    **option_fields,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO / GRPO / DAPO / Dr. GRPO / GSPO policy loss, and TRL's CISPO / SAPO / LUSPO / VESPO objectives.

    Per token, with ``ratio = exp(logps − old_logps)`` and ``A`` the advantage::

        loss = max(−A·min(ratio, delta), −A·clip(ratio, 1 − clip_eps_low, 1 + clip_eps_high))
        if dual_clip = c > 1 and A < 0: loss = min(loss, −A·c)          (verl's dual-clip PPO)
        loss *= is_weights                                               (rollout-engine correction)
        loss *= off-policy sequence mask · top-entropy token mask        (when set)
        loss += kl_coef · KL(logps, ref_logps)  − entropy_coef · entropy

    (``delta`` off: ``+inf``). ``loss_type`` ``"cispo"``, ``"sapo"`` and ``"vespo"`` replace the first line by
    their objectives, and ``"luspo"`` scales GSPO's sequence loss by the length: see :class:`PolicyLossOptions`
    and docs/losses.md for the formulas and papers.

    ``importance_sampling_level="sequence"`` (GSPO) replaces the token log-ratio by its masked mean over the
    sequence, gradient flowing through every token, as TRL does. The KL and entropy terms are not multiplied by
    ``is_weights`` (TRL and verl agree). Log-ratios are clamped to ±20 as in verl; TRL does not clamp.

    Args:
        logps: ``[B, T]`` log-probs of the completion tokens under the policy (gradient flows into it).
        old_logps: ``[B, T]`` under the policy that sampled them (no gradient).
        advantages: ``[B]`` per sequence (GRPO) or ``[B, T]`` per token (PPO); no gradient.
        mask: ``[B, T]``, nonzero on completion tokens. A row with an empty mask contributes nothing, no NaN.
        ref_logps: ``[B, T]`` under the reference policy, for the KL term. entropy: ``[B, T]`` (gradient flows).
        num_items_in_batch: the global completion-token count ``token-mean`` divides by (a number or a
            1-element tensor; default: this batch's).
        is_weights: ``[B]`` or ``[B, T]`` truncated importance weights (no gradient).
        sampler_logps: ``[B, T]`` the rollout engine's log-probs, for ``off_policy_mask_threshold`` (default:
            ``old_logps``, as TRL without vLLM).
        options: a :class:`PolicyLossOptions`, or its fields as keywords (``clip_eps_low=0.2``,
            ``clip_eps_high=None``, ``dual_clip=None``, ``kl_coef=0.0``, ``kl_estimator="k3"``,
            ``loss_agg_mode="token-mean"``, ``loss_type=None``, ``importance_sampling_level="token"``,
            ``entropy_coef=0.0``, ``max_completion_length=None``, ``delta=None``, ``sapo_temperature_pos=1.0``,
            ``sapo_temperature_neg=1.05``, ``vespo_k_pos=2.0``, ``vespo_lambda_pos=3.0``, ``vespo_k_neg=3.0``,
            ``vespo_lambda_neg=2.0``, ``off_policy_mask_threshold=None``, ``top_entropy_quantile=1.0``; see
            :class:`PolicyLossOptions`).
        backend: ``"auto" | "torch" | "triton" | "cuda"``.

    The keywords ``logp``, ``old_logp`` and ``ref_logp`` are the deprecated names of ``logps``, ``old_logps``
    and ``ref_logps``.

    Returns:
        ``(loss, metrics)``: a scalar, and detached scalar tensors (no host sync): ``clip_frac_low`` (tokens
        with A < 0 whose ratio is below 1 − clip_eps_low), ``clip_frac_high`` (A > 0, ratio above
        1 + clip_eps_high), ``clip_frac_dual`` (A < 0 where the dual clip binds), ``ratio_mean``, and
        ``kl_mean`` / ``entropy_mean`` when ``ref_logps`` / ``entropy`` are given — all token means over ``mask``.

    Example:
        >>> import torch, fastalign
        >>> logps = torch.randn(4, 6, requires_grad=True)
        >>> loss, metrics = fastalign.policy_loss(logps, logps.detach() + 0.1, torch.randn(4), torch.ones(4, 6))
        >>> loss.backward()
    """
    options = options_from(PolicyLossOptions, options, option_fields, "policy_loss")
    args = check_policy_args(
        logps,
        old_logps,
        advantages,
        mask,
        ref_logps=ref_logps,
        entropy=entropy,
        is_weights=is_weights,
        num_items_in_batch=num_items_in_batch,
        options=options,
        sampler_logps=sampler_logps,
    )
    chosen = resolve_backend(backend, args.logps.device, args.logps.dtype, "policy_loss")
    if chosen == "torch":
        return policy_loss_torch(args)
    return policy_loss_kernels(args, LAUNCHES[chosen])


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
    values = check_bt("values", values)
    check_float("values", values)
    for name, tensor in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        check_bt(name, tensor, values.shape, like="values")
    check_number("clip_range", clip_range, at_least=0, finite=False, optional=True)
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

"""The PPO / GRPO policy-loss math that the public op (:mod:`fastalign.ops.policy`), the kernels' host side
(:mod:`fastalign.ops._policy_kernels`) and the fused-linear module (:class:`fastalign.nn.LinearPolicyLoss`)
share: the options bundle and its names, the argument checks, the per-token terms in torch, the aggregation
weights, and the per-row sums ``stats[STAT_ROWS, B]`` that every path reduces into the same metrics.

Semantics follow TRL's GRPOTrainer and verl's ``core_algos`` (which agree on everything here unless a docstring
says which one is followed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from fastalign.ops._checks import check_number
from fastalign.ops._options import renamed_keywords

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# TRL's loss_type names, each with its aggregation (dapo, cispo, vespo: token-mean over num_items_in_batch; luspo:
# the mean over rows of each row's token sum, i.e. a sequence-level loss scaled by the sequence's length).
LOSS_TYPES = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
    "vespo": "token-mean",
}
# The per-token objective of each loss_type (the clipped surrogate unless named here).
OBJECTIVES = ("clip", "cispo", "sapo", "vespo")
_LOSS_TYPE_OBJECTIVES = {"cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
# The loss types TRL normalises by the generation batch's token count (num_items_in_batch).
GENERATION_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")
# VESPO's sequence weight is formed in log space, clamped to [log 1e-8, 20] as in TRL / the paper's code.
VESPO_LOG_WEIGHT_FLOOR = math.log(1e-8)
KL_ESTIMATORS = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3"}
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Log-ratios are clamped like verl's, so exp() stays finite and no 0 * inf reaches a gradient.
LOG_RATIO_LIMIT = 20.0

# Rows of the per-row sums stats[STAT_ROWS, B] over each row's kept tokens: the layout the Triton kernels
# (fastalign/kernels/triton/policy_loss.py) and the CUDA kernels (csrc's policy::Stat) write, and that
# policy_stats computes in torch.
LOSS, COUNT, LOW_CLIP, HIGH_CLIP, DUAL_CLIP, RATIO, KL, ENTROPY = range(8)
STAT_ROWS = 8


def resolve_aggregation(loss_agg_mode: str, loss_type: str | None) -> str:
    """``loss_type`` (TRL's name), when given, decides the aggregation; otherwise ``loss_agg_mode`` does."""
    if loss_type is not None:
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {sorted(LOSS_TYPES)} or None, got {loss_type!r}")
        return LOSS_TYPES[loss_type]
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    return loss_agg_mode


@dataclass(frozen=True)
class PolicyLossOptions:
    """The options of :func:`fastalign.policy_loss` and :class:`fastalign.nn.LinearPolicyLoss`, checked when
    built (a ``ValueError`` names the option).

    * ``clip_eps_low`` / ``clip_eps_high``: the ratio is clipped to ``[1 − clip_eps_low, 1 + clip_eps_high]``
      (``clip_eps_high=None``: ``clip_eps_low``; DAPO's clip-higher uses 0.28); ``clip_eps_low`` in ``[0, 1)``.
    * ``dual_clip``: ``None`` or ``c > 1``, the cap ``−A·c`` of a negative advantage's loss (verl's dual-clip PPO).
    * ``kl_coef`` (``>= 0``) and ``kl_estimator`` (``"k1" | "k2" | "k3"``, or their aliases ``"kl"``, ``"mse"``,
      ``"low_var_kl"``): the KL term to the reference policy.
    * ``loss_agg_mode`` (``"token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum" |
      "seq-mean-token-sum-norm"``) or TRL's ``loss_type`` (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``), which wins
      when given; ``max_completion_length``: the length ``seq-mean-token-sum-norm`` divides by (default ``T``).
    * ``importance_sampling_level``: ``"token"``, or ``"sequence"`` (GSPO).
    * ``entropy_coef``: weight of the entropy bonus.
    * ``delta``: ``None`` or ``> 0``, INTELLECT-2's two-sided clip: the unclipped branch's ratio is capped at
      ``delta`` (the clipped surrogate's loss types only).
    * ``loss_type="cispo"`` (MiniMax-M1, ScaleRL): ``−sg(min(ratio, clip_eps_high)) · A · logps``; the cap is
      ``clip_eps_high`` itself (ScaleRL's ε_max, 5.0 recommended), which must be given; no lower clip.
    * ``loss_type="sapo"`` (SAPO): ``−(4/τ) σ(τ (ratio − 1)) · A`` with ``τ = sapo_temperature_pos`` (1.0) where
      ``A > 0`` and ``sapo_temperature_neg`` (1.05) elsewhere; both ``> 0``.
    * ``loss_type="luspo"`` (LUSPO): the clipped surrogate at sequence level, each sequence's loss scaled by its
      length (``importance_sampling_level="sequence"`` required).
    * ``loss_type="vespo"`` (VESPO): ``−φ(w) · A · logps`` with the detached gamma weight ``φ(w) = e^λ w^k e^(−λ w)``
      of the sequence's importance ratio ``w = Π ratio`` (times its ``[B, T]`` ``is_weights``, which VESPO folds in
      instead of multiplying the loss); ``k, λ = vespo_k_pos, vespo_lambda_pos`` (2, 3) where ``A ≥ 0``, else
      ``vespo_k_neg, vespo_lambda_neg`` (3, 2); ``λ > 0``.
    * ``off_policy_mask_threshold``: ``None`` or a number, DeepSeek-V3.2's off-policy sequence mask: a sequence
      with ``A < 0`` whose mean ``sampler_logps − logps`` (the sampler's k1 KL to the policy) is above it gets no
      policy loss (the KL term stays; the denominators are unchanged).
    * ``top_entropy_quantile``: ``ρ`` in ``[0, 1]`` ("Beyond the 80/20 rule"): only the tokens whose entropy is at
      least the ``1 − ρ`` quantile of the call's masked-in entropies (``torch.quantile``'s linear
      interpolation) keep their policy loss; needs ``entropy``; 1 keeps all.
    * ``use_bias_correction_kl`` (DeepSeek-V3.2's unbiased KL): the KL term (and ``kl_mean``) is the estimate
      times the ratio (token or sequence, before ``delta``; not detached), as in TRL.
    cispo, sapo and vespo are token-level objectives: they refuse ``importance_sampling_level="sequence"``, and
    ``dual_clip`` / ``delta``, which belong to the clipped surrogate.
    """

    clip_eps_low: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    loss_agg_mode: str = "token-mean"
    loss_type: str | None = None
    importance_sampling_level: str = "token"
    entropy_coef: float = 0.0
    max_completion_length: int | None = None
    delta: float | None = None
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None
    top_entropy_quantile: float = 1.0
    use_bias_correction_kl: bool = False

    def __post_init__(self):
        check_number("clip_eps_low", self.clip_eps_low, at_least=0)
        if self.clip_eps_high is not None:
            check_number("clip_eps_high", self.clip_eps_high, at_least=0)
        if self.clip_eps_low >= 1:
            raise ValueError(f"clip_eps_low must be < 1 (the lower clip is 1 - clip_eps_low), got {self.clip_eps_low}")
        check_number("dual_clip", self.dual_clip, above=1, finite=False, optional=True)
        check_number("kl_coef", self.kl_coef)
        check_number("entropy_coef", self.entropy_coef)
        if self.kl_coef < 0:
            raise ValueError(
                "kl_coef must be >= 0 (a negative coefficient rewards moving away from the reference), "
                f"got {self.kl_coef}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        resolve_aggregation(self.loss_agg_mode, self.loss_type)
        check_number("max_completion_length", self.max_completion_length, integer=True, above=0, optional=True)
        check_number("delta", self.delta, above=0, finite=False, optional=True)
        check_number("sapo_temperature_pos", self.sapo_temperature_pos, above=0)
        check_number("sapo_temperature_neg", self.sapo_temperature_neg, above=0)
        check_number("vespo_k_pos", self.vespo_k_pos)
        check_number("vespo_k_neg", self.vespo_k_neg)
        check_number("vespo_lambda_pos", self.vespo_lambda_pos, above=0)
        check_number("vespo_lambda_neg", self.vespo_lambda_neg, above=0)
        check_number("off_policy_mask_threshold", self.off_policy_mask_threshold, optional=True)
        check_number("top_entropy_quantile", self.top_entropy_quantile, at_least=0)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        if self.top_entropy_quantile > 1:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if self.top_entropy_quantile < 1 and self.entropy_coef != 0:
            raise ValueError(
                "top_entropy_quantile < 1 with entropy_coef != 0 is refused: the entropy bonus would need the same "
                "token mask, which the kernels do not apply to it"
            )
        objective = self.objective
        if objective != "clip":
            if self.sequence_level:
                raise ValueError(
                    f"loss_type={self.loss_type!r} is a token-level objective: importance_sampling_level='sequence' "
                    "is refused (as liger-kernel does; TRL warns)"
                )
            for name in ("dual_clip", "delta"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name} applies to the clipped surrogate (grpo, bnpo, dr_grpo, dapo, luspo), not to "
                        f"loss_type={self.loss_type!r}"
                    )
        if objective == "cispo" and self.clip_eps_high is None:
            raise ValueError(
                "loss_type='cispo' caps the ratio at clip_eps_high itself (ScaleRL's ε_max; 5.0 recommended): pass it "
                "(TRL would fall back to epsilon = 0.2)"
            )
        if self.loss_type == "luspo" and not self.sequence_level:
            raise ValueError(
                "loss_type='luspo' scales each sequence's GSPO loss by its length: it needs "
                "importance_sampling_level='sequence' (TRL warns and then averages over padding)"
            )

    @property
    def clip_low(self) -> float:
        """The lower clip bound of the ratio, ``1 − clip_eps_low``."""
        return 1.0 - float(self.clip_eps_low)

    @property
    def clip_high(self) -> float:
        """The upper clip bound of the ratio, ``1 + clip_eps_high`` (``clip_eps_low`` when that is None)."""
        return 1.0 + float(self.clip_eps_low if self.clip_eps_high is None else self.clip_eps_high)

    @property
    def aggregation(self) -> str:
        """The ``loss_agg_mode`` that applies: ``loss_type``'s when given."""
        return resolve_aggregation(self.loss_agg_mode, self.loss_type)

    @property
    def kl_kind(self) -> str:
        """``"k1" | "k2" | "k3"``: the estimator, aliases resolved."""
        return KL_ESTIMATORS[self.kl_estimator]

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def needs_whole_rows(self) -> bool:
        """Whether a token's loss depends on its whole row (GSPO's sequence ratio, VESPO's sequence weight, the
        off-policy mask's sequence KL)."""
        return self.sequence_level or self.objective == "vespo" or self.off_policy_mask_threshold is not None

    @property
    def objective(self) -> str:
        """``"clip" | "cispo" | "sapo" | "vespo"``: the per-token objective of the loss type."""
        return _LOSS_TYPE_OBJECTIVES.get(self.loss_type, "clip")

    @property
    def metric_clip_bounds(self) -> tuple[float, float]:
        """The ratio bounds the clip-fraction metrics count against: the clip range, cispo's cap (no lower clip),
        or none (sapo, vespo: ``(0, inf)``, never crossed)."""
        if self.objective == "clip":
            return self.clip_low, self.clip_high
        if self.objective == "cispo":
            return 0.0, float(self.clip_eps_high)
        return 0.0, math.inf


def check_bt(name: str, value: object, shape: torch.Size | None = None, like: str = "logps") -> torch.Tensor:
    """``value`` as a ``[B, T]`` tensor (of ``shape``, that of ``like``, when given)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if shape is None:
        if value.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {tuple(value.shape)}")
    elif value.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} like {like}, got {tuple(value.shape)}")
    return value


def check_float(name: str, value: torch.Tensor) -> None:
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _check_per_row_or_token(name: str, value: object, shape: torch.Size) -> torch.Tensor:
    """``[B]`` (one value per sequence) or ``[B, T]`` (per token); returned as ``[B, 1]`` or ``[B, T]``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    check_float(name, value)
    if value.shape == shape[:1]:
        return value.unsqueeze(-1)
    if value.shape == shape:
        return value
    raise ValueError(f"{name} must be [B] = ({shape[0]},) or [B, T] = {tuple(shape)}, got {tuple(value.shape)}")


def check_aggregation_args(
    mode: str, width: int, max_completion_length: int | None, num_items_in_batch: object
) -> None:
    """What an aggregation needs from the batch: a length for ``seq-mean-token-sum-norm`` when ``T = 0``, and a
    ``num_items_in_batch`` that is a number ``> 0`` or a 1-element tensor."""
    if mode == "seq-mean-token-sum-norm" and max_completion_length is None and width == 0:
        raise ValueError(
            "seq-mean-token-sum-norm (loss_type='dr_grpo') needs a length: pass max_completion_length "
            "(the mask has no token dimension to default to)"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a 1-element tensor, got {num_items_in_batch.shape}"
            )
    else:
        check_number("num_items_in_batch", num_items_in_batch, above=0, finite=False, optional=True)


@dataclass(frozen=True)
class PolicyArgs:
    """Checked and normalised arguments of :func:`fastalign.policy_loss`: advantages and importance weights as
    ``[B, 1]`` or ``[B, T]``, the other tensors ``[B, T]``, and the options."""

    logps: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    ref_logps: torch.Tensor | None
    entropy: torch.Tensor | None
    is_weights: torch.Tensor | None
    num_items_in_batch: int | float | torch.Tensor | None
    options: PolicyLossOptions
    sampler_logps: torch.Tensor | None = None


def check_policy_args(
    logps: object,
    old_logps: object,
    advantages: object,
    mask: object,
    *,
    ref_logps: object,
    entropy: object,
    is_weights: object,
    num_items_in_batch: object,
    options: PolicyLossOptions,
    sampler_logps: object = None,
) -> PolicyArgs:
    """Check the tensors against each other and against ``options`` (already checked on their own)."""
    logps = check_bt("logps", logps)
    check_float("logps", logps)
    shape = logps.shape
    old_logps = check_bt("old_logps", old_logps, shape)
    mask = check_bt("mask", mask, shape)
    advantages = _check_per_row_or_token("advantages", advantages, shape)
    if ref_logps is not None:
        ref_logps = check_bt("ref_logps", ref_logps, shape)
    if entropy is not None:
        entropy = check_bt("entropy", entropy, shape)
    if is_weights is not None:
        is_weights = _check_per_row_or_token("is_weights", is_weights, shape)
    if sampler_logps is not None:
        sampler_logps = check_bt("sampler_logps", sampler_logps, shape)
    if options.top_entropy_quantile < 1 and entropy is None:
        raise ValueError("top_entropy_quantile < 1 needs entropy (the per-token entropies it ranks)")
    named = (("old_logps", old_logps), ("ref_logps", ref_logps), ("entropy", entropy), ("sampler_logps", sampler_logps))
    for name, tensor in named:
        if tensor is not None:
            check_float(name, tensor)
    tensors = (logps, old_logps, mask, advantages, ref_logps, entropy, is_weights, sampler_logps)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if options.objective == "vespo" and is_weights is not None and is_weights.shape[1] == 1 and shape[1] != 1:
        raise ValueError(
            "loss_type='vespo' folds per-token importance weights into its sequence weight: is_weights must be "
            f"[B, T] = {tuple(shape)} (TRL's token_truncate / token_mask modes), got one weight per sequence"
        )
    if options.kl_coef != 0 and ref_logps is None:
        raise ValueError("kl_coef is nonzero but ref_logps is None: the KL term needs the reference log-probs")
    if options.entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef is nonzero but entropy is None")
    mode = options.aggregation
    check_aggregation_args(mode, shape[1], options.max_completion_length, num_items_in_batch)
    if num_items_in_batch is not None and mode != "token-mean":
        raise ValueError(f"num_items_in_batch applies to token-mean aggregation only, not {mode!r}")
    return PolicyArgs(
        logps, old_logps, advantages, mask, ref_logps, entropy, is_weights, num_items_in_batch, options, sampler_logps
    )


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


def args_row_weights(a: PolicyArgs, counts: torch.Tensor) -> torch.Tensor:
    """:func:`row_weights` of the arguments' aggregation, from the rows' token counts ``[B]``."""
    return row_weights(
        counts,
        a.options.aggregation,
        width=a.mask.shape[1],
        max_completion_length=a.options.max_completion_length,
        num_items_in_batch=a.num_items_in_batch,
    )


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
    counts = keep.sum(-1).to(row_sums.dtype)
    options = {"max_completion_length": max_completion_length, "num_items_in_batch": num_items_in_batch}
    return (row_sums * row_weights(counts, mode, width=mask.shape[-1], **options)).sum()


@renamed_keywords(logp="logps", ref_logp="ref_logps")
def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate with ``r = ref_logps − logps`` (clamped to ±20 as in verl).

    k1 = −r, k2 = r²/2, k3 = exp(r) − r − 1 (Schulman's low-variance estimator; verl's ``low_var_kl``).
    """
    r = (ref_logps - logps).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r.square()
    return torch.exp(r) - r - 1.0


@dataclass(frozen=True)
class PolicyTerms:
    """Per-token pieces of the policy loss, ``[B, T]`` (``ratio``: ``[B, 1]`` at sequence level)."""

    per_token: torch.Tensor
    ratio: torch.Tensor
    clipped_loss: torch.Tensor
    kl: torch.Tensor | None


def _by_sign(positive: torch.Tensor, if_positive: float, otherwise: float, like: torch.Tensor) -> torch.Tensor:
    """``if_positive`` where ``positive``, else ``otherwise``, in ``like``'s dtype and device (a float64 1.05, not
    the float32 one ``torch.where`` makes of a Python number)."""
    value = torch.full(positive.shape, otherwise, dtype=like.dtype, device=like.device)
    return value.masked_fill(positive, if_positive)


def vespo_weights(a: PolicyArgs) -> torch.Tensor:
    """VESPO's detached gamma weight ``φ(w) = exp(λ + k log w − λ w)`` (``φ(1) = 1``), ``[B, 1]`` (``[B, T]`` with
    per-token advantages: ``k, λ`` follow each token's sign), where ``log w`` is the row's sum of clamped
    log-ratios plus that of its ``[B, T]`` ``is_weights`` (each in ``[log 1e-8, 20]``), clamped to
    ``[log 1e-8, 20]``; non-finite weights are 0, as in TRL. In float32 or wider."""
    o, keep = a.options, a.mask != 0
    dtype = torch.promote_types(a.logps.dtype, torch.float32)
    with torch.no_grad():
        log_ratio = (a.logps.to(dtype) - a.old_logps.to(dtype)).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        log_w = torch.where(keep, log_ratio, 0.0).sum(-1, keepdim=True)
        if a.is_weights is not None:
            log_is = a.is_weights.to(dtype).log().clamp(VESPO_LOG_WEIGHT_FLOOR, LOG_RATIO_LIMIT)
            log_w = log_w + torch.where(keep, log_is, 0.0).sum(-1, keepdim=True)
        log_w = log_w.clamp(VESPO_LOG_WEIGHT_FLOOR, LOG_RATIO_LIMIT)
        nonneg = a.advantages >= 0
        k = _by_sign(nonneg, o.vespo_k_pos, o.vespo_k_neg, log_w)
        lam = _by_sign(nonneg, o.vespo_lambda_pos, o.vespo_lambda_neg, log_w)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(a: PolicyArgs) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, ``[B, 1]`` (``[B, T]`` with per-token advantages) bool: keep where
    ``A ≥ 0`` or the row's mean ``sampler_logps − logps`` (``old_logps`` without a sampler; NaN counts as 0) is at
    most ``off_policy_mask_threshold``."""
    keep = a.mask != 0
    sampler = a.old_logps if a.sampler_logps is None else a.sampler_logps
    with torch.no_grad():
        gap = sampler.detach() - a.logps.detach()
        gap = torch.where(keep & ~torch.isnan(gap), gap, 0.0)
        kl = gap.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
        return (a.advantages >= 0) | (kl <= a.options.off_policy_mask_threshold)


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """``[B, T]`` bool: masked-in tokens whose entropy is at least the ``1 − quantile`` quantile of all masked-in
    entropies (linear interpolation, as ``torch.quantile``), without a host sync (a sort and gathers)."""
    keep = mask != 0
    with torch.no_grad():
        values = entropy.detach().to(torch.promote_types(entropy.dtype, torch.float32))
        ordered = torch.where(keep, values, math.inf).flatten().sort().values
        position = (keep.sum() - 1).clamp_min(0).to(values.dtype) * (1.0 - quantile)
        low, high = position.floor().long().view(1), position.ceil().long().view(1)
        below, above = ordered.gather(0, low), ordered.gather(0, high)
        threshold = below + (above - below).nan_to_num(0.0) * (position - low)
        return keep & (values >= threshold)


def policy_weights(a: PolicyArgs) -> torch.Tensor | None:
    """What multiplies each token's policy term (not the KL or entropy terms), detached, or ``None`` for 1: the
    importance weights (VESPO: its weight φ, which folds them in), times the off-policy sequence mask and the
    top-entropy token mask when set. The kernels receive it as their importance weight."""
    o = a.options
    weights = vespo_weights(a) if o.objective == "vespo" else (None if a.is_weights is None else a.is_weights.detach())
    masks = []
    if o.off_policy_mask_threshold is not None:
        masks.append(off_policy_mask(a))
    if o.top_entropy_quantile < 1:
        masks.append(top_entropy_mask(a.entropy, a.mask, o.top_entropy_quantile))
    for keep in masks:
        weights = keep.to(torch.float32) if weights is None else weights * keep
    return weights


def _objective_loss(a: PolicyArgs, ratio: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The per-token objective of ``a.options.loss_type`` before the dual clip, importance weights, KL and
    entropy terms."""
    o = a.options
    if o.objective == "cispo":
        return -ratio.clamp(max=float(o.clip_eps_high)).detach() * advantages * a.logps
    if o.objective == "sapo":
        temperature = _by_sign(advantages > 0, o.sapo_temperature_pos, o.sapo_temperature_neg, ratio)
        return -(torch.sigmoid(temperature * (ratio - 1.0)) * 4.0 / temperature) * advantages
    if o.objective == "vespo":  # φ(w) comes in with the policy weights
        return -advantages * a.logps
    capped = ratio if o.delta is None else ratio.clamp(max=float(o.delta))
    return torch.maximum(-advantages * capped, -advantages * ratio.clamp(o.clip_low, o.clip_high))


def policy_terms(a: PolicyArgs) -> PolicyTerms:
    """The per-token loss before aggregation; autograd flows into ``a.logps`` and ``a.entropy``."""
    o = a.options
    keep = a.mask != 0
    log_ratio = torch.where(keep, a.logps - a.old_logps.detach(), 0.0)
    if o.sequence_level:
        log_ratio = log_ratio.sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    advantages = a.advantages.detach()
    clipped_loss = _objective_loss(a, ratio, advantages)
    per_token = clipped_loss
    if o.dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(clipped_loss, -advantages * o.dual_clip), clipped_loss)
    weights = policy_weights(a)
    if weights is not None:
        per_token = per_token * weights.to(per_token.dtype)
    kl = None
    if a.ref_logps is not None:
        kl = kl_estimate(a.logps, a.ref_logps.detach(), o.kl_kind)
        if o.use_bias_correction_kl:
            kl = kl * ratio
        if o.kl_coef != 0:
            per_token = per_token + o.kl_coef * kl
    if a.entropy is not None and o.entropy_coef != 0:
        per_token = per_token - o.entropy_coef * a.entropy
    return PolicyTerms(per_token, ratio, clipped_loss, kl)


@torch.no_grad()
def policy_stats(a: PolicyArgs, terms: PolicyTerms, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[STAT_ROWS, ...]``: ``reduce`` of each per-token value the kernels sum per row (the masked loss, the
    mask, the clip flags, ratio, KL, entropy; 0 off the mask and for absent terms), in the loss's dtype.

    ``reduce=_row_sums`` gives the kernels' ``stats[STAT_ROWS, B]``.
    """
    o, keep, dtype = a.options, a.mask != 0, terms.per_token.dtype
    advantages, ratio = a.advantages, terms.ratio
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    rows = [None] * STAT_ROWS
    rows[LOSS] = terms.per_token
    rows[COUNT] = keep
    clip_low, clip_high = o.metric_clip_bounds
    rows[LOW_CLIP] = (ratio < clip_low) & (advantages < 0)
    rows[HIGH_CLIP] = (ratio > clip_high) & (advantages > 0)
    if o.dual_clip is not None:
        rows[DUAL_CLIP] = (advantages < 0) & (terms.clipped_loss > -advantages * o.dual_clip)
    rows[RATIO] = ratio
    rows[KL] = terms.kl
    rows[ENTROPY] = a.entropy
    return torch.stack([reduce(torch.where(keep, zero if x is None else x.to(dtype), zero)) for x in rows])


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    return values.sum(-1)


def _token_values(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1)


def policy_metrics(a: PolicyArgs, stats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics of :func:`fastalign.policy_loss` from the per-row sums ``stats[STAT_ROWS, B]``: token means
    over the mask, as detached scalar tensors (no host sync)."""
    tokens = stats[COUNT].sum().clamp_min(1)
    rows = {"clip_frac_low": LOW_CLIP, "clip_frac_high": HIGH_CLIP, "clip_frac_dual": DUAL_CLIP, "ratio_mean": RATIO}
    if a.ref_logps is not None:
        rows["kl_mean"] = KL
    if a.entropy is not None:
        rows["entropy_mean"] = ENTROPY
    return {name: stats[row].sum() / tokens for name, row in rows.items()}


def policy_loss_torch(a: PolicyArgs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Composed torch ops; autograd provides the gradient into ``logps`` and ``entropy``."""
    terms = policy_terms(a)
    o = a.options
    loss = aggregate(
        terms.per_token,
        a.mask,
        o.aggregation,
        max_completion_length=o.max_completion_length,
        num_items_in_batch=a.num_items_in_batch,
    )
    return loss, policy_metrics(a, policy_stats(a, terms, _row_sums))


class PolicyChunks:
    """The policy loss of the arguments ``a`` over chunks of tokens (for
    :func:`fastalign.ops.fused_linear.fused_linear_loss`), summing the kernels' per-row stats as it goes.

    ``a`` holds everything but the log-probs and the entropy (placeholders shaped ``[B, T]``), which each chunk
    brings. At token level any set of tokens makes a chunk; at sequence level a chunk must cover whole rows, in
    order (the sequence ratio needs all of a row's tokens, and so does VESPO's weight): :attr:`units` are those
    rows.
    """

    def __init__(self, a: PolicyArgs):
        self.a = a
        counts = (a.mask != 0).sum(-1).to(torch.float32)
        self.weights = args_row_weights(a, counts)
        self.stats: torch.Tensor | None = None

    @property
    def units(self) -> Sequence[torch.Tensor] | None:
        """Token indices (into the flattened ``[B, T]``) of each row when a token's loss needs its whole row
        (sequence level, VESPO), else ``None``."""
        if not self.a.options.needs_whole_rows:
            return None
        rows, width = self.a.mask.shape
        device = self.a.mask.device
        return [torch.arange(b * width, (b + 1) * width, device=device) for b in range(rows)]

    def loss(self, index: torch.Tensor, logps: torch.Tensor, entropy: torch.Tensor | None) -> torch.Tensor:
        """The part of the aggregated loss that falls on the tokens ``index`` (into the flattened ``[B, T]``),
        whose log-probs and entropy are ``logps`` / ``entropy`` ``[n]`` (differentiable)."""
        a = self.a
        width = a.mask.shape[1]

        def pick(tensor: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if cols is None:
                return tensor[rows]
            return tensor[rows, cols if tensor.shape[1] == width else 0].unsqueeze(0)

        if a.options.needs_whole_rows:
            rows, cols = index.view(-1, width)[:, 0] // width, None
            logps, entropy = logps.view(-1, width), None if entropy is None else entropy.view(-1, width)
            token_weights = self.weights[rows].unsqueeze(-1)
            reduce = _row_sums
        else:
            rows, cols = index // width, index % width
            logps, entropy = logps.unsqueeze(0), None if entropy is None else entropy.unsqueeze(0)
            token_weights = self.weights[rows].unsqueeze(0)
            reduce = _token_values  # each added to its row below
        sub = replace(
            a,
            logps=logps,
            entropy=entropy,
            old_logps=pick(a.old_logps, rows, cols),
            mask=pick(a.mask, rows, cols),
            advantages=pick(a.advantages, rows, cols),
            ref_logps=pick(a.ref_logps, rows, cols),
            is_weights=pick(a.is_weights, rows, cols),
            sampler_logps=pick(a.sampler_logps, rows, cols),
        )
        terms = policy_terms(sub)
        stats = policy_stats(sub, terms, reduce)
        if self.stats is None:
            self.stats = stats.new_zeros(STAT_ROWS, a.mask.shape[0])
        self.stats.index_add_(1, rows, stats)
        return (torch.where(sub.mask != 0, terms.per_token, 0.0) * token_weights).sum()

    def metrics(self) -> dict[str, torch.Tensor]:
        """:func:`policy_metrics` of the chunks seen so far (all of them, once the fused loss has run)."""
        stats = self.stats
        if stats is None:  # no chunk: no tokens
            stats = torch.zeros(STAT_ROWS, self.a.mask.shape[0], device=self.a.mask.device)
        return policy_metrics(self.a, stats)

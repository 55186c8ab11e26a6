"""The DPO-family math that the public ops (:mod:`fastalign.ops.preference`), the kernels' host side
(:mod:`fastalign.ops._dpo_kernels`) and :class:`fastalign.nn.LinearDPOLoss` share: the loss types and their
options bundle, the per-pair formulas (TRL 1.x) in torch, and the plan the kernels take the types in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastalign.ops._checks import check_number

# The loss types, in the order of the kernels' type bits (fastalign/kernels/triton/dpo_loss.py, csrc's dpo_math.h).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
# Loss types whose sequence log-probs are length-averaged (TRL 1.x averages inside these two).
LENGTH_AVERAGED_TYPES = ("ipo", "sigmoid_norm")
# Valid label_smoothing per loss type: (low, high, high inclusive); types absent from this table ignore it.
_SMOOTHING_RANGES = {
    "sigmoid": (0.0, 0.5, True),  # conservative DPO
    "robust": (0.0, 0.5, False),
    "exo_pair": (0.0, 1.0, False),  # strictly positive: the loss takes log(label_smoothing)
}
# exp(-z) in discopop is bounded so that exp(-z) * sigmoid(z / tau) is 0, not inf * 0, for very negative z.
_DISCOPOP_EXP_LIMIT = 80.0


def _check_smoothing(types: Sequence[str], label_smoothing: float) -> None:
    check_number("label_smoothing", label_smoothing, finite=False)
    smoothed = [name for name in types if name in _SMOOTHING_RANGES]
    if label_smoothing != 0 and not smoothed:
        raise ValueError(
            f"label_smoothing={label_smoothing} would be ignored: none of the loss types {list(types)} uses it "
            f"(only {sorted(_SMOOTHING_RANGES)} do)"
        )
    for name in smoothed:
        low, high, high_inclusive = _SMOOTHING_RANGES[name]
        inside = low <= label_smoothing and (label_smoothing <= high if high_inclusive else label_smoothing < high)
        if name == "exo_pair":
            inside = inside and label_smoothing > 0
        if not inside:
            bracket = "]" if high_inclusive else ")"
            opening = "(" if name == "exo_pair" else "["
            hint = " (the EXO paper recommends 1e-3)" if name == "exo_pair" else ""
            raise ValueError(
                f"label_smoothing for loss_type {name!r} must be in {opening}{low}, {high}{bracket}, "
                f"got {label_smoothing}{hint}"
            )


@dataclass(frozen=True)
class DPOLossOptions:
    """The options of :func:`fastalign.dpo_loss`, :func:`fastalign.dpo_loss_from_token_logps` and
    :class:`fastalign.nn.LinearDPOLoss`, checked when built (a ``ValueError`` names the option).

    * ``beta``: ``> 0``, the deviation from the reference (IPO's τ).
    * ``loss_type``: one of :data:`DPO_LOSS_TYPES` or a list of them (repeats allowed), summed per pair with
      ``loss_weights`` (default 1 each), as TRL combines them.
    * ``label_smoothing``: for ``sigmoid`` in ``[0, 0.5]`` (conservative DPO), ``robust`` in ``[0, 0.5)``,
      ``exo_pair`` in ``(0, 1)``; an error when none of the types uses it.
    * ``discopop_tau``: ``> 0``, DiscoPOP's temperature.
    """

    beta: float = 0.1
    loss_type: str | Sequence[str] = "sigmoid"
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    loss_weights: Sequence[float] | None = None

    def __post_init__(self):
        # Lists (or any iterables) are kept as tuples, so that a bundle is immutable and hashable.
        if not isinstance(self.loss_type, str):
            object.__setattr__(self, "loss_type", tuple(self.loss_type))
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        types = self.types
        if not types:
            raise ValueError("loss_type must name at least one loss")
        for name in types:
            if name not in DPO_LOSS_TYPES:
                raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES} (or a list of them), got {name!r}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(
                f"loss_weights must have one weight per loss type: got {len(self.loss_weights)} weights for "
                f"{len(types)} types"
            )
        check_number("beta", self.beta, above=0)
        check_number("discopop_tau", self.discopop_tau, above=0, finite=False)
        _check_smoothing(types, self.label_smoothing)

    @property
    def types(self) -> list[str]:
        """The loss types, as a list."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        """One weight per type (1.0 each by default)."""
        if self.loss_weights is None:
            return [1.0] * len(self.types)
        return list(self.loss_weights)


def dpo_loss_terms(
    loss_type: str,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
) -> torch.Tensor:
    """Per-pair loss of one type from ``logratio = logps − ref_logps`` of the chosen and rejected answers."""
    c, r = chosen_logratios, rejected_logratios
    margin = c - r
    z = beta * margin
    ls = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    if loss_type == "ipo":
        return (margin - 1 / (2 * beta)).square()
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(z) + ls * F.logsigmoid(-z)) / (1 - 2 * ls)
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-ls)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(ls)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta).square() + (r + 0.5 / beta).square()
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(z)
    if loss_type == "discopop":
        modulation = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - modulation) + torch.exp((-z).clamp(max=_DISCOPOP_EXP_LIMIT)) * modulation
    return -F.logsigmoid(z)  # sigmoid_norm: the caller passes length-averaged log-probs


def weighted_pair_losses(
    options: DPOLossOptions, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor
) -> torch.Tensor:
    """``Σ_types weight · dpo_loss_terms(type, ...)`` per pair."""
    return sum(
        weight
        * dpo_loss_terms(
            name, chosen_logratios, rejected_logratios, options.beta, options.label_smoothing, options.discopop_tau
        )
        for name, weight in zip(options.types, options.weights, strict=True)
    )


def averaged_types(options: DPOLossOptions, average_log_prob: bool | None) -> list[bool]:
    """Per type, whether it takes length-averaged log-probs: ``None``: ``ipo`` and ``sigmoid_norm`` (TRL 1.x);
    ``True``: every type; ``False``: none."""
    if average_log_prob is None:
        return [name in LENGTH_AVERAGED_TYPES for name in options.types]
    return [bool(average_log_prob)] * len(options.types)


class TypePlan(NamedTuple):
    """The requested loss types as the kernels take them.

    ``type_bits`` / ``averaged_bits``: bit ``k`` set when ``DPO_LOSS_TYPES[k]`` is used / takes length-averaged
    log-probs; ``weights``: one weight per type of ``DPO_LOSS_TYPES`` (summed over repeats, 0 when unused).
    """

    type_bits: int
    averaged_bits: int
    weights: tuple[float, ...]
    beta: float
    label_smoothing: float
    discopop_tau: float

    def cuda_arguments(self) -> tuple:
        """The plan as the CUDA extension's DPO functions take it, in their order."""
        return (
            self.type_bits,
            self.averaged_bits,
            list(self.weights),
            self.beta,
            self.label_smoothing,
            self.discopop_tau,
        )


def type_plan(
    types: Sequence[str],
    weights: Sequence[float],
    averaged: Sequence[bool],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
) -> TypePlan:
    """Fold a list of loss types (repeats allowed), their weights and length averaging into a :class:`TypePlan`."""
    per_type = [0.0] * len(DPO_LOSS_TYPES)
    type_bits = averaged_bits = 0
    for name, weight, average in zip(types, weights, averaged, strict=True):
        kind = DPO_LOSS_TYPES.index(name)
        per_type[kind] += weight
        type_bits |= 1 << kind
        averaged_bits |= int(average) << kind
    return TypePlan(type_bits, averaged_bits, tuple(per_type), float(beta), float(label_smoothing), float(discopop_tau))


def options_plan(options: DPOLossOptions, average_log_prob: bool | None) -> TypePlan:
    """The :class:`TypePlan` of an options bundle."""
    return type_plan(
        options.types,
        options.weights,
        averaged_types(options, average_log_prob),
        options.beta,
        options.label_smoothing,
        options.discopop_tau,
    )

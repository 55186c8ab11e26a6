"""Fused linear distillation: the generalized JSD between a student's and a teacher's next-token distributions,
straight from both models' hidden states and lm_head weights, without either ``[N, V]`` logits tensor.

Per token, with ``z_s = h_s W_s^T / T`` and ``z_t = h_t W_t^T / T`` (``T`` the temperature), ``p_s = softmax(z_s)``,
``p_t = softmax(z_t)`` and, for ``0 < β < 1``, the mixture ``m = (1 − β) p_s + β p_t`` (TRL's convention):

=========  =================================================  ===============================================
``β``      loss                                               gradient w.r.t. the student logit ``z_s,j``
=========  =================================================  ===============================================
0          ``KL(p_t ‖ p_s) = Σ_j p_t (log p_t − log p_s)``    ``p_s,j − p_t,j``
1          ``KL(p_s ‖ p_t) = Σ_j p_s (log p_s − log p_t)``    ``p_s,j (log p_s,j − log p_t,j − KL(p_s ‖ p_t))``
(0, 1)     ``β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)``            ``(1 − β) p_s,j (log p_s,j − log m_j − KL(p_s ‖ m))``
=========  =================================================  ===============================================

The gradient with respect to the raw student logit ``h_s W_s^T`` is the one above times ``1 / T``. The mixture
case follows from ``JSD_β = β Σ p_t log p_t + (1 − β) Σ p_s log p_s − Σ m log m``: ``∂/∂p_s,k = (1 − β)(log p_s,k −
log m_k)``, and the softmax Jacobian ``∂p_s,k/∂z_j = p_s,k (δ_kj − p_s,j)`` turns it into the row above.

How the backends sweep the vocabulary tiles: both KLs need only one sweep in the forward: each head's online
log-sum-exp (running maximum ``m``, ``S = Σ_j e^(z_j − m)``) plus the gap ``Σ_j e^(z_t − m_t) ((z_t − m_t) − (z_s −
m_s))`` (``β = 0``, rescaled like the teacher's sum) or its mirror image (``β = 1``), from which ``KL(p_t ‖ p_s) =
gap / S_t − log S_t + log S_s`` (:func:`kl_from_gap`). The mixture needs ``log m_j``, so
it needs both log-sum-exps first: a second sweep then adds up ``KL(p_t ‖ m)`` and ``KL(p_s ‖ m)`` per token. The
backward recomputes each tile of both heads and turns it into the student's logit gradient, then ``d_hidden +=
G W_s`` and ``d_weight += Gᵀ h_s``.

Each backend module provides ``distill_forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
opts) -> DistillStats`` and ``distill_backward(the same four, s_max, s_log_sum, t_max, t_log_sum, aux, grad [N],
needs, opts) -> (d_student_hidden, d_student_weight)`` (``None`` where ``needs`` says no).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch

from fastalign.ops import dispatch
from fastalign.ops._checks import SUPPORTED_FLOAT_DTYPES, check_number, check_targets
from fastalign.ops.dispatch import BackendUnavailableError

_REDUCTIONS = ("mean", "sum", "none")
# Forward KL, reverse KL, the mixture's generalized JSD.
FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2

_BACKEND_MODULES = {"torch": "fastalign.ops._distill_torch", "triton": "fastalign.ops._distill_triton"}


@dataclass(frozen=True)
class DistillOptions:
    """What the backends need: ``mode`` (FORWARD_KL / REVERSE_KL / MIXTURE), ``beta``, ``1 / temperature`` and the
    scratch budget in bytes for logit tiles."""

    mode: int
    beta: float
    inv_temperature: float
    scratch_bytes: int

    @property
    def log_weights(self) -> tuple[float, float]:
        """``(log(1 − β), log β)``: the mixture's weights of the student and the teacher (mixture mode only)."""
        return math.log1p(-self.beta), math.log(self.beta)


class DistillStats(NamedTuple):
    """A backend's forward, ``[N]`` each in the accumulation dtype: each head's row maximum ``m`` and ``log Σ_j
    e^(z_j − m)``, the per-token divergence, and ``aux``, the row constant of the backward (``KL(p_s ‖ p_t)`` for
    ``β = 1``, ``KL(p_s ‖ m)`` for the mixture, the divergence itself for ``β = 0``, where it is unused)."""

    s_max: torch.Tensor
    s_log_sum: torch.Tensor
    t_max: torch.Tensor
    t_log_sum: torch.Tensor
    divergence: torch.Tensor
    aux: torch.Tensor


def kl_from_gap(
    mode: int, centered_gap: torch.Tensor, s_max, s_log_sum, t_max, t_log_sum
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(divergence, aux)`` of a one-sweep KL mode from its gap accumulator, taken around both row maxima.

    Forward KL: ``centered_gap = Σ_j e^(z_t − t_max) ((z_t − t_max) − (z_s − s_max))``; divided by the teacher's sum
    it is ``E_t[(z_t − t_max) − (z_s − s_max)]``, and ``log p_t − log p_s = (z_t − t_max − t_log_sum) − (z_s −
    s_max − s_log_sum)`` gives ``KL(p_t ‖ p_s) = E_t[...] − t_log_sum + s_log_sum``. Reverse KL: the same with the
    heads swapped.
    """
    if mode == FORWARD_KL:
        divergence = centered_gap / torch.exp(t_log_sum) - t_log_sum + s_log_sum
    else:
        divergence = centered_gap / torch.exp(s_log_sum) - s_log_sum + t_log_sum
    return divergence, divergence


def backend_module(name: str) -> ModuleType:
    """``fastalign.ops._distill_torch`` or ``fastalign.ops._distill_triton`` (imported on first use: triton only
    loads when its backend runs)."""
    return importlib.import_module(_BACKEND_MODULES[name])


class LinearDistill(torch.autograd.Function):
    """``(student_hidden [N, Ds], student_weight [V, Ds], teacher_hidden [N, Dt], teacher_weight [V, Dt])`` ->
    per-token divergence ``[N]`` (accumulation dtype), differentiable with respect to the student's two inputs."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, backend: str, opts):
        impl = backend_module(backend)
        stats = impl.distill_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, opts)
        ctx.impl, ctx.opts = impl, opts
        ctx.save_for_backward(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            stats.s_max,
            stats.s_log_sum,
            stats.t_max,
            stats.t_log_sum,
            stats.aux,
        )
        ctx.set_materialize_grads(False)
        return stats.divergence

    @staticmethod
    def backward(ctx, grad_divergence):
        student_hidden, student_weight, teacher_hidden, teacher_weight, *stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:2]
        if grad_divergence is None or not any(needs):
            return None, None, None, None, None, None
        grads = ctx.impl.distill_backward(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            *stats,
            grad_divergence.contiguous(),
            needs,
            ctx.opts,
        )
        return *grads, None, None, None, None


def _check_head(role: str, hidden: object, weight: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``{role}_hidden [..., D]`` and ``{role}_weight [V, D]``: tensors of one float dtype on one device."""
    for name, value in ((f"{role}_hidden", hidden), (f"{role}_weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in SUPPORTED_FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{role}_hidden must have at least one dimension [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{role}_weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{role}_weight must have at least one row: [V, D] with V >= 1, got V = 0")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{role}_hidden's last dimension ({hidden.shape[-1]}) must equal {role}_weight's width D "
            f"({weight.shape[1]}); {role}_weight is [V, D] = {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{role}_hidden and {role}_weight must have the same dtype, got {hidden.dtype} and {weight.dtype}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"{role}_hidden is on {hidden.device} but {role}_weight is on {weight.device}")
    return hidden, weight


def check_distill_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets):
    """The argument checks of :func:`linear_distill_loss`; returns the four tensors and ``targets``."""
    student_hidden, student_weight = _check_head("student", student_hidden, student_weight)
    teacher_hidden, teacher_weight = _check_head("teacher", teacher_hidden, teacher_weight)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight must have student_weight's vocabulary size V = {student_weight.shape[0]} (the models "
            f"must share a tokenizer), got V = {teacher_weight.shape[0]}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden must have student_hidden's leading shape {tuple(student_hidden.shape[:-1])} (one row "
            f"per token), got {tuple(teacher_hidden.shape[:-1])}"
        )
    if teacher_hidden.dtype != student_hidden.dtype:
        raise ValueError(
            f"teacher_hidden and teacher_weight must have the student's dtype {student_hidden.dtype}, got "
            f"{teacher_hidden.dtype} (cast the teacher's tensors)"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(
            f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {student_hidden.device}"
        )
    targets = check_targets(targets, student_hidden.shape[:-1], student_hidden.device)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, targets


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The distillation loss has a torch and a Triton implementation, like the other fused-linear ops."""
    if backend == "cuda":
        raise BackendUnavailableError(
            "backend='cuda' has no kernel for the distillation loss; it runs on 'torch' and 'triton'"
        )
    return dispatch.resolve_backend(backend, device, dtype, "linear_stats")


def linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Generalized JSD between the student's and the teacher's next-token distributions, from hidden states.

    ``beta`` has TRL's meaning (``DistillationConfig.beta``, ``trl.kernels.chunked_divergence``): 0 is the forward
    KL ``KL(p_t ‖ p_s)``, 1 the reverse KL ``KL(p_s ‖ p_t)``, anything between the generalized JSD ``β KL(p_t ‖ m)
    + (1 − β) KL(p_s ‖ m)`` with ``m = (1 − β) p_s + β p_t`` (so the loss at small β is about β times the forward
    KL, not the forward KL itself). ``temperature`` divides both heads' logits; the loss is not rescaled by ``T²``
    (as TRL). Formulas and the student-logit gradient: :mod:`fastalign.ops.distill`.

    The teacher is frozen: ``teacher_hidden`` and ``teacher_weight`` are detached, so no gradient reaches them
    even when they require one (a teacher head that was not frozen, or self-distillation through a shared head,
    where the teacher's side is the stop-gradient target).

    Args:
        student_hidden: ``[..., Ds]``; student_weight: ``[V, Ds]``.
        teacher_hidden: ``[..., Dt]`` (the same leading shape); teacher_weight: ``[V, Dt]`` (the same ``V``).
            All four share one float dtype (float16, bfloat16, float32, float64) and device.
        targets: ``[...]`` integer, the leading shape; only ``targets != ignore_index`` is read: the tokens that
            count (pass ``torch.where(mask, 0, -100)`` for a mask).
        beta: in ``[0, 1]``. temperature: > 0. ignore_index: an int.
        reduction: ``"mean"`` (over the counted tokens; 0 when none counts), ``"sum"``, or ``"none"`` (one loss
            per token, shaped like ``targets``, 0 where ignored).
        backend: ``"auto" | "torch" | "triton"``. The logit tiles of both heads share the scratch budget
            (:func:`fastalign.set_scratch_budget`).

    Returns:
        float32 (float64 for float64 inputs), differentiable with respect to ``student_hidden`` and
        ``student_weight``.

    Example:
        >>> import torch, fastalign
        >>> student_hidden = torch.randn(2, 5, 16, requires_grad=True)
        >>> student_weight = torch.randn(100, 16, requires_grad=True)
        >>> teacher_hidden, teacher_weight = torch.randn(2, 5, 32), torch.randn(100, 32)
        >>> targets = torch.randint(0, 100, (2, 5))
        >>> loss = fastalign.linear_distill_loss(
        ...     student_hidden, student_weight, teacher_hidden, teacher_weight, targets, beta=0.5, temperature=2.0
        ... )
        >>> loss.backward()
    """
    student_hidden, student_weight, teacher_hidden, teacher_weight, targets = check_distill_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets
    )
    check_number("beta", beta, at_least=0, at_most=1)
    check_number("temperature", temperature, above=0)
    check_number("ignore_index", ignore_index, integer=True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    chosen = _resolve_backend(backend, student_hidden.device, student_hidden.dtype)
    beta = float(beta)
    opts = DistillOptions(
        mode=FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else MIXTURE,
        beta=beta,
        inv_temperature=1.0 / float(temperature),
        scratch_bytes=dispatch.scratch_budget(student_hidden.device),
    )
    divergence = LinearDistill.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]),
        student_weight,
        teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]),
        teacher_weight.detach(),
        chosen,
        opts,
    )
    valid = targets.reshape(-1) != ignore_index
    # Ignored rows pass a zero upstream gradient, so nothing of them reaches the student.
    per_token = torch.where(valid, divergence, 0.0)
    if reduction == "none":
        return per_token.reshape(targets.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)

"""The torch backend of :func:`fastalign.linear_distill_loss`: both heads' logits in ``[row_block, col_block]``
tiles under the scratch budget, never ``[N, V]``; the CPU path and the fallback.

Row blocks are walked one after the other; within a row block the vocabulary tiles are swept once for the online
log-sum-exps (and the KL modes' gap), a second time for the mixture's divergences. The backward recomputes every
tile of both heads, turns it into the student's logit gradient and adds it into ``d_hidden`` (per row block) and
``d_weight`` (over row blocks, in the accumulation dtype). Float64 inputs compute in float64, everything else
accumulates in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fastalign.ops._torch_backend import add_matmul
from fastalign.ops.distill import FORWARD_KL, MIXTURE, REVERSE_KL, DistillOptions, DistillStats, kl_from_gap
from fastalign.ops.stats import accum_dtype

# Scratch buffers alive at once per tile element, in the accumulation dtype: both heads' logits, their
# exponentials and one difference (the backward's mixture needs as many), plus both raw tiles in the input dtype.
_ACC_BUFFERS_PER_ELEMENT = 6
_RAW_BUFFERS_PER_ELEMENT = 2
# As for the other torch-backend ops: CPU tiles of about 2 MiB per float32 buffer stay in cache.
_CPU_TILE_ELEMENTS = 1 << 19


def _row_blocks(n_rows: int, n_cols: int, dtype: torch.dtype, budget: int, device) -> Iterator[tuple[slice, list]]:
    """``(rows, [cols, ...])`` per row block: square-ish tiles whose scratch stays under ``budget`` bytes."""
    per_element = (
        _ACC_BUFFERS_PER_ELEMENT * torch.empty((), dtype=accum_dtype(dtype)).element_size()
        + _RAW_BUFFERS_PER_ELEMENT * torch.empty((), dtype=dtype).element_size()
    )
    elements = max(1, budget // per_element)
    if device.type == "cpu":
        elements = min(elements, _CPU_TILE_ELEMENTS)
    row_block = max(1, min(n_rows, math.isqrt(elements)))
    col_block = max(1, min(n_cols, elements // row_block))
    col_tiles = [slice(start, min(n_cols, start + col_block)) for start in range(0, n_cols, col_block)]
    for start in range(0, n_rows, row_block):
        yield slice(start, min(n_rows, start + row_block)), col_tiles


def _logit_tiles(student_hidden, student_weight, teacher_hidden, teacher_weight, rows, cols, opts: DistillOptions):
    """Both heads' tempered logits of one tile: fresh ``[rows, cols]`` tensors in the accumulation dtype."""
    acc = accum_dtype(student_hidden.dtype)

    def project(hidden, weight):
        # Rounded once in the input dtype, like eager F.linear.
        logits = (hidden[rows] @ weight[cols].T).to(acc)
        return logits if opts.inv_temperature == 1.0 else logits.mul_(opts.inv_temperature)

    return project(student_hidden, student_weight), project(teacher_hidden, teacher_weight)


def _log_probs(logits: torch.Tensor, row_max: torch.Tensor, row_log_sum: torch.Tensor) -> torch.Tensor:
    """``(z − m) − log Σ e^(z − m)`` in place: no rounding at the logits' magnitude."""
    return logits.sub_(row_max.unsqueeze(1)).sub_(row_log_sum.unsqueeze(1))


def _log_mixture(log_ps: torch.Tensor, log_pt: torch.Tensor, opts: DistillOptions) -> torch.Tensor:
    log_student_weight, log_teacher_weight = opts.log_weights
    return torch.logaddexp(log_ps + log_student_weight, log_pt + log_teacher_weight)


class _Online:
    """One head's running log-sum-exp over a row block's tiles: maximum ``m`` and ``Σ e^(z − m)``."""

    def __init__(self, n: int, like: torch.Tensor):
        self.max = torch.full((n,), -math.inf, dtype=like.dtype, device=like.device)
        self.sum = torch.zeros_like(self.max)

    def update(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fold a tile in; returns ``(rescale, e^(z − m_new), m_new − m_old, the old sum)`` for accumulators
        weighted like the sum (``m_new − m_old`` is 0 on the first tile)."""
        new_max = torch.maximum(self.max, logits.amax(dim=1))
        # Before the first tile max is -inf and the rescale exp(-inf) = 0: the logits are finite, so never NaN.
        rescale = torch.exp(self.max - new_max)
        shift = torch.where(torch.isinf(self.max), 0.0, new_max - self.max)
        exps = torch.exp(logits - new_max.unsqueeze(1))
        old_sum = self.sum
        self.sum = self.sum * rescale + exps.sum(dim=1)
        self.max = new_max
        return rescale, exps, shift, old_sum


def _centered_gap(gap, weighted: _Online, other: _Online, update, other_shift, z_weighted, z_other):
    """Fold a tile into ``Σ e^(z_w − m_w) ((z_w − m_w) − (z_o − m_o))``, the gap around both heads' running maxima
    (``w`` the head whose probabilities weight it). A shift of the maxima moves the old terms by ``shift_o −
    shift_w`` each; around the maxima every term is a difference of log-probabilities plus ``log S``, not of logits,
    so the KL's rounding does not grow with the logits' magnitude."""
    rescale, exps, shift, old_sum = update
    centered = z_weighted.sub_(weighted.max.unsqueeze(1)).sub_(z_other.sub_(other.max.unsqueeze(1)))
    return rescale * (gap + (other_shift - shift) * old_sum) + exps.mul_(centered).sum(dim=1)


def distill_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, opts: DistillOptions):
    n_rows, n_cols = student_hidden.shape[0], student_weight.shape[0]
    acc = accum_dtype(student_hidden.dtype)
    device = student_hidden.device
    out = torch.zeros(6, n_rows, dtype=acc, device=device)
    s_max, s_log_sum, t_max, t_log_sum, first, second = out.unbind(0)
    for rows, col_tiles in _row_blocks(n_rows, n_cols, student_hidden.dtype, opts.scratch_bytes, device):
        n = rows.stop - rows.start
        student = teacher = None
        gap = torch.zeros(n, dtype=acc, device=device)
        for cols in col_tiles:
            zs, zt = _logit_tiles(student_hidden, student_weight, teacher_hidden, teacher_weight, rows, cols, opts)
            if student is None:
                student, teacher = _Online(n, zs), _Online(n, zs)
            s_update, t_update = student.update(zs), teacher.update(zt)
            if opts.mode == FORWARD_KL:
                gap = _centered_gap(gap, teacher, student, t_update, s_update[2], zt, zs)
            elif opts.mode == REVERSE_KL:
                gap = _centered_gap(gap, student, teacher, s_update, t_update[2], zs, zt)
        s_max[rows], s_log_sum[rows] = student.max, torch.log(student.sum)
        t_max[rows], t_log_sum[rows] = teacher.max, torch.log(teacher.sum)
        if opts.mode != MIXTURE:
            first[rows] = gap
            continue
        kl_student = torch.zeros(n, dtype=acc, device=device)
        kl_teacher = torch.zeros_like(kl_student)
        for cols in col_tiles:
            zs, zt = _logit_tiles(student_hidden, student_weight, teacher_hidden, teacher_weight, rows, cols, opts)
            log_ps = _log_probs(zs, s_max[rows], s_log_sum[rows])
            log_pt = _log_probs(zt, t_max[rows], t_log_sum[rows])
            log_m = _log_mixture(log_ps, log_pt, opts)
            kl_student += torch.exp(log_ps).mul_(log_ps - log_m).sum(dim=1)
            kl_teacher += torch.exp(log_pt).mul_(log_pt.sub_(log_m)).sum(dim=1)
        first[rows] = opts.beta * kl_teacher + (1.0 - opts.beta) * kl_student
        second[rows] = kl_student
    if opts.mode == MIXTURE:
        divergence, aux = first, second
    else:
        divergence, aux = kl_from_gap(opts.mode, first, s_max, s_log_sum, t_max, t_log_sum)
    return DistillStats(s_max, s_log_sum, t_max, t_log_sum, divergence, aux)


def _student_logit_grad(zs, zt, rows, s_max, s_log_sum, t_max, t_log_sum, aux, coef, opts: DistillOptions):
    """d loss / d raw student logits of one tile (see the table in :mod:`fastalign.ops.distill`)."""
    log_ps = _log_probs(zs, s_max[rows], s_log_sum[rows])
    log_pt = _log_probs(zt, t_max[rows], t_log_sum[rows])
    if opts.mode == FORWARD_KL:
        grad = torch.exp(log_ps).sub_(log_pt.exp_())
    elif opts.mode == REVERSE_KL:
        grad = torch.exp(log_ps).mul_((log_ps - log_pt).sub_(aux[rows].unsqueeze(1)))
    else:
        log_m = _log_mixture(log_ps, log_pt, opts)
        grad = torch.exp(log_ps).mul_(log_ps.sub_(log_m).sub_(aux[rows].unsqueeze(1)))
    # ``coef`` folds in the upstream gradient, 1 / T and, for the mixture, (1 − β).
    return grad.mul_(coef[rows].unsqueeze(1))


def distill_backward(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    s_max,
    s_log_sum,
    t_max,
    t_log_sum,
    aux,
    grad_divergence,
    needs,
    opts: DistillOptions,
):
    need_hidden, need_weight = needs
    n_rows, n_cols = student_hidden.shape[0], student_weight.shape[0]
    acc = accum_dtype(student_hidden.dtype)
    device = student_hidden.device
    scale = opts.inv_temperature * ((1.0 - opts.beta) if opts.mode == MIXTURE else 1.0)
    coef = grad_divergence.to(acc) * scale
    grad_hidden = torch.zeros_like(student_hidden) if need_hidden else None
    # Low-precision weight gradients add up over row blocks in the accumulation dtype.
    grad_weight = torch.zeros_like(student_weight, dtype=acc) if need_weight else None
    for rows, col_tiles in _row_blocks(n_rows, n_cols, student_hidden.dtype, opts.scratch_bytes, device):
        if need_hidden:
            row_grad = torch.zeros(rows.stop - rows.start, student_hidden.shape[1], dtype=acc, device=device)
        for cols in col_tiles:
            zs, zt = _logit_tiles(student_hidden, student_weight, teacher_hidden, teacher_weight, rows, cols, opts)
            grad = _student_logit_grad(zs, zt, rows, s_max, s_log_sum, t_max, t_log_sum, aux, coef, opts)
            grad = grad.to(student_hidden.dtype)
            if need_hidden:
                add_matmul(row_grad, grad, student_weight[cols])
            if need_weight:
                add_matmul(grad_weight[cols], grad.T, student_hidden[rows])
        if need_hidden:
            grad_hidden[rows] = row_grad
    return grad_hidden, None if grad_weight is None else grad_weight.to(student_weight.dtype)

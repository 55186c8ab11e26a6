"""The Triton backend of :func:`fastalign.linear_distill_loss`: allocations, launch grids and the ``[N]``-sized
merges around the kernels in ``fastalign.kernels.triton.distill``.

Forward: ``distill_stats_kernel`` over ``(token blocks, vocabulary splits)`` writes per-split partials ``[5,
splits, N]`` that are merged here; the mixture then runs ``distill_mixture_kernel`` over the same grid (``[2,
splits, N]``, summed here). Backward: the vocabulary is walked in slabs of columns sized by the scratch budget;
per slab ``distill_grad_kernel`` recomputes both heads' tiles and writes the student's logit gradient ``[N,
slab]``, then ``d_hidden (float32) += G @ W_s[slab]`` and ``d_weight[slab] = Gᵀ @ h_s``. Memory beyond inputs
and gradients: the slab, a float32 ``d_hidden`` accumulator, and the ``[splits, N]`` partials.
"""

from __future__ import annotations

import torch

from fastalign.kernels.triton import distill as kernels
from fastalign.kernels.triton.softmax_tile import INTERPRETING
from fastalign.ops._triton_backend import (
    GROUP_TOKEN_BLOCKS,
    _dot_precision,
    _matmul_accumulate,
    _slab_cols,
    _split_grid,
    _vocab_splits,
    slab_grid,
)
from fastalign.ops.distill import FORWARD_KL, MIXTURE, DistillOptions, DistillStats, kl_from_gap


def _shapes_and_strides(student_hidden, student_weight, teacher_hidden, teacher_weight) -> tuple:
    """``N, V, DS, DT`` (after the output pointers) and the eight strides, in the kernels' argument order."""
    return (
        (student_hidden.shape[0], student_weight.shape[0], student_hidden.shape[1], teacher_hidden.shape[1]),
        (*student_hidden.stride(), *student_weight.stride(), *teacher_hidden.stride(), *teacher_weight.stride()),
    )


def _merge(run_max: torch.Tensor, run_sum: torch.Tensor):
    """One head's ``(max [N], log Σ e^(z − max) [N], scale [splits, N])`` from its per-split partials; ``scale``
    rescales any accumulator weighted like that head's sum to the merged maximum."""
    top = run_max.amax(dim=0)
    # Every split saw finite logits: its maximum is finite.
    scale = torch.exp(run_max - top)
    return top, torch.log((run_sum * scale).sum(dim=0)), scale


def distill_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, opts: DistillOptions):
    heads = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    sizes, strides = _shapes_and_strides(*heads)
    n_rows, n_cols = sizes[:2]
    device = student_hidden.device
    if n_rows == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return DistillStats(*(empty,) * 6)
    splits, cols_per_split = _vocab_splits(n_rows, n_cols, device)
    precision = _dot_precision(student_hidden.dtype)
    partial = torch.empty(5, splits, n_rows, dtype=torch.float32, device=device)
    kernels.distill_stats_kernel[_split_grid(n_rows, splits)](
        *heads,
        *partial,
        *sizes,
        cols_per_split,
        *strides,
        opts.inv_temperature,
        MODE=opts.mode,
        UPCAST=INTERPRETING,
        DOT_PRECISION=precision,
        GROUP_N=GROUP_TOKEN_BLOCKS,
    )
    s_max, s_log_sum, s_scale = _merge(partial[0], partial[1])
    t_max, t_log_sum, t_scale = _merge(partial[2], partial[3])
    if opts.mode != MIXTURE:
        # Each split's gap is around its own maxima: move it to the merged ones, then rescale like its sum.
        s_moved, t_moved = s_max - partial[0], t_max - partial[2]
        if opts.mode == FORWARD_KL:
            gap = (t_scale * (partial[4] + (s_moved - t_moved) * partial[3])).sum(dim=0)
        else:
            gap = (s_scale * (partial[4] + (t_moved - s_moved) * partial[1])).sum(dim=0)
        divergence, aux = kl_from_gap(opts.mode, gap, s_max, s_log_sum, t_max, t_log_sum)
        return DistillStats(s_max, s_log_sum, t_max, t_log_sum, divergence, aux)
    kl = torch.empty(2, splits, n_rows, dtype=torch.float32, device=device)
    kernels.distill_mixture_kernel[_split_grid(n_rows, splits)](
        *heads,
        s_max,
        s_log_sum,
        t_max,
        t_log_sum,
        kl[0],
        kl[1],
        *sizes,
        cols_per_split,
        *strides,
        opts.inv_temperature,
        *opts.log_weights,
        MODE=opts.mode,
        UPCAST=INTERPRETING,
        DOT_PRECISION=precision,
        GROUP_N=GROUP_TOKEN_BLOCKS,
    )
    kl_student, kl_teacher = kl.sum(dim=1).unbind(0)
    divergence = opts.beta * kl_teacher + (1.0 - opts.beta) * kl_student
    return DistillStats(s_max, s_log_sum, t_max, t_log_sum, divergence, kl_student)


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
    heads = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    sizes, strides = _shapes_and_strides(*heads)
    n_rows, n_cols, width, _ = sizes
    device = student_hidden.device
    grad_hidden = torch.zeros(n_rows, width, dtype=torch.float32, device=device) if need_hidden else None
    # Every slab writes its rows of the weight gradient in full; only an empty batch leaves it all zero.
    grad_weight = None
    if need_weight:
        grad_weight = torch.empty_like(student_weight) if n_rows > 0 else torch.zeros_like(student_weight)
    if n_rows > 0:
        scale = opts.inv_temperature * ((1.0 - opts.beta) if opts.mode == MIXTURE else 1.0)
        coef = (grad_divergence.float() * scale).contiguous()
        log_weights = opts.log_weights if opts.mode == MIXTURE else (0.0, 0.0)
        precision = _dot_precision(student_hidden.dtype)
        slab_cols = _slab_cols(n_rows, n_cols, student_hidden.element_size(), opts.scratch_bytes)
        slab = torch.empty(n_rows, slab_cols, dtype=student_hidden.dtype, device=device)
        for col_offset in range(0, n_cols, slab_cols):
            cols = min(slab_cols, n_cols - col_offset)
            kernels.distill_grad_kernel[slab_grid(n_rows, cols)](
                *heads,
                s_max,
                s_log_sum,
                t_max,
                t_log_sum,
                aux,
                coef,
                slab,
                *sizes,
                col_offset,
                cols,
                *strides,
                slab.stride(0),
                opts.inv_temperature,
                *log_weights,
                MODE=opts.mode,
                UPCAST=INTERPRETING,
                DOT_PRECISION=precision,
                GROUP_N=GROUP_TOKEN_BLOCKS,
            )
            grad_slab = slab[:, :cols]
            if need_hidden:
                _matmul_accumulate(grad_slab, student_weight[col_offset : col_offset + cols], grad_hidden)
            if need_weight:
                torch.mm(grad_slab.T, student_hidden, out=grad_weight[col_offset : col_offset + cols])
    return None if grad_hidden is None else grad_hidden.to(student_hidden.dtype), grad_weight

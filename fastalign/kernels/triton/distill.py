"""Triton kernels of the fused linear distillation loss: tiles of both heads' logits, ``h_s W_s^T`` and ``h_t
W_t^T``, computed in the kernel (a ``tl.dot`` over each head's width per tile) and never stored.

* ``distill_stats_kernel``: grid ``(token blocks, vocabulary splits)``; each program walks its split tile by tile
  and keeps both heads' online log-sum-exp, plus the KL modes' gap ``Σ e^(z_t − m_t)((z_t − m_t) − (z_s − m_s))``
  (forward KL) or its mirror image (reverse KL), around each split's running maxima, writing per-split partials
  that the host merges.
* ``distill_mixture_kernel``: the mixture's second sweep, with both log-sum-exps known: per split, ``Σ p_s (log p_s
  − log m)`` and ``Σ p_t (log p_t − log m)`` for ``m = (1 − β) p_s + β p_t``.
* ``distill_grad_kernel``: recomputes the tiles of one vocabulary slab and writes the gradient with respect to the
  student's raw logits, for the slab's two matmuls (``d_hidden += G W_s``, ``d_weight = Gᵀ h_s``).

Kernels do no argument checking and no autograd: ``fastalign.ops._distill_triton`` owns both.
"""

import triton
import triton.language as tl

from fastalign.kernels.triton.linear_stats import _tile_configs, configs_for, head_logits
from fastalign.kernels.triton.softmax_tile import autotune_configs, slab_tile, split_tile, store_tile

# Tiles ``(rows, columns, inner, warps, stages)`` per kernel, precision and architecture, as in linear_stats.py. Two
# fp32 logit tiles are live at once (the student's and the teacher's), so the tiles hold at most half the elements
# of the single-head kernels'. Every tile was compiled by bench.aot for its target in every variant (MODE 0, 1, 2)
# without spills; the mixture's sweep, with the most live values per element, gets the narrowest inner tiles on
# sm_80 (its 64 x 128 x 64 tile spills 428 B there).
_TILES = {
    "stats": {
        ("half", 9): [(128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 4)],
        ("half", 8): [(64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 4)],
        ("tf32", 9): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 64, 16, 8, 4), (64, 128, 16, 8, 4)],
        ("tf32", 8): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 64, 16, 8, 4), (64, 128, 16, 8, 4)],
        ("ieee", 9): [(32, 64, 16, 4, 2), (64, 32, 16, 4, 2)],
        ("ieee", 8): [(32, 128, 16, 8, 2), (64, 64, 16, 8, 2), (32, 64, 16, 4, 2), (64, 32, 16, 4, 2)],
    },
    "mixture": {
        ("half", 9): [(64, 128, 64, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 4), (64, 64, 64, 8, 3)],
        ("half", 8): [(64, 128, 32, 8, 3), (64, 128, 32, 8, 4), (64, 64, 64, 8, 3), (32, 128, 64, 8, 3)],
        ("tf32", 9): [(64, 128, 32, 8, 3), (128, 64, 16, 8, 4), (64, 128, 16, 8, 4), (64, 64, 32, 8, 3)],
        ("tf32", 8): [(64, 128, 16, 8, 4), (64, 64, 32, 8, 3), (32, 128, 32, 8, 3)],
        ("ieee", 9): [(32, 64, 16, 4, 2), (64, 32, 16, 4, 2), (16, 128, 16, 4, 2)],
        ("ieee", 8): [(32, 128, 16, 8, 2), (64, 64, 16, 8, 2), (32, 64, 16, 4, 2), (64, 32, 16, 4, 2)],
    },
    "grad": {
        ("half", 9): [(128, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 32, 8, 4)],
        ("half", 8): [(128, 128, 32, 8, 3), (64, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 128, 32, 8, 4)],
        ("tf32", 9): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 4), (128, 64, 16, 8, 4)],
        ("tf32", 8): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 4), (128, 64, 16, 8, 4)],
        ("ieee", 9): [(32, 128, 16, 8, 2), (64, 64, 16, 8, 2), (64, 64, 8, 4, 2)],
        ("ieee", 8): [(32, 128, 16, 8, 2), (64, 64, 16, 8, 2), (32, 64, 16, 4, 2), (64, 32, 16, 4, 2)],
    },
}
_KIND_CONFIGS = {kernel: _tile_configs(tiles, ("BLOCK_N", "BLOCK_V", "BLOCK_D")) for kernel, tiles in _TILES.items()}
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16})
_KEY = ["DS", "DT", "V", "MODE", "DOT_PRECISION", "GROUP_N"]


def _tuning(kernel: str) -> dict:
    """``triton.autotune``'s arguments for one kernel: its configs, and the pruning to the launch's dtype and
    device (architecture, shared memory)."""
    kinds = _KIND_CONFIGS[kernel]

    def prune(configs, named_args, **kwargs):
        return configs_for(kinds, named_args["student_hidden_ptr"], kwargs["DOT_PRECISION"])

    every = [config for configs in kinds.values() for config in configs]
    return {
        "configs": autotune_configs(every, _INTERPRETER_CONFIG),
        "key": _KEY,
        "prune_configs_by": {"early_config_prune": prune},
    }


@triton.jit
def _head_tiles(
    student,
    teacher,
    rows,
    cols,
    row_mask,
    col_mask,
    inv_temperature,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The student's and the teacher's tempered float32 logits of one ``[BLOCK_N, BLOCK_V]`` tile; each head is
    ``(hidden_ptr, weight_ptr, D, stride_hn, stride_hd, stride_wv, stride_wd)`` (masked rows and columns read
    zeros)."""
    zs = head_logits(student, rows, cols, row_mask, col_mask, UPCAST, DOT_PRECISION, BLOCK_D)
    zt = head_logits(teacher, rows, cols, row_mask, col_mask, UPCAST, DOT_PRECISION, BLOCK_D)
    return zs * inv_temperature, zt * inv_temperature


@triton.jit
def _online_step(z, col_mask, run_max):
    """One tile of an online log-sum-exp: the new running maximum, the factor that rescales the old sum to it, the
    shift of the maximum (0 before the first tile), and the tile's ``e^(z − new max)`` (0 in masked columns).
    Every tile has a column in range and finite logits, so the maximum is finite after the first tile and the
    first rescale is ``exp(-inf) = 0``."""
    new_max = tl.maximum(run_max, tl.max(tl.where(col_mask[None, :], z, float("-inf")), 1))
    rescale = tl.exp(run_max - new_max)
    shift = tl.where(run_max == float("-inf"), 0.0, new_max - run_max)
    exps = tl.where(col_mask[None, :], tl.exp(z - new_max[:, None]), 0.0)
    return new_max, rescale, shift, exps


@triton.jit
def _log_probs(zs, zt, s_max, s_log_sum, t_max, t_log_sum):
    """``(z − m) − log Σ e^(z − m)`` of both heads: no rounding at the logits' magnitude."""
    log_ps = (zs - s_max[:, None]) - s_log_sum[:, None]
    log_pt = (zt - t_max[:, None]) - t_log_sum[:, None]
    return log_ps, log_pt


@triton.jit
def _log_mixture(log_ps, log_pt, log_student_weight, log_teacher_weight):
    """``log((1 − β) p_s + β p_t)`` as a log-add-exp."""
    a = log_ps + log_student_weight
    b = log_pt + log_teacher_weight
    top = tl.maximum(a, b)
    return top + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _load_rows(ptr, rows, row_mask):
    return tl.load(ptr + rows, mask=row_mask, other=0.0)


@triton.autotune(**_tuning("stats"))
@triton.jit
def distill_stats_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    s_max_ptr,
    s_sum_ptr,
    t_max_ptr,
    t_sum_ptr,
    gap_ptr,
    N,
    V,
    DS,
    DT,
    cols_per_split,
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    inv_temperature,
    MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partials of one token block over one vocabulary split (:func:`split_tile`), each ``[splits, N]`` float32:
    both heads' maximum and ``Σ e^(z − m)`` around it, and (``MODE`` 0 / 1) the gap around both maxima, weighted
    like the teacher's / the student's sum."""
    rows, row_mask, col_start, col_stop, split = split_tile(N, V, cols_per_split, BLOCK_N, GROUP_N)
    student = (student_hidden_ptr, student_weight_ptr, DS, stride_shn, stride_shd, stride_swv, stride_swd)
    teacher = (teacher_hidden_ptr, teacher_weight_ptr, DT, stride_thn, stride_thd, stride_twv, stride_twd)

    s_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    t_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gap = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(col_start, col_stop, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < col_stop
        zs, zt = _head_tiles(
            student, teacher, rows, cols, row_mask, col_mask, inv_temperature, UPCAST, DOT_PRECISION, BLOCK_D
        )
        new_s_max, s_rescale, s_shift, s_exps = _online_step(zs, col_mask, s_max)
        new_t_max, t_rescale, t_shift, t_exps = _online_step(zt, col_mask, t_max)
        # The gap around both running maxima: a shift of the maxima moves each old term by the difference of
        # the shifts (see fastalign.ops.distill.kl_from_gap).
        if MODE == 0:
            centered = (zt - new_t_max[:, None]) - (zs - new_s_max[:, None])
            gap = t_rescale * (gap + (s_shift - t_shift) * t_sum) + tl.sum(t_exps * centered, 1)
        elif MODE == 1:
            centered = (zs - new_s_max[:, None]) - (zt - new_t_max[:, None])
            gap = s_rescale * (gap + (t_shift - s_shift) * s_sum) + tl.sum(s_exps * centered, 1)
        s_sum = s_sum * s_rescale + tl.sum(s_exps, 1)
        s_max = new_s_max
        t_sum = t_sum * t_rescale + tl.sum(t_exps, 1)
        t_max = new_t_max

    out = split * N + rows
    tl.store(s_max_ptr + out, s_max, mask=row_mask)
    tl.store(s_sum_ptr + out, s_sum, mask=row_mask)
    tl.store(t_max_ptr + out, t_max, mask=row_mask)
    tl.store(t_sum_ptr + out, t_sum, mask=row_mask)
    if MODE != 2:
        tl.store(gap_ptr + out, gap, mask=row_mask)


@triton.autotune(**_tuning("mixture"))
@triton.jit
def distill_mixture_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    s_max_ptr,
    s_log_sum_ptr,
    t_max_ptr,
    t_log_sum_ptr,
    kl_student_ptr,
    kl_teacher_ptr,
    N,
    V,
    DS,
    DT,
    cols_per_split,
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    inv_temperature,
    log_student_weight,
    log_teacher_weight,
    MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per split ``[splits, N]`` float32: ``Σ p_s (log p_s − log m)`` and ``Σ p_t (log p_t − log m)`` over its
    columns, from the rows' merged ``[N]`` statistics (``MODE`` is 2; it keys the autotuner like the others)."""
    rows, row_mask, col_start, col_stop, split = split_tile(N, V, cols_per_split, BLOCK_N, GROUP_N)
    student = (student_hidden_ptr, student_weight_ptr, DS, stride_shn, stride_shd, stride_swv, stride_swd)
    teacher = (teacher_hidden_ptr, teacher_weight_ptr, DT, stride_thn, stride_thd, stride_twv, stride_twd)
    s_max = _load_rows(s_max_ptr, rows, row_mask)
    s_log_sum = _load_rows(s_log_sum_ptr, rows, row_mask)
    t_max = _load_rows(t_max_ptr, rows, row_mask)
    t_log_sum = _load_rows(t_log_sum_ptr, rows, row_mask)

    kl_student = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kl_teacher = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(col_start, col_stop, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < col_stop
        zs, zt = _head_tiles(
            student, teacher, rows, cols, row_mask, col_mask, inv_temperature, UPCAST, DOT_PRECISION, BLOCK_D
        )
        log_ps, log_pt = _log_probs(zs, zt, s_max, s_log_sum, t_max, t_log_sum)
        log_m = _log_mixture(log_ps, log_pt, log_student_weight, log_teacher_weight)
        ps = tl.where(col_mask[None, :], tl.exp(log_ps), 0.0)
        pt = tl.where(col_mask[None, :], tl.exp(log_pt), 0.0)
        kl_student += tl.sum(ps * (log_ps - log_m), 1)
        kl_teacher += tl.sum(pt * (log_pt - log_m), 1)

    out = split * N + rows
    tl.store(kl_student_ptr + out, kl_student, mask=row_mask)
    tl.store(kl_teacher_ptr + out, kl_teacher, mask=row_mask)


@triton.autotune(**_tuning("grad"))
@triton.jit
def distill_grad_kernel(
    student_hidden_ptr,
    student_weight_ptr,
    teacher_hidden_ptr,
    teacher_weight_ptr,
    s_max_ptr,
    s_log_sum_ptr,
    t_max_ptr,
    t_log_sum_ptr,
    aux_ptr,
    coef_ptr,
    grad_ptr,
    N,
    V,
    DS,
    DT,
    col_offset,
    slab_cols,
    stride_shn,
    stride_shd,
    stride_swv,
    stride_swd,
    stride_thn,
    stride_thd,
    stride_twv,
    stride_twd,
    stride_gn,
    inv_temperature,
    log_student_weight,
    log_teacher_weight,
    MODE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """``grad[N, slab_cols]`` (the student's dtype) = d loss / d raw student logits of columns ``[col_offset,
    col_offset + slab_cols)``: ``coef · (p_s − p_t)`` (``MODE`` 0), ``coef · p_s (log p_s − log p_t − aux)`` (1),
    ``coef · p_s (log p_s − log m − aux)`` (2); ``coef [N]`` folds the upstream gradient, ``1 / T`` and, for the
    mixture, ``1 − β``."""
    rows, row_mask, local_cols, cols, col_mask, first_row = slab_tile(
        N, V, col_offset, slab_cols, BLOCK_N, BLOCK_V, GROUP_N
    )
    if first_row >= N:
        return
    student = (student_hidden_ptr, student_weight_ptr, DS, stride_shn, stride_shd, stride_swv, stride_swd)
    teacher = (teacher_hidden_ptr, teacher_weight_ptr, DT, stride_thn, stride_thd, stride_twv, stride_twd)
    zs, zt = _head_tiles(
        student, teacher, rows, cols, row_mask, col_mask, inv_temperature, UPCAST, DOT_PRECISION, BLOCK_D
    )
    log_ps, log_pt = _log_probs(
        zs,
        zt,
        _load_rows(s_max_ptr, rows, row_mask),
        _load_rows(s_log_sum_ptr, rows, row_mask),
        _load_rows(t_max_ptr, rows, row_mask),
        _load_rows(t_log_sum_ptr, rows, row_mask),
    )
    ps = tl.exp(log_ps)
    if MODE == 0:
        grad = ps - tl.exp(log_pt)
    elif MODE == 1:
        grad = ps * (log_ps - log_pt - _load_rows(aux_ptr, rows, row_mask)[:, None])
    else:
        log_m = _log_mixture(log_ps, log_pt, log_student_weight, log_teacher_weight)
        grad = ps * (log_ps - log_m - _load_rows(aux_ptr, rows, row_mask)[:, None])
    grad = grad * _load_rows(coef_ptr, rows, row_mask)[:, None]
    store_tile(grad_ptr, grad, rows, local_cols, row_mask, col_mask, stride_gn)

"""Triton kernels of the fused linear log-prob core: logits ``hidden @ weight.T + bias`` in tiles, never stored.

* ``linear_stats_fwd_kernel``: grid ``(token blocks, vocabulary splits)``; each program walks its vocabulary
  split tile by tile (a ``tl.dot`` over D per tile) and keeps an online logsumexp, writing per-split partial
  statistics that the host merges.
* ``linear_grad_logits_kernel``: recomputes the logit tiles of one vocabulary slab and writes their gradient
  (and atomically the bias gradient) for the slab's two matmuls.
* ``matmul_accumulate_kernel``: ``out[M, K] (float32) += a[M, S] @ b[S, K]`` — accumulates d_hidden over slabs.

Kernels do no argument checking and no autograd: ``fastalign.ops._triton_backend`` owns both.
"""

import triton
import triton.language as tl

from fastalign.kernels.triton.softmax_tile import (
    autotune_configs,
    load_rows_and_grad,
    online_update,
    transform_logits,
)

_FWD_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": 64}, num_warps=w, num_stages=s)
        for bn, bv, w, s in [
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (64, 256, 4, 4),
            (128, 128, 4, 4),
            (64, 128, 4, 4),
        ]
    ],
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}),
)
_GRAD_CONFIGS = _FWD_CONFIGS
_MATMUL_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_S": bs}, num_warps=w, num_stages=s)
        for bm, bk, bs, w, s in [
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
        ]
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_S": 16}),
)


@triton.jit
def _linear_logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Transformed float32 logits of one ``[BLOCK_N, BLOCK_V]`` tile (masked rows/columns read zeros)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    row_offsets = rows.to(tl.int64) * stride_hn
    col_offsets = cols.to(tl.int64) * stride_wv
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(
            hidden_ptr + row_offsets[:, None] + offs_d[None, :] * stride_hd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + col_offsets[None, :] + offs_d[:, None] * stride_wd,
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        if UPCAST:  # triton's interpreter gets bf16 dots wrong
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return transform_logits(acc, softcap, inv_temperature, HAS_SOFTCAP)


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "V", "NEED_ENTROPY", "NEED_SUM"])
@triton.jit
def linear_stats_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    max_ptr,
    sumexp_ptr,
    centered_ptr,
    total_ptr,
    target_logit_ptr,
    N,
    V,
    D,
    cols_per_split,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial statistics of split ``program_id(1)``: outputs are ``[splits, N]`` float32."""
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    col_start = pid_split * cols_per_split
    col_stop = tl.minimum(V, col_start + cols_per_split)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_centered = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v_start in range(col_start, col_stop, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < col_stop
        logits = _linear_logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
            stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_temperature,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        run_max, run_sum, run_centered, run_total, run_target = online_update(
            logits, cols, col_mask, targets, run_max, run_sum, run_centered, run_total, run_target,
            NEED_ENTROPY, NEED_SUM,
        )  # fmt: skip

    out = pid_split * N + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sumexp_ptr + out, run_sum, mask=row_mask)
    tl.store(target_logit_ptr + out, run_target, mask=row_mask)
    if NEED_ENTROPY:
        tl.store(centered_ptr + out, run_centered, mask=row_mask)
    if NEED_SUM:
        tl.store(total_ptr + out, run_total, mask=row_mask)


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=["D", "V", "HAS_BETA", "HAS_GAMMA", "HAS_KAPPA", "HAS_BIAS_GRAD"],
    reset_to_zero=["grad_bias_ptr"],
)
@triton.jit
def linear_grad_logits_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    max_logit_ptr,
    log_sum_ptr,
    alpha_ptr,
    beta_ptr,
    gamma_ptr,
    kappa_ptr,
    grad_ptr,
    grad_bias_ptr,
    N,
    V,
    D,
    col_offset,
    slab_cols,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_gn,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_KAPPA: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``grad[N, slab_cols]`` = gradient w.r.t. the raw logits of columns ``[col_offset, col_offset + slab_cols)``.

    Also ``grad_bias[V]`` (float32) += column sums, atomically across token blocks.
    """
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_offset + local_cols
    col_mask = (local_cols < slab_cols) & (cols < V)
    logits = _linear_logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, D,
        stride_hn, stride_hd, stride_wv, stride_wd, softcap, inv_temperature,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    grad = load_rows_and_grad(
        logits, rows, cols, row_mask, targets_ptr, max_logit_ptr, log_sum_ptr,
        alpha_ptr, beta_ptr, gamma_ptr, kappa_ptr, softcap, inv_temperature,
        HAS_BETA, HAS_GAMMA, HAS_KAPPA, HAS_SOFTCAP,
    )  # fmt: skip
    grad = tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)
    tl.store(
        grad_ptr + rows.to(tl.int64)[:, None] * stride_gn + local_cols[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )
    if HAS_BIAS_GRAD:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_mask)


@triton.autotune(configs=_MATMUL_CONFIGS, key=["S", "K"], restore_value=["out_ptr"])
@triton.jit
def matmul_accumulate_kernel(
    a_ptr,
    b_ptr,
    out_ptr,
    M,
    S,
    K,
    stride_am,
    stride_as,
    stride_bs,
    stride_bk,
    stride_om,
    stride_ok,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """``out[M, K] += a[M, S] @ b[S, K]`` with float32 ``out`` and float32 accumulation."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for s_start in range(0, S, BLOCK_S):
        offs_s = s_start + tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        a = tl.load(
            a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_s[None, :] * stride_as,
            mask=m_mask[:, None] & s_mask[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_s.to(tl.int64)[:, None] * stride_bs + offs_k[None, :] * stride_bk,
            mask=s_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    out_mask = m_mask[:, None] & k_mask[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc, mask=out_mask)

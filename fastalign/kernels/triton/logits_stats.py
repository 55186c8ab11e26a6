"""Triton kernels of ``logprobs_from_logits``: one read of the logits forward, one read and one write backward.

* ``logits_stats_fwd_kernel``: grid over row blocks; each program streams its rows' logits tile by tile
  through an online logsumexp and writes the per-row statistics.
* ``logits_grad_kernel``: grid ``(row blocks, column tiles)``; every tile's gradient is independent once the
  logsumexp is known.
"""

import triton
import triton.language as tl

from fastalign.kernels.triton.softmax_tile import (
    autotune_configs,
    online_start,
    online_update,
    store_tile,
    tile_grad,
    transform_grad,
    transform_logits,
)

_ROW_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w)
        for bn, bv, w in [(1, 4096, 8), (1, 8192, 16), (2, 2048, 8), (4, 1024, 4), (1, 2048, 4)]
    ],
    triton.Config({"BLOCK_N": 2, "BLOCK_V": 32}),
)
_TILE_CONFIGS = autotune_configs(
    [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w)
        for bn, bv, w in [(1, 4096, 8), (4, 2048, 8), (8, 1024, 8), (2, 4096, 16)]
    ],
    triton.Config({"BLOCK_N": 2, "BLOCK_V": 32}),
)


@triton.jit
def _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_n, softcap, inv_temperature, HAS_SOFTCAP):
    raw = tl.load(
        logits_ptr + rows.to(tl.int64)[:, None] * stride_n + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    return transform_logits(raw.to(tl.float32), softcap, inv_temperature, HAS_SOFTCAP)


@triton.autotune(configs=_ROW_CONFIGS, key=["V", "HAS_SOFTCAP", "NEED_ENTROPY", "NEED_SUM"])
@triton.jit
def logits_stats_fwd_kernel(
    logits_ptr,
    targets_ptr,
    max_logit_ptr,
    log_sum_ptr,
    target_logp_ptr,
    entropy_ptr,
    total_ptr,
    N,
    V,
    stride_n,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    NEED_ENTROPY: tl.constexpr,
    NEED_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per-row max logit, ``log Σ exp(l - max)``, target log-prob, and optionally entropy and logit sum: float32 [N]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    stats = online_start(BLOCK_N)
    for v_start in range(0, V, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        logits = _load_logits(
            logits_ptr, rows, cols, row_mask, col_mask, stride_n, softcap, inv_temperature, HAS_SOFTCAP
        )
        stats = online_update(logits, cols, col_mask, targets, stats, NEED_ENTROPY, NEED_SUM)
    run_max, run_sum, run_centered, run_total, run_target = stats
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    log_sum = tl.log(run_sum)
    tl.store(max_logit_ptr + rows, shift, mask=row_mask)
    tl.store(log_sum_ptr + rows, log_sum, mask=row_mask)
    tl.store(target_logp_ptr + rows, (run_target - shift) - log_sum, mask=row_mask)
    if NEED_ENTROPY:
        tl.store(entropy_ptr + rows, log_sum - run_centered / run_sum, mask=row_mask)
    if NEED_SUM:
        tl.store(total_ptr + rows, run_total, mask=row_mask)


@triton.autotune(configs=_TILE_CONFIGS, key=["V", "HAS_SOFTCAP", "HAS_BETA", "HAS_GAMMA", "HAS_KAPPA"])
@triton.jit
def logits_grad_kernel(
    logits_ptr,
    targets_ptr,
    max_logit_ptr,
    log_sum_ptr,
    alpha_ptr,
    beta_ptr,
    gamma_ptr,
    kappa_ptr,
    grad_ptr,
    N,
    V,
    stride_n,
    stride_gn,
    softcap,
    inv_temperature,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_KAPPA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``grad[N, V]`` (the logits' dtype) from the saved softmax statistics and the per-row gradient coefficients."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    logits = _load_logits(logits_ptr, rows, cols, row_mask, col_mask, stride_n, softcap, inv_temperature, HAS_SOFTCAP)
    stat_ptrs = (targets_ptr, max_logit_ptr, log_sum_ptr)
    coef_ptrs = (alpha_ptr, beta_ptr, gamma_ptr, kappa_ptr)
    grad = tile_grad(logits, rows, cols, row_mask, stat_ptrs, coef_ptrs, HAS_BETA, HAS_GAMMA, HAS_KAPPA)
    grad = transform_grad(grad, logits, softcap, inv_temperature, HAS_SOFTCAP)
    store_tile(grad_ptr, grad, rows, cols, row_mask, col_mask, stride_gn)

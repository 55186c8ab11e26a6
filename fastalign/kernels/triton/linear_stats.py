"""Triton kernels of the fused linear log-prob core: logits ``hidden @ weight.T + bias`` in tiles, never stored.

* ``linear_stats_fwd_kernel``: grid ``(token blocks, vocabulary splits)``; each program walks its vocabulary
  split tile by tile (a ``tl.dot`` over D per tile) and keeps an online logsumexp, writing per-split partial
  statistics that the host merges.
* ``linear_grad_logits_kernel``: recomputes the logit tiles of one vocabulary slab and writes their gradient
  (and atomically the bias gradient) for the slab's two matmuls.
* ``matmul_accumulate_kernel``: ``out[M, K] (float32) += a[M, S] @ b[S, K]`` — accumulates d_hidden over slabs.
* ``linear_grad_tiles_kernel``: the backward in one launch over ``token tiles × vocabulary tiles`` (grouped
  order): each program recomputes its logit tile, forms the gradient in registers and adds both gradient dots
  into float32 ``d_hidden`` and ``d_weight`` — atomically, or in a fixed order behind per-tile tickets
  (deterministic) — skipping tiles whose gradient is nowhere above a threshold. Nothing ``[N, V]``-sized is
  written.

Kernels do no argument checking and no autograd: ``fastalign.ops._triton_backend`` owns both.
"""

import triton
import triton.language as tl

from fastalign.kernels.triton.softmax_tile import (
    autotune_configs,
    grouped_tile,
    online_start,
    online_update,
    slab_tile,
    split_tile,
    store_tile,
    tile_grad,
    transform_grad,
    transform_logits,
)

# Tiles ``(rows, columns, inner, warps, stages)`` per precision and architecture: ``half`` (bf16/fp16) and ``tf32``
# run on tensor cores (mma on sm_80, wgmma on sm_90), ``ieee`` (float32 with torch's TF32 switch off) on FMA, which
# needs small inner tiles (each thread holds whole rows of the A operand). Every tile was measured by
# ``python -m bench.aot`` to compile for its target without spills in the heaviest variant (bias, softcap, entropy,
# logit sum); sm_80 spills at 128 x 128 in the forward, so it gets narrower tiles. Lists are per kernel family.
# Architecture 8: sm_80..sm_89 (tiles also filtered by the device's shared memory); 9: sm_90 and newer.
_LOGIT_TILES = {
    ("half", 9): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 4), (64, 128, 64, 4, 4)],
    ("half", 8): [(64, 256, 64, 8, 3), (64, 256, 64, 8, 4), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4)],
    ("tf32", 9): [(64, 256, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 3), (64, 128, 32, 4, 4)],
    ("tf32", 8): [(64, 256, 32, 8, 3), (128, 64, 32, 8, 4), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],
    ("ieee", 9): [(64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 128, 16, 4, 2), (64, 64, 8, 4, 2)],
    ("ieee", 8): [(64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 128, 16, 4, 2), (64, 64, 8, 4, 2)],
}
_MATMUL_TILES = {
    ("half", 9): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    ("half", 8): [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
    ("tf32", 9): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4)],
    ("tf32", 8): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4)],
    ("ieee", 9): [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 128, 16, 4, 2)],
    ("ieee", 8): [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (32, 128, 16, 4, 2)],
}
# The tile backward holds the logit tile, its gradient as a dot operand and one [tile, BLOCK_D] product at a time.
# 128 x 128 (the fewest atomic bytes per FLOP of these) fits sm_90's registers only without the bias, softcap and
# entropy terms (with them ptxas spills 240-272 B): ``_LIGHT_ONLY`` tiles are pruned from those launches.
# sm_80 spills at 128 x 128 in every variant, and at 64 x 128 w8 / 64 x 64 x 64 w8 in the deterministic cross-entropy
# (16-32 B); its list holds the tiles that compile clean in every variant and mode (AOT table).
_TILE_BACKWARD_TILES = {
    ("half", 9): [(128, 128, 64, 8, 3), (64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 64, 8, 3)],
    ("half", 8): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 4), (32, 128, 32, 4, 3)],
    ("tf32", 9): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 2)],
    ("tf32", 8): [(64, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 32, 4, 2)],
    ("ieee", 9): [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (64, 64, 8, 4, 2)],
    ("ieee", 8): [(64, 64, 16, 4, 2), (64, 128, 16, 8, 2), (128, 64, 16, 8, 2), (64, 64, 8, 4, 2)],
}
_LIGHT_ONLY = {(128, 128)}


def _tile_config(names: tuple[str, str, str], tile: tuple) -> triton.Config:
    return triton.Config(dict(zip(names, tile[:3], strict=True)), num_warps=tile[3], num_stages=tile[4])


def _tile_configs(tiles: dict, names: tuple[str, str, str]) -> dict:
    return {kind: [_tile_config(names, tile) for tile in kind_tiles] for kind, kind_tiles in tiles.items()}


_LOGIT_CONFIGS = _tile_configs(_LOGIT_TILES, ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
_MATMUL_KIND_CONFIGS = _tile_configs(_MATMUL_TILES, ("BLOCK_M", "BLOCK_K", "BLOCK_S"))
_FWD_CONFIGS = autotune_configs(
    [c for configs in _LOGIT_CONFIGS.values() for c in configs],
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}),
)
_GRAD_CONFIGS = _FWD_CONFIGS
_TILE_BACKWARD_KIND_CONFIGS = _tile_configs(_TILE_BACKWARD_TILES, ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
_TILE_BACKWARD_CONFIGS = autotune_configs(
    [c for configs in _TILE_BACKWARD_KIND_CONFIGS.values() for c in configs],
    triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_D": 16}),
)
_MATMUL_CONFIGS = autotune_configs(
    [c for configs in _MATMUL_KIND_CONFIGS.values() for c in configs],
    triton.Config({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_S": 16}),
)
# Shared memory per block where the device does not report its opt-in limit (torch < 2.6): A100 / H100.
_SHARED_LIMIT = {8: 163 * 1024, 9: 227 * 1024}


def tile_kind(dtype, dot_precision: str) -> str:
    """``"half"``, ``"tf32"`` or ``"ieee"``: which tile list a launch draws from."""
    if dot_precision == "ieee":
        return "ieee"
    return "tf32" if dtype.itemsize == 4 else "half"


def shared_bytes(config: triton.Config, itemsize: int) -> int:
    """An upper bound of the shared memory of a tile config: ``stages`` buffers of both dot operands."""
    rows, cols, inner = config.kwargs.values()
    return config.num_stages * (rows + cols) * inner * itemsize


def _device_limits(tensor) -> tuple[int, int]:
    """``(architecture, shared memory per block)`` of the tensor's CUDA device."""
    import torch

    major, _ = torch.cuda.get_device_capability(tensor.device)
    architecture = 9 if major >= 9 else 8
    limit = getattr(torch.cuda.get_device_properties(tensor.device), "shared_memory_per_block_optin", None)
    return architecture, limit or _SHARED_LIMIT[architecture]


def configs_for(kinds: dict, tensor, dot_precision: str) -> list:
    """The configs a launch on ``tensor``'s dtype and device may use: its kind's list for the device's
    architecture, less those that need more shared memory than a block may have there."""
    architecture, limit = _device_limits(tensor)
    configs = kinds[(tile_kind(tensor.dtype, dot_precision), architecture)]
    return [c for c in configs if shared_bytes(c, tensor.element_size()) <= limit]


def _prune_logit_tiles(configs, named_args, **kwargs):
    return configs_for(_LOGIT_CONFIGS, named_args["hidden_ptr"], kwargs["DOT_PRECISION"])


def smallest_tile_backward_tile() -> tuple[int, int]:
    """The fewest ``(rows, columns)`` of any tile backward config: what the host sizes the tickets by."""
    return (
        min(c.kwargs["BLOCK_N"] for c in _TILE_BACKWARD_CONFIGS),
        min(c.kwargs["BLOCK_V"] for c in _TILE_BACKWARD_CONFIGS),
    )


def _prune_tile_backward_tiles(configs, named_args, **kwargs):
    kept = configs_for(_TILE_BACKWARD_KIND_CONFIGS, named_args["hidden_ptr"], kwargs["DOT_PRECISION"])
    if kwargs["HAS_BIAS"] or kwargs["HAS_SOFTCAP"] or kwargs["HAS_BETA"]:
        kept = [c for c in kept if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"]) not in _LIGHT_ONLY]
    return kept


def _prune_matmul_tiles(configs, named_args, **kwargs):
    return configs_for(_MATMUL_KIND_CONFIGS, named_args["a_ptr"], kwargs["DOT_PRECISION"])


@triton.jit
def _dot_tiles(
    a_rows,
    b_cols,
    a_mask,
    b_mask,
    K,
    stride_ak,
    stride_bk,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``a[rows, :K] @ b[:K, cols]`` in float32, ``BLOCK_K`` of K at a time: ``a_rows`` [M] point at the rows of
    ``a``, ``b_cols`` [N] at the columns of ``b`` (masked ones read zeros), ``stride_ak`` / ``stride_bk`` step
    along K."""
    acc = tl.zeros((a_rows.shape[0], b_cols.shape[0]), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_rows[:, None] + offs_k[None, :] * stride_ak, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_cols[None, :] + offs_k[:, None] * stride_bk, mask=b_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:  # triton's interpreter gets bf16 dots wrong
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def head_logits(
    head, rows, cols, row_mask, col_mask, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr
):
    """``hidden[rows] @ weight[cols]ᵀ`` in float32 for ``head = (hidden_ptr, weight_ptr, D, stride_hn, stride_hd,
    stride_wv, stride_wd)`` (masked rows and columns read zeros)."""
    hidden_ptr, weight_ptr, D, stride_hn, stride_hd, stride_wv, stride_wd = head
    h_rows = hidden_ptr + rows.to(tl.int64) * stride_hn
    w_cols = weight_ptr + cols.to(tl.int64) * stride_wv
    return _dot_tiles(h_rows, w_cols, row_mask, col_mask, D, stride_hd, stride_wd, UPCAST, DOT_PRECISION, BLOCK_D)


@triton.jit
def recomputed_grad(
    head,
    bias_ptr,
    stat_ptrs,
    coef_ptrs,
    rows,
    cols,
    row_mask,
    col_mask,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_KAPPA: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The gradient w.r.t. the raw logits of the tile ``[rows, cols]``, its logits recomputed (:func:`head_logits`,
    bias, transform): float32, zero outside the masks (:func:`tile_grad` for ``stat_ptrs`` / ``coef_ptrs``)."""
    logits = head_logits(head, rows, cols, row_mask, col_mask, UPCAST, DOT_PRECISION, BLOCK_D)
    if HAS_BIAS:
        logits += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    logits = transform_logits(logits, softcap, inv_temperature, HAS_SOFTCAP)
    grad = tile_grad(logits, rows, cols, row_mask, stat_ptrs, coef_ptrs, HAS_BETA, HAS_GAMMA, HAS_KAPPA)
    grad = transform_grad(grad, logits, softcap, inv_temperature, HAS_SOFTCAP)
    return tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)


@triton.autotune(
    configs=_FWD_CONFIGS,
    key=["D", "V", "HAS_BIAS", "HAS_SOFTCAP", "NEED_ENTROPY", "NEED_SUM", "DOT_PRECISION", "GROUP_N"],
    prune_configs_by={"early_config_prune": _prune_logit_tiles},
)
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
    GROUP_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial statistics of one token block over one vocabulary split (:func:`split_tile`): outputs are
    ``[splits, N]`` float32."""
    rows, row_mask, col_start, col_stop, split = split_tile(N, V, cols_per_split, BLOCK_N, GROUP_N)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    h_rows = hidden_ptr + rows.to(tl.int64) * stride_hn
    stats = online_start(BLOCK_N)
    for v_start in range(col_start, col_stop, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_mask = cols < col_stop
        w_cols = weight_ptr + cols.to(tl.int64) * stride_wv
        logits = _dot_tiles(h_rows, w_cols, row_mask, col_mask, D, stride_hd, stride_wd, UPCAST, DOT_PRECISION, BLOCK_D)
        if HAS_BIAS:
            logits += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        logits = transform_logits(logits, softcap, inv_temperature, HAS_SOFTCAP)
        stats = online_update(logits, cols, col_mask, targets, stats, NEED_ENTROPY, NEED_SUM)
    run_max, run_sum, run_centered, run_total, run_target = stats

    out = split * N + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sumexp_ptr + out, run_sum, mask=row_mask)
    tl.store(target_logit_ptr + out, run_target, mask=row_mask)
    if NEED_ENTROPY:
        tl.store(centered_ptr + out, run_centered, mask=row_mask)
    if NEED_SUM:
        tl.store(total_ptr + out, run_total, mask=row_mask)


@triton.autotune(
    configs=_GRAD_CONFIGS,
    key=[
        "D",
        "V",
        "HAS_BIAS",
        "HAS_SOFTCAP",
        "HAS_BETA",
        "HAS_GAMMA",
        "HAS_KAPPA",
        "HAS_BIAS_GRAD",
        "DOT_PRECISION",
        "GROUP_N",
    ],
    reset_to_zero=["grad_bias_ptr"],
    prune_configs_by={"early_config_prune": _prune_logit_tiles},
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
    GROUP_N: tl.constexpr,
):
    """``grad[N, slab_cols]`` = gradient w.r.t. the raw logits of columns ``[col_offset, col_offset + slab_cols)``.

    Also ``grad_bias[V]`` (float32) += column sums, atomically across token blocks.
    """
    rows, row_mask, local_cols, cols, col_mask, first_row = slab_tile(
        N, V, col_offset, slab_cols, BLOCK_N, BLOCK_V, GROUP_N
    )
    if first_row >= N:
        return
    head = (hidden_ptr, weight_ptr, D, stride_hn, stride_hd, stride_wv, stride_wd)
    stat_ptrs = (targets_ptr, max_logit_ptr, log_sum_ptr)
    coef_ptrs = (alpha_ptr, beta_ptr, gamma_ptr, kappa_ptr)
    grad = recomputed_grad(
        head,
        bias_ptr,
        stat_ptrs,
        coef_ptrs,
        rows,
        cols,
        row_mask,
        col_mask,
        softcap,
        inv_temperature,
        HAS_BIAS,
        HAS_SOFTCAP,
        HAS_BETA,
        HAS_GAMMA,
        HAS_KAPPA,
        UPCAST,
        DOT_PRECISION,
        BLOCK_D,
    )
    store_tile(grad_ptr, grad, rows, local_cols, row_mask, col_mask, stride_gn)
    if HAS_BIAS_GRAD:
        tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_mask)


@triton.autotune(
    configs=_MATMUL_CONFIGS,
    key=["S", "K", "DOT_PRECISION", "GROUP_M"],
    restore_value=["out_ptr"],
    prune_configs_by={"early_config_prune": _prune_matmul_tiles},
)
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
    GROUP_M: tl.constexpr,
):
    """``out[M, K] += a[M, S] @ b[S, K]`` with float32 ``out`` and float32 accumulation, on the grid ``(GROUP_M × K
    tiles, M groups)``: ``GROUP_M`` row tiles by every column tile, the row tiles fastest, so that a wave of
    programs shares its ``a`` rows and its ``b`` columns from L2 (see ``split_tile``)."""
    local = tl.program_id(0)
    pid_m = tl.program_id(1) * GROUP_M + local % GROUP_M
    pid_k = local // GROUP_M
    if pid_m * BLOCK_M >= M:  # past the last row tile, in a short last group
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    a_rows = a_ptr + offs_m.to(tl.int64) * stride_am
    b_cols = b_ptr + offs_k * stride_bk
    # Along S in 64 bits: S may be the token count, and S * stride_bs pass 2^31.
    acc = _dot_tiles(
        a_rows, b_cols, m_mask, k_mask, S, stride_as, tl.cast(stride_bs, tl.int64), UPCAST, DOT_PRECISION, BLOCK_S
    )
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    out_mask = m_mask[:, None] & k_mask[None, :]
    tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + acc, mask=out_mask)


@triton.jit
def _wait_turn(ticket_ptr, turn):
    """Spin until the ticket at ``ticket_ptr`` reads ``turn``: every program whose turn came before has added
    its part (acquire: their adds are visible)."""
    seen = tl.atomic_add(ticket_ptr, 0, sem="acquire")
    while seen != turn:
        seen = tl.atomic_add(ticket_ptr, 0, sem="acquire")


@triton.jit
def _pass_turn(ticket_ptr, turn):
    """Hand the ticket on once every thread's adds are issued (barrier, then release)."""
    tl.debug_barrier()
    tl.atomic_xchg(ticket_ptr, turn + 1, sem="release")


@triton.autotune(
    configs=_TILE_BACKWARD_CONFIGS,
    key=[
        "D",
        "V",
        "HAS_BIAS",
        "HAS_SOFTCAP",
        "HAS_BETA",
        "HAS_GAMMA",
        "HAS_KAPPA",
        "NEED_HIDDEN",
        "NEED_WEIGHT",
        "HAS_BIAS_GRAD",
        "DETERMINISTIC",
        "DOT_PRECISION",
        "GROUP_N",
    ],
    reset_to_zero=["grad_hidden_ptr", "grad_weight_ptr", "grad_bias_ptr", "tickets_ptr"],
    prune_configs_by={"early_config_prune": _prune_tile_backward_tiles},
)
@triton.jit
def linear_grad_tiles_kernel(
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
    grad_hidden_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    tickets_ptr,
    N,
    V,
    D,
    stride_hn,
    stride_hd,
    stride_wv,
    stride_wd,
    softcap,
    inv_temperature,
    grad_filter,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_KAPPA: tl.constexpr,
    NEED_HIDDEN: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    HAS_BIAS_GRAD: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_V]`` tile of the backward: ``g = d loss / d logits`` of the tile (recomputed logits,
    :func:`tile_grad`), then ``grad_hidden[rows] += g @ weight[cols]`` and ``grad_weight[cols] += gᵀ @
    hidden[rows]`` (``[N, D]`` / ``[V, D]`` float32, contiguous, zeroed) ``BLOCK_D`` columns at a time, and
    ``grad_bias[cols] += Σ_rows g``.

    Grid: ``(GROUP_N × vocabulary tiles, token groups)`` in the order of :func:`grouped_tile`. A tile whose
    ``max |g|`` is not above ``grad_filter`` adds nothing (0.0: only all-zero tiles, exact).

    ``DETERMINISTIC``: ``tickets_ptr`` (int32, zeroed) holds a program counter, then one ticket per token tile and
    one per vocabulary tile. Each program takes the next program number from the counter (so every lower number
    belongs to a program already running or done: no wait can deadlock), and adds into a token tile's rows only
    when that tile's ticket reaches its vocabulary tile, into a vocabulary tile's rows only when that ticket
    reaches its token tile: the float32 sums are formed in one fixed order, bit-identical run to run.
    Otherwise the adds are plain float32 atomics in whatever order the programs run.
    """
    n_token_tiles = tl.cdiv(N, BLOCK_N)
    n_vocab_tiles = tl.cdiv(V, BLOCK_V)
    if DETERMINISTIC:
        program = tl.atomic_add(tickets_ptr, 1)
    else:
        program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    token_tile, vocab_tile = grouped_tile(program, n_vocab_tiles, GROUP_N)
    if token_tile >= n_token_tiles:
        return
    rows = token_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vocab_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    head = (hidden_ptr, weight_ptr, D, stride_hn, stride_hd, stride_wv, stride_wd)
    stat_ptrs = (targets_ptr, max_logit_ptr, log_sum_ptr)
    coef_ptrs = (alpha_ptr, beta_ptr, gamma_ptr, kappa_ptr)
    grad = recomputed_grad(
        head,
        bias_ptr,
        stat_ptrs,
        coef_ptrs,
        rows,
        cols,
        row_mask,
        col_mask,
        softcap,
        inv_temperature,
        HAS_BIAS,
        HAS_SOFTCAP,
        HAS_BETA,
        HAS_GAMMA,
        HAS_KAPPA,
        UPCAST,
        DOT_PRECISION,
        BLOCK_D,
    )
    keep = tl.max(tl.max(tl.abs(grad), 1), 0) > grad_filter
    # The dot operand in the inputs' dtype, as the slab backward stores it (float32 under the interpreter).
    operand = grad.to(tl.float32 if UPCAST else hidden_ptr.dtype.element_ty)
    h_rows = hidden_ptr + rows.to(tl.int64) * stride_hn
    w_cols = weight_ptr + cols.to(tl.int64) * stride_wv
    if NEED_HIDDEN:
        hidden_ticket = tickets_ptr + 1 + token_tile
        if DETERMINISTIC:
            _wait_turn(hidden_ticket, vocab_tile)
        if keep:
            out_rows = grad_hidden_ptr + rows.to(tl.int64)[:, None] * D
            for d_start in range(0, D, BLOCK_D):
                offs_d = d_start + tl.arange(0, BLOCK_D)
                d_mask = offs_d < D
                w = tl.load(
                    w_cols[:, None] + offs_d[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :], other=0.0
                )
                if UPCAST:
                    w = w.to(tl.float32)
                part = tl.dot(operand, w, input_precision=DOT_PRECISION)
                tl.atomic_add(out_rows + offs_d[None, :], part, mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
        if DETERMINISTIC:
            _pass_turn(hidden_ticket, vocab_tile)
    if NEED_WEIGHT or HAS_BIAS_GRAD:
        weight_ticket = tickets_ptr + 1 + n_token_tiles + vocab_tile
        if DETERMINISTIC:
            _wait_turn(weight_ticket, token_tile)
        if keep:
            if NEED_WEIGHT:
                out_cols = grad_weight_ptr + cols.to(tl.int64)[:, None] * D
                operand_t = tl.trans(operand)
                for d_start in range(0, D, BLOCK_D):
                    offs_d = d_start + tl.arange(0, BLOCK_D)
                    d_mask = offs_d < D
                    h = tl.load(
                        h_rows[:, None] + offs_d[None, :] * stride_hd,
                        mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    if UPCAST:
                        h = h.to(tl.float32)
                    part = tl.dot(operand_t, h, input_precision=DOT_PRECISION)
                    tl.atomic_add(
                        out_cols + offs_d[None, :], part, mask=col_mask[:, None] & d_mask[None, :], sem="relaxed"
                    )
            if HAS_BIAS_GRAD:
                tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, 0), mask=col_mask, sem="relaxed")
        if DETERMINISTIC:
            _pass_turn(weight_ticket, token_tile)

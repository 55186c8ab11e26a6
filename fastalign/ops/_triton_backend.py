"""The Triton backend: allocations, launch grids and the small merges around the kernels in
``fastalign.kernels.triton``.

Forward: one fused kernel over ``token blocks × vocabulary splits`` (grouped launch order, ``split_tile``) writes
partial statistics ``[splits, N]`` that are merged here (a few ``[N]``-sized ops). Backward: the vocabulary is
walked in slabs of columns sized by the scratch budget; per slab a kernel recomputes the logit tiles and writes
their gradient ``[N, slab]``, then ``d_hidden (float32) += grad @ weight[slab]`` (Triton) and ``d_weight[slab] =
grad.T @ hidden`` (one matmul over all tokens, so no cross-slab accumulation). Memory beyond inputs and gradients:
the slab, a float32 ``d_hidden`` accumulator for non-float32 inputs, and ``[splits, N]`` statistics.
"""

from __future__ import annotations

import torch

from fastalign.kernels.triton import linear_stats as linear_kernels
from fastalign.kernels.triton import logits_stats as logits_kernels
from fastalign.kernels.triton.softmax_tile import INTERPRETING
from fastalign.ops.stats import GradCoefficients, StatsOptions, TokenStats, empty_stats, row_major

# Vocabulary splits are multiples of the widest vocabulary tile in the autotune configs.
_SPLIT_ALIGN = 256
_SLAB_ALIGN = 128


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs follow torch's TF32 switch for matmuls; half-precision dots ignore the setting."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dot_flags(dtype: torch.dtype) -> dict:
    """The matmul kernels' compile-time flags for inputs of ``dtype``."""
    return {"UPCAST": INTERPRETING, "DOT_PRECISION": _dot_precision(dtype)}


def _transform(opts: StatsOptions) -> tuple[float, float]:
    """The logit transform as the kernels take it: the softcap (1.0 when off, then unread) and 1 / temperature."""
    return opts.softcap or 1.0, opts.inv_temperature


def _coefficients(coeffs: GradCoefficients) -> tuple[torch.Tensor, ...]:
    """``α, β, γ, κ`` as the gradient kernels take them: ``α`` in place of an absent one (its flag is off)."""
    return tuple(coeffs.alpha if c is None else c for c in coeffs)


def _coefficient_flags(coeffs: GradCoefficients) -> dict:
    return {
        "HAS_BETA": coeffs.beta is not None,
        "HAS_GAMMA": coeffs.gamma is not None,
        "HAS_KAPPA": coeffs.kappa is not None,
    }


GROUP_TOKEN_BLOCKS = 16
"""Token blocks per group of the split kernels' launch order (``split_tile``): a wave of ~2 programs per SM covers
16 token blocks (16 × 128 rows of hidden: 16 MiB at D = 4096 in bf16, inside L2) and ~17 vocabulary splits."""


def _vocab_splits(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """``(splits, cols_per_split)``: a wave of concurrent programs (about two per SM) spans the splits of one group
    of ``GROUP_TOKEN_BLOCKS`` token blocks, or of all of them when there are fewer; at least 4 aligned tiles per
    split."""
    if INTERPRETING:
        # Two splits whenever possible, so the tests cover the cross-split merge.
        cols_per_split = max(32, _cdiv(n_cols, 2))
        return _cdiv(n_cols, cols_per_split), cols_per_split
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = min(_cdiv(n_rows, 128), GROUP_TOKEN_BLOCKS)
    splits = max(1, min(_cdiv(2 * multiprocessors, token_blocks), _cdiv(n_cols, 4 * _SPLIT_ALIGN)))
    cols_per_split = _cdiv(_cdiv(n_cols, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return _cdiv(n_cols, cols_per_split), cols_per_split


def _split_grid(n_rows: int, splits: int):
    """The launch grid of the split kernels (``split_tile``): ``GROUP_TOKEN_BLOCKS × splits`` programs per group of
    token blocks, one group per grid row."""
    return lambda meta: (GROUP_TOKEN_BLOCKS * splits, _cdiv(_cdiv(n_rows, meta["BLOCK_N"]), GROUP_TOKEN_BLOCKS))


def slab_grid(n_rows: int, cols: int):
    """The launch grid of the gradient kernels over a slab of ``cols`` columns (``slab_tile``):
    ``GROUP_TOKEN_BLOCKS × column tiles`` programs per group of token blocks, one group per grid row."""

    def grid(meta):
        token_groups = _cdiv(_cdiv(n_rows, meta["BLOCK_N"]), GROUP_TOKEN_BLOCKS)
        return GROUP_TOKEN_BLOCKS * _cdiv(cols, meta["BLOCK_V"]), token_groups

    return grid


def _merge_splits(partial: torch.Tensor, opts: StatsOptions) -> TokenStats:
    """Combine ``partial = [max, sum, centered, total, target] x [splits, N]`` into the row statistics.

    Each split's ``sum`` and ``centered`` are taken around its own shift (its max, or 0 if it saw only -inf).
    """
    run_max, run_sum, centered, total, target = partial.unbind(0)
    split_shift = torch.where(torch.isinf(run_max), 0.0, run_max)
    top = run_max.amax(dim=0)
    shift = torch.where(torch.isinf(top), 0.0, top)
    scale = torch.where(run_sum > 0, torch.exp(split_shift - shift), 0.0)
    row_sum = (run_sum * scale).sum(dim=0)
    log_sum = torch.log(row_sum)
    entropy = None
    if opts.need_entropy:
        row_centered = (scale * (centered + (split_shift - shift) * run_sum)).sum(dim=0)
        entropy = log_sum - row_centered / row_sum
    return TokenStats(
        max_logit=shift,
        log_sum=log_sum,
        target_logp=(target.sum(dim=0) - shift) - log_sum,  # one split holds the target, the others add 0
        entropy=entropy,
        sum_logits=total.sum(dim=0) if opts.need_sum else None,
    )


def linear_forward(hidden, weight, bias, targets, opts: StatsOptions) -> TokenStats:
    n_rows, width = hidden.shape
    n_cols = weight.shape[0]
    if n_rows == 0:
        return empty_stats(hidden, opts)
    splits, cols_per_split = _vocab_splits(n_rows, n_cols, hidden.device)
    partial = torch.empty(5, splits, n_rows, dtype=torch.float32, device=hidden.device)
    inputs = (hidden, weight, weight if bias is None else bias, targets)
    sizes = (n_rows, n_cols, width, cols_per_split)
    flags = {
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": opts.softcap is not None,
        "NEED_ENTROPY": opts.need_entropy,
        "NEED_SUM": opts.need_sum,
    }
    dot = _dot_flags(hidden.dtype)
    linear_kernels.linear_stats_fwd_kernel[_split_grid(n_rows, splits)](
        *inputs,
        *partial,
        *sizes,
        *hidden.stride(),
        *weight.stride(),
        *_transform(opts),
        **flags,
        **dot,
        GROUP_N=GROUP_TOKEN_BLOCKS,
    )
    return _merge_splits(partial, opts)


def _slab_cols(n_rows: int, n_cols: int, itemsize: int, budget: int) -> int:
    """Columns per backward slab: as many as the budget allows, at least one aligned tile."""
    fitting = (budget // max(1, n_rows * itemsize)) // _SLAB_ALIGN * _SLAB_ALIGN
    return min(n_cols, max(_SLAB_ALIGN, fitting))


def _matmul_accumulate(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out (float32) += a @ b``."""
    rows, inner = a.shape
    width = b.shape[1]
    strides = (*a.stride(), *b.stride(), *out.stride())

    def grid(meta):  # grouped order: GROUP_TOKEN_BLOCKS row tiles by every column tile
        column_tiles = _cdiv(width, meta["BLOCK_K"])
        return GROUP_TOKEN_BLOCKS * column_tiles, _cdiv(_cdiv(rows, meta["BLOCK_M"]), GROUP_TOKEN_BLOCKS)

    linear_kernels.matmul_accumulate_kernel[grid](
        a, b, out, rows, inner, width, *strides, **_dot_flags(a.dtype), GROUP_M=GROUP_TOKEN_BLOCKS
    )


def _tile_backward(
    hidden, weight, bias, targets, max_logit, log_sum, coeffs: GradCoefficients, needs, opts: StatsOptions
):
    """The backward as one launch of ``linear_grad_tiles_kernel`` over every (token tile, vocabulary tile):
    float32 ``d_hidden [N, D]`` and ``d_weight [V, D]`` accumulators and the tickets are its only memory beyond
    the inputs and gradients."""
    need_hidden, need_weight, need_bias = needs
    n_rows, width = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    tiles = opts.tile_backward
    grad_hidden = torch.zeros(n_rows if need_hidden else 1, width, dtype=torch.float32, device=device)
    grad_weight = torch.zeros(n_cols if need_weight else 1, width, dtype=torch.float32, device=device)
    grad_bias = torch.zeros(n_cols if need_bias else 1, dtype=torch.float32, device=device)
    if n_rows > 0:
        # A counter, then a ticket per token tile and per vocabulary tile, for the smallest tiles a config has.
        smallest_rows, smallest_cols = linear_kernels.smallest_tile_backward_tile()
        tickets = torch.zeros(
            1 + _cdiv(n_rows, smallest_rows) + _cdiv(n_cols, smallest_cols), dtype=torch.int32, device=device
        )
        inputs = (hidden, weight, weight if bias is None else bias, targets, max_logit, log_sum, *_coefficients(coeffs))
        flags = {
            "HAS_BIAS": bias is not None,
            "HAS_SOFTCAP": opts.softcap is not None,
            **_coefficient_flags(coeffs),
            "NEED_HIDDEN": need_hidden,
            "NEED_WEIGHT": need_weight,
            "HAS_BIAS_GRAD": need_bias,
            "DETERMINISTIC": tiles.deterministic,
            **_dot_flags(hidden.dtype),
        }
        linear_kernels.linear_grad_tiles_kernel[slab_grid(n_rows, n_cols)](
            *inputs,
            grad_hidden,
            grad_weight,
            grad_bias,
            tickets,
            n_rows,
            n_cols,
            width,
            *hidden.stride(),
            *weight.stride(),
            *_transform(opts),
            float(tiles.grad_filter),
            **flags,
            GROUP_N=GROUP_TOKEN_BLOCKS,
        )
    return (
        grad_hidden.to(hidden.dtype) if need_hidden else None,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(weight.dtype) if need_bias else None,
    )


def linear_backward(
    hidden, weight, bias, targets, max_logit, log_sum, coeffs: GradCoefficients, needs, opts: StatsOptions
):
    if opts.tile_backward is not None:
        return _tile_backward(hidden, weight, bias, targets, max_logit, log_sum, coeffs, needs, opts)
    need_hidden, need_weight, need_bias = needs
    n_rows, width = hidden.shape
    n_cols = weight.shape[0]
    device = hidden.device
    grad_hidden = torch.zeros(n_rows, width, dtype=torch.float32, device=device) if need_hidden else None
    # Every slab writes its rows of the weight gradient in full; only an empty batch leaves it all zero.
    grad_weight = (torch.empty_like(weight) if n_rows > 0 else torch.zeros_like(weight)) if need_weight else None
    # A dedicated dummy: the autotuner zeroes whatever is passed as the bias gradient.
    grad_bias = torch.zeros(n_cols if need_bias else 1, dtype=torch.float32, device=device)
    if n_rows > 0:
        slab_cols = _slab_cols(n_rows, n_cols, hidden.element_size(), opts.scratch_bytes)
        slab = torch.empty(n_rows, slab_cols, dtype=hidden.dtype, device=device)
        inputs = (hidden, weight, weight if bias is None else bias, targets, max_logit, log_sum, *_coefficients(coeffs))
        flags = {
            "HAS_BIAS": bias is not None,
            "HAS_SOFTCAP": opts.softcap is not None,
            **_coefficient_flags(coeffs),
            "HAS_BIAS_GRAD": need_bias,
            **_dot_flags(hidden.dtype),
        }
        for col_offset in range(0, n_cols, slab_cols):
            cols = min(slab_cols, n_cols - col_offset)

            sizes = (n_rows, n_cols, width, col_offset, cols)
            strides = (*hidden.stride(), *weight.stride(), slab.stride(0))
            linear_kernels.linear_grad_logits_kernel[slab_grid(n_rows, cols)](
                *inputs, slab, grad_bias, *sizes, *strides, *_transform(opts), **flags, GROUP_N=GROUP_TOKEN_BLOCKS
            )
            grad_slab = slab[:, :cols]
            weight_slab = weight[col_offset : col_offset + cols]
            if need_hidden:
                _matmul_accumulate(grad_slab, weight_slab, grad_hidden)
            if need_weight:
                torch.mm(grad_slab.T, hidden, out=grad_weight[col_offset : col_offset + cols])
    return (
        None if grad_hidden is None else grad_hidden.to(hidden.dtype),
        grad_weight,
        grad_bias.to(weight.dtype) if need_bias else None,
    )


def logits_forward(logits, targets, opts: StatsOptions) -> TokenStats:
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return empty_stats(logits, opts)
    logits = row_major(logits)
    stats, out = opts.stats_buffer(logits)
    flags = {"HAS_SOFTCAP": opts.softcap is not None, "NEED_ENTROPY": opts.need_entropy, "NEED_SUM": opts.need_sum}
    logits_kernels.logits_stats_fwd_kernel[lambda meta: (_cdiv(n_rows, meta["BLOCK_N"]),)](
        logits, targets, *stats, n_rows, n_cols, logits.stride(0), *_transform(opts), **flags
    )
    return out


def _launch_logits_grad(logits, targets, max_logit, log_sum, coeffs: GradCoefficients, grad, opts, config=None):
    """``logits_grad_kernel`` through its autotuner, or with ``config`` (a ``triton.Config``) as given."""
    n_rows, n_cols = logits.shape
    kernel = logits_kernels.logits_grad_kernel if config is None else logits_kernels.logits_grad_kernel.fn
    fixed = {} if config is None else config.all_kwargs()
    flags = {"HAS_SOFTCAP": opts.softcap is not None, **_coefficient_flags(coeffs), **fixed}
    sizes = (n_rows, n_cols, logits.stride(0), grad.stride(0))
    kernel[lambda meta: (_cdiv(n_rows, meta["BLOCK_N"]), _cdiv(n_cols, meta["BLOCK_V"]))](
        logits, targets, max_logit, log_sum, *_coefficients(coeffs), grad, *sizes, *_transform(opts), **flags
    )


# In-place gradient launches: the config per (V, dtype, device, variant), chosen as described in _in_place_config.
_IN_PLACE_CONFIGS: dict[tuple, object] = {}


def _in_place_config(logits, targets, max_logit, log_sum, coeffs: GradCoefficients, opts):
    """The config of an in-place gradient launch. The autotuner benchmarks every config on the buffers it is
    given, several runs each: with the gradient aliasing the logits, each run would read the previous run's
    gradient as logits. So the first in-place launch per key tunes out of place, on as many leading rows as the
    scratch budget holds, into a scratch gradient; the winner (also the out-of-place choice for the same key)
    then runs in place."""
    n_rows, n_cols = logits.shape
    key = (
        n_cols,
        logits.dtype,
        logits.device,
        opts.softcap is not None,
        *(c is not None for c in (coeffs.beta, coeffs.gamma, coeffs.kappa)),
    )
    config = _IN_PLACE_CONFIGS.get(key)
    if config is None:
        rows = max(1, min(n_rows, opts.scratch_bytes // (n_cols * logits.element_size())))
        sample = GradCoefficients(*(None if c is None else c[:rows] for c in coeffs))
        scratch = torch.empty(rows, n_cols, dtype=logits.dtype, device=logits.device)
        _launch_logits_grad(logits[:rows], targets[:rows], max_logit[:rows], log_sum[:rows], sample, scratch, opts)
        config = _IN_PLACE_CONFIGS[key] = logits_kernels.logits_grad_kernel.best_config
    return config


def logits_backward(logits, targets, max_logit, log_sum, coeffs: GradCoefficients, opts: StatsOptions) -> torch.Tensor:
    n_rows = logits.shape[0]
    logits = row_major(logits)
    grad = opts.grad_buffer(logits)  # each program reads its tile before writing it: may be the logits
    if n_rows == 0:
        return grad
    if opts.grad_into_logits:
        config = _in_place_config(logits, targets, max_logit, log_sum, coeffs, opts)
        _launch_logits_grad(logits, targets, max_logit, log_sum, coeffs, grad, opts, config)
        torch.autograd.graph.increment_version(grad)
    else:
        _launch_logits_grad(logits, targets, max_logit, log_sum, coeffs, grad, opts)
    return grad

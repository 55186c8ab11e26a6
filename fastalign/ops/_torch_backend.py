"""The torch backend: per-token softmax statistics computed tile by tile, never holding ``[N, V]`` logits.

The logits are visited in ``[row_block, col_block]`` tiles whose scratch stays under the scratch budget
(:func:`fastalign.ops.dispatch.scratch_budget`). The forward merges the tiles of a row block with an online
logsumexp; the backward recomputes each tile from the saved row maximum and log-sum and pushes its gradient through the
matmul (linear input) or writes it out (logits input). Float64 inputs compute in float64, everything else
accumulates in float32.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from fastalign.ops.stats import GradCoefficients, StatsOptions, TokenStats, accum_dtype

# Scratch tensors alive at once per tile element, in units of the accumulation dtype: the transformed tile,
# its exponentials and one product, plus the raw tile in the input dtype (counted separately).
_ACC_BUFFERS_PER_ELEMENT = 3
# On CPU, tiles of about 2 MiB per float32 buffer stay in cache: measured about 2x faster than whole-vocabulary
# row blocks at N=4096, D=512, V=32768 on a 2-core machine (fwd 0.8 s vs 1.5 s, bwd 2.1 s vs 3.7 s).
_CPU_TILE_ELEMENTS = 1 << 19


def _tiles(
    n_rows: int, n_cols: int, bytes_per_element: int, budget: int, device: torch.device
) -> Iterator[tuple[slice, slice, bool]]:
    """Yield ``(rows, cols, last_col_of_row_block)`` tiles of at most ``budget`` bytes of scratch.

    Tiles are square-ish: the matmul stays efficient and each row block adds into the weight gradient once,
    so the accumulation traffic falls as the row blocks grow.
    """
    elements = max(budget // bytes_per_element, 1)
    if device.type == "cpu":
        elements = min(elements, _CPU_TILE_ELEMENTS)
    row_block = max(1, min(n_rows, math.isqrt(elements)))
    col_block = max(1, min(n_cols, elements // row_block))
    for row_start in range(0, n_rows, row_block):
        rows = slice(row_start, min(n_rows, row_start + row_block))
        for col_start in range(0, n_cols, col_block):
            col_end = min(n_cols, col_start + col_block)
            yield rows, slice(col_start, col_end), col_end == n_cols


def _bytes_per_element(input_dtype: torch.dtype) -> int:
    acc_size = torch.empty((), dtype=accum_dtype(input_dtype)).element_size()
    return _ACC_BUFFERS_PER_ELEMENT * acc_size + torch.empty((), dtype=input_dtype).element_size()


def _transform(raw: torch.Tensor, opts: StatsOptions) -> torch.Tensor:
    """Raw tile (a fresh tensor, changed in place) -> transformed logits in the accumulation dtype."""
    logits = raw.to(accum_dtype(raw.dtype))
    if opts.softcap is not None:
        logits = logits.div_(opts.softcap).tanh_().mul_(opts.softcap)
    if opts.inv_temperature != 1.0:
        logits = logits.mul_(opts.inv_temperature)
    return logits


def _target_in_tile(targets: torch.Tensor, cols: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each row's target inside the tile (clamped) and whether the target is in the tile."""
    local = targets - cols.start
    inside = (local >= 0) & (local < cols.stop - cols.start)
    return local.clamp(0, cols.stop - cols.start - 1).unsqueeze(1), inside


def _stats_forward(raw_tile, n_rows: int, n_cols: int, targets, opts: StatsOptions, like: torch.Tensor):
    """Merge the tiles' statistics row block by row block. ``raw_tile(rows, cols)`` gives input-dtype logits.

    Per row the running state is the maximum ``m``, ``S = Σ e^(l-s)`` and ``A = Σ e^(l-s) (l-s)`` around the
    shift ``s = m`` (0 while the row has seen only -inf), so that ``entropy = log S - A / S``.
    """
    acc = accum_dtype(like.dtype)
    max_logit = torch.empty(n_rows, dtype=acc, device=like.device)
    log_sum = torch.empty_like(max_logit)
    target_logp = torch.empty_like(max_logit)
    entropy = torch.empty_like(max_logit) if opts.need_entropy else None
    sum_logits = torch.empty_like(max_logit) if opts.need_sum else None
    for rows, cols, row_done in _tiles(n_rows, n_cols, _bytes_per_element(like.dtype), opts.scratch_bytes, like.device):
        if cols.start == 0:
            n = rows.stop - rows.start
            run_max = torch.full((n,), -math.inf, dtype=acc, device=like.device)
            run_shift = torch.zeros_like(run_max)
            run_sum = torch.zeros_like(run_max)
            run_centered = torch.zeros_like(run_max)
            run_target = torch.zeros_like(run_max)
            run_total = torch.zeros_like(run_max)
        logits = _transform(raw_tile(rows, cols), opts)
        local, inside = _target_in_tile(targets[rows], cols)
        run_target += torch.where(inside, logits.gather(1, local).squeeze(1), 0.0)
        if opts.need_sum:
            run_total += logits.sum(dim=1)
        run_max = torch.maximum(run_max, logits.amax(dim=1))
        shift = torch.where(torch.isinf(run_max), 0.0, run_max)
        # Rows with nothing summed yet rescale by 0 (never inf * 0 when the new shift is very negative).
        rescale = torch.where(run_sum > 0, torch.exp(run_shift - shift), 0.0)
        if opts.need_entropy:
            run_centered = rescale * (run_centered + (run_shift - shift) * run_sum)
        exps = torch.exp(logits.sub_(shift.unsqueeze(1)))
        run_sum = run_sum * rescale + exps.sum(dim=1)
        if opts.need_entropy:
            run_centered += exps.mul_(torch.where(exps > 0, logits, 0.0)).sum(dim=1)
        run_shift = shift
        if row_done:
            row_log_sum = torch.log(run_sum)
            max_logit[rows] = shift
            log_sum[rows] = row_log_sum
            target_logp[rows] = (run_target - shift) - row_log_sum
            if opts.need_entropy:
                entropy[rows] = row_log_sum - run_centered / run_sum
            if opts.need_sum:
                sum_logits[rows] = run_total
    return TokenStats(max_logit, log_sum, target_logp, entropy, sum_logits)


def _tile_grad(
    raw, rows, cols, targets, max_logit, log_sum, coeffs: GradCoefficients, opts: StatsOptions
) -> torch.Tensor:
    """d loss / d raw logits for one tile, in the accumulation dtype."""
    logits = _transform(raw, opts)
    log_probs = (logits - max_logit[rows].unsqueeze(1)).sub_(log_sum[rows].unsqueeze(1))
    grad = torch.exp(log_probs)
    if coeffs.beta is not None:
        # Where p = 0 (a -inf logit) the log-prob term must vanish, not become 0 * inf.
        log_probs = torch.where(grad > 0, log_probs, 0.0)
        grad *= log_probs.mul_(coeffs.beta[rows].unsqueeze(1)).add_(coeffs.alpha[rows].unsqueeze(1))
    else:
        grad *= coeffs.alpha[rows].unsqueeze(1)
    if coeffs.kappa is not None:
        grad += coeffs.kappa[rows].unsqueeze(1)
    if coeffs.gamma is not None:
        local, inside = _target_in_tile(targets[rows], cols)
        grad.scatter_add_(1, local, torch.where(inside, coeffs.gamma[rows], 0.0).unsqueeze(1))
    if opts.softcap is not None:
        # d/dz softcap*tanh(z/softcap) = 1 - tanh², and tanh = logits / (softcap * inv_temperature).
        tanh = logits.mul_(1.0 / (opts.softcap * opts.inv_temperature))
        grad *= 1.0 - tanh.square_()
    if opts.inv_temperature != 1.0:
        grad *= opts.inv_temperature
    return grad


def _linear_tile(hidden, weight, bias, rows: slice, cols: slice) -> torch.Tensor:
    """``hidden[rows] @ weight[cols].T + bias[cols]`` in the input dtype, rounded once like eager ``F.linear``."""
    if bias is None:
        return hidden[rows] @ weight[cols].T
    return torch.addmm(bias[cols], hidden[rows], weight[cols].T)


def linear_forward(hidden, weight, bias, targets, opts: StatsOptions) -> TokenStats:
    """Statistics of ``hidden [N, D] @ weight[V, D].T + bias``."""

    def raw_tile(rows: slice, cols: slice) -> torch.Tensor:
        return _linear_tile(hidden, weight, bias, rows, cols)

    return _stats_forward(raw_tile, hidden.shape[0], weight.shape[0], targets, opts, hidden)


# Rows of ``out`` per product where a low-precision product is formed before it is added into a wider ``out``
# (CPU; CUDA without ``out_dtype``): bounds that temporary at about 2**22 elements.
_WIDENING_TEMP_ELEMENTS = 1 << 22
# Per device type: whether ``torch.addmm(..., out_dtype=float32)`` adds 16-bit products straight into a float32
# ``out`` (cuBLAS, float32 accumulation and output; CUDA only, and older torch refuses a float32 ``self``).
_WIDENING_ADDMM: dict[str, bool] = {}


def _widening_addmm(out: torch.Tensor, a: torch.Tensor) -> bool:
    if out.device.type != "cuda" or out.dtype != torch.float32 or a.dtype not in (torch.float16, torch.bfloat16):
        return False
    key = f"{out.device.type}:{a.dtype}"
    if key not in _WIDENING_ADDMM:
        probe_in = torch.zeros(1, 1, dtype=a.dtype, device=a.device)
        probe_out = torch.zeros(1, 1, dtype=torch.float32, device=out.device)
        try:
            torch.addmm(probe_out, probe_in, probe_in, out_dtype=torch.float32, out=probe_out)
            _WIDENING_ADDMM[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _WIDENING_ADDMM[key] = False
    return _WIDENING_ADDMM[key]


def add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, overwrite: bool = False) -> None:
    """``out += a @ b`` (``out = a @ b`` with ``overwrite``: ``out``'s old values, even NaN, are not read), with
    ``out`` possibly float32 for 16-bit ``a`` and ``b``.

    A wider ``out`` takes the product straight from cuBLAS where torch allows it (``out_dtype``); elsewhere the
    16-bit product is formed a block of rows at a time, so no temporary as large as ``out`` is made.
    """
    if out.dtype == a.dtype:
        if overwrite:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif _widening_addmm(out, a):
        torch.addmm(out, a, b, beta=0 if overwrite else 1, out_dtype=out.dtype, out=out)
    else:
        step = max(1, _WIDENING_TEMP_ELEMENTS // max(1, out.shape[1]))
        for start in range(0, out.shape[0], step):
            product = a[start : start + step] @ b
            if overwrite:
                out[start : start + step].copy_(product)
            else:
                out[start : start + step] += product


def linear_backward(
    hidden, weight, bias, targets, max_logit, log_sum, coeffs: GradCoefficients, needs, opts: StatsOptions
):
    """Gradients ``(d_hidden, d_weight, d_bias)`` (``None`` where not needed) from the per-token coefficients."""
    need_hidden, need_weight, need_bias = needs
    n_rows, n_cols = hidden.shape[0], weight.shape[0]
    acc = accum_dtype(hidden.dtype)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # Low-precision weight gradients sum over row blocks in the accumulation dtype.
    grad_weight = torch.zeros_like(weight, dtype=acc) if need_weight else None
    grad_bias = torch.zeros(n_cols, dtype=acc, device=weight.device) if need_bias else None
    for rows, cols, row_done in _tiles(
        n_rows, n_cols, _bytes_per_element(hidden.dtype), opts.scratch_bytes, hidden.device
    ):
        if cols.start == 0 and need_hidden:
            row_grad = torch.zeros(rows.stop - rows.start, hidden.shape[1], dtype=acc, device=hidden.device)
        raw = _linear_tile(hidden, weight, bias, rows, cols)
        grad = _tile_grad(raw, rows, cols, targets, max_logit, log_sum, coeffs, opts)
        if need_bias:
            grad_bias[cols] += grad.sum(dim=0)
        grad = grad.to(hidden.dtype)
        if need_hidden:
            add_matmul(row_grad, grad, weight[cols])
            if row_done:
                grad_hidden[rows] = row_grad
        if need_weight:
            add_matmul(grad_weight[cols], grad.T, hidden[rows])
    return (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(weight.dtype),
    )


def _copy_tile(logits: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
    """A fresh accumulation-dtype copy of a tile of the caller's logits (tiles are transformed in place)."""
    return logits[rows, cols].to(accum_dtype(logits.dtype), copy=True)


def logits_forward(logits, targets, opts: StatsOptions) -> TokenStats:
    """Statistics of ``logits [N, V]``."""

    def raw_tile(rows: slice, cols: slice) -> torch.Tensor:
        return _copy_tile(logits, rows, cols)

    return _stats_forward(raw_tile, logits.shape[0], logits.shape[1], targets, opts, logits)


def logits_backward(logits, targets, max_logit, log_sum, coeffs: GradCoefficients, opts: StatsOptions) -> torch.Tensor:
    """``d_logits [N, V]`` in the logits' dtype (written into ``logits`` itself with ``grad_into_logits``)."""
    # Every tile is copied out before its gradient is written back, so the gradient may overwrite the logits.
    grad_logits = logits if opts.grad_into_logits else torch.empty_like(logits)
    for rows, cols, _ in _tiles(
        logits.shape[0], logits.shape[1], _bytes_per_element(logits.dtype), opts.scratch_bytes, logits.device
    ):
        raw = _copy_tile(logits, rows, cols)
        grad_logits[rows, cols] = _tile_grad(raw, rows, cols, targets, max_logit, log_sum, coeffs, opts)
    return grad_logits

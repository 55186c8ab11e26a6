"""Device helpers shared by the Triton kernels: the index arithmetic of a split or slab tile and the tile store,
the logit transform and its gradient, the online softmax update, and the gradient of one logit tile. Tiles are
``[BLOCK_N rows, BLOCK_V columns]`` in float32.
"""

import os

import triton
import triton.language as tl

# Set before triton is imported: kernels then run in triton's CPU interpreter (tests without a GPU).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _tanh(x):
    # exp of a non-positive argument: no overflow, exact sign.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def split_tile(N, V, cols_per_split, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """The tile of a ``(token block, vocabulary split)`` program on the grid ``(GROUP_N × splits, token groups)``:
    its rows ``[BLOCK_N]``, their mask, the split's columns ``[col_start, col_stop)`` and the split's index.

    Programs run in grouped order: ``GROUP_N`` token blocks by every split, the token blocks fastest. A wave of
    concurrent programs then covers ``GROUP_N`` token blocks (their hidden rows, re-read for every vocabulary
    tile, stay in L2) and reads each weight tile ``GROUP_N`` times at nearly the same moment (one HBM read). The
    divisions are by the constexpr ``GROUP_N`` (a runtime divisor made ptxas spill the forward on sm_90). A
    program past the last token block (a short last group) gets no columns."""
    local = tl.program_id(0)
    first_row = (tl.program_id(1) * GROUP_N + local % GROUP_N) * BLOCK_N
    rows = first_row + tl.arange(0, BLOCK_N)
    split = local // GROUP_N
    col_start = split * cols_per_split
    col_stop = tl.where(first_row < N, tl.minimum(V, col_start + cols_per_split), col_start)
    return rows, rows < N, col_start, col_stop, split


@triton.jit
def slab_tile(N, V, col_offset, slab_cols, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    """The tile of a gradient program over the slab of columns ``[col_offset, col_offset + slab_cols)`` on the grid
    ``(GROUP_N × column tiles, token groups)``, in the grouped order of :func:`split_tile`: its rows, their mask,
    its columns within the slab and in the vocabulary, their mask, and its first row (a program whose first row
    is past ``N``, in a short last group, has nothing to do: the kernel returns)."""
    local = tl.program_id(0)
    first_row = (tl.program_id(1) * GROUP_N + local % GROUP_N) * BLOCK_N
    rows = first_row + tl.arange(0, BLOCK_N)
    local_cols = (local // GROUP_N) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_offset + local_cols
    return rows, rows < N, local_cols, cols, (local_cols < slab_cols) & (cols < V), first_row


@triton.jit
def grouped_tile(program, n_vocab_tiles, GROUP_N: tl.constexpr):
    """``(token tile, vocabulary tile)`` of the ``program``-th program of a 2D tile grid in grouped order:
    ``GROUP_N`` token tiles by every vocabulary tile, the token tiles fastest, groups one after another (the order
    of :func:`split_tile` over single tiles). For a fixed token tile the vocabulary tiles come in increasing
    program order, and for a fixed vocabulary tile the token tiles do: the ticket order of the deterministic
    tile backward. In a short last group the caller finds token tiles past the last: they have nothing to do."""
    per_group = GROUP_N * n_vocab_tiles
    group = program // per_group
    local = program - group * per_group
    return group * GROUP_N + local % GROUP_N, local // GROUP_N


@triton.jit
def store_tile(ptr, values, rows, cols, row_mask, col_mask, stride_row):
    """``ptr[rows, cols] = values`` in ``ptr``'s dtype (64-bit row offsets: big gradients pass 2^31 elements)."""
    tl.store(
        ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :],
        values.to(ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def transform_logits(z, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """``softcap * tanh(z / softcap)`` (when enabled), then times ``1 / temperature``."""
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z * inv_temperature


@triton.jit
def online_start(BLOCK_N: tl.constexpr):
    """The running statistics of :func:`online_update` before any tile: ``(max, sum, centered, total, target)``,
    each ``[BLOCK_N]`` float32."""
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_centered = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_target = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return run_max, run_sum, run_centered, run_total, run_target


@triton.jit
def online_update(logits, cols, col_mask, targets, stats, NEED_ENTROPY: tl.constexpr, NEED_SUM: tl.constexpr):
    """Fold one tile into the running per-row statistics ``stats`` (from :func:`online_start`).

    Around the shift ``s = run_max`` (0 while a row has seen only -inf): ``run_sum = Σ e^(l-s)`` and
    ``run_centered = Σ e^(l-s) (l-s)``, so that ``entropy = log(run_sum) - run_centered / run_sum``; ``run_total``
    sums the logits (with ``NEED_SUM``), ``run_target`` picks the target's logit.
    """
    run_max, run_sum, run_centered, run_total, run_target = stats
    is_target = (cols[None, :] == targets[:, None]) & col_mask[None, :]
    run_target += tl.sum(tl.where(is_target, logits, 0.0), 1)
    if NEED_SUM:
        run_total += tl.sum(tl.where(col_mask[None, :], logits, 0.0), 1)
    logits = tl.where(col_mask[None, :], logits, float("-inf"))
    old_shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    run_max = tl.maximum(run_max, tl.max(logits, 1))
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    # Rows with nothing summed yet rescale by 0 (never inf * 0 when the new shift is very negative).
    rescale = tl.where(run_sum > 0, tl.exp(old_shift - shift), 0.0)
    centered = logits - shift[:, None]
    exps = tl.exp(centered)
    if NEED_ENTROPY:
        run_centered = rescale * (run_centered + (old_shift - shift) * run_sum)
        run_centered += tl.sum(exps * tl.where(exps > 0, centered, 0.0), 1)
    run_sum = run_sum * rescale + tl.sum(exps, 1)
    return run_max, run_sum, run_centered, run_total, run_target


@triton.jit
def tile_grad(
    logits,
    rows,
    cols,
    row_mask,
    stat_ptrs,
    coef_ptrs,
    HAS_BETA: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    HAS_KAPPA: tl.constexpr,
):
    """Gradient with respect to the transformed logits ``l`` of one tile: ``d_l = p (α + β log p) + γ [j = y] + κ``.

    ``stat_ptrs``: ``(targets, max_logit, log_sum)``, ``coef_ptrs``: ``(α, β, γ, κ)``; each points at ``[N]``
    per-row values, read at ``rows``. ``log p = (l - max_logit) - log_sum``: no rounding at the magnitude of the
    logits. :func:`transform_grad` carries the result back to the raw logits.
    """
    targets_ptr, max_logit_ptr, log_sum_ptr = stat_ptrs
    alpha_ptr, beta_ptr, gamma_ptr, kappa_ptr = coef_ptrs
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    max_logit = tl.load(max_logit_ptr + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=row_mask, other=0.0)
    alpha = tl.load(alpha_ptr + rows, mask=row_mask, other=0.0)
    if HAS_BETA:
        beta = tl.load(beta_ptr + rows, mask=row_mask, other=0.0)
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + rows, mask=row_mask, other=0.0)
    if HAS_KAPPA:
        kappa = tl.load(kappa_ptr + rows, mask=row_mask, other=0.0)
    log_probs = (logits - max_logit[:, None]) - log_sum[:, None]
    probs = tl.exp(log_probs)
    if HAS_BETA:
        # Where p = 0 (a -inf logit) the log-prob term must vanish, not become 0 * inf.
        grad = probs * (alpha[:, None] + beta[:, None] * tl.where(probs > 0, log_probs, 0.0))
    else:
        grad = probs * alpha[:, None]
    if HAS_GAMMA:
        grad += tl.where(cols[None, :] == targets[:, None], gamma[:, None], 0.0)
    if HAS_KAPPA:
        grad += kappa[:, None]
    return grad


@triton.jit
def transform_grad(grad, logits, softcap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """The chain rule through :func:`transform_logits`: ``grad`` (w.r.t. the transformed ``logits``) w.r.t. ``z``."""
    if HAS_SOFTCAP:
        tanh = logits / (softcap * inv_temperature)
        grad = grad * (1.0 - tanh * tanh)
    return grad * inv_temperature


def autotune_configs(gpu_configs: list, interpreter_config: triton.Config) -> list:
    """Triton's interpreter cannot benchmark, so it gets one (small) config; GPUs get the whole list."""
    return [interpreter_config] if INTERPRETING else gpu_configs


def autotune_bucket(tokens: int) -> int:
    """The autotune key of a row length: the next power of two of ``tokens``, clamped to ``[256, 8192]`` (the
    block sizes the row kernels tile with). Every length in one bucket shares one tuning, so a new completion
    length each GRPO step does not re-benchmark the configs."""
    return min(max(1 << max(tokens - 1, 0).bit_length(), 256), 8192)

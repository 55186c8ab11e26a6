"""Per-token softmax statistics: the one differentiable primitive every log-prob op is built from.

For each token row ``i`` with transformed logits ``l_i = T(z_i)`` (``z = hidden @ weight.T + bias``, or given
logits; ``T`` applies softcap and temperature) the backends compute

* ``lse_i = log Σ_j exp(l_ij)``,
* ``target_logp_i = l_{i, y_i} − lse_i``, formed as ``(l_{i, y_i} − m_i) − log Σ_j exp(l_ij − m_i)`` around the
  row maximum ``m_i`` so that no rounding happens at the magnitude of the logits (as eager ``log_softmax``),
* ``entropy_i = −Σ_j p_ij log p_ij`` (optional),
* ``sum_logits_i = Σ_j l_ij`` (optional; for label smoothing),
* ``is_top1_i`` (optional, no gradient): whether the target's log-prob is the row's largest, ``−log Σ_j e^(l_ij −
  m_i)``; derived from the same sweep (see :func:`target_is_top1`).

Log-probs and cross-entropy are cheap ``[N]``-sized expressions of these, so autograd composes any later
computation on top. Whatever the upstream gradients, the gradient with respect to the logits has the form
``d_l_ij = p_ij (α_i + β_i log p_ij) + γ_i [j = y_i] + κ_i``, which each backend evaluates tile by tile without
storing ``[N, V]``. The entropy is accumulated as ``log S − Σ e^(l−m) (l−m) / S`` around the running maximum
``m`` rather than as ``lse − E_p[l]``, which would cancel catastrophically for large logits.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other input dtype accumulates (and returns) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TileBackward(NamedTuple):
    """The Triton backend's tile backward (:func:`fastalign.set_linear_backward`): one launch over every (token
    tile, vocabulary tile), both gradient dots added into float32 in the kernel.

    ``grad_filter``: a tile whose largest ``|d loss / d logit|`` is not above it adds nothing (0.0, the default:
    only all-zero tiles, exact). ``deterministic``: the adds run in a fixed order (bit-identical run to run).
    """

    grad_filter: float = 0.0
    deterministic: bool = False


@dataclass(frozen=True)
class StatsOptions:
    inv_temperature: float
    softcap: float | None
    need_entropy: bool
    need_sum: bool
    scratch_bytes: int
    # Logits input only: the backward writes d_logits into the logits' own storage.
    grad_into_logits: bool = False
    # LinearStats only: also return is_top1 (derived from the statistics every backend returns).
    need_top1: bool = False
    # LinearStats on the Triton backend only: the tile backward in place of the slabs (None: slabs).
    tile_backward: TileBackward | None = None

    def stats_buffer(self, logits: torch.Tensor) -> tuple[torch.Tensor, TokenStats]:
        """float32 ``[5, N]`` for a logits kernel to write, and its rows as the ``TokenStats`` they become (max
        logit, log-sum, target log-prob, entropy and logit sum; the last two ``None`` unless asked for)."""
        stats = torch.empty(5, logits.shape[0], dtype=torch.float32, device=logits.device)
        entropy, sum_logits = stats[3] if self.need_entropy else None, stats[4] if self.need_sum else None
        return stats, TokenStats(stats[0], stats[1], stats[2], entropy, sum_logits)

    def grad_buffer(self, logits: torch.Tensor) -> torch.Tensor:
        """Where a logits kernel writes ``d_logits [N, V]``: the logits themselves with ``grad_into_logits``,
        else a new tensor of their dtype whose rows are aligned as theirs are (:func:`aligned_like`)."""
        if self.grad_into_logits:
            return logits
        return aligned_like(logits)


# Row strides of a new gradient agree with the logits' modulo this many elements: 16 bytes for every dtype of at
# least one byte, and the divisibility by 16 that Triton specialises a stride argument on.
_STRIDE_MODULUS = 16
_ACCESS_BYTES = 16


def aligned_like(rows: torch.Tensor) -> torch.Tensor:
    """A new, uninitialised tensor shaped like ``rows [N, V]`` (unit column stride) whose every row starts at the
    same address modulo 16 bytes as the same row of ``rows``.

    A kernel that reads one and writes the other can then use 16-byte accesses on both for every row. A fresh
    contiguous tensor does not have that when ``rows`` are a slice (``logits[:, :151665]`` of a vocabulary padded
    to 151936: 7 rows in 8 would start at a different offset), so the new rows take a stride congruent to theirs
    (at most 15 elements of padding per row) and the storage the same leading offset. Contiguous whenever that
    already holds, as for contiguous ``rows`` at an aligned address.
    """
    n_rows, n_cols = rows.shape
    like = {"dtype": rows.dtype, "device": rows.device}
    source_stride = rows.stride(0) if n_rows > 1 else n_cols
    stride = n_cols + (source_stride - n_cols) % _STRIDE_MODULUS
    esize = rows.element_size()
    if rows.numel() == 0 or rows.stride(1) != 1 or (stride == n_cols and rows.data_ptr() % _ACCESS_BYTES == 0):
        return torch.empty(rows.shape, **like)
    slack = _ACCESS_BYTES // esize
    storage = torch.empty(slack + (n_rows - 1) * stride + n_cols, **like)
    offset = ((rows.data_ptr() - storage.data_ptr()) % _ACCESS_BYTES) // esize
    return storage.as_strided(rows.shape, (stride, 1), offset)


class TokenStats(NamedTuple):
    """What a backend's forward returns, each ``[N]`` in the accumulation dtype.

    ``max_logit``: the row maximum ``m`` (0 for a row of only -inf); ``log_sum``: ``log Σ_j exp(l_j − m)``;
    ``target_logp``: ``(l_y − m) − log_sum``; ``entropy`` and ``sum_logits`` when asked for, else ``None``.
    """

    max_logit: torch.Tensor
    log_sum: torch.Tensor
    target_logp: torch.Tensor
    entropy: torch.Tensor | None
    sum_logits: torch.Tensor | None


def empty_stats(like: torch.Tensor, opts: StatsOptions) -> TokenStats:
    """The statistics of zero rows."""
    empty = torch.empty(0, dtype=accum_dtype(like.dtype), device=like.device)
    return TokenStats(empty, empty, empty, empty if opts.need_entropy else None, empty if opts.need_sum else None)


def row_major(logits: torch.Tensor) -> torch.Tensor:
    """``logits [N, V]`` with a unit column stride, as the logits kernels read them (rows may be strided)."""
    return logits if logits.stride(1) == 1 else logits.contiguous()


class GradCoefficients(NamedTuple):
    """Per-token coefficients of ``d_l = p (α + β log p) + γ [j = y] + κ``; ``None`` means zero."""

    alpha: torch.Tensor
    beta: torch.Tensor | None
    gamma: torch.Tensor | None
    kappa: torch.Tensor | None


_BACKEND_MODULES = {
    "torch": "fastalign.ops._torch_backend",
    "triton": "fastalign.ops._triton_backend",
    "cuda": "fastalign.ops._cuda_backend",
}


def backend_module(name: str) -> ModuleType:
    """The module implementing ``logits_forward/backward`` (and, but for cuda, ``linear_forward/backward``)."""
    return importlib.import_module(_BACKEND_MODULES[name])


def _coefficients(entropy, g_lse, g_target, g_entropy, g_sum) -> GradCoefficients | None:
    if g_lse is None and g_target is None and g_entropy is None and g_sum is None:
        return None
    reference = next(g for g in (g_lse, g_target, g_entropy, g_sum) if g is not None)
    alpha = torch.zeros_like(reference) if g_lse is None else g_lse
    if g_target is not None:
        # d target_logp / d l_j = [j = y] - p_j
        alpha = alpha - g_target
    beta = None
    if g_entropy is not None:
        # d entropy / d l_j = -p_j (log p_j + entropy)
        alpha = alpha - g_entropy * entropy
        beta = -g_entropy
    # Upstream gradients may be expanded views (stride 0); kernels index them densely.
    return GradCoefficients(*(None if g is None else g.contiguous() for g in (alpha, beta, g_target, g_sum)))


def _outputs(stats: TokenStats) -> tuple[torch.Tensor, ...]:
    empty = stats.log_sum.new_empty(0)
    return (
        stats.max_logit + stats.log_sum,
        stats.target_logp,
        empty if stats.entropy is None else stats.entropy,
        empty if stats.sum_logits is None else stats.sum_logits,
    )


def target_is_top1(stats: TokenStats) -> torch.Tensor:
    """``[N]`` bool: whether the target's log-prob equals the row's largest log-prob ``(m − m) − log_sum``.

    Every backend forms ``target_logp = (l_y − m) − log_sum`` from the same logit values that give ``m``, so a
    target whose logit is the row maximum gives exactly ``−log_sum``: a target tied with the maximum counts as
    top-1, whatever the tied columns' order, and so does one within float rounding of it (``|l_y − m|`` below half
    a unit in the last place of ``log_sum``). Mathematically ``target_logp <= −log_sum``; NaN rows give False.
    """
    return stats.target_logp >= -stats.log_sum


class LinearStats(torch.autograd.Function):
    """``(hidden [N, D], weight [V, D], bias [V] | None, targets [N] in [0, V))`` -> ``[N]`` each of lse,
    target_logp, entropy (empty unless asked for), sum_logits (idem), and, only with ``opts.need_top1``, a fifth
    output ``is_top1`` (bool, :func:`target_is_top1`, no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, backend: str, opts: StatsOptions):
        impl = backend_module(backend)
        stats = impl.linear_forward(hidden, weight, bias, targets, opts)
        ctx.impl, ctx.opts = impl, opts
        ctx.save_for_backward(hidden, weight, bias, targets, stats.max_logit, stats.log_sum, stats.entropy)
        ctx.set_materialize_grads(False)
        if not opts.need_top1:
            return _outputs(stats)
        is_top1 = target_is_top1(stats)
        ctx.mark_non_differentiable(is_top1)
        return (*_outputs(stats), is_top1)

    @staticmethod
    def backward(ctx, g_lse, g_target, g_entropy, g_sum, *_g_top1):
        hidden, weight, bias, targets, max_logit, log_sum, entropy = ctx.saved_tensors
        coeffs = _coefficients(entropy, g_lse, g_target, g_entropy, g_sum)
        needs = ctx.needs_input_grad[:3]
        if coeffs is None or not any(needs):
            return None, None, None, None, None, None
        grads = ctx.impl.linear_backward(hidden, weight, bias, targets, max_logit, log_sum, coeffs, needs, ctx.opts)
        return *grads, None, None, None


class LogitsStats(torch.autograd.Function):
    """``(logits [N, V], targets [N] in [0, V))`` -> the same four outputs as :class:`LinearStats`."""

    @staticmethod
    def forward(ctx, logits, targets, backend: str, opts: StatsOptions):
        impl = backend_module(backend)
        stats = impl.logits_forward(logits, targets, opts)
        ctx.impl, ctx.opts = impl, opts
        ctx.save_for_backward(logits, targets, stats.max_logit, stats.log_sum, stats.entropy)
        ctx.set_materialize_grads(False)
        return _outputs(stats)

    @staticmethod
    def backward(ctx, g_lse, g_target, g_entropy, g_sum):
        logits, targets, max_logit, log_sum, entropy = ctx.saved_tensors
        coeffs = _coefficients(entropy, g_lse, g_target, g_entropy, g_sum)
        if coeffs is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad = ctx.impl.logits_backward(logits, targets, max_logit, log_sum, coeffs, ctx.opts)
        return grad, None, None, None

"""Vocabulary parallelism: the log-prob statistics of a vocabulary sharded across the ranks of a process group.

Rank ``r`` holds rows ``[start_r, start_r + V_r)`` of the lm_head weight (and bias); the shards tile the whole
vocabulary ``[0, V)`` in any rank order. ``hidden`` and ``targets`` are the same on every rank. Each rank runs the
ordinary backend on its shard with the targets mapped to local ids (targets elsewhere read column 0, and their
contribution is dropped), which gives per token its shard's maximum ``m_r``, ``ls_r = log Σ_{j∈r} e^(l_j − m_r)``,
the target's local log-prob ``t_r``, the shard's own entropy ``H_r`` and logit sum ``S_r``. One all-gather of
these ``[N]`` rows (plus the shard size) lets every rank form the global statistics, identically:

* ``M = max_r m_r``, ``a_r = (m_r − M) + ls_r`` (the log of shard ``r``'s mass), ``L = logsumexp_r a_r``, and
  ``lse = M + L``; ``log w_r = a_r − L`` is the log of the probability mass on shard ``r``;
* ``target_logp = t_o + log w_o`` for the shard ``o`` that owns the target;
* ``entropy = Σ_r w_r (H_r − log w_r)`` (every term is >= 0: no cancellation at large logits);
* ``sum_logits = Σ_r S_r`` and ``V = Σ_r V_r``.

With one rank every combination is exact (``M = m``, ``log w = 0``), so a group of size 1 reproduces the
single-process op bit for bit.

The backward needs no gathered statistics: the gradient of each logit is ``p_j (α + β log p_j) + γ [j = y] + κ``
with the *global* ``p`` and the per-token coefficients, which are the same on every rank because every rank
computes the same loss from the same outputs. So the backend's own backward runs on the shard with the global
row maximum ``M`` and log-sum ``L`` in place of the local ones (and ``γ`` kept only where this rank owns the
target); it yields this shard's ``d_weight`` / ``d_bias`` and this shard's part of ``d_hidden``, which is
all-reduced (summed) over the group so that every rank ends with the full ``d_hidden``.

Communication per call: forward, one all-gather of ``k·N + 1`` values per rank in the accumulation dtype
(``k`` = 4, plus one each for the entropy and the logit sum when asked for); backward, one all-reduce of
``d_hidden`` ``[N, D]`` in the input dtype. Argument checks that need the other ranks' shard bounds (CPU tensors
always, GPU tensors with ``FASTALIGN_CHECK_TARGETS=1``, as for the target values) add one all-gather of two
int64 per rank and a host sync.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastalign.ops._checks import check_number
from fastalign.ops.stats import StatsOptions, _coefficients, accum_dtype, backend_module

# Shard sizes travel inside the (float32) statistics all-gather, which holds integers exactly up to 2**24; the
# global vocabulary, their sum, is exact below 2**24 as well.
MAX_SHARD_ROWS = 1 << 24


def check_process_group(process_group: object, vocab_start: object, shard_rows: int) -> None:
    """Local checks of the vocabulary-parallel arguments (the same on every rank when the ranks agree)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group was given but torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first (or pass process_group=None for a single process)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )
    check_number(
        "vocab_start", vocab_start, integer=True, at_least=0, why="the vocabulary id of this rank's first weight row"
    )
    if shard_rows > MAX_SHARD_ROWS:
        raise ValueError(f"a vocab-parallel weight shard holds at most 2**24 rows, got V_local = {shard_rows}")


def global_vocab_size(process_group: dist.ProcessGroup, vocab_start: int, shard_rows: int, device) -> int:
    """Gather every rank's shard bounds, check that they tile ``[0, V)`` exactly, and return ``V``.

    A collective with a host sync: every rank of the group must call it, and every rank raises the same error.
    """
    bounds = torch.tensor([vocab_start, shard_rows], dtype=torch.int64, device=device)
    ranks = _all_gather_rows(bounds, process_group).tolist()
    expected_start = 0
    for start, rows in sorted(ranks):
        if start != expected_start:
            layout = ", ".join(f"rank {rank}: [{a}, {a + n})" for rank, (a, n) in enumerate(ranks))
            problem = "a gap" if start > expected_start else "an overlap"
            raise ValueError(
                f"the weight shards (vocab_start, V_local) of the process group must tile the vocabulary [0, V) "
                f"without gaps or overlaps; {problem} at id {min(start, expected_start)} ({layout})"
            )
        expected_start = start + rows
    return expected_start


def _all_gather_rows(values: torch.Tensor, process_group: dist.ProcessGroup) -> torch.Tensor:
    """``[numel]`` on each rank -> ``[ranks, numel]`` in group-rank order."""
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(parts, values, group=process_group)
    return torch.stack(parts)


def _combine(gathered: torch.Tensor, n_tokens: int, opts: StatsOptions) -> dict[str, torch.Tensor | None]:
    """The global statistics from every rank's packed ``[k·N + 1]`` local ones (see the module docstring)."""
    n_ranks = gathered.shape[0]
    vocab_size = gathered[:, -1].sum()
    rows = gathered[:, :-1].reshape(n_ranks, 4 + int(opts.need_entropy) + int(opts.need_sum), n_tokens)
    max_logit, log_sum, target, owns = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3] > 0
    # A shard row without mass (all its logits -inf) reports m = 0; it must not raise the global maximum.
    max_logit = torch.where(log_sum == -torch.inf, -torch.inf, max_logit)
    global_max = max_logit.amax(dim=0)
    global_max = torch.where(torch.isinf(global_max), 0.0, global_max)
    shard_log_mass = (max_logit - global_max) + log_sum
    global_log_sum = torch.logsumexp(shard_log_mass, dim=0)
    log_weight = shard_log_mass - global_log_sum
    out = {
        "max_logit": global_max,
        "log_sum": global_log_sum,
        "lse": global_max + global_log_sum,
        "target_logp": torch.where(owns, target + log_weight, 0.0).sum(dim=0),
        "owned": owns.any(dim=0),
        "vocab_size": vocab_size,
        "entropy": None,
        "sum_logits": None,
    }
    extra = 4
    if opts.need_entropy:
        weight = torch.exp(log_weight)
        out["entropy"] = torch.where(weight > 0, weight * (rows[:, extra] - log_weight), 0.0).sum(dim=0)
        extra += 1
    if opts.need_sum:
        out["sum_logits"] = rows[:, extra].sum(dim=0)
    return out


class VocabParallelLinearStats(torch.autograd.Function):
    """``(hidden [N, D], weight shard [V_r, D], bias shard [V_r] | None, local targets [N], owns [N] bool)`` ->
    global ``[N]`` lse, target_logp (0 where no rank owns the target), entropy and sum_logits (empty unless asked
    for), then ``owned [N]`` (bool) and ``vocab_size`` (0-d), which carry no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, owns, backend: str, opts: StatsOptions, process_group):
        impl = backend_module(backend)
        stats = impl.linear_forward(hidden, weight, bias, targets, opts)
        acc = accum_dtype(hidden.dtype)
        rows = [stats.max_logit, stats.log_sum, torch.where(owns, stats.target_logp, 0.0), owns.to(acc)]
        rows += [s for s in (stats.entropy, stats.sum_logits) if s is not None]
        shard_rows = torch.full((1,), weight.shape[0], dtype=acc, device=hidden.device)  # a fill: no host copy
        packed = torch.cat([torch.stack(rows).reshape(-1), shard_rows])
        out = _combine(_all_gather_rows(packed, process_group), hidden.shape[0], opts)
        ctx.impl, ctx.opts, ctx.process_group = impl, opts, process_group
        ctx.save_for_backward(hidden, weight, bias, targets, owns, out["max_logit"], out["log_sum"], out["entropy"])
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out["owned"], out["vocab_size"])
        empty = out["lse"].new_empty(0)
        return (
            out["lse"],
            out["target_logp"],
            empty if out["entropy"] is None else out["entropy"],
            empty if out["sum_logits"] is None else out["sum_logits"],
            out["owned"],
            out["vocab_size"],
        )

    @staticmethod
    def backward(ctx, g_lse, g_target, g_entropy, g_sum, _g_owned, _g_vocab):
        hidden, weight, bias, targets, owns, max_logit, log_sum, entropy = ctx.saved_tensors
        coeffs = _coefficients(entropy, g_lse, g_target, g_entropy, g_sum)
        needs = ctx.needs_input_grad[:3]
        if coeffs is None or not any(needs):
            return (None,) * 8
        if coeffs.gamma is not None:
            # The [j = y] term lives on the owner's shard only; elsewhere the local id 0 is a placeholder.
            coeffs = coeffs._replace(gamma=torch.where(owns, coeffs.gamma, 0.0))
        grad_hidden, grad_weight, grad_bias = ctx.impl.linear_backward(
            hidden, weight, bias, targets, max_logit, log_sum, coeffs, needs, ctx.opts
        )
        if grad_hidden is not None:
            # hidden is replicated: its gradient is the sum of every shard's part.
            dist.all_reduce(grad_hidden, group=ctx.process_group)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None

"""Public log-prob ops: per-token log-probs and entropy of target tokens, from hidden states or from logits."""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastalign.ops._checks import (
    check_inplace_target,
    check_linear_inputs,
    check_logits_inputs,
    check_scalar_options,
    check_target_values,
    target_values_checked,
)
from fastalign.ops.dispatch import resolve_backend, scratch_budget, tile_backward
from fastalign.ops.stats import LinearStats, LogitsStats, StatsOptions
from fastalign.ops.vocab_parallel import VocabParallelLinearStats, check_process_group, global_vocab_size


class PreparedTargets:
    """Flattened targets split into what the kernels read and what the outputs are masked with.

    ``safe`` holds in-range ids only (ignored and out-of-range positions read column 0), ``valid`` marks
    non-ignored positions, ``local`` the non-ignored ones in range, and ``out_of_range`` marks unchecked bad ids
    (GPU tensors), whose outputs become NaN. With ``vocab_start`` (vocabulary parallelism) the kernels see a shard
    of ``vocab_size`` rows starting at that id: ``safe`` holds ``target - vocab_start`` and ``local`` marks the
    targets in this shard (the vocab-parallel op then sets ``out_of_range`` and the global ``vocab_size``).
    """

    def __init__(self, targets: torch.Tensor, vocab_size: int, ignore_index: int, vocab_start: int = 0):
        flat = targets.reshape(-1)
        self.shape = targets.shape
        self.vocab_size: int | torch.Tensor = vocab_size
        self.valid = flat != ignore_index
        ids = flat - vocab_start if vocab_start else flat
        self.local = self.valid & (ids >= 0) & (ids < vocab_size)
        self.out_of_range = self.valid & ~self.local
        self.safe = torch.where(self.local, ids, 0).long().contiguous()

    def finish(self, per_token: torch.Tensor) -> torch.Tensor:
        """Zero at ignored positions (no gradient there), NaN at out-of-range ones, reshaped like targets."""
        per_token = torch.where(self.valid, per_token, 0.0)
        per_token = torch.where(self.out_of_range, float("nan"), per_token)
        return per_token.reshape(self.shape)


def _prepare(
    targets,
    vocab_size,
    like,
    *,
    temperature,
    softcap,
    ignore_index,
    need_entropy,
    need_sum,
    backend,
    op,
    grad_into_logits=False,
    process_group=None,
    vocab_start=0,
    need_top1=False,
) -> tuple[PreparedTargets, StatsOptions, str]:
    """Checks shared by every op after the input-specific ones: options, target values, backend.

    With a ``process_group``, ``vocab_size`` is this rank's shard and the target values are checked against the
    global vocabulary, whose size (and the shards' layout) a collective establishes when the checks run.
    """
    check_scalar_options(temperature, softcap, ignore_index)
    if process_group is None:
        check_target_values(targets, vocab_size, ignore_index)
    elif target_values_checked(targets.device):
        full_vocab = global_vocab_size(process_group, vocab_start, vocab_size, like.device)
        check_target_values(targets, full_vocab, ignore_index)
    backend = resolve_backend(backend, like.device, like.dtype, op)
    opts = StatsOptions(
        inv_temperature=1.0 / float(temperature),
        softcap=None if softcap is None else float(softcap),
        need_entropy=need_entropy,
        need_sum=need_sum,
        scratch_bytes=scratch_budget(like.device),
        grad_into_logits=grad_into_logits,
        need_top1=need_top1,
        # A choice among the Triton backend's linear backwards: the other backends have one each.
        tile_backward=tile_backward() if backend == "triton" and op == "linear_stats" else None,
    )
    return PreparedTargets(targets, vocab_size, ignore_index, vocab_start), opts, backend


def _logprob_outputs(target_logp, entropy, prepared: PreparedTargets, return_entropy: bool):
    logp = prepared.finish(target_logp)
    if not return_entropy:
        return logp
    return logp, prepared.finish(entropy.clamp_min(0.0))


def linear_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    need_entropy: bool,
    need_sum: bool,
    backend: str,
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    need_top1: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> tuple[tuple[torch.Tensor, ...], PreparedTargets]:
    """Checked entry to :class:`LinearStats` (to :class:`VocabParallelLinearStats` with a ``process_group``):
    returns ``((lse, target_logp, entropy, sum_logits), PreparedTargets)``, each statistic ``[N]`` (``N`` =
    ``targets.numel()``) in the accumulation dtype (float32; float64 for float64 inputs), ``entropy`` /
    ``sum_logits`` empty unless asked for. Like the targets the kernels read (``PreparedTargets.safe``), these
    are unmasked: callers mask them with ``PreparedTargets`` (e.g. :meth:`PreparedTargets.finish`).

    ``temperature``, ``softcap``, ``ignore_index``, ``process_group`` and ``vocab_start`` mean what they mean for
    :func:`linear_logprobs`. With a ``process_group`` the statistics are those of the whole vocabulary, the same
    on every rank, and ``PreparedTargets.vocab_size`` is the global size.

    With ``need_top1=True`` the statistics gain a fifth entry, ``is_top1`` ``[N]`` bool (no gradient): whether the
    target is the row's most likely token, False at ignored and out-of-range positions. It comes from the same
    sweep (no extra pass over the vocabulary; torch and triton backends alike) as
    ``target_logp == −log Σ_j e^(l_j − max_j l_j)`` (:func:`fastalign.ops.stats.target_is_top1`), so a target
    tied with the row maximum counts as top-1 whatever the tied columns' order (``argmax == target`` picks the
    first of them). Not available with a ``process_group`` (the shards' rounding of the gathered log-probs hides
    exact equality).
    """
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    if not isinstance(need_top1, bool):
        raise ValueError(f"need_top1 must be a bool, got {need_top1!r}")
    if need_top1 and process_group is not None:
        raise ValueError("need_top1=True is not supported with a process_group (vocabulary parallelism); got both")
    if process_group is None:
        if vocab_start != 0:
            raise ValueError(f"vocab_start={vocab_start!r} needs a process_group (vocabulary parallelism); got None")
    else:
        check_process_group(process_group, vocab_start, weight.shape[0])
    prepared, opts, backend = _prepare(
        targets,
        weight.shape[0],
        hidden,
        need_entropy=need_entropy,
        need_sum=need_sum,
        backend=backend,
        op="linear_stats",
        process_group=process_group,
        vocab_start=vocab_start,
        need_top1=need_top1,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
    )
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    if process_group is None:
        stats = LinearStats.apply(flat_hidden, weight, bias, prepared.safe, backend, opts)
        if need_top1:
            # Ignored and out-of-range positions read column 0: their flag means nothing.
            stats = (*stats[:4], stats[4] & prepared.local)
        return stats, prepared
    *stats, owned, prepared.vocab_size = VocabParallelLinearStats.apply(
        flat_hidden, weight, bias, prepared.safe, prepared.local, backend, opts, process_group
    )
    # A valid target that no shard holds is out of range (only possible when the checks did not run).
    prepared.out_of_range = prepared.valid & ~owned
    return tuple(stats), prepared


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    process_group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (and entropy) of each target token, straight from hidden states and the lm_head weight.

    The logits ``z = hidden @ weight.T + bias`` are never materialised: the chosen backend visits them in
    vocabulary tiles. With ``softcap`` the logits become ``softcap * tanh(z / softcap)``; then they are divided
    by ``temperature``. ``logp`` is the log-softmax at the target, ``entropy`` is ``-Σ p log p`` of the same
    distribution.

    Args:
        hidden: ``[..., D]`` float16/bfloat16/float32/float64.
        weight: ``[V, D]``, same dtype and device as ``hidden``.
        targets: ``[...]`` integer ids in ``[0, V)`` or ``ignore_index``; shape is ``hidden.shape[:-1]``.
        bias: optional ``[V]``.
        temperature: > 0. softcap: ``None`` or > 0.
        ignore_index: positions with this target get 0 and pass no gradient.
        return_entropy: also return the entropy.
        backend: ``"auto" | "torch" | "triton" | "cuda"``.
        process_group: vocabulary parallelism (see :mod:`fastalign.ops.vocab_parallel`): ``weight`` ``[V_local,
            D]`` (and ``bias``) hold rows ``[vocab_start, vocab_start + V_local)`` of the full vocabulary, the
            shards of the group's ranks tile it; ``hidden`` and ``targets`` (full-vocabulary ids) are the same on
            every rank. Every rank gets the same outputs; the backward gives every rank the full ``hidden``
            gradient (all-reduced inside the op) and the gradient of its own ``weight`` / ``bias`` shard. All
            ranks must call the op together and compute the same loss from its outputs.
        vocab_start: this rank's first vocabulary id (an int >= 0); only with ``process_group``.

    Returns:
        ``logp`` (or ``(logp, entropy)``), shaped like ``targets``, float32 (float64 for float64 inputs),
        differentiable with respect to ``hidden``, ``weight`` and ``bias``.

    Example:
        >>> import torch, fastalign
        >>> hidden, weight = torch.randn(2, 5, 16), torch.randn(100, 16)
        >>> targets = torch.randint(0, 100, (2, 5))
        >>> fastalign.linear_logprobs(hidden, weight, targets).shape
        torch.Size([2, 5])
    """
    transform = {"temperature": temperature, "softcap": softcap, "ignore_index": ignore_index}
    parallel = {"process_group": process_group, "vocab_start": vocab_start}
    needs = {"need_entropy": return_entropy, "need_sum": False, "backend": backend}
    (_, target_logp, entropy, _), prepared = linear_stats(
        hidden, weight, bias, targets, **needs, **transform, **parallel
    )
    return _logprob_outputs(target_logp, entropy, prepared, return_entropy)


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob (and entropy) of each target token from given logits ``[..., V]``.

    Same transform, outputs and gradients as :func:`linear_logprobs`, for callers that already hold the logits.
    Unlike ``log_softmax(logits.float())`` it never allocates a float32 copy of the whole logits.

    With ``inplace_backward=True`` the backward writes ``d_logits`` into the logits' own storage instead of a new
    ``[..., V]`` buffer (saving that much memory): use it only when nothing else reads the logits after this
    op's backward. Autograd's version counter is bumped, so a graph that saved the same logits elsewhere raises
    rather than silently using the overwritten values. Logits whose ``[N, V]`` rows share memory (an ``expand``-ed
    or overlapping ``as_strided`` view) are refused with it: one row's gradient would overwrite another's logits.

    Example:
        >>> import torch, fastalign
        >>> logits, targets = torch.randn(3, 7, 50), torch.randint(0, 50, (3, 7))
        >>> logp, entropy = fastalign.logprobs_from_logits(logits, targets, temperature=0.7, return_entropy=True)
    """
    logits, targets = check_logits_inputs(logits, targets)
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    vocab_size = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab_size)  # what the backends read and, in place, overwrite
    if inplace_backward:
        check_inplace_target("logits", flat_logits)
    transform = {"temperature": temperature, "softcap": softcap, "ignore_index": ignore_index}
    needs = {"need_entropy": return_entropy, "need_sum": False, "grad_into_logits": inplace_backward}
    prepared, opts, backend = _prepare(
        targets, vocab_size, logits, **transform, **needs, backend=backend, op="logits_stats"
    )
    _, target_logp, entropy, _ = LogitsStats.apply(flat_logits, prepared.safe, backend, opts)
    return _logprob_outputs(target_logp, entropy, prepared, return_entropy)

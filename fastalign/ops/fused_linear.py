"""Losses over ``hidden @ weight.T`` whose gradient is formed during the forward sweep.

When a loss is the last step (a scalar that ``backward()`` is called on), the gradient of every token's logits
is known as soon as the token's softmax statistics are: the upstream gradient is a single scalar. So instead of
a forward sweep over the vocabulary and a second one in the backward (recomputing the logits: 8·N·D·V flops),
:func:`fused_linear_loss` walks the tokens in chunks whose logits fit the scratch budget, materialises a
chunk's logits once, turns them into their gradient in place, and that straight into ``d_hidden`` rows and
``d_weight`` / ``d_bias`` contributions (6·N·D·V flops). ``backward()`` then only scales the stored gradients by
the upstream scalar.

A chunk holds one ``[tokens, V]`` buffer in the input dtype (the logits, then their gradient), as many tokens as
the scratch budget holds. Each chunk adds ``gradᵀ @ rows`` into the float32 weight gradient (for 16-bit inputs;
on CUDA straight from cuBLAS with ``out_dtype``), reading and writing all ``V × D`` of it, so fewer, larger chunks
move less: the update stays compute-bound while a chunk has at least ``4 × peak FLOP/s ÷ HBM bytes/s`` tokens
(≈ 1200 on an H100, ≈ 820 on an H200), whatever ``V`` and ``D`` are (``python -m bench.roofline``).

A loss must be a sum over *units* — sets of tokens whose part of the loss depends on their own statistics only:
single tokens for cross-entropy and the token-level policy loss, whole sequences for GSPO, chosen/rejected pairs
for DPO. Units are never split; a unit whose logits do not fit the budget is processed in two sweeps (statistics,
then the recomputed gradient), which is still exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fastalign.ops._checks import check_linear_inputs
from fastalign.ops._torch_backend import add_matmul
from fastalign.ops.logprobs import PreparedTargets, _prepare
from fastalign.ops.stats import LinearStats, LogitsStats, StatsOptions, accum_dtype


@dataclass(frozen=True)
class ChunkStats:
    """Per-token statistics of one chunk, ``[n]`` each, differentiable: log-prob of the target (0 where
    ignored), entropy and logit sum (``None`` unless asked for), logsumexp, and the non-ignored mask."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    sum_logits: torch.Tensor | None
    lse: torch.Tensor
    valid: torch.Tensor


# ``chunk_loss(token_index [n], stats) -> scalar``: the chunk's part of the total loss.
ChunkLoss = Callable[[torch.Tensor, ChunkStats], torch.Tensor]


@dataclass(frozen=True)
class FusedResult:
    loss: torch.Tensor
    logp: torch.Tensor  # detached, shaped like targets
    entropy: torch.Tensor | None  # detached, shaped like targets


@dataclass(frozen=True)
class _Chunk:
    """A chunk's token indices ``[n]`` into the flattened tokens, and ``span``, the same tokens as a slice when
    they are consecutive (then rows are read and written as views, not gathered and scattered)."""

    index: torch.Tensor
    span: slice | None = None

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.index] if self.span is None else tensor[self.span]


def _plan_chunks(units: Sequence[torch.Tensor] | None, n_tokens: int, max_tokens: int, device) -> list[_Chunk]:
    """Chunks of at most ``max_tokens`` tokens (a unit larger than that becomes a chunk of its own)."""
    if units is None:
        step = max(1, max_tokens)
        spans = [slice(s, min(n_tokens, s + step)) for s in range(0, n_tokens, step)]
        return [_Chunk(torch.arange(span.start, span.stop, device=device), span) for span in spans]
    chunks, current, size = [], [], 0
    for unit in units:
        if current and size + unit.numel() > max_tokens:
            chunks.append(_Chunk(torch.cat(current)))
            current, size = [], 0
        current.append(unit)
        size += unit.numel()
    if current:
        chunks.append(_Chunk(torch.cat(current)))
    return chunks


@dataclass(frozen=True)
class _Gradients:
    """Accumulators the chunks add into (``None`` where no gradient is needed)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


# Elements per block when the backward scales a float32 accumulator into the inputs' dtype.
_SCALE_BLOCK_ELEMENTS = 1 << 24


def _unwritten(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An accumulator the first chunk overwrites (a name of its own so a test can fill it with NaN)."""
    return torch.empty_like(like, dtype=dtype)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = accum_dtype(hidden.dtype)
        # Low-precision weight gradients add up over chunks in the accumulation dtype; the first chunk writes it
        # (no zero-fill of V x D floats) unless there is none.
        new_weight = _unwritten if plan.chunks else torch.zeros_like
        grads = _Gradients(
            hidden=torch.zeros_like(hidden) if need_hidden else None,
            weight=new_weight(weight, dtype=acc) if need_weight else None,
            bias=torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None,
        )
        total = torch.zeros((), dtype=acc, device=hidden.device)
        logp = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        entropy = torch.zeros_like(logp) if plan.opts.need_entropy else None
        for number, chunk in enumerate(plan.chunks):
            run = plan.run_materialised if chunk.index.numel() <= plan.max_tokens else plan.run_two_sweeps
            loss, chunk_logp, chunk_entropy = run(chunk, hidden, weight, bias, grads, first=number == 0)
            total = total + loss
            where = chunk.index if chunk.span is None else chunk.span
            logp[where] = chunk_logp
            if entropy is not None:
                entropy[where] = chunk_entropy
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logp, *(() if entropy is None else (entropy,)))
        return (total, logp) if entropy is None else (total, logp, entropy)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes

        def scaled(grad, dtype):
            if grad is None:
                return None
            if grad.dtype == dtype:
                return grad * grad_total
            # A block of rows at a time: no second float32 copy of a [V, D] accumulator on the way to ``dtype``.
            out = torch.empty_like(grad, dtype=dtype)
            step = max(1, _SCALE_BLOCK_ELEMENTS // max(1, grad[0].numel()))
            for start in range(0, grad.shape[0], step):
                out[start : start + step] = grad[start : start + step] * grad_total
            return out

        return (
            scaled(grad_hidden, hidden_dtype),
            scaled(grad_weight, weight_dtype),
            scaled(grad_bias, weight_dtype),
            None,
        )


@dataclass(frozen=True)
class _Plan:
    """Everything a chunk needs: targets, options, backend, the loss, and how many tokens fit the budget."""

    prepared: PreparedTargets
    opts: StatsOptions
    backend: str
    chunk_loss: ChunkLoss
    chunks: list[_Chunk]
    max_tokens: int

    def _stats(self, index, lse, target_logp, entropy, sum_logits) -> ChunkStats:
        valid, out_of_range = self.prepared.valid[index], self.prepared.out_of_range[index]

        def finish(values: torch.Tensor) -> torch.Tensor:
            return torch.where(out_of_range, float("nan"), torch.where(valid, values, 0.0))

        return ChunkStats(
            logp=finish(target_logp),
            entropy=finish(entropy.clamp_min(0.0)) if self.opts.need_entropy else None,
            sum_logits=sum_logits if self.opts.need_sum else None,
            lse=lse,
            valid=valid,
        )

    @staticmethod
    def _outputs(loss: torch.Tensor, stats: ChunkStats):
        return loss.detach(), stats.logp.detach(), None if stats.entropy is None else stats.entropy.detach()

    def run_materialised(self, chunk: _Chunk, hidden, weight, bias, grads: _Gradients, first: bool):
        """One sweep: the chunk's logits are held once and become their gradient in place, then the gradients."""
        index, rows = chunk.index, chunk.rows(hidden)
        in_place = replace(self.opts, grad_into_logits=True)
        with torch.enable_grad():
            logits = F.linear(rows, weight, bias).detach().requires_grad_()
            lse, target_logp, entropy, sum_logits = LogitsStats.apply(
                logits, self.prepared.safe[index], self.backend, in_place
            )
            stats = self._stats(index, lse, target_logp, entropy, sum_logits)
            loss = self.chunk_loss(index, stats)
            # With a gradient, it is the logits' own buffer (written by the backend's logits backward).
            grad_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else logits.detach().zero_()
        if grads.hidden is not None:
            if chunk.span is None:
                grads.hidden[index] = grad_logits @ weight
            else:
                torch.mm(grad_logits, weight, out=grads.hidden[chunk.span])
        if grads.weight is not None:
            add_matmul(grads.weight, grad_logits.T, rows, overwrite=first)
        if grads.bias is not None:
            grads.bias.add_(grad_logits.sum(0, dtype=grads.bias.dtype))
        return self._outputs(loss, stats)

    def run_two_sweeps(self, chunk: _Chunk, hidden, weight, bias, grads: _Gradients, first: bool):
        """A unit too large for the budget: statistics first, then the gradient with recomputed logits."""
        index = chunk.index
        if first and grads.weight is not None:
            grads.weight.zero_()  # the accumulator starts unwritten (see _FusedLinearLoss.forward)
        with torch.enable_grad():
            leaves = {
                "hidden": hidden[index].detach().requires_grad_(grads.hidden is not None),
                "weight": weight.detach().requires_grad_(grads.weight is not None),
                "bias": None if bias is None else bias.detach().requires_grad_(grads.bias is not None),
            }
            lse, target_logp, entropy, sum_logits = LinearStats.apply(
                leaves["hidden"], leaves["weight"], leaves["bias"], self.prepared.safe[index], self.backend, self.opts
            )
            stats = self._stats(index, lse, target_logp, entropy, sum_logits)
            loss = self.chunk_loss(index, stats)
            wanted = [name for name, leaf in leaves.items() if leaf is not None and leaf.requires_grad]
            found = (
                torch.autograd.grad(loss, [leaves[n] for n in wanted], allow_unused=True)
                if (loss.requires_grad and wanted)
                else ()
            )
        for name, grad in zip(wanted if found else (), found, strict=True):
            if grad is None:
                continue
            if name == "hidden":
                grads.hidden[index] = grad
            else:
                getattr(grads, name).add_(grad)
        return self._outputs(loss, stats)


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_loss: ChunkLoss,
    *,
    bias: torch.Tensor | None = None,
    units: Sequence[torch.Tensor] | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    need_entropy: bool = False,
    need_sum: bool = False,
    backend: str = "auto",
) -> FusedResult:
    """A scalar loss ``Σ_chunks chunk_loss(token_index, stats)`` whose gradient is computed in this call.

    Args:
        hidden: ``[..., D]``; weight: ``[V, D]``; targets: ``[...]``; bias: ``[V]`` or ``None``.
        chunk_loss: ``(token_index [n] into the flattened tokens, ChunkStats) -> scalar``; must add up over
            chunks made of whole ``units``.
        units: index tensors (into the flattened tokens) that must stay in one chunk (sequences, pairs);
            ``None`` when every token is its own unit.
        temperature, softcap, ignore_index, need_entropy, need_sum, backend: as for the log-prob ops.

    Returns:
        ``FusedResult(loss, logp, entropy)``: the loss (differentiable with respect to ``hidden``, ``weight`` and
        ``bias``; its ``backward`` only scales stored gradients) and the detached per-token log-probs and
        entropy (for metrics), shaped like ``targets``.
    """
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    vocab_size = weight.shape[0]
    transform = {"temperature": temperature, "softcap": softcap, "ignore_index": ignore_index}
    needs = {"need_entropy": need_entropy, "need_sum": need_sum}
    prepared, opts, chosen = _prepare(
        targets, vocab_size, hidden, **transform, **needs, backend=backend, op="linear_stats"
    )
    flat = hidden.reshape(-1, hidden.shape[-1])
    # A chunk's logits, then their gradient in the same buffer, in the input dtype, fill the scratch budget.
    max_tokens = max(1, opts.scratch_bytes // (vocab_size * hidden.element_size()))
    chunks = _plan_chunks(units, flat.shape[0], max_tokens, flat.device)
    plan = _Plan(prepared, opts, chosen, chunk_loss, chunks, max_tokens)
    outputs = _FusedLinearLoss.apply(flat, weight, bias, plan)
    entropy = outputs[2].reshape(targets.shape) if need_entropy else None
    return FusedResult(outputs[0], outputs[1].reshape(targets.shape), entropy)

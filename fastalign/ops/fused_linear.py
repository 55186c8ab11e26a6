"""Losses over ``hidden @ weight.T`` whose gradient is formed during the forward sweep.

When a loss is the last step (a scalar that ``backward()`` is called on), the gradient of every token's logits
is known as soon as the token's softmax statistics are: the upstream gradient is a single scalar. So instead of
a forward sweep over the vocabulary and a second one in the backward (recomputing the logits: 8·N·D·V flops),
:func:`fused_linear_loss` walks the tokens in chunks whose logits fit the scratch budget, materialises a
chunk's logits once, and turns them straight into ``d_hidden`` rows and ``d_weight`` / ``d_bias`` contributions
(6·N·D·V flops). ``backward()`` then only scales the stored gradients by the upstream scalar.

A loss must be a sum over *units* — sets of tokens whose part of the loss depends on their own statistics only:
single tokens for cross-entropy and the token-level policy loss, whole sequences for GSPO, chosen/rejected pairs
for DPO. Units are never split; a unit whose logits do not fit the budget is processed in two sweeps (statistics,
then the recomputed gradient), which is still exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def _plan_chunks(units: Sequence[torch.Tensor] | None, n_tokens: int, max_tokens: int, device) -> list[torch.Tensor]:
    """Token-index chunks of at most ``max_tokens`` (a unit larger than that becomes a chunk of its own)."""
    if units is None:
        step = max(1, max_tokens)
        return [torch.arange(s, min(n_tokens, s + step), device=device) for s in range(0, n_tokens, step)]
    chunks, current, size = [], [], 0
    for unit in units:
        if current and size + unit.numel() > max_tokens:
            chunks.append(torch.cat(current))
            current, size = [], 0
        current.append(unit)
        size += unit.numel()
    if current:
        chunks.append(torch.cat(current))
    return chunks


@dataclass(frozen=True)
class _Gradients:
    """Accumulators the chunks add into (``None`` where no gradient is needed)."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        acc = accum_dtype(hidden.dtype)
        grads = _Gradients(
            hidden=torch.zeros_like(hidden) if need_hidden else None,
            # Low-precision weight gradients add up over chunks in the accumulation dtype.
            weight=torch.zeros_like(weight, dtype=acc) if need_weight else None,
            bias=torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None,
        )
        total = torch.zeros((), dtype=acc, device=hidden.device)
        logp = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
        entropy = torch.zeros_like(logp) if plan.opts.need_entropy else None
        for index in plan.chunks:
            run = plan.run_materialised if index.numel() <= plan.max_tokens else plan.run_two_sweeps
            loss, chunk_logp, chunk_entropy = run(index, hidden, weight, bias, grads)
            total = total + loss
            logp[index] = chunk_logp
            if entropy is not None:
                entropy[index] = chunk_entropy
        ctx.save_for_backward(grads.hidden, grads.weight, grads.bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logp, *(() if entropy is None else (entropy,)))
        return (total, logp) if entropy is None else (total, logp, entropy)

    @staticmethod
    def backward(ctx, grad_total, *unused):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes

        def scaled(grad, dtype):
            return None if grad is None else (grad * grad_total).to(dtype)

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
    chunks: list[torch.Tensor]
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

    def run_materialised(self, index, hidden, weight, bias, grads: _Gradients):
        """One sweep: the chunk's logits are held once and become the gradients at once."""
        rows = hidden[index]
        with torch.enable_grad():
            logits = F.linear(rows, weight, bias).detach().requires_grad_()
            lse, target_logp, entropy, sum_logits = LogitsStats.apply(
                logits, self.prepared.safe[index], self.backend, self.opts
            )
            stats = self._stats(index, lse, target_logp, entropy, sum_logits)
            loss = self.chunk_loss(index, stats)
            grad_logits = torch.autograd.grad(loss, logits)[0] if loss.requires_grad else torch.zeros_like(logits)
        if grads.hidden is not None:
            grads.hidden[index] = grad_logits @ weight
        if grads.weight is not None:
            add_matmul(grads.weight, grad_logits.T, rows)
        if grads.bias is not None:
            grads.bias.add_(grad_logits.sum(0, dtype=grads.bias.dtype))
        return self._outputs(loss, stats)

    def run_two_sweeps(self, index, hidden, weight, bias, grads: _Gradients):
        """A unit too large for the budget: statistics first, then the gradient with recomputed logits."""
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
    # The chunk's logits and their gradient, in the input dtype, share the scratch budget.
    max_tokens = max(1, opts.scratch_bytes // (2 * vocab_size * hidden.element_size()))
    chunks = _plan_chunks(units, flat.shape[0], max_tokens, flat.device)
    plan = _Plan(prepared, opts, chosen, chunk_loss, chunks, max_tokens)
    outputs = _FusedLinearLoss.apply(flat, weight, bias, plan)
    entropy = outputs[2].reshape(targets.shape) if need_entropy else None
    return FusedResult(outputs[0], outputs[1].reshape(targets.shape), entropy)

"""The CUDA C++ backend of the logits ops: argument marshalling around ``fastalign._C``'s kernels.

Forward: one block per row streams the row's logits once (16-byte vector loads, online softmax with entropy)
and writes the per-row statistics. Backward: one read of the logits and one write of ``d_logits`` per element,
optionally into the logits' own storage. The matmul-fused ops (from hidden states) have no CUDA kernel: the
dispatcher sends them to Triton or torch.
"""

from __future__ import annotations

import torch

from fastalign.ops import _cuda_ext
from fastalign.ops._cuda_ext import ptr
from fastalign.ops.stats import GradCoefficients, StatsOptions, TokenStats, empty_stats


def _transform_args(opts: StatsOptions) -> tuple[float, float, bool]:
    return (opts.softcap or 1.0, opts.inv_temperature, opts.softcap is not None)


def logits_forward(logits: torch.Tensor, targets: torch.Tensor, opts: StatsOptions) -> TokenStats:
    """Statistics of ``logits [N, V]`` (float16/bfloat16/float32 CUDA) for int64 ``targets [N]`` in ``[0, V)``."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return empty_stats(logits, opts)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    stats = torch.empty(5, n_rows, dtype=torch.float32, device=logits.device)
    entropy = stats[3] if opts.need_entropy else None
    sum_logits = stats[4] if opts.need_sum else None
    with _cuda_ext.launch_stream(logits) as stream:
        _cuda_ext.extension().logprobs_forward(
            ptr(logits), _cuda_ext.dtype_code(logits.dtype), n_rows, n_cols, logits.stride(0), ptr(targets),
            *_transform_args(opts), ptr(stats[0]), ptr(stats[1]), ptr(stats[2]), ptr(entropy), ptr(sum_logits),
            stream,
        )  # fmt: skip
    return TokenStats(stats[0], stats[1], stats[2], entropy, sum_logits)


def logits_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    max_logit: torch.Tensor,
    log_sum: torch.Tensor,
    coeffs: GradCoefficients,
    opts: StatsOptions,
) -> torch.Tensor:
    """``d_logits [N, V]`` in the logits' dtype (written into ``logits`` itself with ``grad_into_logits``)."""
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = logits if opts.grad_into_logits else torch.empty(n_rows, n_cols, dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return grad
    alpha, beta, gamma, kappa = (None if c is None else c.to(torch.float32) for c in coeffs)
    with _cuda_ext.launch_stream(logits) as stream:
        _cuda_ext.extension().logprobs_backward(
            ptr(logits), _cuda_ext.dtype_code(logits.dtype), n_rows, n_cols, logits.stride(0), ptr(targets),
            ptr(max_logit), ptr(log_sum), ptr(alpha), ptr(beta), ptr(gamma), ptr(kappa), *_transform_args(opts),
            ptr(grad), grad.stride(0), stream,
        )  # fmt: skip
    if opts.grad_into_logits:
        # The kernel wrote through a raw pointer; tell autograd the logits changed so misuse is caught.
        torch.autograd.graph.increment_version(grad)
    return grad

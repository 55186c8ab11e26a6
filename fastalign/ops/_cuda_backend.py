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
from fastalign.ops.stats import GradCoefficients, StatsOptions, TokenStats, empty_stats, row_major


def _transform_args(opts: StatsOptions) -> tuple[float, float, bool]:
    return (opts.softcap or 1.0, opts.inv_temperature, opts.softcap is not None)


def logits_forward(logits: torch.Tensor, targets: torch.Tensor, opts: StatsOptions) -> TokenStats:
    """Statistics of ``logits [N, V]`` (float16/bfloat16/float32 CUDA) for int64 ``targets [N]`` in ``[0, V)``."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return empty_stats(logits, opts)
    logits = row_major(logits)
    _, out = opts.stats_buffer(logits)
    source = (ptr(logits), _cuda_ext.dtype_code(logits.dtype), n_rows, n_cols, logits.stride(0), ptr(targets))
    outputs = (ptr(out.max_logit), ptr(out.log_sum), ptr(out.target_logp), ptr(out.entropy), ptr(out.sum_logits))
    with _cuda_ext.launch_stream(logits) as stream:
        _cuda_ext.extension().logprobs_forward(*source, *_transform_args(opts), *outputs, stream)
    return out


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
    logits = row_major(logits)
    grad = opts.grad_buffer(logits)
    if n_rows == 0:
        return grad
    # Held here until the launch: the kernel reads them through raw pointers.
    alpha, beta, gamma, kappa = (None if c is None else c.to(torch.float32) for c in coeffs)
    source = (ptr(logits), _cuda_ext.dtype_code(logits.dtype), n_rows, n_cols, logits.stride(0), ptr(targets))
    statistics = (ptr(max_logit), ptr(log_sum), ptr(alpha), ptr(beta), ptr(gamma), ptr(kappa))
    with _cuda_ext.launch_stream(logits) as stream:
        _cuda_ext.extension().logprobs_backward(
            *source, *statistics, *_transform_args(opts), ptr(grad), grad.stride(0), stream
        )
    if opts.grad_into_logits:
        # The kernel wrote through a raw pointer; tell autograd the logits changed so misuse is caught.
        torch.autograd.graph.increment_version(grad)
    return grad

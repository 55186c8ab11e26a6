"""Host side of the DPO kernels (Triton and CUDA C++): the autograd of ``dpo_loss_from_token_logps``.

One autograd Function serves both backends; a launcher object holds the only backend-specific part, the
forward launch (per-pair reduction of the ``[2B, T]`` token log-probs + every loss type) and the backward launch
(each row's gradient broadcast onto its masked tokens). Pair ``i`` is chosen row ``i`` and rejected row ``B + i``.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from fastalign.ops import _cuda_ext
from fastalign.ops._cuda_ext import ptr
from fastalign.ops._dpo_math import TypePlan
from fastalign.ops._masks import kernel_mask


class PairOutputs(NamedTuple):
    """float32 outputs of the forward launch: ``losses [B]``; ``sums``, ``lengths``, ``row_grad [2B]``."""

    losses: torch.Tensor
    sums: torch.Tensor
    lengths: torch.Tensor
    row_grad: torch.Tensor


class Launches(Protocol):
    """The backend-specific part of the DPO autograd: its two launches (the implementations take these types)."""

    def forward(
        self, token_logps: torch.Tensor, mask: torch.Tensor, ref_logps: torch.Tensor, plan: TypePlan, out: PairOutputs
    ) -> None:
        """Fill ``out`` from contiguous ``token_logps [2B, T]``, ``mask [2B, T]`` and float32 ``ref_logps [2B]``
        (B > 0)."""

    def backward(
        self,
        mask: torch.Tensor,
        row_grad: torch.Tensor,
        grad_losses: torch.Tensor | None,
        grad_sums: torch.Tensor | None,
        grad: torch.Tensor,
    ) -> None:
        """Fill ``grad [2B, T]`` with ``row_grad[row] · grad_losses[pair] + grad_sums[row]`` on masked tokens and
        0 elsewhere (B > 0, T > 0; an absent upstream gradient is zero)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _TritonLaunches:
    """``fastalign/kernels/triton/dpo_loss.py``; its backward takes the combined per-row upstream gradient."""

    def forward(self, token_logps, mask, ref_logps, plan, out) -> None:
        from fastalign.kernels.triton import dpo_loss as kernels
        from fastalign.kernels.triton.softmax_tile import autotune_bucket

        pairs, width = token_logps.shape[0] // 2, token_logps.shape[1]
        weights = torch.tensor(plan.weights, dtype=torch.float32).to(token_logps.device, non_blocking=True)
        kernels.dpo_fwd_kernel[lambda meta: (_cdiv(pairs, meta["BLOCK_P"]),)](
            token_logps,
            mask,
            ref_logps,
            weights,
            *out,
            pairs,
            width,
            autotune_bucket(width),
            token_logps.stride(0),
            plan.beta,
            plan.label_smoothing,
            plan.discopop_tau,
            TYPES=plan.type_bits,
            AVERAGED=plan.averaged_bits,
        )

    def backward(self, mask, row_grad, grad_losses, grad_sums, grad) -> None:
        from fastalign.kernels.triton import dpo_loss as kernels
        from fastalign.kernels.triton.softmax_tile import autotune_bucket

        rows, width = mask.shape
        upstream = torch.zeros_like(row_grad)
        if grad_losses is not None:
            upstream = upstream + row_grad * grad_losses.repeat(2)
        if grad_sums is not None:
            upstream = upstream + grad_sums
        kernels.dpo_bwd_kernel[lambda meta: (_cdiv(rows, meta["BLOCK_R"]), _cdiv(width, meta["BLOCK_T"]))](
            mask, upstream.contiguous(), grad, rows, width, autotune_bucket(width), mask.stride(0)
        )


def mask_layout(dtype: torch.dtype) -> tuple[int, bool]:
    """``(element bytes, is floating point)`` of a mask dtype, as the CUDA kernels read masks."""
    return dtype.itemsize, dtype.is_floating_point


class _CudaLaunches:
    """``csrc/cuda/dpo_loss.cu`` through ``fastalign._C``; its backward combines the upstream gradients itself."""

    def forward(self, token_logps, mask, ref_logps, plan, out) -> None:
        with _cuda_ext.launch_stream(token_logps) as stream:
            _cuda_ext.extension().dpo_loss_forward(
                ptr(token_logps),
                _cuda_ext.dtype_code(token_logps.dtype),
                ptr(mask),
                *mask_layout(mask.dtype),
                ptr(ref_logps),
                token_logps.shape[0] // 2,
                token_logps.shape[1],
                *plan.cuda_arguments(),
                *map(ptr, out),
                stream,
            )

    def backward(self, mask, row_grad, grad_losses, grad_sums, grad) -> None:
        with _cuda_ext.launch_stream(grad) as stream:
            _cuda_ext.extension().dpo_loss_backward(
                ptr(mask),
                *mask_layout(mask.dtype),
                ptr(row_grad),
                ptr(grad_losses),
                0 if grad_losses is None else grad_losses.stride(0),
                ptr(grad_sums),
                0 if grad_sums is None else grad_sums.stride(0),
                mask.shape[0] // 2,
                mask.shape[1],
                ptr(grad),
                _cuda_ext.dtype_code(grad.dtype),
                stream,
            )


LAUNCHES: dict[str, Launches] = {"triton": _TritonLaunches(), "cuda": _CudaLaunches()}


class _DPOFromTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, mask, ref_logps, launches, plan):
        rows = token_logps.shape[0]
        pairs = rows // 2
        out = torch.zeros(4, rows, dtype=torch.float32, device=token_logps.device)
        outputs = PairOutputs(out[0, :pairs], out[1], out[2], out[3])
        if pairs > 0:
            launches.forward(token_logps, mask, ref_logps, plan, outputs)
        ctx.save_for_backward(mask, outputs.row_grad)
        ctx.launches = launches
        ctx.dtype = token_logps.dtype
        # An unused output's gradient arrives as None rather than as a tensor of zeros to read.
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(outputs.lengths)
        return outputs.losses.clone(), outputs.sums.clone(), outputs.lengths.clone()

    @staticmethod
    def backward(ctx, grad_losses, grad_sums, _grad_lengths):
        mask, row_grad = ctx.saved_tensors
        rows, width = mask.shape
        grad = torch.empty(rows, width, dtype=ctx.dtype, device=mask.device)
        if rows > 0 and width > 0:
            ctx.launches.backward(mask, row_grad, grad_losses, grad_sums, grad)
        return grad, None, None, None, None


def dpo_from_token_logps_kernels(
    backend: str, token_logps: torch.Tensor, mask: torch.Tensor, ref_logps: torch.Tensor, plan: TypePlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dpo_loss_from_token_logps`` on the ``"triton"`` or ``"cuda"`` kernels (arguments already checked).

    ``token_logps [2B, T]`` float16/bfloat16/float32 and ``mask [2B, T]`` (nonzero on completion tokens) on the
    kernels' device, ``ref_logps [2B]``; ``plan`` from :func:`fastalign.ops._dpo_math.type_plan`. Returns float32
    ``(losses [B], sums [2B], lengths [2B])``.
    """
    mask = kernel_mask(mask, backend)  # torch's own != 0 where the kernels cannot read the dtype
    return _DPOFromTokens.apply(
        token_logps.contiguous(),
        mask.contiguous(),
        ref_logps.detach().to(torch.float32).contiguous(),
        LAUNCHES[backend],
        plan,
    )

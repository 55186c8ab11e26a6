"""Host side of the Triton DPO kernels: launches and the autograd of ``dpo_loss_from_token_logps``."""

from __future__ import annotations

import torch

from fastalign.kernels.triton import dpo_loss as kernels
from fastalign.ops.preference import DPO_LOSS_TYPES


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _DPOFromTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, mask, ref_logps, type_bits, averaged_bits, weights, beta, smoothing, tau):
        rows, width = token_logps.shape
        pairs = rows // 2
        out = torch.zeros(4, rows, dtype=torch.float32, device=token_logps.device)
        losses, sums, lengths, row_grad = out[0, :pairs], out[1], out[2], out[3]
        if pairs > 0:
            kernels.dpo_fwd_kernel[lambda meta: (_cdiv(pairs, meta["BLOCK_P"]),)](
                token_logps, mask, ref_logps, weights, losses, sums, lengths, row_grad,
                pairs, width, token_logps.stride(0), beta, smoothing, tau,
                TYPES=type_bits, AVERAGED=averaged_bits,
            )  # fmt: skip
        ctx.save_for_backward(mask, row_grad)
        ctx.dtype = token_logps.dtype
        ctx.mark_non_differentiable(lengths)
        return losses.clone(), sums.clone(), lengths.clone()

    @staticmethod
    def backward(ctx, grad_losses, grad_sums, _grad_lengths):
        mask, row_grad = ctx.saved_tensors
        rows, width = mask.shape
        upstream = torch.zeros_like(row_grad)
        if grad_losses is not None:
            upstream = upstream + row_grad * grad_losses.repeat(2)
        if grad_sums is not None:
            upstream = upstream + grad_sums
        grad = torch.empty(rows, width, dtype=ctx.dtype, device=mask.device)
        if rows > 0 and width > 0:
            kernels.dpo_bwd_kernel[lambda meta: (_cdiv(rows, meta["BLOCK_R"]), _cdiv(width, meta["BLOCK_T"]))](
                mask, upstream.contiguous(), grad, rows, width, mask.stride(0)
            )
        return grad, None, None, None, None, None, None, None, None


def dpo_from_token_logps_triton(
    token_logps, mask, ref_logps, types, weights, averaged, beta, label_smoothing, discopop_tau
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    per_type = [0.0] * len(DPO_LOSS_TYPES)
    type_bits = averaged_bits = 0
    for name, weight, average in zip(types, weights, averaged, strict=True):
        kind = DPO_LOSS_TYPES.index(name)
        per_type[kind] += weight
        type_bits |= 1 << kind
        averaged_bits |= int(average) << kind
    type_weights = torch.tensor(per_type, dtype=torch.float32).to(token_logps.device, non_blocking=True)
    return _DPOFromTokens.apply(
        token_logps.contiguous(), mask.contiguous(), ref_logps.detach().to(torch.float32).contiguous(),
        type_bits, averaged_bits, type_weights, float(beta), float(label_smoothing), float(discopop_tau),
    )  # fmt: skip

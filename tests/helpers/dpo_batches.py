"""dpo_loss_from_token_logps batches, the torch backend's float64 outputs and gradient, a backend's, and their
comparison: shared by the CUDA DPO tests and the GPU check's core tests."""

import torch

from fastalign.ops.preference import dpo_loss_from_token_logps


def token_batch(pairs=4, width=37, seed=0, dtype=torch.float64, device="cpu"):
    """Token log-probs [2B, T], a mask with a row of no tokens (and, for B > 2, a second one), ref [2B]."""
    gen = torch.Generator().manual_seed(seed)
    token_logps = -3 * torch.rand(2 * pairs, width, generator=gen, dtype=torch.float64)
    mask = torch.rand(2 * pairs, width, generator=gen) > 0.3
    mask[1 % (2 * pairs)] = False
    if pairs > 2:
        mask[pairs + 2] = False
    ref = -40 * torch.rand(2 * pairs, generator=gen, dtype=torch.float64)
    # The values the kernels see: the reference takes the same (rounded) ones in float64.
    token_logps = token_logps.to(dtype).double()
    return token_logps.to(device), mask.to(device), ref.float().double().to(device)


def reference_outputs(token_logps, mask, ref, upstream, **options):
    """The torch backend in float64: outputs and the token gradient of Σ losses·u_l + Σ sums·u_s."""
    leaf = token_logps.detach().cpu().double().requires_grad_()
    losses, sums, lengths = dpo_loss_from_token_logps(leaf, mask.cpu(), ref.cpu().double(), backend="torch", **options)
    u_losses, u_sums = upstream
    total = (losses * u_losses.cpu()).sum() if u_losses is not None else 0
    total = total + ((sums * u_sums.cpu()).sum() if u_sums is not None else 0)
    (grad,) = torch.autograd.grad(total, leaf)
    return losses.detach(), sums.detach(), lengths, grad


def upstreams(pairs, which, device="cpu"):
    gen = torch.Generator().manual_seed(9)
    u_losses = torch.rand(pairs, generator=gen).to(device) + 0.5 if which in ("losses", "both") else None
    u_sums = torch.randn(2 * pairs, generator=gen).to(device) if which in ("sums", "both") else None
    return u_losses, u_sums


def run_backend(token_logps, mask, ref, upstream, dtype, backend, **options):
    """Outputs and the token gradient, with the kernels' input dtype; an absent upstream is an unused output."""
    leaf = token_logps.detach().to(dtype).requires_grad_()
    losses, sums, lengths = dpo_loss_from_token_logps(leaf, mask, ref.float(), backend=backend, **options)
    u_losses, u_sums = upstream
    total = (losses * u_losses).sum() if u_losses is not None else 0
    total = total + ((sums * u_sums).sum() if u_sums is not None else 0)
    (grad,) = torch.autograd.grad(total, leaf)
    return losses, sums, lengths, grad


GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 8e-3}  # the gradient's storage dtype


def assert_outputs_close(got, expected, dtype):
    """Against float64 results. float32 sums of T token log-probs carry rounding errors of order 1e-7 |sum|,
    which the losses and gradients inherit through the log-ratios: those tolerances grow with the largest |sum|."""
    losses, sums, lengths, grad = (t.detach().double().cpu() for t in got)
    want_losses, want_sums, want_lengths, want_grad = expected
    sum_error = 2e-7 * max(float(want_sums.abs().max()), 1.0) if want_sums.numel() else 0.0
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-5 + sum_error)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lengths, want_lengths, rtol=0, atol=0)
    torch.testing.assert_close(grad, want_grad, rtol=GRAD_RTOL[dtype] + sum_error, atol=1e-7)

"""The torch backend never allocates an [N, V]-sized tensor: every tensor an aten op produces during forward
and backward is watched, and the only ones above the scratch budget are the inputs' own shapes (gradients)."""

import pytest
import torch
from helpers.memory import AllocationWatcher

import fastalign

N, D, V = 512, 16, 8192  # [N, V] float32 = 16 MiB
BUDGET = 256 << 10  # 256 KiB


@pytest.mark.parametrize(
    "op",
    [
        lambda h, w, b, t: fastalign.linear_logprobs(h, w, t, bias=b, return_entropy=True, softcap=20.0)[1].sum(),
        lambda h, w, b, t: fastalign.linear_logprobs(h, w, t, temperature=0.7).sum(),
        lambda h, w, b, t: fastalign.linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.1, z_loss=1e-4),
    ],
    ids=["logprobs+entropy", "logprobs", "cross_entropy"],
)
def test_torch_backend_has_no_full_logits_allocation(scratch_budget, op):
    scratch_budget(BUDGET)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    with AllocationWatcher() as watcher:
        op(hidden, weight, bias, targets).backward()
    allowed_shapes = {(N, D), (V, D), (V,)}  # inputs' shapes: gradients and their accumulators
    scratch = [(shape, size) for shape, size in watcher.produced if shape not in allowed_shapes]
    largest = max(size for _, size in scratch)
    assert largest <= BUDGET, (
        f"a {largest}-byte tensor exceeds the {BUDGET}-byte budget: {max(scratch, key=lambda s: s[1])}"
    )
    assert largest >= BUDGET // 8, "the tiles should use the budget; the watcher may be missing allocations"
    assert all(size < N * V * 4 // 16 for _, size in scratch)
    assert hidden.grad is not None and weight.grad is not None

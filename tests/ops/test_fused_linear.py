"""fused_linear_loss's chunks: one [tokens, V] buffer each (the logits, then their gradient in place), the weight
gradient's accumulator written by the first chunk, and add_matmul's widening product without a [V, D] temporary."""

import pytest
import torch
from helpers.memory import AllocationWatcher

import fastalign
from fastalign.ops import _torch_backend, fused_linear, reference

BACKENDS = ["torch", "triton"]


def _problem(tokens=37, dim=12, vocab=203, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[::5] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _sum_loss(index, stats):
    return -(stats.logp.sum() + 0.1 * stats.entropy.sum())


def _fused(hidden, weight, targets, backend, units=None):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    result = fused_linear.fused_linear_loss(h, w, targets, _sum_loss, units=units, need_entropy=True, backend=backend)
    result.loss.backward()
    return result.loss, h.grad, w.grad


def _reference(hidden, weight, targets):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp, entropy = reference.linear_logprobs(h, w, targets, return_entropy=True)
    valid = targets != -100
    loss = -(logp[valid].sum() + 0.1 * entropy[valid].sum())
    loss.backward()
    return loss, h.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_chunk_holds_one_logits_buffer(scratch_budget, backend):
    """The budget holds one [tokens, V] buffer: the chunk's gradient reuses its logits' storage."""
    hidden, weight, targets = _problem()
    tokens_per_chunk = 8
    scratch_budget(tokens_per_chunk * weight.shape[0] * weight.element_size())
    # Triton's first in-place launch per key tunes on a buffer of its own (docs/core-ops.md); not watched.
    _fused(hidden, weight, targets, backend)
    with AllocationWatcher() as watcher:
        got = _fused(hidden, weight, targets, backend)
    chunk_shaped = [shape for shape in watcher.allocated if len(shape) == 2 and shape[1] == weight.shape[0]]
    # 37 tokens: four chunks of 8 and one of 5, one logits buffer each and no second [n, V] tensor
    assert sorted(chunk_shaped) == sorted([(8, 203)] * 4 + [(5, 203)])
    for g, e in zip(got, _reference(hidden, weight, targets), strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("two_sweeps", [False, True], ids=["materialised", "two-sweeps"])
def test_first_chunk_overwrites_the_weight_accumulator(monkeypatch, scratch_budget, two_sweeps):
    """The float32 weight-gradient accumulator is never zero-filled: the first chunk writes it whole."""
    monkeypatch.setattr(
        fused_linear, "_unwritten", lambda like, dtype: torch.full_like(like, float("nan"), dtype=dtype)
    )
    hidden, weight, targets = _problem(dtype=torch.bfloat16)
    scratch_budget(16 * weight.shape[0] * weight.element_size())
    # Units of 20 tokens exceed the 16-token chunks: each is then a two-sweep chunk of its own.
    units = [torch.arange(0, 20), torch.arange(20, 37)] if two_sweeps else None
    loss, grad_hidden, grad_weight = _fused(hidden, weight, targets, "torch", units=units)
    assert torch.isfinite(grad_weight).all()
    ref = _reference(hidden, weight, targets)
    # bf16 inputs and gradients: within a few bf16 roundings of the float64 reference
    torch.testing.assert_close(grad_weight.double(), ref[2], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_hidden.double(), ref[1], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.double(), ref[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("overwrite", [False, True], ids=["add", "overwrite"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_add_matmul_against_float64(monkeypatch, overwrite, dtype):
    """``out (+)= a @ b`` into a float32 ``out``; a widening product goes a few rows at a time (never a
    temporary as large as ``out``), an overwrite reads nothing of ``out`` (NaN there stays out)."""
    monkeypatch.setattr(_torch_backend, "_WIDENING_TEMP_ELEMENTS", 5 * 7)  # 5 rows of 7 columns per product
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(23, 11, generator=gen).to(dtype)
    b = torch.randn(11, 7, generator=gen).to(dtype)
    start = torch.randn(23, 7, generator=gen)
    out = torch.full_like(start, float("nan")) if overwrite else start.clone()
    with AllocationWatcher() as watcher:
        _torch_backend.add_matmul(out, a, b, overwrite=overwrite)
    expected = a.double() @ b.double() + (0 if overwrite else start.double())
    # float32 products: float32 rounding; bf16 products are rounded to bf16 before they are added
    tolerance = {"rtol": 1e-6, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 4e-2}
    torch.testing.assert_close(out.double(), expected, **tolerance)
    if dtype != torch.float32:
        # the block's product, and at most its float32 copy for the add: never the 23 x 7 of out
        assert max(size for shape, size in watcher.produced) <= 5 * 7 * 4


def test_linear_cross_entropy_module_chunks_match_one_chunk(scratch_budget):
    """The module's fused path gives the same loss and gradients whatever the chunking (1 token to all)."""
    hidden, weight, targets = _problem(tokens=29, vocab=97)
    results = []
    for tokens_per_chunk in (1, 6, 29):
        scratch_budget(tokens_per_chunk * weight.shape[0] * weight.element_size())
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fastalign.nn.LinearCrossEntropy(gradient_in_forward=True)(h, w, targets)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for other in results[1:]:
        for g, e in zip(other, results[0], strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_backward_scales_the_accumulators_a_block_at_a_time(monkeypatch):
    """``backward`` turns the float32 accumulators into bf16 gradients times the upstream scalar, a few rows at a
    time: no float32 temporary as large as the weight gradient."""
    monkeypatch.setattr(fused_linear, "_SCALE_BLOCK_ELEMENTS", 3 * 12)  # 3 rows of D = 12
    hidden, weight, targets = _problem(dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    result = fused_linear.fused_linear_loss(h, w, targets, _sum_loss, need_entropy=True)
    with AllocationWatcher() as watcher:
        (2.5 * result.loss).backward()
    assert ((203, 12), 203 * 12 * 2) in watcher.produced  # the bf16 weight gradient
    assert ((203, 12), 203 * 12 * 4) not in watcher.produced  # and no float32 copy of the accumulator
    assert max(size for shape, size in watcher.produced if size != 203 * 12 * 2) <= 37 * 12 * 2
    ref = _reference(hidden, weight, targets)
    torch.testing.assert_close(w.grad.double(), 2.5 * ref[2], rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(h.grad.double(), 2.5 * ref[1], rtol=2e-2, atol=5e-2)

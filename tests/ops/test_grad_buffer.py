"""The logits kernels' new gradient buffer has the logits' row alignment (issue 15, item 4).

The CUDA backward picks one access width per row from both the logits' and the gradient's row addresses; a fresh
contiguous gradient for sliced logits (``logits[:, :151665]`` of a vocabulary padded to 151936) starts 7 rows in 8
at another offset modulo 16 bytes, and those rows fall back to narrow stores.
"""

import itertools

import pytest
import torch

import fastalign
from fastalign.ops import _triton_backend
from fastalign.ops.stats import aligned_like


def row_offsets(t: torch.Tensor) -> list[int]:
    """Each row's start address modulo 16 bytes."""
    return [(t.data_ptr() + r * t.stride(0) * t.element_size()) % 16 for r in range(t.shape[0])]


def sliced(n_rows, n_cols, row_stride, offset, dtype):
    base = torch.zeros(offset + n_rows * row_stride, dtype=dtype)
    return base.as_strided((n_rows, n_cols), (row_stride, 1), offset)


SHAPES = list(
    itertools.product(
        [1, 2, 9],  # rows
        [1, 7, 37, 151],  # columns
        [0, 1, 2, 3, 5, 8, 13, 16, 17],  # row padding (elements)
        [0, 1, 2, 3, 7],  # storage offset (elements)
    )
)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32, torch.float64])
def test_every_row_starts_where_the_logits_row_does(dtype):
    for n_rows, n_cols, pad, offset in SHAPES:
        case = f"{dtype} rows={n_rows} cols={n_cols} pad={pad} offset={offset}"
        logits = sliced(n_rows, n_cols, n_cols + pad, offset, dtype)
        grad = aligned_like(logits)
        assert grad.shape == logits.shape and grad.dtype == dtype and grad.stride(1) == 1, case
        assert row_offsets(grad) == row_offsets(logits), case
        # Rows do not overlap, and each carries less than 16 elements of padding.
        assert n_rows == 1 or n_cols <= grad.stride(0) < n_cols + 16, case
        # The view lies inside its own storage.
        span = grad.storage_offset() + (n_rows - 1) * grad.stride(0) + n_cols
        assert span * grad.element_size() <= grad.untyped_storage().nbytes(), case


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_contiguous_aligned_logits_get_a_contiguous_gradient(dtype):
    logits = torch.randn(5, 151, dtype=dtype)
    assert aligned_like(logits).is_contiguous()
    # A padded row stride congruent to the width modulo 16 needs no padding of its own.
    assert aligned_like(sliced(4, 37, 37 + 16, 0, dtype)).is_contiguous()


def test_the_issue_example_gets_one_access_width_on_every_row():
    logits = sliced(8, 151665, 151936, 0, torch.bfloat16)
    fresh = torch.empty(logits.shape, dtype=logits.dtype)
    assert sum(a != b for a, b in zip(row_offsets(fresh), row_offsets(logits), strict=True)) == 7
    grad = aligned_like(logits)
    assert row_offsets(grad) == row_offsets(logits)
    assert grad.stride(0) - grad.shape[1] == (151936 - 151665) % 16


@pytest.mark.parametrize("pad, offset", [(3, 1), (8, 0), (11, 5)])
def test_triton_backward_writes_the_strided_gradient_right(monkeypatch, pad, offset):
    """The Triton logits backward (interpreted here) gets the aligned buffer and writes it through its stride:
    gradients of sliced logits against float64 autograd."""
    seen = []
    original = _triton_backend.logits_backward

    def recording(*args):
        grad = original(*args)
        seen.append((grad.stride(0), row_offsets(grad), row_offsets(args[0])))
        return grad

    monkeypatch.setattr(_triton_backend, "logits_backward", recording)
    torch.manual_seed(0)
    n_rows, n_cols = 6, 37
    logits = sliced(n_rows, n_cols, n_cols + pad, offset, torch.float32)
    logits.copy_(torch.randn(n_rows, n_cols))
    logits.requires_grad_()
    targets = torch.randint(0, n_cols, (n_rows,))
    weights = torch.randn(n_rows)
    logp = fastalign.logprobs_from_logits(logits, targets, backend="triton")
    (logp * weights).sum().backward()

    reference = logits.detach().double().requires_grad_()
    ref_logp = torch.log_softmax(reference, -1).gather(-1, targets[:, None]).squeeze(-1)
    (ref_logp * weights.double()).sum().backward()
    # float32 inputs, one softmax per row: the error against float64 is a few float32 ulps of values below 1.
    torch.testing.assert_close(logp.double(), ref_logp.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=0, atol=1e-5)
    assert len(seen) == 1
    stride, grad_rows, logit_rows = seen[0]
    assert grad_rows == logit_rows
    assert stride == n_cols + pad % 16

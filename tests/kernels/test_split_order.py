"""The split kernels' grouped launch order (``split_tile``): every (token block, vocabulary split) pair is one
program, groups of ``GROUP_N`` token blocks run with the token blocks fastest, and the result does not depend on
the order (the op against its float64 reference at a size where the last group is short)."""

import pytest
import torch
import triton
import triton.language as tl

from fastalign.kernels.triton.softmax_tile import split_tile
from fastalign.ops import linear_logprobs, reference


@triton.jit
def _record_tiles(block_ptr, split_ptr, span_ptr, N, V, cols_per_split, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    rows, _, col_start, col_stop, split = split_tile(N, V, cols_per_split, BLOCK_N, GROUP_N)
    pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)  # the order CUDA starts blocks in
    tl.store(block_ptr + pid, tl.min(rows, axis=0) // BLOCK_N)
    tl.store(split_ptr + pid, split)
    tl.store(span_ptr + 2 * pid, col_start)
    tl.store(span_ptr + 2 * pid + 1, col_stop)


@pytest.mark.parametrize(("rows", "splits", "group"), [(16 * 19, 3, 16), (16 * 5 + 3, 4, 2), (16, 1, 16), (48, 5, 1)])
def test_every_pair_once_in_grouped_order(rows, splits, group):
    block, cols_per_split = 16, 32
    vocab = cols_per_split * splits - 7  # the last split is short
    blocks = triton.cdiv(rows, block)
    grid = (group * splits, triton.cdiv(blocks, group))
    programs = grid[0] * grid[1]
    seen_block, seen_split = (torch.full((programs,), -1, dtype=torch.int32) for _ in range(2))
    spans = torch.full((programs, 2), -1, dtype=torch.int32)
    _record_tiles[grid](seen_block, seen_split, spans, rows, vocab, cols_per_split, BLOCK_N=block, GROUP_N=group)
    expected = []  # groups of `group` token blocks, token blocks fastest inside a group
    for first in range(0, grid[1] * group, group):
        expected += [(b, s) for s in range(splits) for b in range(first, first + group)]
    assert list(zip(seen_block.tolist(), seen_split.tolist(), strict=True)) == expected
    for (b, s), (start, stop) in zip(expected, spans.tolist(), strict=True):
        if b < blocks:  # each real (token block, split) pair once, over its split's columns
            assert (start, stop) == (s * cols_per_split, min(vocab, (s + 1) * cols_per_split))
        else:  # past the last token block: no columns to visit
            assert start == stop


def test_the_op_is_exact_where_the_last_group_is_short():
    """19 token blocks of 16 rows (the interpreter's tile): one full group of 16 and a group of 3, in the forward's
    splits, the gradient kernel's slab tiles and the d_hidden matmul's row tiles; against float64."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(16 * 19 - 5, 24, generator=generator, dtype=torch.float64)
    weight = torch.randn(70, 24, generator=generator, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 70, (hidden.shape[0],), generator=generator)
    upstream = torch.randn(2, hidden.shape[0], generator=generator, dtype=torch.float64)
    results = {}
    for name, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        h = hidden.to(dtype).requires_grad_()
        w = weight.to(dtype).requires_grad_()
        if name == "triton":
            logp, entropy = linear_logprobs(h, w, targets, return_entropy=True, backend="triton")
        else:
            logp, entropy = reference.linear_logprobs(h, w, targets, return_entropy=True)
        ((logp.double() * upstream[0]).sum() + (entropy.double() * upstream[1]).sum()).backward()
        results[name] = (logp.double(), entropy.double(), h.grad.double(), w.grad.double())
    for got, expected in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

// The index arithmetic of the kernels, shared with the host test of it (tests/kernels/test_cuda_index_host.py
// compiles csrc/tests/index_check.cpp against this header with the system C++ compiler): how a row is cut into a
// scalar head, aligned vectors and a scalar tail; which elements each thread and block of a launch touches; how
// many blocks a launcher starts. Everything here is plain integer arithmetic, the same on the host and the GPU.
#pragma once

#include "fastalign/common.h"

namespace fastalign {

// A row of `cols` elements cut at its first `access_bytes` boundary: elements [0, head) one by one, then n_vec
// vectors of access_bytes / element bytes elements each from `head`, then elements [tail, cols) one by one.
struct RowSplit {
  int64_t head;
  int64_t n_vec;
  int64_t tail;
};

// `addr`: the byte address of the row's first element (a multiple of elem_bytes); access_bytes: a power of two,
// a multiple of elem_bytes, at most 16.
FA_HD RowSplit split_row(uintptr_t addr, int64_t cols, int elem_bytes, int access_bytes = 16) {
  const uintptr_t mask = static_cast<uintptr_t>(access_bytes) - 1u;
  int64_t head = static_cast<int64_t>(((static_cast<uintptr_t>(access_bytes) - (addr & mask)) & mask) /
                                      static_cast<uintptr_t>(elem_bytes));
  if (head > cols) head = cols;
  const int64_t per_vec = access_bytes / elem_bytes;
  const int64_t n_vec = (cols - head) / per_vec;
  return RowSplit{head, n_vec, head + n_vec * per_vec};
}

// The widest access (16, 8, 4, 2 or 1 bytes, at least elem_bytes) at which two rows of the same length starting
// at byte addresses a and b are aligned at the same element: the backward reads logits and writes the gradient
// with one split, so it takes the width both rows allow.
FA_HD int common_access_bytes(uintptr_t a, uintptr_t b, int elem_bytes) {
  const uintptr_t diff = (a - b) & 15u;
  int width = 16;
  while (width > elem_bytes && (diff & static_cast<uintptr_t>(width - 1)) != 0) width /= 2;
  return width;
}

// The elements first + k * stride in [begin, end) that a thread visits in a strided loop, k = 0, 1, ...
template <class F>
FA_HD void for_strided(int64_t begin, int64_t end, int64_t first, int64_t stride, F&& f) {
  for (int64_t j = begin + first; j < end; j += stride) f(j);
}

// Vectors [0, n) of a row shared by `stride` threads, two at a time so that two loads are in flight before
// either is used: thread `first` takes the pairs (v, v + stride) for v = first, first + 2 stride, ..., then one
// last single vector.
template <class Pair, class Single>
FA_HD void for_vector_pairs(int64_t n, int64_t first, int64_t stride, Pair&& pair, Single&& single) {
  int64_t v = first;
  for (; v + stride < n; v += 2 * stride) pair(v, v + stride);
  if (v < n) single(v);
}

// ---------------------------------------------------------------------------------------- logprobs backward
// Grid (rows, column chunks) of kLogprobsBackwardThreads threads. A chunk covers the same number of elements
// whatever the access width: kLogprobsBackwardItems 16-byte vectors per thread, or proportionally more narrower
// ones. Chunk c holds the vectors [c * per_chunk, (c + 1) * per_chunk) of the row's body; thread t's item i of
// it is vector c * per_chunk + i * threads + t. Chunk 0 also takes the scalar head and tail.
constexpr int kLogprobsBackwardThreads = 256;
constexpr int kLogprobsBackwardItems = 4;

// Vectors of access_bytes per thread and chunk.
FA_HD int logprobs_backward_items(int access_bytes) { return kLogprobsBackwardItems * (16 / access_bytes); }

FA_HD int64_t logprobs_backward_per_chunk(int access_bytes) {
  return static_cast<int64_t>(kLogprobsBackwardThreads) * logprobs_backward_items(access_bytes);
}

// Column chunks for rows of `cols` elements: enough for a body of cols elements at any access width.
FA_HD int64_t logprobs_backward_chunks(int64_t cols, int elem_bytes) {
  const int64_t elements = static_cast<int64_t>(kLogprobsBackwardThreads) * kLogprobsBackwardItems * (16 / elem_bytes);
  return cols / elements + 1;
}

// ------------------------------------------------------------------------------------------------ row splits
// The policy and DPO forward kernels run `splits` blocks per row when rows are few: block s of a row is the
// threads s * threads .. (s + 1) * threads - 1 of one launch-wide stride over the row (for_strided,
// for_vector_pairs with first = s * threads + t, stride = splits * threads), and a second pass sums the blocks'
// partial results in block order.
constexpr int kMaxSplits = 64;

// The slot of block s of row `row` in a [rows, splits] buffer of partial results: the blocks' writes and the
// second pass's reads in block order (s = 0, 1, ...) go through it.
FA_HD int64_t split_slot(int64_t row, int64_t splits, int64_t s) { return row * splits + s; }

// Blocks per row: enough rows x splits to give every SM `blocks_per_sm` blocks, but at least `min_work` units
// (tokens or vectors) per thread and at most kMaxSplits.
FA_HD int choose_splits(int64_t rows, int64_t units, int threads, int sms, int blocks_per_sm, int min_work) {
  if (rows <= 0) return 1;
  const int64_t wanted = (static_cast<int64_t>(sms) * blocks_per_sm + rows - 1) / rows;
  const int64_t useful = units / (static_cast<int64_t>(threads) * min_work);
  int64_t splits = wanted < useful ? wanted : useful;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : static_cast<int>(splits);
}

// ------------------------------------------------------------------------------------------------ DPO backward
// The [rows, width] gradient as one flat array of `total` elements, kDpoBackwardVector of them per thread.
// The row of flat element `first`: a double-precision estimate of first / width (a 64-bit integer division is a
// long subroutine on the GPU), off by at most one, corrected.
FA_HD int64_t flat_row(int64_t first, int64_t width, double inv_width) {
  int64_t row = static_cast<int64_t>(static_cast<double>(first) * inv_width);
  if (row * width > first) {
    --row;
  } else if ((row + 1) * width <= first) {
    ++row;
  }
  return row;
}

}  // namespace fastalign

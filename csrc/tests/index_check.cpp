// The kernels' index arithmetic on the host, from the same header (fastalign/row_split.h) and the same loop
// shapes as csrc/cuda/*.cu: for every case, every element is read and written exactly once, every vector access
// is aligned to its width and inside its row. Built and run by tests/kernels/test_cuda_index_host.py with the
// system C++ compiler; prints one line per failure (the first 20) and "cases N failures F", exits 1 on any failure.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "fastalign/row_split.h"

using namespace fastalign;

namespace {

long cases = 0, failures = 0;

void fail(const char* what, long a, long b, long c, long d) {
  if (++failures <= 20) std::printf("FAIL %s: %ld %ld %ld %ld\n", what, a, b, c, d);
}

// Counts of each element of a row and the checks of one access.
struct Row {
  uintptr_t base;
  int64_t cols;
  int elem;
  std::vector<int> count;
  bool ok = true;
  Row(uintptr_t b, int64_t c, int e) : base(b), cols(c), elem(e), count(c, 0) {}
  void scalar(int64_t j) {
    if (j < 0 || j >= cols) {
      ok = false;
      return;
    }
    ++count[j];
  }
  void vector(int64_t first, int bytes) {
    const int64_t n = bytes / elem;
    if ((base + static_cast<uintptr_t>(first) * elem) % bytes != 0 || first < 0 || first + n > cols) {
      ok = false;
      return;
    }
    for (int64_t k = 0; k < n; ++k) ++count[first + k];
  }
  bool once() const {
    if (!ok) return false;
    for (int c : count)
      if (c != 1) return false;
    return true;
  }
};

RowSplit split(uintptr_t addr, int64_t cols, int elem, int bytes = 16) { return split_row(addr, cols, elem, bytes); }

// logprobs_fwd_kernel and row_share of dpo_fwd_kernel: head, vector pairs, tail over `stride` threads.
void strided_row(Row& row, int64_t stride) {
  const RowSplit s = split(row.base, row.cols, row.elem);
  const int64_t per = 16 / row.elem;
  for (int64_t t = 0; t < stride; ++t) {
    for_strided(0, s.head, t, stride, [&](int64_t j) { row.scalar(j); });
    for_vector_pairs(
        s.n_vec, t, stride,
        [&](int64_t a, int64_t b) {
          row.vector(s.head + a * per, 16);
          row.vector(s.head + b * per, 16);
        },
        [&](int64_t a) { row.vector(s.head + a * per, 16); });
    for_strided(s.tail, row.cols, t, stride, [&](int64_t j) { row.scalar(j); });
  }
}

// logprobs_bwd_kernel: grid (1 row, chunks), the access width both rows allow, the loads and the stores.
bool backward_row(uintptr_t x, uintptr_t g, int64_t cols, int elem) {
  const int bytes = common_access_bytes(x, g, elem);
  Row read(x, cols, elem), write(g, cols, elem);
  const RowSplit s = split(x, cols, elem, bytes);
  const RowSplit sg = split_row(g, cols, elem, bytes);
  if (sg.head != s.head) return false;  // both rows must cut at the same element
  const int64_t per = bytes / elem;
  const int64_t chunks = logprobs_backward_chunks(cols, elem);
  const int64_t per_chunk = logprobs_backward_per_chunk(bytes);
  const int items = logprobs_backward_items(bytes);
  if (s.n_vec > chunks * per_chunk) return false;  // the grid must cover the body
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * per_chunk;
    const int64_t end = s.n_vec < begin + per_chunk ? s.n_vec : begin + per_chunk;
    for (int t = 0; t < kLogprobsBackwardThreads; ++t) {
      if (c == 0) {
        for_strided(0, s.head, t, kLogprobsBackwardThreads, [&](int64_t j) { read.scalar(j), write.scalar(j); });
        for_strided(s.tail, cols, t, kLogprobsBackwardThreads, [&](int64_t j) { read.scalar(j), write.scalar(j); });
      }
      if (begin >= end) continue;
      const int here = static_cast<int>(end - begin) - t;
      for (int item = 0; item < items; ++item) {
        const int offset = item * kLogprobsBackwardThreads;
        if (offset >= here) continue;
        const int64_t v = begin + t + offset;
        read.vector(s.head + v * per, bytes);
        write.vector(s.head + v * per, bytes);
      }
    }
  }
  return read.once() && write.once();
}

// dpo_bwd_kernel: the flat [rows, width] gradient, N elements per thread.
bool dpo_backward(int64_t rows, int64_t width, int elem, int mask_bytes, uintptr_t grad, uintptr_t mask) {
  const int n = 16 / elem;
  const int64_t total = rows * width;
  const int64_t per_block = 256 * static_cast<int64_t>(n);
  const int64_t blocks = (total + per_block - 1) / per_block;
  const double inv_width = 1.0 / static_cast<double>(width);
  const int chunk_align = n * mask_bytes < 16 ? n * mask_bytes : 16;
  Row write(grad, total, elem), read(mask, total, mask_bytes);
  for (int64_t b = 0; b < blocks; ++b)
    for (int t = 0; t < 256; ++t) {
      const int64_t first = (b * 256 + t) * n;
      if (first >= total) continue;
      const int64_t row = flat_row(first, width, inv_width);
      if (row != first / width) return false;
      const int64_t col = first - row * width;
      const bool vectorised = first + n <= total && col + n <= width && grad % 16 == 0 && mask % chunk_align == 0;
      if (vectorised) {
        write.vector(first, 16);
        for (int k = 0; k < n; ++k) read.scalar(first + k);  // one chunk load
        if ((mask + static_cast<uintptr_t>(first) * mask_bytes) % chunk_align != 0) return false;
      } else {
        const int count = static_cast<int>(total - first < n ? total - first : n);
        for (int k = 0; k < count; ++k) write.scalar(first + k), read.scalar(first + k);
      }
    }
  return write.once() && read.once();
}

// A split launch, grid (rows, splits) of `threads` threads, each row's tokens shared by one launch-wide stride
// (the policy kernels' token loops: for t = s * threads + thread; t < tokens; t += splits * threads): every token
// of every row once; every block's partial result in a slot of its own inside the [rows, splits] buffer
// (split_slot); the second pass of row r reads, for s = 0, 1, ..., the slot that block (r, s) wrote.
bool split_launch(int64_t rows, int64_t tokens, int threads, int splits) {
  const int64_t stride = static_cast<int64_t>(splits) * threads;
  std::vector<int64_t> writer(static_cast<size_t>(rows * splits), -1);
  for (int64_t r = 0; r < rows; ++r) {
    Row row(0, tokens, 1);
    for (int s = 0; s < splits; ++s) {
      for (int t = 0; t < threads; ++t)
        for_strided(0, tokens, static_cast<int64_t>(s) * threads + t, stride, [&](int64_t j) { row.scalar(j); });
      const int64_t slot = split_slot(r, splits, s);
      if (slot < 0 || slot >= rows * splits || writer[slot] != -1) return false;
      writer[slot] = r * splits + s;
    }
    if (!row.once()) return false;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int s = 0; s < splits; ++s)
      if (writer[split_slot(r, splits, s)] != r * splits + s) return false;
  return true;
}

}  // namespace

int main() {
  std::vector<int64_t> widths;
  for (int64_t v = 1; v <= 300; ++v) widths.push_back(v);
  for (int64_t v : {32000, 32768, 128256, 151665, 151936, 152064, 256000}) widths.push_back(v);
  const uintptr_t base = 1u << 20;  // 16-byte aligned
  for (int elem : {2, 4}) {
    for (int64_t cols : widths) {
      const bool big = cols > 300;
      for (int mis = 0; mis < 16 / elem; ++mis) {
        // Forward: 512 threads (logprobs); DPO forward: every block size x splits it can launch.
        std::vector<int64_t> strides = {512};
        for (int threads = 64; threads <= 512; threads *= 2)
          for (int splits : {1, 2, 3, 7, kMaxSplits}) strides.push_back(static_cast<int64_t>(threads) * splits);
        for (int64_t stride : strides) {
          if (big && stride != 512 && stride % 7 != 0 && stride != 512 * kMaxSplits) continue;
          Row row(base + mis * elem, cols, elem);
          strided_row(row, stride);
          ++cases;
          if (!row.once()) fail("forward", elem, cols, mis, stride);
        }
        // Backward: every pair of misalignments of the logits' and the gradient's rows.
        for (int gmis = 0; gmis < 16 / elem; ++gmis) {
          ++cases;
          if (!backward_row(base + mis * elem, (base << 4) + gmis * elem, cols, elem))
            fail("backward", elem, cols, mis, gmis);
        }
      }
      // DPO backward: 2 rows x width, 1- to 8-byte masks, aligned and unaligned buffers.
      if (cols <= 300 || cols == 32768 || cols == 151665)
        for (int mask_bytes : {1, 2, 4, 8})
          for (int gmis : {0, 1})
            for (int mmis : {0, 1}) {
              ++cases;
              if (!dpo_backward(cols <= 300 ? 5 : 2, cols, elem, mask_bytes, base + gmis * elem,
                                (base << 2) + mmis * mask_bytes))
                fail("dpo backward", elem, cols, mask_bytes, gmis * 2 + mmis);
            }
    }
  }
  // The row estimate of large flat indices (2^31 - 1 pairs of long rows).
  for (int64_t width : {1, 7, 4099, 32768, 151665, 1 << 20})
    for (int64_t first = (int64_t{1} << 40) - 1000; first < (int64_t{1} << 40) + 1000; first += 3) {
      ++cases;
      if (flat_row(first, width, 1.0 / static_cast<double>(width)) != first / width) fail("flat_row", width, first, 0, 0);
    }
  // choose_splits: always 1..kMaxSplits, 1 when rows fill the GPU.
  for (int64_t rows : {1, 2, 8, 64, 132, 1000})
    for (int64_t units : {0, 100, 4096, 32768, 1 << 20}) {
      ++cases;
      const int s = choose_splits(rows, units, 256, 132, 4, 8);
      if (s < 1 || s > kMaxSplits || (rows >= 528 && s != 1)) fail("choose_splits", rows, units, s, 0);
    }
  // Split launches as the launchers pick them: the policy kernels (256 threads, 4 blocks per SM, 8+ tokens a
  // thread) and the DPO forward (64..512 threads, 2 blocks per SM, a vector a thread: 8 bf16 tokens), on
  // GPUs of 108, 132 and 144 SMs.
  for (int sms : {108, 132, 144})
    for (int64_t rows : {1, 2, 3, 8, 64})
      for (int64_t tokens : {1, 255, 2047, 2048, 4099, 32768, 40000}) {
        ++cases;
        const int policy = choose_splits(rows, tokens, 256, sms, 4, 8);
        if (!split_launch(rows, tokens, 256, policy)) fail("policy split", sms, rows, tokens, policy);
        for (int threads = 64; threads <= 512; threads *= 2) {
          ++cases;
          // The slots only (no tokens): the forward's shares of a row are strided_row's, checked above.
          const int dpo = choose_splits(rows, tokens / 8, threads, sms, 2, 1);
          if (!split_launch(rows, 0, threads, dpo)) fail("dpo split", sms, rows, tokens, threads * 100 + dpo);
        }
      }
  std::printf("cases %ld failures %ld\n", cases, failures);
  return failures == 0 ? 0 : 1;
}

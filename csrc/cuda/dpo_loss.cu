// The DPO family from per-token log-probs on CUDA, one launch each way (the Triton kernels' output layout).
//
// Forward: one block per pair. Every thread folds a strided share of the chosen and the rejected row (16-byte
// vector loads of the token log-probs, two in flight, with the mask's elements loaded in matching chunks,
// between a scalar head up to the tokens' first 16-byte boundary and a scalar tail), the block sums the shares
// with warp shuffles, and thread 0 evaluates every requested loss type (fastalign/dpo_math.h) and writes the
// pair's loss, the rows' sums and lengths, and each row's d loss / d token log-prob. All math is float32.
//
// Backward: the [2B, T] gradient as one flat array, a 16-byte vector of it per thread: upstream[row] on masked
// tokens, 0 elsewhere, with upstream[row] = row_grad[row] * grad_losses[pair] + grad_sums[row].

#include "device_utils.cuh"
#include "fastalign/mask.h"
#include "fastalign/dpo_math.h"
#include "fastalign/launch_dpo.h"
#include "fastalign/row_split.h"

namespace fastalign {
namespace {

constexpr int kMinForwardThreads = 64;
// 512-thread blocks, at least 2 per SM (a 1024-thread block of 43-46 registers held an SM alone: 50 %
// occupancy); rows too few to fill the GPU are split across blocks (row_split.h).
constexpr int kMaxForwardThreads = 512;
constexpr int kForwardBlocksPerSM = 2;
constexpr int kFinishThreads = 128;
constexpr int kBackwardThreads = 256;

// The mask elements that go with one Vec<T> of token log-probs, read in one load (several 16-byte loads for
// wide masks). The mask's elements are unsigned integers of the mask dtype's width.
template <typename M, int N>
struct alignas(N * sizeof(M) < 16 ? N * sizeof(M) : 16) MaskChunk {
  M v[N];
};

// Chunks are aligned whenever the token log-probs' and the mask's buffers are (the usual case: the vector body
// starts at an element index that is a multiple of N); a mask at an odd offset is read element by element.
template <typename M, int N>
__device__ __forceinline__ MaskChunk<M, N> load_chunk(const M* m, bool aligned) {
  if (aligned) return *reinterpret_cast<const MaskChunk<M, N>*>(m);
  MaskChunk<M, N> chunk;
#pragma unroll
  for (int k = 0; k < N; ++k) chunk.v[k] = m[k];
  return chunk;
}

struct ForwardParams {
  const void* tokens;
  const void* mask;
  uint64_t mask_bits;  // mask_value_bits of the mask's dtype
  const float* ref;
  int64_t pairs;
  int64_t width;
  unsigned types;
  unsigned averaged;
  dpo::Weights weights;
  dpo::Options options;
  float* losses;
  float* sums;
  float* lengths;
  float* row_grad;
};

struct RowSum {
  float sum;  // Σ masked token log-probs
  int count;  // number of masked tokens
};

template <typename T, typename M>
__device__ __forceinline__ void fold(RowSum& acc, T x, M m, M bits) {
  // Tokens outside the mask add an exact 0 (not 0 * x), so a NaN or inf there does not reach the sum.
  const bool keep = mask_keeps(m, bits);
  acc.sum += keep ? Convert<T>::load(x) : 0.0f;
  acc.count += keep ? 1 : 0;
}

template <typename T, typename M>
__device__ __forceinline__ void fold_chunk(RowSum& acc, const Vec<T>& x, const MaskChunk<M, Vec<T>::kSize>& m,
                                           M bits) {
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) fold(acc, x.v[k], m.v[k], bits);
}

// The share of one row of `width` tokens of thread `first` of `stride` (row_split.h: the threads of all the
// row's blocks). Both vectors of a pair and their mask chunks are loaded before either is folded.
template <typename T, typename M, bool kMaskAligned>
__device__ __forceinline__ void row_body(RowSum& acc, const T* x, const M* m, RowSplit split, int64_t first,
                                         int64_t stride, M bits) {
  constexpr int N = Vec<T>::kSize;
  using Chunk = MaskChunk<M, N>;
  const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(x + split.head);
  const M* mv = m + split.head;
  for_vector_pairs(
      split.n_vec, first, stride,
      [&](int64_t a, int64_t b) {
        const Vec<T> va = xv[a];
        const Vec<T> vb = xv[b];
        const Chunk mask_a = load_chunk<M, N>(mv + a * N, kMaskAligned);
        const Chunk mask_b = load_chunk<M, N>(mv + b * N, kMaskAligned);
        fold_chunk(acc, va, mask_a, bits);
        fold_chunk(acc, vb, mask_b, bits);
      },
      [&](int64_t a) { fold_chunk(acc, xv[a], load_chunk<M, N>(mv + a * N, kMaskAligned), bits); });
}

template <typename T, typename M>
__device__ RowSum row_share(const T* x, const M* m, int64_t width, M bits, int64_t first, int64_t stride) {
  constexpr int N = Vec<T>::kSize;
  RowSum acc{0.0f, 0};
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(x), width, sizeof(T));
  for_strided(0, split.head, first, stride, [&](int64_t j) { fold(acc, x[j], m[j], bits); });
  for_strided(split.tail, width, first, stride, [&](int64_t j) { fold(acc, x[j], m[j], bits); });
  if (reinterpret_cast<uintptr_t>(m + split.head) % alignof(MaskChunk<M, N>) == 0) {
    row_body<T, M, true>(acc, x, m, split, first, stride, bits);
  } else {
    row_body<T, M, false>(acc, x, m, split, first, stride, bits);
  }
  return acc;
}

__device__ __forceinline__ RowSum warp_sum(RowSum s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    s.sum += __shfl_xor_sync(0xffffffffu, s.sum, offset);
    s.count += __shfl_xor_sync(0xffffffffu, s.count, offset);
  }
  return s;
}

// Sum two rows' shares over the block (blockDim.x a multiple of 32); the totals are valid in thread 0.
__device__ __forceinline__ void block_sum(RowSum& chosen, RowSum& rejected) {
  __shared__ RowSum warp_chosen[kMaxForwardThreads / 32];
  __shared__ RowSum warp_rejected[kMaxForwardThreads / 32];
  chosen = warp_sum(chosen);
  rejected = warp_sum(rejected);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_chosen[warp] = chosen;
    warp_rejected[warp] = rejected;
  }
  __syncthreads();
  if (warp == 0) {
    const bool live = lane < static_cast<int>(blockDim.x / 32);
    chosen = warp_sum(live ? warp_chosen[lane] : RowSum{0.0f, 0});
    rejected = warp_sum(live ? warp_rejected[lane] : RowSum{0.0f, 0});
  }
}

// Warp 0 of a pair's block (or its finishing warp) with the pair's totals in every lane: lane k evaluates loss
// type k, a butterfly sums the types' shares, lane 0 writes.
__device__ __forceinline__ void finish_pair(const ForwardParams& p, int64_t pair, RowSum chosen, RowSum rejected) {
  const int lane = threadIdx.x % 32;
  const int64_t chosen_row = pair;
  const int64_t rejected_row = p.pairs + pair;
  const dpo::PairRows rows{chosen.sum,
                           rejected.sum,
                           static_cast<float>(chosen.count),
                           static_cast<float>(rejected.count),
                           p.ref[chosen_row],
                           p.ref[rejected_row]};
  dpo::Terms terms{0.0f, 0.0f, 0.0f};
  if (lane < dpo::kNumLossTypes && ((p.types >> lane) & 1u) != 0)
    terms = dpo::pair_type_terms(rows, lane, p.averaged, p.weights, p.options);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    terms.loss += __shfl_xor_sync(0xffffffffu, terms.loss, offset);
    terms.d_chosen += __shfl_xor_sync(0xffffffffu, terms.d_chosen, offset);
    terms.d_rejected += __shfl_xor_sync(0xffffffffu, terms.d_rejected, offset);
  }
  if (lane != 0) return;
  p.losses[pair] = terms.loss;
  p.sums[chosen_row] = rows.chosen_sum;
  p.sums[rejected_row] = rows.rejected_sum;
  p.lengths[chosen_row] = rows.chosen_length;
  p.lengths[rejected_row] = rows.rejected_length;
  p.row_grad[chosen_row] = terms.d_chosen;
  p.row_grad[rejected_row] = terms.d_rejected;
}

// Grid (pairs, splits). One split: the block finishes its pair. More: block s writes its shares of both rows to
// partial[2 (pair * splits + s)] and dpo_finish_kernel sums them in block order.
template <typename T, typename M>
__global__ void __launch_bounds__(kMaxForwardThreads, kForwardBlocksPerSM)
    dpo_fwd_kernel(ForwardParams p, RowSum* __restrict__ partial) {
  const int64_t pair = blockIdx.x;
  const int64_t chosen_row = pair;
  const int64_t rejected_row = p.pairs + pair;
  const T* tokens = static_cast<const T*>(p.tokens);
  const M* mask = static_cast<const M*>(p.mask);
  const M bits = static_cast<M>(p.mask_bits);
  const int64_t first = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  RowSum chosen =
      row_share(tokens + chosen_row * p.width, mask + chosen_row * p.width, p.width, bits, first, stride);
  RowSum rejected =
      row_share(tokens + rejected_row * p.width, mask + rejected_row * p.width, p.width, bits, first, stride);
  block_sum(chosen, rejected);
  if (threadIdx.x >= 32) return;
  if (gridDim.y == 1) return finish_pair(p, pair, chosen, rejected);
  if (threadIdx.x == 0) {
    partial[2 * split_slot(pair, gridDim.y, blockIdx.y)] = chosen;
    partial[2 * split_slot(pair, gridDim.y, blockIdx.y) + 1] = rejected;
  }
}

// One warp per pair: the splits' shares summed in block order (the same bits on every run), then finish_pair.
__global__ void __launch_bounds__(kFinishThreads) dpo_finish_kernel(ForwardParams p, const RowSum* partial,
                                                                    int splits) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (kFinishThreads / 32) + threadIdx.x / 32;
  if (pair >= p.pairs) return;
  RowSum chosen{0.0f, 0}, rejected{0.0f, 0};
  for (int s = 0; s < splits; ++s) {
    const RowSum c = partial[2 * split_slot(pair, splits, s)];
    const RowSum r = partial[2 * split_slot(pair, splits, s) + 1];
    chosen.sum += c.sum;
    chosen.count += c.count;
    rejected.sum += r.sum;
    rejected.count += r.count;
  }
  finish_pair(p, pair, chosen, rejected);
}

struct BackwardParams {
  const void* mask;
  uint64_t mask_bits;
  const float* row_grad;
  const float* grad_losses;  // nullptr: zero
  int64_t grad_losses_stride;
  const float* grad_sums;  // nullptr: zero
  int64_t grad_sums_stride;
  int64_t pairs;
  int64_t width;
  double inv_width;  // 1 / width
  void* grad;
};

// d loss / d (each masked token log-prob) of a row. The product is rounded on its own (no fused multiply-add
// with the sum's gradient), as torch rounds it on the Triton path.
__device__ __forceinline__ float row_upstream(const BackwardParams& p, int64_t row) {
  float upstream = 0.0f;
  if (p.grad_losses != nullptr) {
    const int64_t pair = row < p.pairs ? row : row - p.pairs;
    upstream = __fmul_rn(p.row_grad[row], p.grad_losses[pair * p.grad_losses_stride]);
  }
  if (p.grad_sums != nullptr) upstream += p.grad_sums[row * p.grad_sums_stride];
  return upstream;
}

template <typename T, typename M>
__global__ void __launch_bounds__(kBackwardThreads) dpo_bwd_kernel(BackwardParams p) {
  constexpr int N = Vec<T>::kSize;
  using Chunk = MaskChunk<M, N>;
  const M* mask = static_cast<const M*>(p.mask);
  T* grad = static_cast<T*>(p.grad);
  const M bits = static_cast<M>(p.mask_bits);
  const int64_t total = 2 * p.pairs * p.width;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kBackwardThreads + threadIdx.x) * N;
  if (first >= total) return;
  // The vector's first row comes from a double-precision estimate of first / width, off by at most one, then
  // corrected: a 64-bit integer division is a long subroutine call on the GPU, about as costly as the vector's
  // memory traffic.
  int64_t row = static_cast<int64_t>(static_cast<double>(first) * p.inv_width);
  if (row * p.width > first) {
    --row;
  } else if ((row + 1) * p.width <= first) {
    ++row;
  }
  int64_t col = first - row * p.width;
  float upstream = row_upstream(p, row);
  // A whole vector inside one row is one 16-byte store; vectors that cross a row boundary (at most one per row,
  // none when T is a multiple of the vector width, all of them for rows narrower than a vector), the last
  // partial vector and unaligned buffers go element by element.
  const bool vectorised = first + N <= total && col + N <= p.width && reinterpret_cast<uintptr_t>(grad) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(mask) % alignof(Chunk) == 0;
  if (vectorised) {
    const Chunk m = *reinterpret_cast<const Chunk*>(mask + first);
    Vec<T> out;
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = Convert<T>::store(mask_keeps(m.v[k], bits) ? upstream : 0.0f);
    *reinterpret_cast<Vec<T>*>(grad + first) = out;
    return;
  }
  const int count = static_cast<int>(total - first < N ? total - first : N);
  for (int k = 0; k < count; ++k) {
    grad[first + k] = Convert<T>::store(mask_keeps(mask[first + k], bits) ? upstream : 0.0f);
    if (++col == p.width && k + 1 < count) {
      col = 0;
      upstream = row_upstream(p, ++row);
    }
  }
}

// Threads per forward block: about two vectors of each row per thread, so that short rows leave few threads
// idle and long rows keep many loads in flight.
int forward_threads(int64_t width, int vector_size) {
  const int64_t vectors = (width + vector_size - 1) / vector_size;
  int threads = kMinForwardThreads;
  while (threads < kMaxForwardThreads && 2 * static_cast<int64_t>(threads) < vectors) threads *= 2;
  return threads;
}

// Launch<M>::For<T>::run(params, stream) for token dtype T and mask elements M, through dispatch_dtype.
template <typename M>
struct ForwardLaunch {
  template <typename T>
  struct For {
    static LaunchError run(ForwardParams p, uintptr_t stream) {
      const int threads = forward_threads(p.width, Vec<T>::kSize);
      int sms = 0;
      if (const LaunchError error = multiprocessor_count(&sms)) return error;
      // Few pairs of long rows: split each row so that every SM gets blocks, a vector of each row per thread
      // at least (8 pairs of 32768 bf16 tokens: 8 blocks per pair).
      const int splits = choose_splits(p.pairs, p.width / Vec<T>::kSize, threads, sms, kForwardBlocksPerSM, 1);
      const dim3 grid(static_cast<unsigned>(p.pairs), static_cast<unsigned>(splits));
      if (splits == 1) {
        dpo_fwd_kernel<T, M><<<grid, threads, 0, as_stream(stream)>>>(p, nullptr);
        return last_launch_error();
      }
      RowSum* partial = nullptr;
      const size_t bytes = sizeof(RowSum) * 2 * static_cast<size_t>(p.pairs) * splits;
      if (cudaMallocAsync(reinterpret_cast<void**>(&partial), bytes, as_stream(stream)) != cudaSuccess)
        return last_launch_error();
      dpo_fwd_kernel<T, M><<<grid, threads, 0, as_stream(stream)>>>(p, partial);
      const unsigned finish_blocks = static_cast<unsigned>((p.pairs + kFinishThreads / 32 - 1) / (kFinishThreads / 32));
      dpo_finish_kernel<<<finish_blocks, kFinishThreads, 0, as_stream(stream)>>>(p, partial, splits);
      const LaunchError error = last_launch_error();
      cudaFreeAsync(partial, as_stream(stream));
      return error != nullptr ? error : last_launch_error();
    }
  };
};

template <typename M>
struct BackwardLaunch {
  template <typename T>
  struct For {
    static LaunchError run(BackwardParams p, uintptr_t stream) {
      constexpr int64_t per_block = static_cast<int64_t>(kBackwardThreads) * Vec<T>::kSize;
      const int64_t blocks = (2 * p.pairs * p.width + per_block - 1) / per_block;
      if (blocks > 0x7fffffff) return "more than 2^31 - 1 blocks of tokens";
      dpo_bwd_kernel<T, M><<<static_cast<unsigned>(blocks), kBackwardThreads, 0, as_stream(stream)>>>(p);
      return last_launch_error();
    }
  };
};

template <template <typename> class Launch, typename Params>
LaunchError dispatch_mask(int mask_bytes, int dtype, Params params, uintptr_t stream) {
  switch (mask_bytes) {
    case 1:
      return dispatch_dtype<Launch<uint8_t>::template For>(dtype, params, stream);
    case 2:
      return dispatch_dtype<Launch<uint16_t>::template For>(dtype, params, stream);
    case 4:
      return dispatch_dtype<Launch<uint32_t>::template For>(dtype, params, stream);
    case 8:
      return dispatch_dtype<Launch<unsigned long long>::template For>(dtype, params, stream);
    default:
      return "unsupported mask element width (expected 1, 2, 4 or 8 bytes)";
  }
}

}  // namespace

LaunchError dpo_loss_forward(const void* token_logps, int dtype, const void* mask, int mask_bytes, bool mask_is_float,
                             const float* ref_logps, int64_t pairs, int64_t width, unsigned types, unsigned averaged,
                             const dpo::Weights& weights, dpo::Options options, float* losses, float* sums,
                             float* lengths, float* row_grad, uintptr_t stream) {
  if (types == 0 || (types >> dpo::kNumLossTypes) != 0)
    return "types must set some of the low 12 bits (one per DPO loss type)";
  if (pairs == 0) return nullptr;
  if (pairs > 0x7fffffff) return "more than 2^31 - 1 pairs";
  const ForwardParams params{token_logps,
                             mask,
                             mask_value_bits(mask_bytes, mask_is_float),
                             ref_logps,
                             pairs,
                             width,
                             types,
                             averaged,
                             weights,
                             options,
                             losses,
                             sums,
                             lengths,
                             row_grad};
  return dispatch_mask<ForwardLaunch>(mask_bytes, dtype, params, stream);
}

LaunchError dpo_loss_backward(const void* mask, int mask_bytes, bool mask_is_float, const float* row_grad,
                              const float* grad_losses, int64_t grad_losses_stride, const float* grad_sums,
                              int64_t grad_sums_stride, int64_t pairs, int64_t width, void* grad, int dtype,
                              uintptr_t stream) {
  if (pairs == 0 || width == 0) return nullptr;
  const BackwardParams params{mask,
                              mask_value_bits(mask_bytes, mask_is_float),
                              row_grad,
                              grad_losses,
                              grad_losses_stride,
                              grad_sums,
                              grad_sums_stride,
                              pairs,
                              width,
                              1.0 / static_cast<double>(width),
                              grad};
  return dispatch_mask<BackwardLaunch>(mask_bytes, dtype, params, stream);
}

}  // namespace fastalign

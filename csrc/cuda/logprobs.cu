// logprobs_from_logits on CUDA: one pass over each row's logits forward (online softmax with entropy), one read
// and one write backward. Rows are read in 16-byte vectors (8 bf16/fp16 or 4 fp32 values) between a scalar head
// (up to the first 16-byte boundary, so any row stride works) and a scalar tail (row_split.h); all math is
// float32, in base 2 (softmax_math.h: one ex2.approx.ftz per element, tanh.approx for the softcap). The forward
// is compiled per softcap and per requested output; the backward per softcap and per access width (the widest
// at which the logits' and the gradient's rows are aligned alike).

#include "device_utils.cuh"
#include "fastalign/launch_logprobs.h"
#include "fastalign/row_split.h"
#include "fastalign/softmax_math.h"

namespace fastalign {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = kLogprobsBackwardThreads;

// Compile-time variants of the forward: softcap, and which optional outputs are wanted (the others are not
// computed at all).
enum ForwardFlags : unsigned { kSoftcapFlag = 1u, kEntropyFlag = 2u, kSumFlag = 4u };

struct ForwardState {
  SoftmaxState softmax;  // base 2, max on u (softmax_math.h)
  float total;           // Σ u, for label smoothing (Σ l = lin Σ u)
};

template <bool kEntropy, bool kSum>
__device__ __forceinline__ ForwardState merge_forward(ForwardState a, ForwardState b, float s) {
  return ForwardState{softmax2_merge<kEntropy>(a.softmax, b.softmax, s), kSum ? a.total + b.total : 0.0f};
}

template <bool kEntropy, bool kSum>
__device__ __forceinline__ ForwardState shuffle_xor(ForwardState st, int mask) {
  ForwardState out{SoftmaxState{__shfl_xor_sync(0xffffffffu, st.softmax.max, mask),
                                __shfl_xor_sync(0xffffffffu, st.softmax.sum, mask), 0.0f},
                   0.0f};
  if (kEntropy) out.softmax.centered = __shfl_xor_sync(0xffffffffu, st.softmax.centered, mask);
  if (kSum) out.total = __shfl_xor_sync(0xffffffffu, st.total, mask);
  return out;
}

// Merge every thread's state; the result is valid in thread 0.
template <int kThreads, bool kEntropy, bool kSum>
__device__ ForwardState block_merge(ForwardState state, float s) {
  constexpr int kWarps = kThreads / 32;
  __shared__ ForwardState warp_states[kWarps];
  for (int mask = 16; mask > 0; mask >>= 1)
    state = merge_forward<kEntropy, kSum>(state, shuffle_xor<kEntropy, kSum>(state, mask), s);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < kWarps ? warp_states[lane] : ForwardState{softmax_empty(), 0.0f};
    for (int mask = 16; mask > 0; mask >>= 1)
      state = merge_forward<kEntropy, kSum>(state, shuffle_xor<kEntropy, kSum>(state, mask), s);
  }
  return state;
}

template <typename T, unsigned kFlags>
__device__ __forceinline__ void fold_vector(ForwardState& state, const Vec<T>& vec, float inv_softcap, float s) {
  constexpr bool kSoftcap = (kFlags & kSoftcapFlag) != 0;
  float u[Vec<T>::kSize];
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) {
    u[k] = softmax2_u<kSoftcap>(Convert<T>::load(vec.v[k]), inv_softcap);
    if (kFlags & kSumFlag) state.total += u[k];
  }
  state.softmax = softmax2_add_group<(kFlags & kEntropyFlag) != 0>(state.softmax, u, Vec<T>::kSize, s);
}

template <typename T, unsigned kFlags>
__device__ __forceinline__ void fold_scalar(ForwardState& state, T raw, float inv_softcap, float s) {
  float u[1] = {softmax2_u<(kFlags & kSoftcapFlag) != 0>(Convert<T>::load(raw), inv_softcap)};
  if (kFlags & kSumFlag) state.total += u[0];
  state.softmax = softmax2_add_group<(kFlags & kEntropyFlag) != 0>(state.softmax, u, 1, s);
}

// One block per row. inv_softcap = 1 / softcap; lin = 1 / temperature (times softcap with a softcap);
// s = lin * log2(e) (softmax_math.h, base 2).
template <typename T, unsigned kFlags>
__global__ void __launch_bounds__(kForwardThreads)
    logprobs_fwd_kernel(const T* __restrict__ logits, int64_t cols, int64_t row_stride,
                        const int64_t* __restrict__ targets, float inv_softcap, float lin, float s,
                        float* __restrict__ max_logit, float* __restrict__ log_sum, float* __restrict__ target_logp,
                        float* __restrict__ entropy, float* __restrict__ sum_logits) {
  constexpr bool kSoftcap = (kFlags & kSoftcapFlag) != 0;
  constexpr bool kEntropy = (kFlags & kEntropyFlag) != 0;
  constexpr bool kSum = (kFlags & kSumFlag) != 0;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  // The target's logit is needed only after the reduction: thread 0 loads it first, off the critical path.
  T target_raw{};
  if (threadIdx.x == 0) target_raw = x[targets[row]];
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(x), cols, sizeof(T));
  ForwardState state{softmax_empty(), 0.0f};
  for_strided(0, split.head, threadIdx.x, kForwardThreads,
              [&](int64_t j) { fold_scalar<T, kFlags>(state, x[j], inv_softcap, s); });
  const Vec<T>* vectors = reinterpret_cast<const Vec<T>*>(x + split.head);
  // Two independent 16-byte loads in flight per thread before either is folded in.
  for_vector_pairs(
      split.n_vec, threadIdx.x, kForwardThreads,
      [&](int64_t a, int64_t b) {
        const Vec<T> va = vectors[a];
        const Vec<T> vb = vectors[b];
        fold_vector<T, kFlags>(state, va, inv_softcap, s);
        fold_vector<T, kFlags>(state, vb, inv_softcap, s);
      },
      [&](int64_t a) { fold_vector<T, kFlags>(state, vectors[a], inv_softcap, s); });
  for_strided(split.tail, cols, threadIdx.x, kForwardThreads,
              [&](int64_t j) { fold_scalar<T, kFlags>(state, x[j], inv_softcap, s); });
  state = block_merge<kForwardThreads, kEntropy, kSum>(state, s);
  if (threadIdx.x == 0) {
    const float target_u = softmax2_u<kSoftcap>(Convert<T>::load(target_raw), inv_softcap);
    const RowStats stats = softmax2_finish(state.softmax, target_u, s);
    max_logit[row] = stats.max_logit;
    log_sum[row] = stats.log_sum;
    target_logp[row] = stats.target_logp;
    if (kEntropy) entropy[row] = stats.entropy;
    if (kSum) sum_logits[row] = state.total * lin;
  }
}

// The per-row constants of the backward.
struct RowGrad {
  float offset2;  // (max_logit + log_sum) log2(e)
  Grad2Coefficients coeffs;
  int64_t target;
  bool zero;  // every coefficient is 0: the gradient is 0 without reading the logits
};

template <typename T, bool kSoftcap>
__device__ __forceinline__ T grad_element(T raw, const RowGrad& r, float inv_softcap, float s) {
  return Convert<T>::store(logit_grad2<kSoftcap>(softmax2_u<kSoftcap>(Convert<T>::load(raw), inv_softcap), s,
                                                 r.offset2, r.coeffs));
}

template <typename T, bool kSoftcap>
__device__ __forceinline__ T grad_element(T raw, int64_t col, int64_t target, const RowGrad& r, float inv_softcap,
                                          float s) {
  const float u = softmax2_u<kSoftcap>(Convert<T>::load(raw), inv_softcap);
  float grad = logit_grad2<kSoftcap>(u, s, r.offset2, r.coeffs);
  if (col == target) grad += target_grad2<kSoftcap>(u, r.coeffs);
  return Convert<T>::store(grad);
}

// The aligned body of one row chunk with kBytes-wide accesses (the widest both rows allow): every item's load
// is issued before any is used or stored, so the thread has all of them in flight. Each thread reads its own
// elements before it writes them, so grad may alias logits.
template <typename T, bool kSoftcap, int kBytes>
__device__ __forceinline__ void backward_body(const T* x, T* g, int64_t cols, const RowGrad& r, float inv_softcap,
                                              float s) {
  using V = Vec<T, kBytes>;
  constexpr int kItems = kLogprobsBackwardItems * (16 / kBytes);
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(x), cols, sizeof(T), kBytes);
  const int64_t per_chunk = logprobs_backward_per_chunk(kBytes);
  const int64_t begin = blockIdx.y * per_chunk;
  const int64_t end = min(split.n_vec, begin + per_chunk);
  if (begin >= end) return;
  // 32-bit offsets from this thread's first vector (a chunk holds at most 8192 vectors).
  const V* in = reinterpret_cast<const V*>(x + split.head) + begin + threadIdx.x;
  V* out = reinterpret_cast<V*>(g + split.head) + begin + threadIdx.x;
  const int here = static_cast<int>(end - begin) - static_cast<int>(threadIdx.x);
  // The target's column relative to this thread's first vector.
  const int64_t target_rel = r.target - split.head - (begin + threadIdx.x) * V::kSize;
  // Loads are issued a group at a time (all of them for 16- and 8-byte accesses): at least 4 in flight, without
  // holding 32 narrow ones in registers.
  constexpr int kGroup = kItems < 8 ? kItems : 8;
#pragma unroll
  for (int group = 0; group < kItems; group += kGroup) {
    V raw[kGroup];
#pragma unroll
    for (int item = 0; item < kGroup; ++item) {
      const int offset = (group + item) * kBackwardThreads;
      if (offset < here) raw[item] = in[offset];
    }
#pragma unroll
    for (int item = 0; item < kGroup; ++item) {
      const int offset = (group + item) * kBackwardThreads;
      if (offset >= here) continue;
      V result;
      const int64_t k_target = target_rel - static_cast<int64_t>(offset) * V::kSize;
      if (static_cast<uint64_t>(k_target) < static_cast<uint64_t>(V::kSize)) {  // the target's vector
#pragma unroll
        for (int k = 0; k < V::kSize; ++k)
          result.v[k] = grad_element<T, kSoftcap>(raw[item].v[k], k, k_target, r, inv_softcap, s);
      } else {
#pragma unroll
        for (int k = 0; k < V::kSize; ++k)
          result.v[k] = grad_element<T, kSoftcap>(raw[item].v[k], r, inv_softcap, s);
      }
      out[offset] = result;
    }
  }
}

// The body of an all-zero row: stores only.
template <typename T, int kBytes>
__device__ __forceinline__ void zero_body(const T* x, T* g, int64_t cols) {
  using V = Vec<T, kBytes>;
  constexpr int kItems = kLogprobsBackwardItems * (16 / kBytes);
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(x), cols, sizeof(T), kBytes);
  const int64_t begin = blockIdx.y * logprobs_backward_per_chunk(kBytes);
  const int64_t end = min(split.n_vec, begin + logprobs_backward_per_chunk(kBytes));
  V zeros;
#pragma unroll
  for (int k = 0; k < V::kSize; ++k) zeros.v[k] = Convert<T>::store(0.0f);
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int64_t v = begin + item * kBackwardThreads + threadIdx.x;
    if (v < end) reinterpret_cast<V*>(g + split.head)[v] = zeros;
  }
}

template <typename T, int kBytes>
__device__ __forceinline__ void scalar_ends(const T* x, T* g, int64_t cols, const RowGrad& r, bool softcap,
                                            float inv_softcap, float s) {
  const RowSplit split = split_row(reinterpret_cast<uintptr_t>(x), cols, sizeof(T), kBytes);
  const auto one = [&](int64_t j) {
    g[j] = r.zero    ? Convert<T>::store(0.0f)
           : softcap ? grad_element<T, true>(x[j], j, r.target, r, inv_softcap, s)
                     : grad_element<T, false>(x[j], j, r.target, r, inv_softcap, s);
  };
  for_strided(0, split.head, threadIdx.x, kBackwardThreads, one);
  for_strided(split.tail, cols, threadIdx.x, kBackwardThreads, one);
}

// Grid (rows, column chunks), row_split.h.
template <typename T, bool kSoftcap>
__global__ void __launch_bounds__(kBackwardThreads, 4)
    logprobs_bwd_kernel(const T* logits, int64_t cols, int64_t row_stride, const int64_t* __restrict__ targets,
                        const float* __restrict__ max_logit, const float* __restrict__ log_sum,
                        const float* __restrict__ alpha, const float* __restrict__ beta,
                        const float* __restrict__ gamma, const float* __restrict__ kappa, float inv_softcap,
                        float inv_temperature, float s, T* grad, int64_t grad_row_stride) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad + row * grad_row_stride;
  const GradCoefficients coeffs{alpha[row], load_or(beta, row, 0.0f), load_or(gamma, row, 0.0f),
                                load_or(kappa, row, 0.0f)};
  const RowGrad r{(max_logit[row] + log_sum[row]) * kLog2e, grad2_coefficients(coeffs, inv_temperature),
                  targets[row],
                  coeffs.alpha == 0.0f && coeffs.beta == 0.0f && coeffs.gamma == 0.0f && coeffs.kappa == 0.0f};
  // One split for both rows: at the widest access at which the logits' and the gradient's rows are aligned alike.
  const int bytes = common_access_bytes(reinterpret_cast<uintptr_t>(x), reinterpret_cast<uintptr_t>(g), sizeof(T));
  const auto run = [&](auto width) {
    constexpr int kBytes = decltype(width)::value;
    if (blockIdx.y == 0) scalar_ends<T, kBytes>(x, g, cols, r, kSoftcap, inv_softcap, s);
    if (r.zero) {
      zero_body<T, kBytes>(x, g, cols);
    } else {
      backward_body<T, kSoftcap, kBytes>(x, g, cols, r, inv_softcap, s);
    }
  };
  switch (bytes) {
    case 16:
      return run(Width<16>{});
    case 8:
      return run(Width<8>{});
    case 4:
      return run(Width<4>{});
    default:
      if constexpr (sizeof(T) <= 2) return run(Width<2>{});
  }
}

template <typename T>
struct ForwardLaunch {
  template <unsigned kFlags>
  static void launch(const void* logits, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* targets,
                     float inv_softcap, float lin, float s, float* max_logit, float* log_sum, float* target_logp,
                     float* entropy, float* sum_logits, uintptr_t stream) {
    logprobs_fwd_kernel<T, kFlags><<<static_cast<unsigned>(rows), kForwardThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(logits), cols, row_stride, targets, inv_softcap, lin, s, max_logit, log_sum,
        target_logp, entropy, sum_logits);
  }

  static LaunchError run(const void* logits, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* targets,
                         float softcap, float inv_temperature, bool has_softcap, float* max_logit, float* log_sum,
                         float* target_logp, float* entropy, float* sum_logits, uintptr_t stream) {
    const float lin = has_softcap ? softcap * inv_temperature : inv_temperature;
    const float inv_softcap = has_softcap ? 1.0f / softcap : 1.0f;
    const unsigned flags = (has_softcap ? kSoftcapFlag : 0u) | (entropy != nullptr ? kEntropyFlag : 0u) |
                           (sum_logits != nullptr ? kSumFlag : 0u);
    const auto go = [&](auto flag) {
      launch<decltype(flag)::value>(logits, rows, cols, row_stride, targets, inv_softcap, lin, lin * kLog2e,
                                    max_logit, log_sum, target_logp, entropy, sum_logits, stream);
    };
    switch (flags) {
      case 0: go(Width<0>{}); break;
      case 1: go(Width<1>{}); break;
      case 2: go(Width<2>{}); break;
      case 3: go(Width<3>{}); break;
      case 4: go(Width<4>{}); break;
      case 5: go(Width<5>{}); break;
      case 6: go(Width<6>{}); break;
      default: go(Width<7>{}); break;
    }
    return last_launch_error();
  }
};

template <typename T>
struct BackwardLaunch {
  static LaunchError run(const void* logits, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* targets,
                         const float* max_logit, const float* log_sum, const float* alpha, const float* beta,
                         const float* gamma, const float* kappa, float softcap, float inv_temperature,
                         bool has_softcap, void* grad, int64_t grad_row_stride, uintptr_t stream) {
    const int64_t chunks = logprobs_backward_chunks(cols, sizeof(T));
    if (chunks > 65535) return "logprobs_backward: the vocabulary is too large for the column grid";
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
    const float lin = has_softcap ? softcap * inv_temperature : inv_temperature;
    const float inv_softcap = has_softcap ? 1.0f / softcap : 1.0f;
    const auto kernel = has_softcap ? logprobs_bwd_kernel<T, true> : logprobs_bwd_kernel<T, false>;
    kernel<<<grid, kBackwardThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(logits), cols, row_stride, targets, max_logit, log_sum, alpha, beta, gamma, kappa,
        inv_softcap, inv_temperature, lin * kLog2e, static_cast<T*>(grad), grad_row_stride);
    return last_launch_error();
  }
};

}  // namespace

LaunchError logprobs_forward(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                             const int64_t* targets, float softcap, float inv_temperature, bool has_softcap,
                             float* max_logit, float* log_sum, float* target_logp, float* entropy, float* sum_logits,
                             uintptr_t stream) {
  if (rows == 0) return nullptr;
  if (rows > 0x7fffffff) return "logprobs_forward: more than 2^31 - 1 rows";
  return dispatch_dtype<ForwardLaunch>(dtype, logits, rows, cols, row_stride, targets, softcap, inv_temperature,
                                       has_softcap, max_logit, log_sum, target_logp, entropy, sum_logits, stream);
}

LaunchError logprobs_backward(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                              const int64_t* targets, const float* max_logit, const float* log_sum,
                              const float* alpha, const float* beta, const float* gamma, const float* kappa,
                              float softcap, float inv_temperature, bool has_softcap, void* grad,
                              int64_t grad_row_stride, uintptr_t stream) {
  if (rows == 0) return nullptr;
  if (rows > 0x7fffffff) return "logprobs_backward: more than 2^31 - 1 rows";
  return dispatch_dtype<BackwardLaunch>(dtype, logits, rows, cols, row_stride, targets, max_logit, log_sum, alpha,
                                        beta, gamma, kappa, softcap, inv_temperature, has_softcap, grad,
                                        grad_row_stride, stream);
}

}  // namespace fastalign

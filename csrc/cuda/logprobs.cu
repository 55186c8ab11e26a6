// logprobs_from_logits on CUDA: one pass over each row's logits forward (online softmax with entropy), one read
// and one write backward. Rows are read in 16-byte vectors (8 bf16/fp16 or 4 fp32 values) between a scalar head
// (up to the first 16-byte boundary, so any row stride works) and a scalar tail; all math is float32.

#include "device_utils.cuh"
#include "fastalign/launch_logprobs.h"
#include "fastalign/softmax_math.h"

namespace fastalign {
namespace {

constexpr int kForwardThreads = 512;
constexpr int kBackwardThreads = 256;
// Vectors each backward thread handles per column chunk: a chunk is kBackwardThreads * kBackwardItems vectors.
constexpr int kBackwardItems = 4;

struct ForwardState {
  SoftmaxState softmax;
  float total;  // Σ l, for label smoothing
};

__device__ __forceinline__ ForwardState merge_forward(ForwardState a, ForwardState b) {
  return ForwardState{softmax_merge(a.softmax, b.softmax), a.total + b.total};
}

__device__ __forceinline__ ForwardState shuffle_xor(ForwardState s, int mask) {
  return ForwardState{SoftmaxState{__shfl_xor_sync(0xffffffffu, s.softmax.max, mask),
                                   __shfl_xor_sync(0xffffffffu, s.softmax.sum, mask),
                                   __shfl_xor_sync(0xffffffffu, s.softmax.centered, mask)},
                      __shfl_xor_sync(0xffffffffu, s.total, mask)};
}

// Merge every thread's state; the result is valid in thread 0.
template <int kThreads>
__device__ ForwardState block_merge(ForwardState state) {
  constexpr int kWarps = kThreads / 32;
  __shared__ ForwardState warp_states[kWarps];
  for (int mask = 16; mask > 0; mask >>= 1) state = merge_forward(state, shuffle_xor(state, mask));
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < kWarps ? warp_states[lane] : ForwardState{softmax_empty(), 0.0f};
    for (int mask = 16; mask > 0; mask >>= 1) state = merge_forward(state, shuffle_xor(state, mask));
  }
  return state;
}

template <typename T>
struct LogitTransform {
  float softcap, inv_temperature;
  bool has_softcap;
  __device__ __forceinline__ float operator()(T raw) const {
    return transform_logit(Convert<T>::load(raw), softcap, inv_temperature, has_softcap);
  }
};

template <typename T>
__device__ __forceinline__ void fold_vector(ForwardState& state, const Vec<T>& vec, const LogitTransform<T>& f) {
  float l[Vec<T>::kSize];
#pragma unroll
  for (int k = 0; k < Vec<T>::kSize; ++k) {
    l[k] = f(vec.v[k]);
    state.total += l[k];
  }
  state.softmax = softmax_add_group(state.softmax, l, Vec<T>::kSize);
}

template <typename T>
__global__ void __launch_bounds__(kForwardThreads)
    logprobs_fwd_kernel(const T* __restrict__ logits, int64_t cols, int64_t row_stride,
                        const int64_t* __restrict__ targets, LogitTransform<T> f, float* __restrict__ max_logit,
                        float* __restrict__ log_sum, float* __restrict__ target_logp, float* __restrict__ entropy,
                        float* __restrict__ sum_logits) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  const int64_t head = unaligned_head(x, cols);
  const int64_t n_vec = (cols - head) / Vec<T>::kSize;
  const int64_t tail = head + n_vec * Vec<T>::kSize;
  ForwardState state{softmax_empty(), 0.0f};
  for (int64_t j = threadIdx.x; j < head; j += kForwardThreads) {
    const float l = f(x[j]);
    state.softmax = softmax_add(state.softmax, l);
    state.total += l;
  }
  const Vec<T>* vectors = reinterpret_cast<const Vec<T>*>(x + head);
  int64_t v = threadIdx.x;
  // Two independent 16-byte loads in flight per thread before either is folded in.
  for (; v + kForwardThreads < n_vec; v += 2 * kForwardThreads) {
    const Vec<T> a = vectors[v];
    const Vec<T> b = vectors[v + kForwardThreads];
    fold_vector(state, a, f);
    fold_vector(state, b, f);
  }
  if (v < n_vec) fold_vector(state, vectors[v], f);
  for (int64_t j = tail + threadIdx.x; j < cols; j += kForwardThreads) {
    const float l = f(x[j]);
    state.softmax = softmax_add(state.softmax, l);
    state.total += l;
  }
  state = block_merge<kForwardThreads>(state);
  if (threadIdx.x == 0) {
    const RowStats stats = softmax_finish(state.softmax, f(x[targets[row]]));
    max_logit[row] = stats.max_logit;
    log_sum[row] = stats.log_sum;
    target_logp[row] = stats.target_logp;
    if (entropy != nullptr) entropy[row] = stats.entropy;
    if (sum_logits != nullptr) sum_logits[row] = state.total;
  }
}

struct RowGrad {
  float max_logit, log_sum;
  int64_t target;
  GradCoefficients coeffs;
  float softcap, inv_temperature;
  bool has_softcap;
  bool zero;  // every coefficient is 0: the gradient is 0 without reading the logits

  template <typename T>
  __device__ __forceinline__ float operator()(T raw, int64_t col) const {
    if (zero) return 0.0f;
    const float l = transform_logit(Convert<T>::load(raw), softcap, inv_temperature, has_softcap);
    return logit_grad(l, col == target, max_logit, log_sum, coeffs, softcap, inv_temperature, has_softcap);
  }
};

// Grid (rows, column chunks). Chunk c handles vectors [c * per_chunk, (c + 1) * per_chunk) of the row's
// aligned body; chunk 0 also handles the scalar head and tail. Each element is read before it is written by
// the same thread, so grad may alias logits.
template <typename T>
__global__ void __launch_bounds__(kBackwardThreads)
    logprobs_bwd_kernel(const T* logits, int64_t cols, int64_t row_stride, const int64_t* __restrict__ targets,
                        const float* __restrict__ max_logit, const float* __restrict__ log_sum,
                        const float* __restrict__ alpha, const float* __restrict__ beta,
                        const float* __restrict__ gamma, const float* __restrict__ kappa, float softcap,
                        float inv_temperature, bool has_softcap, T* grad, int64_t grad_row_stride) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad + row * grad_row_stride;
  const GradCoefficients coeffs{alpha[row], load_or(beta, row, 0.0f), load_or(gamma, row, 0.0f),
                                load_or(kappa, row, 0.0f)};
  const RowGrad row_grad{max_logit[row],
                         log_sum[row],
                         targets[row],
                         coeffs,
                         softcap,
                         inv_temperature,
                         has_softcap,
                         coeffs.alpha == 0.0f && coeffs.beta == 0.0f && coeffs.gamma == 0.0f && coeffs.kappa == 0.0f};
  const int64_t head = unaligned_head(x, cols);
  const int64_t n_vec = (cols - head) / Vec<T>::kSize;
  const int64_t tail = head + n_vec * Vec<T>::kSize;
  if (blockIdx.y == 0) {
    for (int64_t j = threadIdx.x; j < head; j += kBackwardThreads) g[j] = Convert<T>::store(row_grad(x[j], j));
    for (int64_t j = tail + threadIdx.x; j < cols; j += kBackwardThreads) g[j] = Convert<T>::store(row_grad(x[j], j));
  }
  const Vec<T>* in = reinterpret_cast<const Vec<T>*>(x + head);
  // grad's rows share the logits' alignment when both are densely packed; otherwise store element by element.
  const bool aligned_out = ((reinterpret_cast<uintptr_t>(g + head) & 15u) == 0);
  constexpr int64_t per_chunk = static_cast<int64_t>(kBackwardThreads) * kBackwardItems;
  const int64_t end = min(n_vec, (static_cast<int64_t>(blockIdx.y) + 1) * per_chunk);
#pragma unroll
  for (int item = 0; item < kBackwardItems; ++item) {
    const int64_t v = blockIdx.y * per_chunk + item * kBackwardThreads + threadIdx.x;
    if (v >= end) break;
    const Vec<T> raw = in[v];
    Vec<T> out;
    const int64_t col = head + v * Vec<T>::kSize;
#pragma unroll
    for (int k = 0; k < Vec<T>::kSize; ++k) out.v[k] = Convert<T>::store(row_grad(raw.v[k], col + k));
    if (aligned_out) {
      reinterpret_cast<Vec<T>*>(g + head)[v] = out;
    } else {
#pragma unroll
      for (int k = 0; k < Vec<T>::kSize; ++k) g[col + k] = out.v[k];
    }
  }
}

template <typename T>
struct ForwardLaunch {
  static LaunchError run(const void* logits, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* targets,
                         float softcap, float inv_temperature, bool has_softcap, float* max_logit, float* log_sum,
                         float* target_logp, float* entropy, float* sum_logits, uintptr_t stream) {
    const LogitTransform<T> f{softcap, inv_temperature, has_softcap};
    logprobs_fwd_kernel<T><<<static_cast<unsigned>(rows), kForwardThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(logits), cols, row_stride, targets, f, max_logit, log_sum, target_logp, entropy,
        sum_logits);
    return last_launch_error();
  }
};

template <typename T>
struct BackwardLaunch {
  static LaunchError run(const void* logits, int64_t rows, int64_t cols, int64_t row_stride, const int64_t* targets,
                         const float* max_logit, const float* log_sum, const float* alpha, const float* beta,
                         const float* gamma, const float* kappa, float softcap, float inv_temperature,
                         bool has_softcap, void* grad, int64_t grad_row_stride, uintptr_t stream) {
    constexpr int64_t per_chunk = static_cast<int64_t>(kBackwardThreads) * kBackwardItems * Vec<T>::kSize;
    const int64_t chunks = cols / per_chunk + 1;
    if (chunks > 65535) return "logprobs_backward: the vocabulary is too large for the column grid";
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
    logprobs_bwd_kernel<T><<<grid, kBackwardThreads, 0, as_stream(stream)>>>(
        static_cast<const T*>(logits), cols, row_stride, targets, max_logit, log_sum, alpha, beta, gamma, kappa,
        softcap, inv_temperature, has_softcap, static_cast<T*>(grad), grad_row_stride);
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

// The PPO / GRPO policy loss on CUDA: one block per row, its threads striding over the row's tokens (adjacent
// threads read adjacent tokens), the per-token math of policy_math.h in float32, and block reductions through
// warp shuffles. Each input comes with its own dtype code, the same for the whole grid, so branching on it
// never diverges. The [rows, tokens] inputs are contiguous; advantages and importance weights come with element
// strides (a token stride of 0 for one value per row). Masks of any torch dtype are read as raw bits.
//
// Few rows are split across several blocks each (row_split.h), the forward's partial sums added by a second
// pass in block order. At sequence level the blocks of a row first write partial sums of the row's log-ratio
// (and, backward, of d loss / d ratio) to a small buffer, and every block of the row adds the row's partials up
// in block order: the same bits in every block, forward and backward.
//
// Forward: per-row sums [8, rows] (the host reduces them over rows into the loss and the metrics). Backward:
// d_logp (and d_entropy) from each row's weight in the aggregation. At sequence level (GSPO) a first pass
// forms the row's mean log-ratio; the backward then sums d loss / d ratio over the row and spreads it back.

#include "device_utils.cuh"
#include "fastalign/mask.h"
#include "fastalign/launch_policy.h"
#include "fastalign/policy_math.h"
#include "fastalign/row_split.h"

namespace fastalign {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks per SM the register budget must allow (32 warps in flight to cover the loads' latency). Without a
// minimum, ptxas for sm_80 went down to 32 registers (full occupancy) and spilled.
constexpr int kMinBlocksPerSM = 4;

__device__ __forceinline__ float load(const void* data, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16:
      return Convert<__half>::load(static_cast<const __half*>(data)[i]);
    case kBFloat16:
      return Convert<__nv_bfloat16>::load(static_cast<const __nv_bfloat16*>(data)[i]);
    default:
      return Convert<float>::load(static_cast<const float*>(data)[i]);
  }
}

// i: the token's index in the contiguous [rows, tokens] inputs.
__device__ __forceinline__ float load(const PolicyInput& in, int64_t i) { return load(in.data, in.dtype, i); }

__device__ __forceinline__ float load(const PolicyRowInput& in, int64_t row, int64_t t) {
  return load(in.data, in.dtype, row * in.row_stride + t * in.token_stride);
}

__device__ __forceinline__ void store(void* out, int dtype, int64_t i, float value) {
  switch (dtype) {
    case kFloat16:
      static_cast<__half*>(out)[i] = Convert<__half>::store(value);
      return;
    case kBFloat16:
      static_cast<__nv_bfloat16*>(out)[i] = Convert<__nv_bfloat16>::store(value);
      return;
    default:
      static_cast<float*>(out)[i] = Convert<float>::store(value);
  }
}

__device__ __forceinline__ bool keeps(const PolicyMask& mask, int64_t i) {
  return mask_keeps_at(mask.data, i, mask.bytes, mask.is_float);
}

// Which inputs of a token a pass reads; the others keep their neutral values (0, is_weight 1).
struct Reads {
  bool log_ratio;  // logp and old_logp (token level)
  bool surrogate;  // advantage and importance weight
  bool kl;         // logp and ref_logp, when ref_logp is given
  bool entropy;    // when given
};

// row, t: the token's position; i = row * tokens + t.
__device__ __forceinline__ policy::Token load_token(const PolicyProblem& p, int64_t row, int64_t t, int64_t i,
                                                    Reads reads) {
  policy::Token x{0.0f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f};
  const bool kl = reads.kl && p.ref_logp.data != nullptr;
  if (reads.log_ratio || kl) x.logp = load(p.logp, i);
  if (reads.log_ratio) x.old_logp = load(p.old_logp, i);
  if (reads.surrogate) {
    x.advantage = load(p.advantages, row, t);
    if (p.is_weights.data != nullptr) x.is_weight = load(p.is_weights, row, t);
  }
  if (kl) x.ref_logp = load(p.ref_logp, i);
  if (reads.entropy && p.entropy.data != nullptr) x.entropy = load(p.entropy, i);
  return x;
}

// Sums each of v[0..N) over the block. Every thread receives the totals, bit for bit the same in each (the
// xor butterfly adds the same pairs in every lane).
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float partial[N][kWarps];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < N; ++k)
    for (int mask = 16; mask > 0; mask >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], mask);
  __syncthreads();  // an earlier call's readers are done with `partial`
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    v[k] = lane < kWarps ? partial[k][lane] : 0.0f;
    for (int mask = 16; mask > 0; mask >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], mask);
  }
}

// The token loops read every input of a token before testing its mask, so the loads go out together rather
// than behind the mask's (positions off the mask are in bounds; their values are not used). The loops are kept
// rolled: unrolled, they more than double the registers (and halve the blocks an SM holds) in a loop bound by
// memory.

// GSPO's first pass over tokens first + k stride of a row: the sum of logp - old_logp over the kept ones
// (unclamped) and their count, summed over the block.
__device__ __forceinline__ void sequence_log_ratio_sums(const PolicyProblem& p, int64_t row, int64_t first,
                                                        int64_t stride, float (&sums)[2]) {
  sums[0] = 0.0f;
  sums[1] = 0.0f;
#pragma unroll 1
  for (int64_t t = first; t < p.tokens; t += stride) {
    const int64_t i = row * p.tokens + t;
    const float log_ratio = load(p.logp, i) - load(p.old_logp, i);
    if (keeps(p.mask, i)) {
      sums[0] += log_ratio;
      sums[1] += 1.0f;
    }
  }
  block_sum(sums);
}

// The row's mean log-ratio over its kept tokens and their count. One block per row: the block's own pass. Split
// rows: the partial sums [rows, splits, 2] that sequence_partial_kernel wrote, added in block order. The forward
// and backward run it with the same block size and splits, so both see the same bits.
__device__ __forceinline__ float2 sequence_log_ratio(const PolicyProblem& p, int64_t row,
                                                     const float* __restrict__ seq_partial) {
  float sums[2];
  if (gridDim.y == 1) {
    sequence_log_ratio_sums(p, row, threadIdx.x, kThreads, sums);
  } else {
    sums[0] = 0.0f;
    sums[1] = 0.0f;
    for (unsigned s = 0; s < gridDim.y; ++s) {
      sums[0] += seq_partial[split_slot(row, gridDim.y, s) * 2];
      sums[1] += seq_partial[split_slot(row, gridDim.y, s) * 2 + 1];
    }
  }
  return make_float2(sums[0] / fmaxf(sums[1], 1.0f), sums[1]);
}

// Block s of row r's share of the d loss / d ratio sum at sequence level (tokens first + k stride).
__device__ __forceinline__ float sequence_ratio_grad_sum(const PolicyProblem& p, int64_t row, int64_t first,
                                                         int64_t stride, float seq_ratio) {
  const policy::Options& o = p.options;
  const bool has_ref = p.ref_logp.data != nullptr;
  const Reads reads{false, true, o.bias_correction_kl, false};
  float ratio_grad[1] = {0.0f};
#pragma unroll 1
  for (int64_t t = first; t < p.tokens; t += stride) {
    const int64_t i = row * p.tokens + t;
    const policy::Token x = load_token(p, row, t, i, reads);
    if (keeps(p.mask, i)) ratio_grad[0] += policy::sequence_ratio_grad(x, seq_ratio, has_ref, o);
  }
  block_sum(ratio_grad);
  return ratio_grad[0];
}

// Split sequence-level rows, grid (rows, splits): block s's partial sums, to out[(row * splits + s) * width + k].
// kPass 0: the log-ratio sum and kept count (width 2). kPass 1: d loss / d ratio (width 1), after the row's
// mean log-ratio from pass 0's `seq_partial`.
template <int kPass>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    sequence_partial_kernel(const PolicyProblem p, const float* __restrict__ seq_partial, float* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  const int64_t slot = split_slot(row, gridDim.y, blockIdx.y);
  if constexpr (kPass == 0) {
    float sums[2];
    sequence_log_ratio_sums(p, row, first, stride, sums);
    if (threadIdx.x == 0) {
      out[slot * 2] = sums[0];
      out[slot * 2 + 1] = sums[1];
    }
  } else {
    const float seq_ratio =
        policy::ratio_from_log_ratio(sequence_log_ratio(p, row, seq_partial).x, p.options.log_ratio_limit);
    const float sum = sequence_ratio_grad_sum(p, row, first, stride, seq_ratio);
    if (threadIdx.x == 0) out[slot] = sum;
  }
}

// Grid (rows, splits) (row_split.h). Block s of a row takes the tokens first + k stride with
// first = s * kThreads + threadIdx.x, stride = splits * kThreads. One split: the row's sums go to stats; more: to
// partial[(row * splits + s) * kNumStats + k], summed in block order by policy_finish_kernel. seq_partial: the
// split sequence-level rows' pass-0 sums (else unused). Compiled per level (kSequence: p.options.sequence_level)
// so that the token level keeps its registers.
template <bool kSequence>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    policy_fwd_kernel(const PolicyProblem p, const float* __restrict__ seq_partial, float* __restrict__ stats,
                      float* __restrict__ partial) {
  const int64_t row = blockIdx.x;
  const policy::Options& o = p.options;
  const bool has_ref = p.ref_logp.data != nullptr;
  float seq_ratio = 1.0f;
  if constexpr (kSequence)
    seq_ratio = policy::ratio_from_log_ratio(sequence_log_ratio(p, row, seq_partial).x, o.log_ratio_limit);
  const Reads reads{!kSequence, true, true, true};
  float sums[policy::kNumStats] = {};
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
#pragma unroll 1
  for (int64_t t = first; t < p.tokens; t += stride) {
    const int64_t i = row * p.tokens + t;
    const policy::Token x = load_token(p, row, t, i, reads);
    if (keeps(p.mask, i)) policy::add_token_stats(sums, x, seq_ratio, has_ref, o);
  }
  block_sum(sums);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < policy::kNumStats; ++k) {
      if (gridDim.y == 1) {
        stats[k * p.rows + row] = sums[k];
      } else {
        partial[split_slot(row, gridDim.y, blockIdx.y) * policy::kNumStats + k] = sums[k];
      }
    }
  }
}

// One thread per (row, statistic): the splits' partial sums in block order (the same bits on every run).
__global__ void policy_finish_kernel(int64_t rows, int splits, const float* __restrict__ partial,
                                     float* __restrict__ stats) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index >= rows * policy::kNumStats) return;
  const int64_t row = index / policy::kNumStats;
  const int k = static_cast<int>(index % policy::kNumStats);
  float total = 0.0f;
  for (int s = 0; s < splits; ++s) total += partial[split_slot(row, splits, s) * policy::kNumStats + k];
  stats[k * rows + row] = total;
}

// Grid (rows, splits); each token's gradient is its own. At sequence level a split row's blocks add up the
// row's partial sums (seq_partial: pass 0, grad_partial: pass 1 of sequence_partial_kernel) in block order.
// kSequence: p.options.sequence_level.
template <bool kSequence>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    policy_bwd_kernel(const PolicyProblem p, const float* __restrict__ row_weights,
                      const float* __restrict__ seq_partial, const float* __restrict__ grad_partial,
                      void* __restrict__ grad_logp, void* __restrict__ grad_entropy) {
  const int64_t row = blockIdx.x;
  const policy::Options& o = p.options;
  const bool has_ref = p.ref_logp.data != nullptr;
  const float weight = row_weights[row];
  float spread = 0.0f;
  float seq_ratio = 1.0f;
  if constexpr (kSequence) {
    const float2 seq = sequence_log_ratio(p, row, seq_partial);
    seq_ratio = policy::ratio_from_log_ratio(seq.x, o.log_ratio_limit);
    float ratio_grad = 0.0f;
    if (gridDim.y == 1) {
      ratio_grad = sequence_ratio_grad_sum(p, row, threadIdx.x, kThreads, seq_ratio);
    } else {
      for (unsigned s = 0; s < gridDim.y; ++s) ratio_grad += grad_partial[split_slot(row, gridDim.y, s)];
    }
    spread = policy::sequence_spread(ratio_grad, seq.x, seq.y, o.log_ratio_limit);
  }
  const Reads reads{!kSequence, !kSequence, true, false};
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
#pragma unroll 1
  for (int64_t t = first; t < p.tokens; t += stride) {
    const int64_t i = row * p.tokens + t;
    const policy::Token x = load_token(p, row, t, i, reads);
    const bool kept = keeps(p.mask, i);
    const float grad = kept ? policy::token_grad(x, spread, seq_ratio, has_ref, o) * weight : 0.0f;
    store(grad_logp, p.logp.dtype, i, grad);
    if (grad_entropy != nullptr) store(grad_entropy, p.entropy.dtype, i, kept ? -o.entropy_coef * weight : 0.0f);
  }
}

// Blocks per row: several when rows are few, with 8+ tokens per thread (a split sequence-level row costs one
// or two extra passes over its tokens, launched before the main one).
LaunchError row_splits(const PolicyProblem& p, int* splits) {
  *splits = 1;
  int sms = 0;
  if (const LaunchError error = multiprocessor_count(&sms)) return error;
  *splits = choose_splits(p.rows, p.tokens, kThreads, sms, kMinBlocksPerSM, 8);
  return nullptr;
}

// What the kernels cannot read; the Python side never passes it.
LaunchError check_problem(const PolicyProblem& p) {
  if (p.logp.data == nullptr || p.old_logp.data == nullptr || p.advantages.data == nullptr || p.mask.data == nullptr)
    return "logp, old_logp, advantages and mask are required (a null pointer was passed)";
  const auto readable = [](const void* data, int dtype) {
    return data == nullptr || dtype == kFloat32 || dtype == kFloat16 || dtype == kBFloat16;
  };
  if (!readable(p.logp.data, p.logp.dtype) || !readable(p.old_logp.data, p.old_logp.dtype) ||
      !readable(p.ref_logp.data, p.ref_logp.dtype) || !readable(p.entropy.data, p.entropy.dtype) ||
      !readable(p.advantages.data, p.advantages.dtype) || !readable(p.is_weights.data, p.is_weights.dtype))
    return "unsupported dtype code (expected 0 = float32, 1 = float16, 2 = bfloat16)";
  const int bytes = p.mask.bytes;
  if (bytes != 1 && bytes != 2 && bytes != 4 && bytes != 8)
    return "unsupported mask element size (expected 1, 2, 4 or 8 bytes)";
  if (p.rows > 0x7fffffff) return "more than 2^31 - 1 rows";
  return nullptr;
}

}  // namespace

LaunchError policy_loss_forward(const PolicyProblem& problem, float* stats, uintptr_t stream) {
  if (problem.rows == 0 || problem.tokens == 0) return nullptr;
  if (const LaunchError error = check_problem(problem)) return error;
  int splits = 1;
  if (const LaunchError error = row_splits(problem, &splits)) return error;
  const dim3 grid(static_cast<unsigned>(problem.rows), static_cast<unsigned>(splits));
  const cudaStream_t s = as_stream(stream);
  const auto forward = problem.options.sequence_level ? policy_fwd_kernel<true> : policy_fwd_kernel<false>;
  if (splits == 1) {
    forward<<<grid, kThreads, 0, s>>>(problem, nullptr, stats, nullptr);
    return last_launch_error();
  }
  // One scratch buffer: the statistics' partial sums [rows, splits, kNumStats], then at sequence level the
  // log-ratio partials [rows, splits, 2].
  const size_t slots = static_cast<size_t>(problem.rows) * splits;
  const size_t count = slots * (policy::kNumStats + (problem.options.sequence_level ? 2 : 0));
  float* partial = nullptr;
  if (cudaMallocAsync(reinterpret_cast<void**>(&partial), count * sizeof(float), s) != cudaSuccess)
    return last_launch_error();
  float* seq_partial = problem.options.sequence_level ? partial + slots * policy::kNumStats : nullptr;
  if (seq_partial != nullptr) sequence_partial_kernel<0><<<grid, kThreads, 0, s>>>(problem, nullptr, seq_partial);
  forward<<<grid, kThreads, 0, s>>>(problem, seq_partial, stats, partial);
  const int64_t finish = problem.rows * policy::kNumStats;
  policy_finish_kernel<<<static_cast<unsigned>((finish + kThreads - 1) / kThreads), kThreads, 0, s>>>(
      problem.rows, splits, partial, stats);
  const LaunchError error = last_launch_error();
  cudaFreeAsync(partial, s);
  return error != nullptr ? error : last_launch_error();
}

LaunchError policy_loss_backward(const PolicyProblem& problem, const float* row_weights, void* grad_logp,
                                 void* grad_entropy, uintptr_t stream) {
  if (problem.rows == 0 || problem.tokens == 0) return nullptr;
  if (const LaunchError error = check_problem(problem)) return error;
  int splits = 1;
  if (const LaunchError error = row_splits(problem, &splits)) return error;
  const dim3 grid(static_cast<unsigned>(problem.rows), static_cast<unsigned>(splits));
  const cudaStream_t s = as_stream(stream);
  if (!problem.options.sequence_level) {
    policy_bwd_kernel<false><<<grid, kThreads, 0, s>>>(problem, row_weights, nullptr, nullptr, grad_logp, grad_entropy);
    return last_launch_error();
  }
  if (splits == 1) {
    policy_bwd_kernel<true><<<grid, kThreads, 0, s>>>(problem, row_weights, nullptr, nullptr, grad_logp, grad_entropy);
    return last_launch_error();
  }
  // Split sequence-level rows: the log-ratio partials [rows, splits, 2], then d loss / d ratio's [rows, splits].
  const size_t slots = static_cast<size_t>(problem.rows) * splits;
  float* seq_partial = nullptr;
  if (cudaMallocAsync(reinterpret_cast<void**>(&seq_partial), slots * 3 * sizeof(float), s) != cudaSuccess)
    return last_launch_error();
  float* grad_partial = seq_partial + slots * 2;
  sequence_partial_kernel<0><<<grid, kThreads, 0, s>>>(problem, nullptr, seq_partial);
  sequence_partial_kernel<1><<<grid, kThreads, 0, s>>>(problem, seq_partial, grad_partial);
  policy_bwd_kernel<true><<<grid, kThreads, 0, s>>>(problem, row_weights, seq_partial, grad_partial, grad_logp,
                                                    grad_entropy);
  const LaunchError error = last_launch_error();
  cudaFreeAsync(seq_partial, s);
  return error != nullptr ? error : last_launch_error();
}

}  // namespace fastalign

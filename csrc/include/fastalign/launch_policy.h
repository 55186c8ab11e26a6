// Host launchers of the policy-loss kernels (csrc/cuda/policy_loss.cu). Raw pointers only: the Python side
// (fastalign/ops/_policy_kernels.py) checks shapes, devices and dtypes; these only launch on the given stream
// and report CUDA errors.
#pragma once

#include "fastalign/common.h"
#include "fastalign/policy_math.h"

namespace fastalign {

// A contiguous [rows, tokens] input read as float32 from data[row * tokens + token]. dtype: a DType code.
// data == nullptr: absent.
struct PolicyInput {
  const void* data;
  int dtype;
};

// A per-token [rows, tokens] or per-row [rows, 1] input at element strides: data[row * row_stride + token *
// token_stride], a token stride of 0 broadcasting the row's value. data == nullptr: absent.
struct PolicyRowInput {
  const void* data;
  int dtype;
  int64_t row_stride;
  int64_t token_stride;
};

// The contiguous [rows, tokens] mask: elements of any torch dtype of `bytes` bytes (1, 2, 4 or 8), read by
// policy::mask_keeps.
struct PolicyMask {
  const void* data;
  int bytes;
  bool is_float;
};

struct PolicyProblem {
  int64_t rows;
  int64_t tokens;
  PolicyInput logp;
  PolicyInput old_logp;
  PolicyInput ref_logp;        // may be absent (no KL term)
  PolicyInput entropy;         // may be absent (no entropy term)
  PolicyRowInput advantages;
  PolicyRowInput is_weights;   // may be absent (weight 1)
  PolicyMask mask;
  policy::Options options;
};

// stats [policy::kNumStats, rows] (float32, contiguous) = per-row sums over the kept tokens: loss, token count,
// low / high / dual clip counts, ratio, KL, entropy.
LaunchError policy_loss_forward(const PolicyProblem& problem, float* stats, uintptr_t stream);

// grad_logp [rows, tokens] (contiguous, logp's dtype) = row_weights[row] (float32 [rows]) · d(row's loss sum) /
// d logp; grad_entropy likewise in entropy's dtype (nullptr: not written). Every element is written, 0 off the
// mask.
LaunchError policy_loss_backward(const PolicyProblem& problem, const float* row_weights, void* grad_logp,
                                 void* grad_entropy, uintptr_t stream);

}  // namespace fastalign

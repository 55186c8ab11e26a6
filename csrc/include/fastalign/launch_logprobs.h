// Host launchers of the logprobs_from_logits kernels (csrc/cuda/logprobs.cu). Raw pointers only: the Python
// side checks devices, dtypes and shapes; these only launch on the given stream and report CUDA errors.
#pragma once

#include "fastalign/common.h"

namespace fastalign {

// Per-row statistics of logits [rows, cols] (row_stride elements apart, unit column stride) into float32 [rows]
// outputs. targets: int64 [rows], each in [0, cols). entropy and sum_logits may be nullptr (not computed).
LaunchError logprobs_forward(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                             const int64_t* targets, float softcap, float inv_temperature, bool has_softcap,
                             float* max_logit, float* log_sum, float* target_logp, float* entropy, float* sum_logits,
                             uintptr_t stream);

// grad [rows, cols] (logits' dtype, grad_row_stride elements apart) = d loss / d logits from the saved row
// statistics and the per-row coefficients of d_l = p (alpha + beta log p) + gamma [j = y] + kappa; beta, gamma
// and kappa may be nullptr (zero). grad may be the logits buffer itself (in-place backward).
LaunchError logprobs_backward(const void* logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                              const int64_t* targets, const float* max_logit, const float* log_sum,
                              const float* alpha, const float* beta, const float* gamma, const float* kappa,
                              float softcap, float inv_temperature, bool has_softcap, void* grad,
                              int64_t grad_row_stride, uintptr_t stream);

}  // namespace fastalign

// Host launchers of the DPO-family kernels (csrc/cuda/dpo_loss.cu). Raw pointers only: the Python side checks
// devices, dtypes and shapes; these only launch on the given stream and report CUDA errors.
//
// The batch holds 2 * pairs rows: pair i is chosen row i and rejected row pairs + i. token_logps and mask are
// contiguous [2 * pairs, width]; the mask's elements are mask_bytes wide (1, 2, 4 or 8), floating-point when
// mask_is_float, and a token counts where its mask element is nonzero.
#pragma once

#include "fastalign/common.h"
#include "fastalign/dpo_math.h"

namespace fastalign {

// Per pair: reduce both rows' masked token log-probs (dtype code `dtype`) and lengths, evaluate every loss type
// in `types` (bit k: DPO_LOSS_TYPES[k]) with the given per-type weights, on length-averaged log-ratios for the
// types in `averaged`. ref_logps: float32 [2 * pairs]. Outputs, float32: losses [pairs], sums, lengths and
// row_grad (d loss / d each token log-prob of the row) [2 * pairs]. Launches when pairs > 0, also for width 0.
LaunchError dpo_loss_forward(const void* token_logps, int dtype, const void* mask, int mask_bytes, bool mask_is_float,
                             const float* ref_logps, int64_t pairs, int64_t width, unsigned types, unsigned averaged,
                             const dpo::Weights& weights, dpo::Options options, float* losses, float* sums,
                             float* lengths, float* row_grad, uintptr_t stream);

// grad [2 * pairs, width] (contiguous, dtype code `dtype`) = upstream[row] on masked tokens, 0 elsewhere, with
// upstream[row] = row_grad[row] * grad_losses[row mod pairs] + grad_sums[row]. grad_losses ([pairs], elements
// grad_losses_stride apart) and grad_sums ([2 * pairs], grad_sums_stride apart) are float32 and may be nullptr
// (zero). Launches when pairs > 0 and width > 0.
LaunchError dpo_loss_backward(const void* mask, int mask_bytes, bool mask_is_float, const float* row_grad,
                              const float* grad_losses, int64_t grad_losses_stride, const float* grad_sums,
                              int64_t grad_sums_stride, int64_t pairs, int64_t width, void* grad, int dtype,
                              uintptr_t stream);

}  // namespace fastalign

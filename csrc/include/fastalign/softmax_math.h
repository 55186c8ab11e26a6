// The per-row softmax statistics of logprobs_from_logits: the logit transform and its derivative, the online
// softmax state with entropy, and the gradient of one logit. Mirrors fastalign/ops/stats.py.
#pragma once

#include "fastalign/common.h"

namespace fastalign {

// Softcap (softcap * tanh(z / softcap)) when enabled, then times 1 / temperature.
FA_HD float transform_logit(float z, float softcap, float inv_temperature, bool has_softcap) {
  if (has_softcap) z = softcap * tanhf(z / softcap);
  return z * inv_temperature;
}

// d l / d z at the transformed logit l = transform_logit(z): uses tanh = l / (softcap * inv_temperature).
FA_HD float transform_slope(float l, float softcap, float inv_temperature, bool has_softcap) {
  if (!has_softcap) return inv_temperature;
  const float t = l / (softcap * inv_temperature);
  return (1.0f - t * t) * inv_temperature;
}

// The shift the running sums are taken around: the running max, or 0 while only -inf has been seen.
FA_HD float softmax_shift(float max_logit) { return max_logit == -INFINITY ? 0.0f : max_logit; }

// Running statistics of a set of logits l around s = softmax_shift(max):
//   sum = Σ e^(l-s), centered = Σ e^(l-s) (l-s)   so that   entropy = log(sum) - centered / sum.
// (lse - E[l] would cancel catastrophically for large logits.)
struct SoftmaxState {
  float max;
  float sum;
  float centered;
};

FA_HD SoftmaxState softmax_empty() { return SoftmaxState{-INFINITY, 0.0f, 0.0f}; }

// Re-express the state around a larger max (new_max >= state.max).
FA_HD SoftmaxState softmax_rescale(SoftmaxState state, float new_max) {
  const float old_shift = softmax_shift(state.max);
  const float shift = softmax_shift(new_max);
  // States with nothing summed yet rescale by 0 (never inf * 0 when the new shift is very negative).
  const float scale = state.sum > 0.0f ? fast_exp(old_shift - shift) : 0.0f;
  return SoftmaxState{new_max, state.sum * scale, scale * (state.centered + (old_shift - shift) * state.sum)};
}

// Add one logit that does not exceed state.max (rescale first).
FA_HD void softmax_add_below_max(SoftmaxState& state, float l) {
  const float centered = l - softmax_shift(state.max);
  const float e = fast_exp(centered);
  state.sum += e;
  // A -inf logit adds e = 0 and must not add 0 * -inf.
  state.centered += e > 0.0f ? e * centered : 0.0f;
}

FA_HD SoftmaxState softmax_add(SoftmaxState state, float l) {
  if (l > state.max) state = softmax_rescale(state, l);
  softmax_add_below_max(state, l);
  return state;
}

// Add n logits with one rescale for the group (the kernels fold a 16-byte vector at a time).
FA_HD SoftmaxState softmax_add_group(SoftmaxState state, const float* l, int n) {
  float group_max = state.max;
  for (int k = 0; k < n; ++k) group_max = fmaxf(group_max, l[k]);
  if (group_max > state.max) state = softmax_rescale(state, group_max);
  for (int k = 0; k < n; ++k) softmax_add_below_max(state, l[k]);
  return state;
}

// The statistics of the union of two sets of logits.
FA_HD SoftmaxState softmax_merge(SoftmaxState a, SoftmaxState b) {
  const float max = a.max > b.max ? a.max : b.max;
  a = softmax_rescale(a, max);
  b = softmax_rescale(b, max);
  return SoftmaxState{max, a.sum + b.sum, a.centered + b.centered};
}

struct RowStats {
  float max_logit;    // softmax_shift(max)
  float log_sum;      // log Σ e^(l - max_logit)
  float target_logp;  // (l_y - max_logit) - log_sum: no rounding at the magnitude of the logits
  float entropy;      // -Σ p log p
};

FA_HD RowStats softmax_finish(SoftmaxState state, float target_logit) {
  const float shift = softmax_shift(state.max);
  const float log_sum = logf(state.sum);
  return RowStats{shift, log_sum, (target_logit - shift) - log_sum, log_sum - state.centered / state.sum};
}

// ------------------------------------------------------------------------------------------------ base 2
// What the CUDA kernels run: the transformed logit is l = u * lin with u = z (no softcap) or tanh(z / softcap),
// lin = 1 / temperature (times softcap with a softcap); the sums are taken in base 2 on l2 = u * s with
// s = lin * log2(e) > 0, so each element costs one ex2. Since s > 0 the running max is kept on u, and the shift on
// l2 is shift_u * s. The state's sum is Σ 2^(l2 - shift2) = Σ e^(l - shift), the same number as in base e;
// centered is Σ 2^(l2 - shift2) (l2 - shift2), log2(e) times the base-e one.
template <bool kSoftcap>
FA_HD float softmax2_u(float z, float inv_softcap) {
  return kSoftcap ? fast_tanh(z * inv_softcap) : z;
}

// Re-express the state (max on u) around new_max_u >= state.max.
template <bool kEntropy>
FA_HD SoftmaxState softmax2_rescale(SoftmaxState state, float new_max_u, float s) {
  const float old_shift = softmax_shift(state.max) * s;
  const float shift = softmax_shift(new_max_u) * s;
  const float scale = state.sum > 0.0f ? fast_exp2(old_shift - shift) : 0.0f;
  return SoftmaxState{new_max_u, state.sum * scale,
                      kEntropy ? scale * (state.centered + (old_shift - shift) * state.sum) : 0.0f};
}

// Add one u not above the state's max; neg_shift = -(softmax_shift(state.max) * s).
template <bool kEntropy>
FA_HD void softmax2_add_below_max(SoftmaxState& state, float u, float s, float neg_shift) {
  const float centered = fmaf(u, s, neg_shift);
  const float e = fast_exp2(centered);
  state.sum += e;
  // A -inf logit adds e = 0 and must not add 0 * -inf.
  if (kEntropy) state.centered += e > 0.0f ? e * centered : 0.0f;
}

// Add n values of u with one rescale for the group.
template <bool kEntropy>
FA_HD SoftmaxState softmax2_add_group(SoftmaxState state, const float* u, int n, float s) {
  float group_max = state.max;
  for (int k = 0; k < n; ++k) group_max = fmaxf(group_max, u[k]);
  if (group_max > state.max) state = softmax2_rescale<kEntropy>(state, group_max, s);
  const float neg_shift = -(softmax_shift(state.max) * s);
  for (int k = 0; k < n; ++k) softmax2_add_below_max<kEntropy>(state, u[k], s, neg_shift);
  return state;
}

template <bool kEntropy>
FA_HD SoftmaxState softmax2_merge(SoftmaxState a, SoftmaxState b, float s) {
  const float max = a.max > b.max ? a.max : b.max;
  a = softmax2_rescale<kEntropy>(a, max, s);
  b = softmax2_rescale<kEntropy>(b, max, s);
  return SoftmaxState{max, a.sum + b.sum, a.centered + b.centered};
}

// The row's statistics in base e (as softmax_finish) from a base-2 state and the target's u.
FA_HD RowStats softmax2_finish(SoftmaxState state, float target_u, float s) {
  const float shift = softmax_shift(state.max) * s;
  const float log_sum = logf(state.sum);
  return RowStats{shift * kLn2, log_sum, fmaf(target_u, s, -shift) * kLn2 - log_sum,
                  log_sum - kLn2 * state.centered / state.sum};
}

// Per-row coefficients of d_l = p (alpha + beta log p) + gamma [j = y] + kappa (absent ones are 0).
struct GradCoefficients {
  float alpha;
  float beta;
  float gamma;
  float kappa;
};

// d loss / d z for one raw logit z, given its transformed value l and the row's saved statistics.
FA_HD float logit_grad(float l, bool is_target, float max_logit, float log_sum, GradCoefficients c, float softcap,
                       float inv_temperature, bool has_softcap) {
  const float log_p = (l - max_logit) - log_sum;
  const float p = fast_exp(log_p);
  // Where p = 0 (a -inf logit) the log-prob term must vanish, not become 0 * -inf.
  float grad = p * (c.alpha + c.beta * (p > 0.0f ? log_p : 0.0f)) + c.kappa;
  if (is_target) grad += c.gamma;
  return grad * transform_slope(l, softcap, inv_temperature, has_softcap);
}

// The base-2 gradient of one logit for the kernels: log2 p = u s - offset2 with offset2 = (max_logit + log_sum)
// log2(e), and the coefficients pre-scaled by the constant part of the slope: alpha' = alpha lin_slope,
// beta' = beta ln 2 lin_slope (log p = ln 2 log2 p), kappa' = kappa lin_slope, gamma' = gamma lin_slope, with
// lin_slope = 1 / temperature. With a softcap the slope also has the factor 1 - tanh^2 = 1 - u^2.
struct Grad2Coefficients {
  float alpha, beta, gamma, kappa;
};

FA_HD Grad2Coefficients grad2_coefficients(GradCoefficients c, float inv_temperature) {
  return Grad2Coefficients{c.alpha * inv_temperature, c.beta * kLn2 * inv_temperature, c.gamma * inv_temperature,
                           c.kappa * inv_temperature};
}

// d loss / d z without the target's gamma term. log2 p is clamped at -200 before the log-prob term: where
// p > 0 it is at least -126 (ex2 flushes below), and where p = 0 (a -inf logit) the term must be 0, not 0 * -inf.
template <bool kSoftcap>
FA_HD float logit_grad2(float u, float s, float offset2, Grad2Coefficients c) {
  const float log2_p = fmaf(u, s, -offset2);
  const float p = fast_exp2(log2_p);
  const float grad = fmaf(p, fmaf(c.beta, fmaxf(log2_p, -200.0f), c.alpha), c.kappa);
  return kSoftcap ? grad * fmaf(-u, u, 1.0f) : grad;
}

// The target's extra term, in the same units: gamma' times the slope's non-constant factor.
template <bool kSoftcap>
FA_HD float target_grad2(float u, Grad2Coefficients c) {
  return kSoftcap ? c.gamma * fmaf(-u, u, 1.0f) : c.gamma;
}

}  // namespace fastalign

// The per-token math of the PPO / GRPO policy loss: the clamped ratio, the clipped and dual-clipped surrogate
// with its derivative, the cispo / sapo / weighted-log-prob objectives, the KL estimators, and one token's
// contribution to its row's sums and gradient. Mirrors the Triton kernels (fastalign/kernels/triton/policy_loss.py)
// formula for formula: the same clamps, the same tie rules (those of torch's max / min / clamp gradients), float32
// throughout.
#pragma once

#include "fastalign/common.h"

namespace fastalign {
// A namespace of its own: host-inline functions of one name and signature must not differ between the
// translation units of the other losses.
namespace policy {

// Rows of the per-row sums [kNumStats, rows]: the layout of the Triton kernel's stats (LOSS, COUNT, ...).
enum Stat : int {
  kLoss = 0,
  kCount,
  kLowClip,
  kHighClip,
  kDualClip,
  kRatio,
  kKl,
  kEntropy,
  kNumStats
};

// KL estimators of r = ref_logp - logp: k1 = -r, k2 = r^2 / 2, k3 = exp(r) - r - 1.
enum KlKind : int { kK1 = 1, kK2 = 2, kK3 = 3 };

// The per-token objective (fastalign.ops._policy_kernels.OBJECTIVE_CODES). cispo, sapo and the weighted
// log-prob are token-level only, without dual clip or delta (PolicyLossOptions refuses the rest).
enum Objective : int {
  kClip = 0,       // PPO's clipped surrogate, the unclipped ratio capped at delta
  kCispo = 1,      // -min(ratio, clip_high) A logp, the weight detached: clip_high is cispo's cap
  kSapo = 2,       // -(4 / tau) sigmoid(tau (ratio - 1)) A, tau by the advantage's sign
  kWeightedLogp = 3  // -A logp; VESPO's weight phi comes in as the importance weight
};

struct Options {
  float clip_low;         // 1 - clip_eps_low (the clip metrics' lower bound for the other objectives: 0)
  float clip_high;        // 1 + clip_eps_high (cispo: its cap; sapo / vespo: +inf, for the metrics)
  float dual_clip;        // c > 1; read only when has_dual
  float kl_coef;
  float entropy_coef;
  float log_ratio_limit;  // log-ratios are clamped to ±limit (20, as in verl) so exp() stays finite
  int kl_kind;            // KlKind
  bool has_dual;
  bool sequence_level;    // GSPO: one ratio per row, from the row's mean log-ratio
  float delta;            // INTELLECT-2's cap of the unclipped ratio; +inf when off
  float sapo_temperature_pos;  // tau where A > 0
  float sapo_temperature_neg;  // tau elsewhere
  int objective;          // Objective
  bool bias_correction_kl;  // DeepSeek-V3.2: the KL term times the (token or sequence) ratio, not detached
};

FA_HD float clamp_log_ratio(float x, float limit) { return fminf(fmaxf(x, -limit), limit); }

// Where the clamp does not bind (bounds included, as torch.clamp's gradient): the gradient flows.
FA_HD bool within_limit(float x, float limit) { return x >= -limit && x <= limit; }

FA_HD float ratio_from_log_ratio(float log_ratio, float limit) { return expf(clamp_log_ratio(log_ratio, limit)); }

// PPO's clipped surrogate max(-A min(r, delta), -A clip(r, low, high)), before the dual clip.
FA_HD float clipped_surrogate(float ratio, float adv, const Options& o) {
  const float clipped_ratio = fminf(fmaxf(ratio, o.clip_low), o.clip_high);
  return fmaxf(-adv * fminf(ratio, o.delta), -adv * clipped_ratio);
}

// With verl's dual clip: for A < 0 the loss is capped at -A c.
FA_HD float surrogate_loss(float ratio, float adv, const Options& o) {
  const float loss = clipped_surrogate(ratio, adv, o);
  return o.has_dual && adv < 0.0f ? fminf(loss, -adv * o.dual_clip) : loss;
}

// d surrogate_loss / d ratio. torch.maximum / minimum send the gradient to the larger / smaller input and half
// to each on a tie; each branch has slope -A where its clamp does not bind (bounds included, as torch.clamp's
// gradient) and 0 elsewhere (inside the clip range, without delta, both branches are -A r: slope -A).
FA_HD float surrogate_grad(float ratio, float adv, const Options& o) {
  const float clipped_ratio = fminf(fmaxf(ratio, o.clip_low), o.clip_high);
  const float unclipped = -adv * fminf(ratio, o.delta);
  const float clipped = -adv * clipped_ratio;
  const float unclipped_slope = ratio <= o.delta ? -adv : 0.0f;
  const float clipped_slope = ratio >= o.clip_low && ratio <= o.clip_high ? -adv : 0.0f;
  float grad = unclipped > clipped   ? unclipped_slope
               : clipped > unclipped ? clipped_slope
                                     : 0.5f * (unclipped_slope + clipped_slope);
  if (o.has_dual && adv < 0.0f) {
    const float loss = fmaxf(unclipped, clipped);
    const float cap = -adv * o.dual_clip;
    grad *= loss < cap ? 1.0f : (loss == cap ? 0.5f : 0.0f);
  }
  return grad;
}

// The sapo gate sigmoid(tau (ratio - 1)), tau by the advantage's sign.
FA_HD float sapo_gate(float ratio, float adv, const Options& o) {
  const float tau = adv > 0.0f ? o.sapo_temperature_pos : o.sapo_temperature_neg;
  return 1.0f / (1.0f + expf(-tau * (ratio - 1.0f)));
}

// One token's objective, dual clip included (before the importance weight, KL and entropy terms).
FA_HD float objective_loss(float ratio, float logp, float adv, const Options& o) {
  switch (o.objective) {
    case kCispo:
      return -fminf(ratio, o.clip_high) * adv * logp;
    case kSapo: {
      const float tau = adv > 0.0f ? o.sapo_temperature_pos : o.sapo_temperature_neg;
      return -(sapo_gate(ratio, adv, o) * 4.0f / tau) * adv;
    }
    case kWeightedLogp:
      return -adv * logp;
    default:
      return surrogate_loss(ratio, adv, o);
  }
}

// The clip-fraction metrics' events (policy_metrics in fastalign/ops/policy.py).
struct ClipFlags {
  bool low;   // A < 0 and ratio below clip_low
  bool high;  // A > 0 and ratio above clip_high
  bool dual;  // A < 0 and the dual clip binds
};

FA_HD ClipFlags clip_flags(float ratio, float adv, const Options& o) {
  return ClipFlags{ratio < o.clip_low && adv < 0.0f, ratio > o.clip_high && adv > 0.0f,
                   o.has_dual && adv < 0.0f && clipped_surrogate(ratio, adv, o) > -adv * o.dual_clip};
}

// The KL estimate at r = ref_logp - logp, r clamped to ±limit.
FA_HD float kl_value(float r, float limit, int kind) {
  r = clamp_log_ratio(r, limit);
  if (kind == kK1) return -r;
  if (kind == kK2) return 0.5f * r * r;
  return expf(r) - r - 1.0f;
}

// d kl_value / d logp (dr / dlogp = -1); 0 where the clamp of r binds.
FA_HD float kl_grad(float r, float limit, int kind) {
  if (!within_limit(r, limit)) return 0.0f;
  if (kind == kK1) return 1.0f;
  if (kind == kK2) return -r;
  return 1.0f - expf(r);
}

// What the kernels read of one kept token, in float32. Absent inputs read as is_weight = 1, entropy = 0;
// ref_logp is read only with has_ref.
struct Token {
  float logp;
  float old_logp;
  float advantage;
  float is_weight;
  float ref_logp;
  float entropy;
};

// The token's ratio: its own at token level, the row's (seq_ratio) at sequence level.
FA_HD float token_ratio(const Token& x, float seq_ratio, const Options& o) {
  return o.sequence_level ? seq_ratio : ratio_from_log_ratio(x.logp - x.old_logp, o.log_ratio_limit);
}

// Adds one kept token to its row's sums (Stat layout): loss = surrogate · is_weight + kl_coef · KL
// - entropy_coef · entropy (the KL and entropy terms are not importance-weighted), and the metrics' numerators.
FA_HD void add_token_stats(float* sums, const Token& x, float seq_ratio, bool has_ref, const Options& o) {
  const float ratio = token_ratio(x, seq_ratio, o);
  float kl = has_ref ? kl_value(x.ref_logp - x.logp, o.log_ratio_limit, o.kl_kind) : 0.0f;
  if (o.bias_correction_kl) kl *= ratio;
  const ClipFlags flags = clip_flags(ratio, x.advantage, o);
  sums[kLoss] +=
      objective_loss(ratio, x.logp, x.advantage, o) * x.is_weight + o.kl_coef * kl - o.entropy_coef * x.entropy;
  sums[kCount] += 1.0f;
  sums[kLowClip] += flags.low ? 1.0f : 0.0f;
  sums[kHighClip] += flags.high ? 1.0f : 0.0f;
  sums[kDualClip] += flags.dual ? 1.0f : 0.0f;
  sums[kRatio] += ratio;
  sums[kKl] += kl;
  sums[kEntropy] += x.entropy;
}

// At sequence level, one token's share of d(row's loss sum) / d(sequence ratio): the surrogate's, and with the
// bias-corrected KL its kl_coef KL (the KL term is KL times the ratio).
FA_HD float sequence_ratio_grad(const Token& x, float seq_ratio, bool has_ref, const Options& o) {
  float grad = surrogate_grad(seq_ratio, x.advantage, o) * x.is_weight;
  if (has_ref && o.bias_correction_kl)
    grad += o.kl_coef * kl_value(x.ref_logp - x.logp, o.log_ratio_limit, o.kl_kind);
  return grad;
}

// What every kept token of a row receives at sequence level: d(row sum) / d ratio (ratio_grad_sum) through
// ratio = exp(mean log-ratio over the row's n tokens), i.e. × ratio / n; 0 where the clamp binds.
FA_HD float sequence_spread(float ratio_grad_sum, float seq_log_ratio, float n, float limit) {
  if (!within_limit(seq_log_ratio, limit)) return 0.0f;
  return ratio_grad_sum * ratio_from_log_ratio(seq_log_ratio, limit) / fmaxf(n, 1.0f);
}

// d (token loss) / d logp for one kept token, before the row's weight. spread: sequence_spread at sequence
// level (unused at token level); seq_ratio: the row's ratio at sequence level (unused at token level).
FA_HD float token_grad(const Token& x, float spread, float seq_ratio, bool has_ref, const Options& o) {
  float grad = spread;
  if (!o.sequence_level) {
    const float log_ratio = x.logp - x.old_logp;
    const float ratio = ratio_from_log_ratio(log_ratio, o.log_ratio_limit);
    // Through the ratio (x ratio; 0 where the log-ratio's clamp binds), or for cispo / the weighted log-prob
    // (a detached weight times logp) the weight itself.
    const bool through_ratio = within_limit(log_ratio, o.log_ratio_limit);
    if (o.objective == kCispo) {
      grad = -fminf(ratio, o.clip_high) * x.advantage;
    } else if (o.objective == kSapo) {
      const float gate = sapo_gate(ratio, x.advantage, o);
      grad = through_ratio ? -4.0f * gate * (1.0f - gate) * x.advantage * ratio : 0.0f;
    } else if (o.objective == kWeightedLogp) {
      grad = -x.advantage;
    } else {
      grad = through_ratio ? surrogate_grad(ratio, x.advantage, o) * ratio : 0.0f;
    }
    grad *= x.is_weight;
  }
  if (has_ref) {
    const float kl_slope = kl_grad(x.ref_logp - x.logp, o.log_ratio_limit, o.kl_kind);
    if (!o.bias_correction_kl) {
      grad += o.kl_coef * kl_slope;
    } else if (o.sequence_level) {
      grad += o.kl_coef * kl_slope * seq_ratio;  // the ratio's own share came with the spread
    } else {
      // d(KL r)/dlogp = KL' r + KL dr/dlogp, dr/dlogp = r where the log-ratio's clamp does not bind.
      const float log_ratio = x.logp - x.old_logp;
      const float ratio = ratio_from_log_ratio(log_ratio, o.log_ratio_limit);
      const float kl = kl_value(x.ref_logp - x.logp, o.log_ratio_limit, o.kl_kind);
      grad += o.kl_coef * (kl_slope * ratio + (within_limit(log_ratio, o.log_ratio_limit) ? kl * ratio : 0.0f));
    }
  }
  return grad;
}

}  // namespace policy
}  // namespace fastalign

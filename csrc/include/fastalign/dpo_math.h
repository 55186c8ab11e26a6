// The per-pair math of the DPO family (dpo_loss_from_token_logps): every loss type's value and its derivatives
// in the chosen and rejected log-ratios, and their weighted sum over a set of types. Mirrors the Triton kernel
// fastalign/kernels/triton/dpo_loss.py (_type_loss_and_grads, dpo_fwd_kernel) formula for formula.
#pragma once

#include "fastalign/common.h"

namespace fastalign {
// A namespace of its own: the other loss headers define sigmoids too, and host-inline functions of one name
// and signature must not differ between translation units.
namespace dpo {

// Indices of fastalign.ops.preference.DPO_LOSS_TYPES; bit k of a type set selects type k.
enum LossType : int {
  kSigmoid = 0,
  kHinge,
  kIpo,
  kRobust,
  kExoPair,
  kNcaPair,
  kBcoPair,
  kSppoHard,
  kApoZero,
  kApoDown,
  kDiscopop,
  kSigmoidNorm,
  kNumLossTypes
};

// exp(-z) in discopop is bounded so that exp(-z) * sigmoid(z / tau) is 0, not inf * 0, for very negative z.
constexpr float kDiscopopExpLimit = 80.0f;

struct Options {
  float beta;
  float label_smoothing;
  float discopop_tau;
};

// Per-type weights (0 for types not in the set); a struct so that kernels take it by value.
struct Weights {
  float w[kNumLossTypes];
};

// A loss and its derivatives in the chosen (c) and rejected (r) log-ratios.
struct Terms {
  float loss;
  float d_chosen;
  float d_rejected;
};

FA_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// log σ(x) = min(x, 0) − log(1 + e^−|x|): stable for either sign (log1p keeps the tail of large |x|).
FA_HD float log_sigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }

// Terms of a loss that depends on the pair only through z = β(c − r), from d loss / dz.
FA_HD Terms through_margin(float loss, float dz, float beta) { return Terms{loss, beta * dz, -beta * dz}; }

// One loss type at chosen / rejected log-ratios c, r (logp − ref_logp, length-averaged for averaged types).
FA_HD Terms type_terms(int kind, float c, float r, Options o) {
  const float beta = o.beta;
  const float ls = o.label_smoothing;
  const float z = beta * (c - r);
  switch (kind) {
    case kSigmoid:
      return through_margin(-(1.0f - ls) * log_sigmoid(z) - ls * log_sigmoid(-z),
                            -(1.0f - ls) * sigmoid(-z) + ls * sigmoid(z), beta);
    case kHinge:
      return through_margin(fmaxf(1.0f - z, 0.0f), 1.0f - z > 0.0f ? -1.0f : 0.0f, beta);
    case kIpo: {
      const float gap = c - r - 0.5f / beta;
      return Terms{gap * gap, 2.0f * gap, -2.0f * gap};
    }
    case kRobust: {
      const float denominator = 1.0f - 2.0f * ls;
      return through_margin((-(1.0f - ls) * log_sigmoid(z) + ls * log_sigmoid(-z)) / denominator,
                            (-(1.0f - ls) * sigmoid(-z) - ls * sigmoid(z)) / denominator, beta);
    }
    case kExoPair: {
      const float p = sigmoid(z), q = sigmoid(-z);
      const float log_p = log_sigmoid(z), log_q = log_sigmoid(-z);
      const float log_keep = logf(1.0f - ls), log_smooth = logf(ls);
      return through_margin(p * (log_p - log_keep) + q * (log_q - log_smooth),
                            p * q * (log_p - log_keep - log_q + log_smooth), beta);
    }
    case kNcaPair: {
      const float bc = beta * c, br = beta * r;
      return Terms{-log_sigmoid(bc) - 0.5f * log_sigmoid(-bc) - 0.5f * log_sigmoid(-br),
                   beta * (-sigmoid(-bc) + 0.5f * sigmoid(bc)), beta * 0.5f * sigmoid(br)};
    }
    case kBcoPair: {
      const float bc = beta * c, br = beta * r;
      return Terms{-log_sigmoid(bc) - log_sigmoid(-br), -beta * sigmoid(-bc), beta * sigmoid(br)};
    }
    case kSppoHard: {
      const float a = c - 0.5f / beta, b = r + 0.5f / beta;
      return Terms{a * a + b * b, 2.0f * a, 2.0f * b};
    }
    case kApoZero: {
      const float sc = sigmoid(beta * c), sr = sigmoid(beta * r);
      return Terms{1.0f - sc + sr, -beta * sc * (1.0f - sc), beta * sr * (1.0f - sr)};
    }
    case kApoDown: {
      const float sc = sigmoid(beta * c), sz = sigmoid(z);
      return Terms{sc + 1.0f - sz, beta * sc * (1.0f - sc) - beta * sz * (1.0f - sz), beta * sz * (1.0f - sz)};
    }
    case kDiscopop: {
      const float m = sigmoid(z / o.discopop_tau);
      const float dm = m * (1.0f - m) / o.discopop_tau;
      const float neg_z = -z;
      const float e = expf(fminf(neg_z, kDiscopopExpLimit));
      const float log_p = log_sigmoid(z);
      // Past the bound exp(-z) is a constant, so its derivative term is 0.
      const float de = neg_z <= kDiscopopExpLimit ? -e * m : 0.0f;
      return through_margin(-log_p * (1.0f - m) + e * m, -sigmoid(-z) * (1.0f - m) + log_p * dm + de + e * dm,
                            beta);
    }
    default:  // kSigmoidNorm: the same as sigmoid without smoothing, on length-averaged log-ratios
      return through_margin(-log_sigmoid(z), -sigmoid(-z), beta);
  }
}

// One pair's rows: summed token log-probs, completion lengths and summed reference log-probs.
struct PairRows {
  float chosen_sum;
  float rejected_sum;
  float chosen_length;
  float rejected_length;
  float ref_chosen;
  float ref_rejected;
};

// The weighted loss of the types in `types` and d loss / d (each token log-prob) of the chosen and rejected
// rows (d_chosen, d_rejected): a row's tokens enter only through its sum, so one number per row. Types in
// `averaged` take length-averaged log-ratios (sum − ref) / max(length, 1).
// One type's weighted share of pair_terms (every type's, whether in `types` or not: the caller picks).
FA_HD Terms pair_type_terms(PairRows rows, int kind, unsigned averaged, const Weights& weights, Options o) {
  const bool average = ((averaged >> kind) & 1u) != 0;
  const float scale_c = average ? 1.0f / fmaxf(rows.chosen_length, 1.0f) : 1.0f;
  const float scale_r = average ? 1.0f / fmaxf(rows.rejected_length, 1.0f) : 1.0f;
  const Terms t =
      type_terms(kind, (rows.chosen_sum - rows.ref_chosen) * scale_c, (rows.rejected_sum - rows.ref_rejected) * scale_r, o);
  const float weight = weights.w[kind];
  return Terms{weight * t.loss, weight * t.d_chosen * scale_c, weight * t.d_rejected * scale_r};
}

FA_HD Terms pair_terms(PairRows rows, unsigned types, unsigned averaged, const Weights& weights, Options o) {
  Terms total{0.0f, 0.0f, 0.0f};
  for (int kind = 0; kind < kNumLossTypes; ++kind) {
    if (((types >> kind) & 1u) == 0) continue;
    const Terms t = pair_type_terms(rows, kind, averaged, weights, o);
    total.loss += t.loss;
    total.d_chosen += t.d_chosen;
    total.d_rejected += t.d_rejected;
  }
  return total;
}

}  // namespace dpo
}  // namespace fastalign

// The pybind11 class of policy::Options, shared by fastalign._C and the host module fastalign._host_math (each
// registers its own module-local copy), so that both build options from the same keyword arguments.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <optional>
#include <stdexcept>
#include <string>

#include "fastalign/policy_math.h"

namespace fastalign {

inline void bind_policy_options(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<policy::Options>(m, "PolicyOptions", py::module_local())
      .def(py::init([](float clip_low, float clip_high, std::optional<float> dual_clip, float kl_coef, int kl_kind,
                       float entropy_coef, float log_ratio_limit, bool sequence_level, float delta,
                       float sapo_temperature_pos, float sapo_temperature_neg, int objective,
                       bool bias_correction_kl) {
             if (kl_kind != policy::kK1 && kl_kind != policy::kK2 && kl_kind != policy::kK3)
               throw std::invalid_argument("kl_kind must be 1, 2 or 3 (k1, k2, k3), got " + std::to_string(kl_kind));
             if (objective < policy::kClip || objective > policy::kWeightedLogp)
               throw std::invalid_argument("objective must be 0, 1, 2 or 3 (clip, cispo, sapo, weighted logp), got " +
                                           std::to_string(objective));
             return policy::Options{clip_low,
                                    clip_high,
                                    dual_clip.value_or(0.0f),
                                    kl_coef,
                                    entropy_coef,
                                    log_ratio_limit,
                                    kl_kind,
                                    dual_clip.has_value(),
                                    sequence_level,
                                    delta,
                                    sapo_temperature_pos,
                                    sapo_temperature_neg,
                                    objective,
                                    bias_correction_kl};
           }),
           py::kw_only(), py::arg("clip_low"), py::arg("clip_high"), py::arg("dual_clip"), py::arg("kl_coef"),
           py::arg("kl_kind"), py::arg("entropy_coef"), py::arg("log_ratio_limit"), py::arg("sequence_level"),
           py::arg("delta") = std::numeric_limits<float>::infinity(), py::arg("sapo_temperature_pos") = 1.0f,
           py::arg("sapo_temperature_neg") = 1.05f, py::arg("objective") = static_cast<int>(policy::kClip),
           py::arg("bias_correction_kl") = false,
           "Options of the policy loss: clip bounds as ratios (1 - eps_low, 1 + eps_high; for cispo its cap), "
           "dual_clip (None: off), KL coefficient and kind (1, 2, 3 = k1, k2, k3), entropy coefficient, the "
           "|log-ratio| clamp, GSPO's sequence level, delta (the unclipped ratio's cap; inf: off), the sapo "
           "temperatures, the objective (0 clip, 1 cispo, 2 sapo, 3 weighted logp), and the bias-corrected KL (KL times "
           "the ratio)");
}

}  // namespace fastalign

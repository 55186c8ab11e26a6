#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <vector>

#include "fastalign/softmax_math.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace fastalign {

void register_softmax_math(py::module_& m) {
  m.def(
      "transform_logits",
      [](FloatArray z, float softcap, float inv_temperature, bool has_softcap) {
        FloatArray out(z.size());
        for (py::ssize_t i = 0; i < z.size(); ++i)
          out.mutable_data()[i] = transform_logit(z.data()[i], softcap, inv_temperature, has_softcap);
        return out;
      },
      py::arg("z"), py::arg("softcap"), py::arg("inv_temperature"), py::arg("has_softcap"));
  m.def(
      "row_stats",
      [](FloatArray logits, int64_t target, int group, int parts) {
        // The kernels' order of operations: `parts` threads each fold a strided share of the row `group`
        // values at a time, then the partial states merge in a butterfly (a warp shuffle's pattern).
        if (group < 1 || parts < 1 || (parts & (parts - 1)) != 0)
          throw std::invalid_argument("group must be >= 1 and parts a power of two");
        const float* l = logits.data();
        const int64_t n = logits.size();
        std::vector<SoftmaxState> states(parts, softmax_empty());
        for (int64_t start = 0, index = 0; start < n; start += group, ++index) {
          const int count = static_cast<int>(std::min<int64_t>(group, n - start));
          SoftmaxState& state = states[index % parts];
          state = softmax_add_group(state, l + start, count);
        }
        for (int stride = parts / 2; stride > 0; stride /= 2)
          for (int i = 0; i < stride; ++i) states[i] = softmax_merge(states[i], states[i + stride]);
        const RowStats stats = softmax_finish(states[0], l[target]);
        return py::make_tuple(stats.max_logit, stats.log_sum, stats.target_logp, stats.entropy);
      },
      py::arg("logits"), py::arg("target"), py::arg("group"), py::arg("parts"),
      "(max_logit, log_sum, target_logp, entropy) of transformed logits [V]");
  m.def(
      "logit_grads",
      [](FloatArray z, int64_t target, float max_logit, float log_sum, float alpha, float beta, float gamma,
         float kappa, float softcap, float inv_temperature, bool has_softcap) {
        FloatArray out(z.size());
        const GradCoefficients coeffs{alpha, beta, gamma, kappa};
        for (py::ssize_t j = 0; j < z.size(); ++j) {
          const float l = transform_logit(z.data()[j], softcap, inv_temperature, has_softcap);
          out.mutable_data()[j] =
              logit_grad(l, j == target, max_logit, log_sum, coeffs, softcap, inv_temperature, has_softcap);
        }
        return out;
      },
      py::arg("z"), py::arg("target"), py::arg("max_logit"), py::arg("log_sum"), py::arg("alpha"), py::arg("beta"),
      py::arg("gamma"), py::arg("kappa"), py::arg("softcap"), py::arg("inv_temperature"), py::arg("has_softcap"),
      "d loss / d z of raw logits [V] for one row, from its saved statistics and gradient coefficients");
  m.def(
      "row_stats2",
      [](FloatArray z, int64_t target, int group, int parts, float softcap, float inv_temperature, bool has_softcap) {
        // What logprobs_fwd_kernel runs (base 2, max on u): `parts` threads, `group` values at a time, then a
        // butterfly merge.
        if (group < 1 || parts < 1 || (parts & (parts - 1)) != 0)
          throw std::invalid_argument("group must be >= 1 and parts a power of two");
        const float lin = has_softcap ? softcap * inv_temperature : inv_temperature;
        const float s = lin * kLog2e, inv_softcap = has_softcap ? 1.0f / softcap : 1.0f;
        const int64_t n = z.size();
        std::vector<float> u(n);
        for (int64_t j = 0; j < n; ++j)
          u[j] = has_softcap ? softmax2_u<true>(z.data()[j], inv_softcap) : softmax2_u<false>(z.data()[j], 1.0f);
        std::vector<SoftmaxState> states(parts, softmax_empty());
        for (int64_t start = 0, index = 0; start < n; start += group, ++index) {
          const int count = static_cast<int>(std::min<int64_t>(group, n - start));
          SoftmaxState& state = states[index % parts];
          state = softmax2_add_group<true>(state, u.data() + start, count, s);
        }
        for (int stride = parts / 2; stride > 0; stride /= 2)
          for (int i = 0; i < stride; ++i) states[i] = softmax2_merge<true>(states[i], states[i + stride], s);
        const RowStats stats = softmax2_finish(states[0], u[target], s);
        return py::make_tuple(stats.max_logit, stats.log_sum, stats.target_logp, stats.entropy);
      },
      py::arg("z"), py::arg("target"), py::arg("group"), py::arg("parts"), py::arg("softcap"),
      py::arg("inv_temperature"), py::arg("has_softcap"),
      "(max_logit, log_sum, target_logp, entropy) of raw logits [V], as logprobs_fwd_kernel computes them");
  m.def(
      "logit_grads2",
      [](FloatArray z, int64_t target, float max_logit, float log_sum, float alpha, float beta, float gamma,
         float kappa, float softcap, float inv_temperature, bool has_softcap) {
        // What logprobs_bwd_kernel runs (base 2, pre-scaled coefficients).
        FloatArray out(z.size());
        const float lin = has_softcap ? softcap * inv_temperature : inv_temperature;
        const float s = lin * kLog2e, inv_softcap = has_softcap ? 1.0f / softcap : 1.0f;
        const float offset2 = (max_logit + log_sum) * kLog2e;
        const Grad2Coefficients c = grad2_coefficients(GradCoefficients{alpha, beta, gamma, kappa}, inv_temperature);
        for (py::ssize_t j = 0; j < z.size(); ++j) {
          const float u = has_softcap ? softmax2_u<true>(z.data()[j], inv_softcap) : z.data()[j];
          float g = has_softcap ? logit_grad2<true>(u, s, offset2, c) : logit_grad2<false>(u, s, offset2, c);
          if (j == target) g += has_softcap ? target_grad2<true>(u, c) : target_grad2<false>(u, c);
          out.mutable_data()[j] = g;
        }
        return out;
      },
      py::arg("z"), py::arg("target"), py::arg("max_logit"), py::arg("log_sum"), py::arg("alpha"), py::arg("beta"),
      py::arg("gamma"), py::arg("kappa"), py::arg("softcap"), py::arg("inv_temperature"), py::arg("has_softcap"),
      "d loss / d z of raw logits [V], as logprobs_bwd_kernel computes it");
}

}  // namespace fastalign

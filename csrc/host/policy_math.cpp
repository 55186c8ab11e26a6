// The policy loss's shared math (policy_math.h) on the CPU: element-wise over float32 arrays, and whole rows
// in the order of the kernels' passes (csrc/cuda/policy_loss.cu), so that the tests check against torch what
// the kernels compute, token by token.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../bindings/policy_options.h"
#include "fastalign/mask.h"
#include "fastalign/policy_math.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace fastalign {
namespace {

FloatArray empty_like(const FloatArray& like) {
  return FloatArray(std::vector<py::ssize_t>(like.shape(), like.shape() + like.ndim()));
}

void check_same_shape(const char* name, const py::array& array, const FloatArray& like) {
  if (array.ndim() != like.ndim() || !std::equal(like.shape(), like.shape() + like.ndim(), array.shape()))
    throw std::invalid_argument(std::string(name) + " must have the shape of the first argument");
}

// The inputs of policy_rows: [rows, tokens] arrays (advantages and weights broadcast by the caller).
struct Rows {
  const float* logp;
  const float* old_logp;
  const float* advantages;
  const float* is_weights;  // nullptr: weight 1
  const float* ref_logp;    // nullptr: no KL term
  const float* entropy;     // nullptr: no entropy term
  const void* mask;
  int mask_bytes;
  bool mask_is_float;

  policy::Token token(py::ssize_t i) const {
    return policy::Token{logp[i],
                         old_logp[i],
                         advantages[i],
                         is_weights != nullptr ? is_weights[i] : 1.0f,
                         ref_logp != nullptr ? ref_logp[i] : 0.0f,
                         entropy != nullptr ? entropy[i] : 0.0f};
  }
  bool keeps(py::ssize_t i) const { return mask_keeps_at(mask, i, mask_bytes, mask_is_float); }
};

const float* data_or_null(const std::optional<FloatArray>& array) {
  return array.has_value() ? array->data() : nullptr;
}

}  // namespace

void register_policy_math(py::module_& m) {
  bind_policy_options(m);
  m.def(
      "policy_surrogate",
      [](FloatArray ratio, FloatArray advantages, const policy::Options& o) {
        check_same_shape("advantages", advantages, ratio);
        FloatArray loss = empty_like(ratio), grad = empty_like(ratio), low = empty_like(ratio),
                   high = empty_like(ratio), dual = empty_like(ratio);
        for (py::ssize_t i = 0; i < ratio.size(); ++i) {
          const float r = ratio.data()[i], a = advantages.data()[i];
          const policy::ClipFlags flags = policy::clip_flags(r, a, o);
          loss.mutable_data()[i] = policy::surrogate_loss(r, a, o);
          grad.mutable_data()[i] = policy::surrogate_grad(r, a, o);
          low.mutable_data()[i] = flags.low;
          high.mutable_data()[i] = flags.high;
          dual.mutable_data()[i] = flags.dual;
        }
        return py::make_tuple(loss, grad, low, high, dual);
      },
      py::arg("ratio"), py::arg("advantages"), py::arg("options"),
      "(loss, d loss / d ratio, low, high, dual clip flags as 0 / 1) of the clipped, dual-clipped surrogate");
  m.def(
      "policy_kl",
      [](FloatArray r, const policy::Options& o) {
        FloatArray value = empty_like(r), grad = empty_like(r);
        for (py::ssize_t i = 0; i < r.size(); ++i) {
          value.mutable_data()[i] = policy::kl_value(r.data()[i], o.log_ratio_limit, o.kl_kind);
          grad.mutable_data()[i] = policy::kl_grad(r.data()[i], o.log_ratio_limit, o.kl_kind);
        }
        return py::make_tuple(value, grad);
      },
      py::arg("r"), py::arg("options"), "(KL estimate, d KL / d logp) at r = ref_logp - logp, for options.kl_kind");
  m.def(
      "policy_mask_keeps",
      [](const py::array& mask, bool is_float) {
        const py::array dense = py::array::ensure(mask, py::array::c_style);
        py::array_t<bool> out(dense.size());
        for (py::ssize_t i = 0; i < dense.size(); ++i)
          out.mutable_data()[i] = mask_keeps_at(dense.data(), i, static_cast<int>(dense.itemsize()), is_float);
        return out;
      },
      py::arg("mask"), py::arg("is_float"),
      "Which elements of a mask (any dtype of 1, 2, 4 or 8 bytes, read as raw bits) keep their token; flat");
  m.def(
      "policy_rows",
      [](FloatArray logp, FloatArray old_logp, FloatArray advantages, const py::array& mask, bool mask_is_float,
         const policy::Options& o, std::optional<FloatArray> is_weights, std::optional<FloatArray> ref_logp,
         std::optional<FloatArray> entropy) {
        if (logp.ndim() != 2) throw std::invalid_argument("logp must be [rows, tokens]");
        const py::array dense_mask = py::array::ensure(mask, py::array::c_style);
        check_same_shape("old_logp", old_logp, logp);
        check_same_shape("advantages", advantages, logp);
        check_same_shape("mask", dense_mask, logp);
        for (const auto& [name, array] : {std::pair{"is_weights", &is_weights}, std::pair{"ref_logp", &ref_logp},
                                          std::pair{"entropy", &entropy}})
          if (array->has_value()) check_same_shape(name, **array, logp);
        const int bytes = static_cast<int>(dense_mask.itemsize());
        if (bytes != 1 && bytes != 2 && bytes != 4 && bytes != 8)
          throw std::invalid_argument("mask elements must have 1, 2, 4 or 8 bytes");
        const Rows in{logp.data(), old_logp.data(), advantages.data(), data_or_null(is_weights),
                      data_or_null(ref_logp), data_or_null(entropy), dense_mask.data(), bytes, mask_is_float};
        const py::ssize_t rows = logp.shape(0), tokens = logp.shape(1);
        const bool has_ref = in.ref_logp != nullptr;
        FloatArray stats({static_cast<py::ssize_t>(policy::kNumStats), rows});
        FloatArray grad_logp = empty_like(logp), grad_entropy = empty_like(logp);
        // The kernels' passes, one row at a time; d_logp and d_entropy before the row's weight.
        for (py::ssize_t row = 0; row < rows; ++row) {
          const py::ssize_t first = row * tokens, end = first + tokens;
          float log_ratio_sum = 0.0f, count = 0.0f;
          for (py::ssize_t i = first; i < end; ++i)
            if (o.sequence_level && in.keeps(i)) {
              log_ratio_sum += in.logp[i] - in.old_logp[i];
              count += 1.0f;
            }
          const float seq_log_ratio = log_ratio_sum / std::max(count, 1.0f);
          const float seq_ratio = o.sequence_level ? policy::ratio_from_log_ratio(seq_log_ratio, o.log_ratio_limit)
                                                   : 1.0f;
          float sums[policy::kNumStats] = {};
          float ratio_grad_sum = 0.0f;
          for (py::ssize_t i = first; i < end; ++i)
            if (in.keeps(i)) {
              policy::add_token_stats(sums, in.token(i), seq_ratio, has_ref, o);
              if (o.sequence_level)
                ratio_grad_sum += policy::sequence_ratio_grad(in.token(i), seq_ratio, has_ref, o);
            }
          for (int k = 0; k < policy::kNumStats; ++k) stats.mutable_data()[k * rows + row] = sums[k];
          const float spread =
              o.sequence_level ? policy::sequence_spread(ratio_grad_sum, seq_log_ratio, count, o.log_ratio_limit)
                               : 0.0f;
          for (py::ssize_t i = first; i < end; ++i) {
            const bool kept = in.keeps(i);
            grad_logp.mutable_data()[i] =
                kept ? policy::token_grad(in.token(i), spread, seq_ratio, has_ref, o) : 0.0f;
            grad_entropy.mutable_data()[i] = kept ? -o.entropy_coef : 0.0f;
          }
        }
        return py::make_tuple(stats, grad_logp, entropy.has_value() ? py::object(grad_entropy) : py::none());
      },
      py::arg("logp"), py::arg("old_logp"), py::arg("advantages"), py::arg("mask"), py::arg("mask_is_float"),
      py::arg("options"), py::arg("is_weights") = py::none(), py::arg("ref_logp") = py::none(),
      py::arg("entropy") = py::none(),
      "(stats [8, rows], d_logp, d_entropy or None) of float32 [rows, tokens] inputs, as the CUDA kernels form "
      "them: the per-row sums (loss, count, low / high / dual clips, ratio, KL, entropy) and each token's "
      "gradient before its row's weight");
}

}  // namespace fastalign

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "checks.h"
#include "fastalign/launch_dpo.h"

namespace py = pybind11;

namespace fastalign {
namespace {

dpo::Weights to_weights(const std::vector<float>& weights) {
  if (weights.size() != dpo::kNumLossTypes)
    throw std::invalid_argument("type_weights must hold one weight per DPO loss type (12), got " +
                                std::to_string(weights.size()));
  dpo::Weights out{};
  for (int kind = 0; kind < dpo::kNumLossTypes; ++kind) out.w[kind] = weights[kind];
  return out;
}

}  // namespace

void register_dpo(py::module_& m) {
  m.def(
      "dpo_loss_forward",
      [](uintptr_t token_logps, int dtype, uintptr_t mask, int mask_bytes, bool mask_is_float, uintptr_t ref_logps,
         int64_t pairs, int64_t width, unsigned types, unsigned averaged, const std::vector<float>& type_weights,
         float beta, float label_smoothing, float discopop_tau, uintptr_t losses, uintptr_t sums,
         uintptr_t lengths, uintptr_t row_grad, uintptr_t stream) {
        raise_on_error("dpo_loss_forward",
                       dpo_loss_forward(as_ptr<const void>(token_logps), dtype, as_ptr<const void>(mask), mask_bytes,
                                        mask_is_float, as_ptr<const float>(ref_logps), pairs, width, types, averaged,
                                        to_weights(type_weights), dpo::Options{beta, label_smoothing, discopop_tau},
                                        as_ptr<float>(losses), as_ptr<float>(sums), as_ptr<float>(lengths),
                                        as_ptr<float>(row_grad), stream));
      },
      py::arg("token_logps"), py::arg("dtype"), py::arg("mask"), py::arg("mask_bytes"), py::arg("mask_is_float"),
      py::arg("ref_logps"), py::arg("pairs"), py::arg("width"), py::arg("types"), py::arg("averaged"),
      py::arg("type_weights"), py::arg("beta"), py::arg("label_smoothing"), py::arg("discopop_tau"),
      py::arg("losses"), py::arg("sums"), py::arg("lengths"), py::arg("row_grad"), py::arg("stream"),
      "Per-pair weighted DPO loss, per-row sums, lengths and d loss / d token log-prob (float32) of token "
      "log-probs [2 * pairs, width]");
  m.def(
      "dpo_loss_backward",
      [](uintptr_t mask, int mask_bytes, bool mask_is_float, uintptr_t row_grad, uintptr_t grad_losses,
         int64_t grad_losses_stride, uintptr_t grad_sums, int64_t grad_sums_stride, int64_t pairs, int64_t width,
         uintptr_t grad, int dtype, uintptr_t stream) {
        raise_on_error("dpo_loss_backward",
                       dpo_loss_backward(as_ptr<const void>(mask), mask_bytes, mask_is_float,
                                         as_ptr<const float>(row_grad), as_ptr<const float>(grad_losses),
                                         grad_losses_stride, as_ptr<const float>(grad_sums), grad_sums_stride, pairs,
                                         width, as_ptr<void>(grad), dtype, stream));
      },
      py::arg("mask"), py::arg("mask_bytes"), py::arg("mask_is_float"), py::arg("row_grad"), py::arg("grad_losses"),
      py::arg("grad_losses_stride"), py::arg("grad_sums"), py::arg("grad_sums_stride"), py::arg("pairs"),
      py::arg("width"), py::arg("grad"), py::arg("dtype"), py::arg("stream"),
      "d loss / d token log-probs [2 * pairs, width] (token dtype): each row's upstream gradient on its masked "
      "tokens");
}

}  // namespace fastalign

#include "checks.h"
#include "fastalign/launch_logprobs.h"

namespace py = pybind11;

namespace fastalign {

void register_logprobs(py::module_& m) {
  m.def(
      "logprobs_forward",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t targets,
         float softcap, float inv_temperature, bool has_softcap, uintptr_t max_logit, uintptr_t log_sum,
         uintptr_t target_logp, uintptr_t entropy, uintptr_t sum_logits, uintptr_t stream) {
        raise_on_error("logprobs_forward",
                       logprobs_forward(as_ptr<const void>(logits), dtype, rows, cols, row_stride,
                                        as_ptr<const int64_t>(targets), softcap, inv_temperature, has_softcap,
                                        as_ptr<float>(max_logit), as_ptr<float>(log_sum), as_ptr<float>(target_logp),
                                        as_ptr<float>(entropy), as_ptr<float>(sum_logits), stream));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("targets"), py::arg("softcap"), py::arg("inv_temperature"), py::arg("has_softcap"),
      py::arg("max_logit"), py::arg("log_sum"), py::arg("target_logp"), py::arg("entropy"), py::arg("sum_logits"),
      py::arg("stream"),
      "Per-row max, log-sum-exp remainder, target log-prob, entropy and logit sum (float32 [rows]) of logits");
  m.def(
      "logprobs_backward",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t targets,
         uintptr_t max_logit, uintptr_t log_sum, uintptr_t alpha, uintptr_t beta, uintptr_t gamma, uintptr_t kappa,
         float softcap, float inv_temperature, bool has_softcap, uintptr_t grad, int64_t grad_row_stride,
         uintptr_t stream) {
        raise_on_error(
            "logprobs_backward",
            logprobs_backward(as_ptr<const void>(logits), dtype, rows, cols, row_stride,
                              as_ptr<const int64_t>(targets), as_ptr<const float>(max_logit),
                              as_ptr<const float>(log_sum), as_ptr<const float>(alpha), as_ptr<const float>(beta),
                              as_ptr<const float>(gamma), as_ptr<const float>(kappa), softcap, inv_temperature,
                              has_softcap, as_ptr<void>(grad), grad_row_stride, stream));
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("row_stride"),
      py::arg("targets"), py::arg("max_logit"), py::arg("log_sum"), py::arg("alpha"), py::arg("beta"),
      py::arg("gamma"), py::arg("kappa"), py::arg("softcap"), py::arg("inv_temperature"), py::arg("has_softcap"),
      py::arg("grad"), py::arg("grad_row_stride"), py::arg("stream"),
      "d loss / d logits (logits' dtype) from the saved row statistics and per-row gradient coefficients");
}

}  // namespace fastalign

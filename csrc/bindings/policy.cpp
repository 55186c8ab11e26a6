#include <pybind11/pybind11.h>

#include <tuple>

#include "checks.h"
#include "fastalign/launch_policy.h"
#include "policy_options.h"

namespace py = pybind11;

namespace fastalign {
namespace {

using Input = std::tuple<uintptr_t, int>;                       // (pointer, dtype code); pointer 0: absent
using RowInput = std::tuple<uintptr_t, int, int64_t, int64_t>;  // + (row stride, token stride) in elements
using Mask = std::tuple<uintptr_t, int, bool>;                  // (pointer, element bytes, is floating point)

PolicyInput input(const Input& in) { return PolicyInput{as_ptr<const void>(std::get<0>(in)), std::get<1>(in)}; }

PolicyRowInput row_input(const RowInput& in) {
  return PolicyRowInput{as_ptr<const void>(std::get<0>(in)), std::get<1>(in), std::get<2>(in), std::get<3>(in)};
}

}  // namespace

void register_policy(py::module_& m) {
  bind_policy_options(m);
  py::class_<PolicyProblem>(m, "PolicyProblem", py::module_local())
      .def(py::init([](int64_t rows, int64_t tokens, const Input& logp, const Input& old_logp, const Input& ref_logp,
                       const Input& entropy, const RowInput& advantages, const RowInput& is_weights,
                       const Mask& mask, const policy::Options& options) {
             const PolicyMask policy_mask{as_ptr<const void>(std::get<0>(mask)), std::get<1>(mask), std::get<2>(mask)};
             return PolicyProblem{rows, tokens, input(logp), input(old_logp), input(ref_logp), input(entropy),
                                  row_input(advantages), row_input(is_weights), policy_mask, options};
           }),
           py::kw_only(), py::arg("rows"), py::arg("tokens"), py::arg("logp"), py::arg("old_logp"),
           py::arg("ref_logp"), py::arg("entropy"), py::arg("advantages"), py::arg("is_weights"), py::arg("mask"),
           py::arg("options"),
           "The inputs of one policy-loss call as device pointers: contiguous [rows, tokens] tensors as "
           "(pointer, dtype code), advantages / is_weights as (pointer, dtype code, row stride, token stride), "
           "the contiguous mask as (pointer, element bytes, is floating point); pointer 0 for an absent input");
  m.def(
      "policy_loss_forward",
      [](const PolicyProblem& problem, uintptr_t stats, uintptr_t stream) {
        raise_on_error("policy_loss_forward", policy_loss_forward(problem, as_ptr<float>(stats), stream));
      },
      py::arg("problem"), py::arg("stats"), py::arg("stream"),
      "Per-row sums of the loss and the metrics' numerators into float32 stats [8, rows]");
  m.def(
      "policy_loss_backward",
      [](const PolicyProblem& problem, uintptr_t row_weights, uintptr_t grad_logp, uintptr_t grad_entropy,
         uintptr_t stream) {
        raise_on_error("policy_loss_backward",
                       policy_loss_backward(problem, as_ptr<const float>(row_weights), as_ptr<void>(grad_logp),
                                            as_ptr<void>(grad_entropy), stream));
      },
      py::arg("problem"), py::arg("row_weights"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("stream"),
      "d loss / d logp (logp's dtype) and d loss / d entropy (entropy's dtype; pointer 0: none) from the rows' "
      "float32 weights in the aggregation");
}

}  // namespace fastalign

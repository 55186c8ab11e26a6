// fastalign._host_math: the kernels' shared __host__ __device__ math compiled for the CPU, so that the tests
// check it against torch without a GPU. Arrays are float32 numpy arrays.

#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastalign {
void register_softmax_math(py::module_& m);
void register_policy_math(py::module_& m);
void register_dpo_math(py::module_& m);
}  // namespace fastalign

PYBIND11_MODULE(_host_math, m) {
  m.doc() = "Host build of the CUDA kernels' shared device math (for tests)";
  fastalign::register_softmax_math(m);
  fastalign::register_policy_math(m);
  fastalign::register_dpo_math(m);
}

// fastalign._C: the CUDA kernels behind a torch-free ABI. Every function takes device pointers as ints
// (tensor.data_ptr()), sizes, dtype codes (0 = float32, 1 = float16, 2 = bfloat16) and the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream), so one build works with any torch version.

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "fastalign/runtime.h"

namespace py = pybind11;

namespace fastalign {
void register_logprobs(py::module_& m);
void register_policy(py::module_& m);
void register_dpo(py::module_& m);
}  // namespace fastalign

#ifndef FASTALIGN_CUDA_ARCHS
#define FASTALIGN_CUDA_ARCHS "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastalign's CUDA kernels (torch-free ABI: raw pointers, sizes, dtype codes, stream handles)";
  m.def(
      "device_count",
      []() {
        std::string why;
        const int count = fastalign::cuda_device_count(&why);
        return py::make_tuple(count, why);
      },
      "(count, reason): visible CUDA devices, and CUDA's error text when there are none");
  m.def(
      "set_device",
      [](int device) {
        const char* error = fastalign::set_device(device);
        if (error != nullptr) throw std::runtime_error(std::string("fastalign._C.set_device: CUDA error: ") + error);
      },
      py::arg("device"),
      "Make a device current for the calling thread and this extension's launches (its CUDA runtime is its own). "
      "It stays current, for torch too (both act on the thread's current CUDA context): callers restore torch's "
      "device after their launches, as fastalign.ops._cuda_ext.launch_stream does");
  m.def("device_capability", &fastalign::device_capability, py::arg("device"),
        "Compute capability of a device as major * 10 + minor (0 if it cannot be read)");
  m.def(
      "build_info",
      []() {
        py::dict info;
        info["cuda_runtime"] = fastalign::cuda_runtime_version();
        info["archs"] = FASTALIGN_CUDA_ARCHS;
        return info;
      },
      "CUDA runtime version and target architectures of this build");
  fastalign::register_logprobs(m);
  fastalign::register_policy(m);
  fastalign::register_dpo(m);
}

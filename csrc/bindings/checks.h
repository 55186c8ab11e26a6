// Helpers of the pybind11 bindings: turn a launcher's error into a Python exception naming the kernel.
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "fastalign/common.h"

namespace fastalign {

inline void raise_on_error(const char* kernel, LaunchError error) {
  if (error != nullptr) throw std::runtime_error(std::string("fastalign._C.") + kernel + " failed: " + error);
}

// Pointers cross the boundary as Python ints (tensor.data_ptr(), 0 for "absent").
template <typename T>
inline T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace fastalign

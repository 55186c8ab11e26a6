// What the extension reports about itself and the machine, for fastalign.backends().
#pragma once

#include <string>

namespace fastalign {

// Number of visible CUDA devices; 0 with the reason in *why when there is no usable device or driver.
int cuda_device_count(std::string* why);
// The CUDA runtime version the extension was built with (e.g. 13000).
int cuda_runtime_version();
// Make device the calling thread's current device in this extension's CUDA runtime (it is separate from
// torch's: the extension links the runtime statically). nullptr on success, else CUDA's error text.
const char* set_device(int device);
// Compute capability major * 10 + minor of a device.
int device_capability(int device);

}  // namespace fastalign

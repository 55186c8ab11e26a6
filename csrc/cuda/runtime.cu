#include <cuda_runtime.h>

#include "fastalign/runtime.h"

namespace fastalign {

int cuda_device_count(std::string* why) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    *why = cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return count;
}

int cuda_runtime_version() { return CUDART_VERSION; }

const char* set_device(int device) {
  const cudaError_t status = cudaSetDevice(device);
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

int device_capability(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return major * 10 + minor;
}

}  // namespace fastalign

// Device helpers shared by the kernels: element conversion, 16-byte vectors, launch error reporting.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fastalign/common.h"

namespace fastalign {

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// kBytes / sizeof(T) elements of T in one load or store of kBytes (16 by default).
template <typename T, int kBytes = 16>
struct alignas(kBytes) Vec {
  static constexpr int kSize = kBytes / sizeof(T);
  T v[kSize];
};

// A compile-time int to pass to generic lambdas.
template <int N>
struct Width {
  static constexpr int value = N;
};

// Elements before the first 16-byte boundary of a row starting at ptr (at most cols).
template <typename T>
__device__ __forceinline__ int64_t unaligned_head(const T* ptr, int64_t cols) {
  const int64_t head = static_cast<int64_t>(((16u - (reinterpret_cast<uintptr_t>(ptr) & 15u)) & 15u) / sizeof(T));
  return head < cols ? head : cols;
}

__device__ __forceinline__ float load_or(const float* ptr, int64_t index, float fallback) {
  return ptr == nullptr ? fallback : ptr[index];
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// nullptr when the last launch succeeded, else CUDA's error text.
inline LaunchError last_launch_error() {
  const cudaError_t status = cudaGetLastError();
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

// The current device's SM count (the launchers size grids by it).
inline LaunchError multiprocessor_count(int* sms) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device) !=
                                                   cudaSuccess)
    return last_launch_error();
  return nullptr;
}

// Run launch<T>() for the element type named by dtype.
template <template <typename> class Launch, typename... Args>
LaunchError dispatch_dtype(int dtype, Args... args) {
  switch (dtype) {
    case kFloat32:
      return Launch<float>::run(args...);
    case kFloat16:
      return Launch<__half>::run(args...);
    case kBFloat16:
      return Launch<__nv_bfloat16>::run(args...);
    default:
      return "unsupported dtype code (expected 0 = float32, 1 = float16, 2 = bfloat16)";
  }
}

}  // namespace fastalign

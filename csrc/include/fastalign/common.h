// Definitions shared by the CUDA kernels, their host launchers and the host build of the device math.
#pragma once

#include <math.h>
#include <stdint.h>

// Math shared between kernels and the host module: inlined device functions under nvcc, plain inline
// functions in the host build, so the CPU tests exercise exactly the code the kernels run.
#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fastalign {

// Element types crossing the Python boundary; the Python side maps torch dtypes to these codes.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What every launcher returns: nullptr on success, otherwise the CUDA error text (static storage).
using LaunchError = const char*;

}  // namespace fastalign

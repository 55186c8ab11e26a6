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

// e^x for softmax sums and probabilities: the GPU's ex2-based __expf (what Triton's tl.exp compiles to; a few
// ulp, and one multi-function-unit instruction instead of a dozen, which keeps the kernels bandwidth-bound),
// expf on the host.
FA_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return expf(x);
#endif
}

// Element types crossing the Python boundary; the Python side maps torch dtypes to these codes.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What every launcher returns: nullptr on success, otherwise the CUDA error text (static storage).
using LaunchError = const char*;

}  // namespace fastalign

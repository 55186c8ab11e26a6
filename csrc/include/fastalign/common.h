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

// 2^x for the kernels' base-2 softmax: one ex2.approx.ftz (2 ulp; results below 2^-126 flush to 0, which a
// softmax sum or probability never notices), exp2f on the host.
FA_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// tanh(x) for the softcap: the hardware tanh.approx.f32 on sm_75+ (relative error at most 2^-10.99 per the PTX
// ISA: well inside the rounding of the bf16 logits it is applied to, see docs/benchmarks.md), tanhf elsewhere.
FA_HD float fast_tanh(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return tanhf(x);
#endif
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element types crossing the Python boundary; the Python side maps torch dtypes to these codes.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// What every launcher returns: nullptr on success, otherwise the CUDA error text (static storage).
using LaunchError = const char*;

}  // namespace fastalign

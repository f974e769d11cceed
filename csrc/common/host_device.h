// Shared host/device helpers: arithmetic written once, called by the C++ CPU loops and the
// CUDA kernels alike, so the CPU tests check the math the GPU runs.
#pragma once
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD inline
#endif

namespace fastbig {

FB_HD float fb_exp(float x) { return expf(x); }
FB_HD double fb_exp(double x) { return exp(x); }
FB_HD float fb_tanh(float x) { return tanhf(x); }
FB_HD double fb_tanh(double x) { return tanh(x); }
FB_HD float fb_sqrt(float x) { return sqrtf(x); }
FB_HD double fb_sqrt(double x) { return sqrt(x); }
FB_HD float fb_rsqrt(float x) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(x);
#else
  return 1.0f / sqrtf(x);
#endif
}
FB_HD double fb_rsqrt(double x) { return 1.0 / sqrt(x); }

// Numerically safe logistic: never forms exp of a large positive number.
template <typename T>
FB_HD T fb_sigmoid(T x) {
  if (x >= T(0)) {
    T z = fb_exp(-x);
    return T(1) / (T(1) + z);
  }
  T z = fb_exp(x);
  return z / (T(1) + z);
}

}  // namespace fastbig

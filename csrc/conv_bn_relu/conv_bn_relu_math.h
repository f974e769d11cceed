// BatchNorm (batch statistics) + activation math, per element and per channel. Host and device
// share this code: the CPU loops of conv_bn_relu_cpu.cpp and the CUDA kernels of
// conv_bn_relu_cuda.cu call the same functions.
//
// Forward, per channel c with batch mean m, biased variance v, count n:
//   invstd = 1 / sqrt(v + eps)        a = gamma * invstd
//   u = (z - m) * a + beta            y = act(u)
// act: none (u), relu (max(u, 0)), leaky_relu (u > 0 ? u : slope * u); NaN stays NaN.
//
// Backward, from dy: the activation's gradient dy' = dy * act'(u) (u recomputed bit for bit
// from z with the forward's function), then per channel
//   S1 = sum dy'      S2 = sum dy' * (z - m)
//   dbeta = S1        dgamma = S2 * invstd            (= sum dy' * xhat)
//   dz = gamma * invstd * (dy' - S1 / n - (z - m) * invstd^2 * S2 / n)
//      = invstd*gamma/n * (n*dy' - sum dy' - xhat * sum dy'*xhat)
// The running statistics follow BatchNorm2d:
//   factor = momentum, or 1 / num_batches_tracked (after its increment) when momentum is None
//   running_mean = (1 - factor) * running_mean + factor * m
//   running_var  = (1 - factor) * running_var  + factor * v * n / (n - 1)
#pragma once
#include <cstdint>

#include "common/host_device.h"
#include "common/welford.h"

namespace fastbig {
namespace cbr {

enum Act : int64_t { kNone = 0, kRelu = 1, kLeakyRelu = 2 };

template <typename T>
FB_HD T invstd_of(T var, T eps) {
  return fb_rsqrt(var + eps);
}

// The pre-activation u. Forward and backward both call this, so the relu/leaky mask the
// backward recomputes is exactly the forward's.
template <typename T>
FB_HD T bn_pre(T z, T mean, T a, T beta) {
  return (z - mean) * a + beta;
}

// NaN propagates as in torch.relu / leaky_relu: a NaN u fails `u < 0` and is returned as is.
template <typename T>
FB_HD T act_forward(T u, int64_t act, T slope) {
  if (act == kRelu) return u < T(0) ? T(0) : u;
  if (act == kLeakyRelu) return u < T(0) ? u * slope : u;
  return u;
}

// dy' = dy * act'(u); u > 0 is the same test as y > 0 (relu) or sign(y) (leaky, slope > 0).
template <typename T>
FB_HD T act_backward(T dy, T u, int64_t act, T slope) {
  if (act == kRelu) return u > T(0) ? dy : T(0);
  if (act == kLeakyRelu) return u > T(0) ? dy : dy * slope;
  return dy;
}

// Per-channel forward coefficient a = gamma * invstd.
template <typename T>
FB_HD T bn_scale(T gamma, T invstd) {
  return gamma * invstd;
}

// Per-channel backward coefficients from the sums S1 = sum dy', S2 = sum dy' (z - m):
//   dz = k * (dy' - g_mean - (z - m) * g_proj).
template <typename T>
struct BackwardCoeffs {
  T k, g_mean, g_proj, dgamma, dbeta;
};

template <typename T>
FB_HD BackwardCoeffs<T> bn_backward_coeffs(T s1, T s2, T invstd, T gamma, int64_t n) {
  BackwardCoeffs<T> r;
  const T inv_n = T(1) / T(n);
  r.k = gamma * invstd;
  r.g_mean = s1 * inv_n;
  r.g_proj = s2 * invstd * invstd * inv_n;
  r.dgamma = s2 * invstd;
  r.dbeta = s1;
  return r;
}

// The same with the coefficients as scalars: a vector loop over channels (channels_last) reads
// them from per-coefficient arrays; a struct built per element keeps GCC from vectorizing it.
template <typename T>
FB_HD T bn_backward_elem(T dyp, T z, T mean, T k, T g_mean, T g_proj) {
  return k * (dyp - g_mean - (z - mean) * g_proj);
}

template <typename T>
FB_HD T bn_backward_elem(T dyp, T z, T mean, const BackwardCoeffs<T>& c) {
  return bn_backward_elem(dyp, z, mean, c.k, c.g_mean, c.g_proj);
}

// BatchNorm2d's running-statistic update for one channel. factor as above.
template <typename T>
FB_HD void running_update(T& running_mean, T& running_var, T mean, T var_biased, int64_t n, T factor) {
  const T unbiased = var_biased * (T(n) / T(n - 1));
  running_mean = (T(1) - factor) * running_mean + factor * mean;
  running_var = (T(1) - factor) * running_var + factor * unbiased;
}

}  // namespace cbr
}  // namespace fastbig

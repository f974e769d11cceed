// Welford running statistics and Chan's parallel merge, written once for host and device.
//
//   update(x):   n += 1; d = x - mean; mean += d / n; m2 += d * (x - mean)
//   merge(a, b): n = na + nb; d = mean_b - mean_a; mean = mean_a + d * nb / n;
//                m2 = m2_a + m2_b + d^2 * na * nb / n            (Chan, Golub & LeVeque 1979)
//
// m2 is the sum of squared deviations from the mean, so var = m2 / n (biased) and
// m2 / (n - 1) (unbiased). Both the per-element update and the merge stay accurate for large
// counts and for data whose mean is large against its spread, unlike sum / sum-of-squares.
// The count is an int64 so that a merge of many partials keeps it exact.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace fastbig {

template <typename T>
struct Welford {
  T mean;
  T m2;
  int64_t n;
};

template <typename T>
FB_HD Welford<T> welford_init() {
  return Welford<T>{T(0), T(0), 0};
}

// Statistics of one chunk whose mean and sum of squared deviations are already known (for
// instance from a two-pass sweep of a chunk that sits in cache).
template <typename T>
FB_HD Welford<T> welford_from_chunk(T mean, T m2, int64_t n) {
  return Welford<T>{mean, m2, n};
}

template <typename T>
FB_HD void welford_update(Welford<T>& w, T x) {
  w.n += 1;
  const T d = x - w.mean;
  w.mean += d / T(w.n);
  w.m2 += d * (x - w.mean);
}

// Chan's merge of the moments (mean_b, m2_b) of a non-empty part b into (mean, m2) of a
// non-empty part a, given na and nb_over_n = nb / (na + nb). welford_merge calls it; so does a
// loop that merges many channels whose parts share their counts (one division for them all).
template <typename T>
FB_HD void welford_merge_moments(T& mean, T& m2, T na, T nb_over_n, T mean_b, T m2_b) {
  const T d = mean_b - mean;
  mean = mean + d * nb_over_n;
  m2 = m2 + m2_b + d * d * na * nb_over_n;
}

// Chan's merge of two partial statistics; either side may be empty.
template <typename T>
FB_HD Welford<T> welford_merge(const Welford<T>& a, const Welford<T>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  Welford<T> r{a.mean, a.m2, n};
  welford_merge_moments(r.mean, r.m2, T(a.n), T(b.n) / T(n), b.mean, b.m2);
  return r;
}

// Biased variance (what BatchNorm normalizes with); 0 for an empty set.
template <typename T>
FB_HD T welford_var_biased(const Welford<T>& w) {
  return w.n > 0 ? w.m2 / T(w.n) : T(0);
}

}  // namespace fastbig

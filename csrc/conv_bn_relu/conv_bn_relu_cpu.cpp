// CPU kernels of the fused BatchNorm (batch statistics) + activation that follows a conv.
// The conv itself stays with ATen (oneDNN); see fastbig/ops/conv_bn_relu.py.
//
//   bn_act_forward:   one statistics pass (per-chunk two-pass Welford statistics merged with
//                     Chan's rule), then one pass z -> y = act((z - m) * gamma * invstd + beta)
//   bn_act_backward:  one pass for S1 = sum dy', S2 = sum dy' (z - m), one pass for dz
//   bn_update_running_stats_: BatchNorm2d's running-statistic rule, in place
// NCHW and channels_last are both read in place (conv_bn_relu.h). The per-element and
// per-channel arithmetic is conv_bn_relu_math.h and common/welford.h, shared with CUDA.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <type_traits>
#include <vector>

#include "common/welford.h"
#include "conv_bn_relu/conv_bn_relu.h"
#include "conv_bn_relu/conv_bn_relu_math.h"
#include "common/cpu_clones.h"

namespace fastbig {
namespace cbr {
namespace {

// Elements per chunk of a statistics sweep: a chunk stays in L1 for its second pass.
constexpr int64_t kChunk = 4096;
// Elements per parallel task (smaller problems run inline: no thread wake-up for tiny work).
constexpr int64_t kGrainElems = 32768;

// Grain of a loop over channels whose iterations each touch per_channel elements.
inline int64_t channel_grain(int64_t per_channel) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, per_channel));
}
// Grain of a loop over row blocks of block_elems elements each.
inline int64_t block_grain(int64_t block_elems) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, block_elems));
}

// NCHW: f(pl, c) on each of the N*C planes pl (of HW elements, channel c = pl % C), planes in
// parallel.
template <typename F>
inline void for_each_plane(int64_t N, int64_t C, int64_t HW, const F& f) {
  at::parallel_for(0, N * C, std::max<int64_t>(1, kGrainElems / HW), [&](int64_t p0, int64_t p1) {
    for (int64_t pl = p0; pl < p1; ++pl) f(pl, pl % C);
  });
}

// The activation as a compile-time constant, so the inner loops carry no branch on it.
template <typename F>
inline void with_act(int64_t act, F&& f) {
  if (act == kRelu) {
    f(std::integral_constant<int64_t, kRelu>{});
  } else if (act == kLeakyRelu) {
    f(std::integral_constant<int64_t, kLeakyRelu>{});
  } else {
    f(std::integral_constant<int64_t, kNone>{});
  }
}

template <typename acc_t>
struct ChannelParams {
  std::vector<acc_t> mean, a, beta;  // u = (z - mean) * a + beta
};

template <typename scalar_t, typename acc_t>
ChannelParams<acc_t> channel_params(const at::Tensor& mean, const at::Tensor& invstd,
                                    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                    int64_t C) {
  ChannelParams<acc_t> p;
  p.mean.resize(C);
  p.a.resize(C);
  p.beta.resize(C);
  const auto m = mean.contiguous();
  const auto is = invstd.contiguous();
  const acc_t* mp = m.data_ptr<acc_t>();
  const acc_t* ip = is.data_ptr<acc_t>();
  at::Tensor w, b;
  if (weight.has_value() && weight->defined()) w = weight->to(m.scalar_type()).contiguous();
  if (bias.has_value() && bias->defined()) b = bias->to(m.scalar_type()).contiguous();
  for (int64_t c = 0; c < C; ++c) {
    p.mean[c] = mp[c];
    p.a[c] = bn_scale<acc_t>(w.defined() ? w.data_ptr<acc_t>()[c] : acc_t(1), ip[c]);
    p.beta[c] = b.defined() ? b.data_ptr<acc_t>()[c] : acc_t(0);
  }
  return p;
}

// Mean and m2 of one chunk of len elements by two passes over it (it is in cache for the second).
// float64 (the gradcheck / oracle-precision path, where speed does not matter) takes the
// per-element Welford update instead, the very function each CUDA thread runs, so the CPU tests
// exercise it too.
template <typename scalar_t, typename acc_t>
FB_CPU_INLINE Welford<acc_t> chunk_stats_t(const scalar_t* p, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    Welford<acc_t> w = welford_init<acc_t>();
    for (int64_t i = 0; i < len; ++i) welford_update(w, acc_t(p[i]));
    return w;
  }
  // kLanes independent partial sums: vector registers and no serial add chain
  constexpr int kLanes = 16;
  acc_t sl[kLanes] = {}, ql[kLanes] = {};
  const int64_t body = len - len % kLanes;
  for (int64_t i = 0; i < body; i += kLanes)
    for (int l = 0; l < kLanes; ++l) sl[l] += acc_t(p[i + l]);
  acc_t s = 0;
  for (int64_t i = body; i < len; ++i) s += acc_t(p[i]);
  for (int l = 0; l < kLanes; ++l) s += sl[l];
  const acc_t m = s / acc_t(len);
  for (int64_t i = 0; i < body; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t d = acc_t(p[i + l]) - m;
      ql[l] += d * d;
    }
  acc_t q = 0;
  for (int64_t i = body; i < len; ++i) {
    const acc_t d = acc_t(p[i]) - m;
    q += d * d;
  }
  for (int l = 0; l < kLanes; ++l) q += ql[l];
  return welford_from_chunk<acc_t>(m, q, len);
}

// ---- the NCHW and normalize hot loops, cloned for AVX2 ----------------------------------------
// One plane (NCHW: HW elements of one channel) or one block of rows (channels_last) per call, the
// activation a compile-time constant inside. Like the channels_last backward below, these entry
// points are built twice (cpu_clones.h): the extension targets baseline x86-64, where the loops
// get SSE2 only.
template <int64_t act, typename scalar_t, typename acc_t>
FB_CPU_INLINE void nchw_norm_plane_t(const scalar_t* __restrict__ z, scalar_t* __restrict__ y, int64_t len, acc_t m,
                                     acc_t a, acc_t be, acc_t slope) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) y[i] = scalar_t(act_forward(bn_pre(acc_t(z[i]), m, a, be), act, slope));
}

template <int64_t act, typename scalar_t, typename acc_t>
FB_CPU_INLINE void nhwc_norm_rows_t(const scalar_t* z, scalar_t* y, int64_t C, int64_t r0, int64_t r1,
                                    const acc_t* __restrict__ mp, const acc_t* __restrict__ ap,
                                    const acc_t* __restrict__ bp, acc_t slope) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* __restrict__ zp = z + r * C;
    scalar_t* __restrict__ yp = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) yp[c] = scalar_t(act_forward(bn_pre(acc_t(zp[c]), mp[c], ap[c], bp[c]), act, slope));
  }
}

// S1, S2 partial sums of one chunk, in acc_t.
template <int64_t act, typename scalar_t, typename acc_t>
FB_CPU_INLINE void nchw_sums_chunk_t(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ z, int64_t len,
                                     acc_t m, acc_t a, acc_t be, acc_t slope, acc_t& s1, acc_t& s2) {
  acc_t u1 = 0, u2 = 0;
#pragma omp simd reduction(+ : u1, u2)
  for (int64_t i = 0; i < len; ++i) {
    const acc_t zv = acc_t(z[i]);
    const acc_t g = act_backward(acc_t(dy[i]), bn_pre(zv, m, a, be), act, slope);
    u1 += g;
    u2 += g * (zv - m);
  }
  s1 = u1;
  s2 = u2;
}

template <int64_t act, typename scalar_t, typename acc_t>
FB_CPU_INLINE void nchw_elem_plane_t(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ z,
                                     scalar_t* __restrict__ dz, int64_t len, acc_t m, acc_t a, acc_t be, acc_t k,
                                     acc_t g_mean, acc_t g_proj, acc_t slope) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t zv = acc_t(z[i]);
    const acc_t g = act_backward(acc_t(dy[i]), bn_pre(zv, m, a, be), act, slope);
    dz[i] = scalar_t(bn_backward_elem(g, zv, m, k, g_mean, g_proj));
  }
}

// `call` with the activation as the template argument act_c.
#define FB_WITH_ACT(act, call)          \
  if ((act) == kRelu) {                 \
    constexpr int64_t act_c = kRelu;    \
    call;                               \
  } else if ((act) == kLeakyRelu) {     \
    constexpr int64_t act_c = kLeakyRelu; \
    call;                               \
  } else {                              \
    constexpr int64_t act_c = kNone;    \
    call;                               \
  }

#define FB_NCHW_LOOPS(S, A)                                                                                       \
  FB_CPU_CLONES Welford<A> chunk_stats(const S* p, int64_t len) { return chunk_stats_t<S, A>(p, len); }           \
  FB_CPU_CLONES void nchw_norm_plane(const S* z, S* y, int64_t len, A m, A a, A be, int64_t act, A slope) {       \
    FB_WITH_ACT(act, (nchw_norm_plane_t<act_c, S, A>(z, y, len, m, a, be, slope)))                               \
  }                                                                                                               \
  FB_CPU_CLONES void nhwc_norm_rows(const S* z, S* y, int64_t C, int64_t r0, int64_t r1, const A* mp, const A* ap, \
                                    const A* bp, int64_t act, A slope) {                                          \
    FB_WITH_ACT(act, (nhwc_norm_rows_t<act_c, S, A>(z, y, C, r0, r1, mp, ap, bp, slope)))                        \
  }                                                                                                               \
  FB_CPU_CLONES void nchw_sums_chunk(const S* dy, const S* z, int64_t len, A m, A a, A be, int64_t act, A slope,  \
                                     A& s1, A& s2) {                                                              \
    FB_WITH_ACT(act, (nchw_sums_chunk_t<act_c, S, A>(dy, z, len, m, a, be, slope, s1, s2)))                      \
  }                                                                                                               \
  FB_CPU_CLONES void nchw_elem_plane(const S* dy, const S* z, S* dz, int64_t len, A m, A a, A be, A k, A g_mean,  \
                                     A g_proj, int64_t act, A slope) {                                            \
    FB_WITH_ACT(act, (nchw_elem_plane_t<act_c, S, A>(dy, z, dz, len, m, a, be, k, g_mean, g_proj, slope)))       \
  }
FB_NCHW_LOOPS(float, float)
FB_NCHW_LOOPS(double, double)
FB_NCHW_LOOPS(at::BFloat16, float)
FB_NCHW_LOOPS(at::Half, float)
#undef FB_NCHW_LOOPS

// ---- statistics -------------------------------------------------------------------------
// Channel c of an NCHW tensor: its N planes in chunks, merged in order.
template <typename scalar_t, typename acc_t>
Welford<acc_t> channel_stats_nchw(const scalar_t* z, int64_t N, int64_t C, int64_t HW, int64_t c) {
  Welford<acc_t> w = welford_init<acc_t>();
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* p = z + (n * C + c) * HW;
    for (int64_t off = 0; off < HW; off += kChunk) w = welford_merge(w, chunk_stats(p + off, std::min(kChunk, HW - off)));
  }
  return w;
}

template <typename scalar_t, typename acc_t>
void stats_nchw(const scalar_t* z, int64_t N, int64_t C, int64_t HW, acc_t* mean, acc_t* var) {
  at::parallel_for(0, C, channel_grain(N * HW), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Welford<acc_t> w = channel_stats_nchw<scalar_t, acc_t>(z, N, C, HW, c);
      mean[c] = w.mean;
      var[c] = welford_var_biased(w);
    }
  });
}

template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* z, int64_t M, int64_t C, acc_t* mean, acc_t* var) {
  const int64_t rows = std::max<int64_t>(1, kChunk / C);  // rows per block
  const int64_t nblocks = (M + rows - 1) / rows;
  // per block and channel: mean and m2 (the block's count is its number of rows)
  std::vector<acc_t> pm(nblocks * C), pq(nblocks * C);
  at::parallel_for(0, nblocks, block_grain(rows * C), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> s(C), q(C);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows, r1 = std::min(M, r0 + rows);
      if constexpr (std::is_same_v<scalar_t, double>) {  // per-element Welford, as on CUDA
        for (int64_t c = 0; c < C; ++c) {
          Welford<acc_t> w = welford_init<acc_t>();
          for (int64_t r = r0; r < r1; ++r) welford_update(w, acc_t(z[r * C + c]));
          pm[b * C + c] = w.mean;
          pq[b * C + c] = w.m2;
        }
        continue;
      }
      std::fill(s.begin(), s.end(), acc_t(0));
      std::fill(q.begin(), q.end(), acc_t(0));
      acc_t* sp = s.data();
      acc_t* qp = q.data();
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = z + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sp[c] += acc_t(row[c]);
      }
      const acc_t inv = acc_t(1) / acc_t(r1 - r0);
      for (int64_t c = 0; c < C; ++c) sp[c] *= inv;  // now the block mean
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = z + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc_t d = acc_t(row[c]) - sp[c];
          qp[c] += d * d;
        }
      }
      std::copy(sp, sp + C, pm.begin() + b * C);
      std::copy(qp, qp + C, pq.begin() + b * C);
    }
  });
  // Chan's merge of the blocks in block order, with welford_merge's arithmetic (the same
  // welford_merge_moments), all channels of a block at once: they share the counts, so one
  // division per block instead of one per block and channel.
  std::vector<acc_t> am(pm.begin(), pm.begin() + C), aq(pq.begin(), pq.begin() + C);
  acc_t* amp = am.data();
  acc_t* aqp = aq.data();
  int64_t na = std::min(M, rows);
  for (int64_t b = 1; b < nblocks; ++b) {
    const int64_t nb = std::min(M, (b + 1) * rows) - b * rows;
    const acc_t na_t = acc_t(na), f = acc_t(nb) / acc_t(na + nb);
    const acc_t* bm = pm.data() + b * C;
    const acc_t* bq = pq.data() + b * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) welford_merge_moments(amp[c], aqp[c], na_t, f, bm[c], bq[c]);
    na += nb;
  }
  for (int64_t c = 0; c < C; ++c) {
    mean[c] = amp[c];
    var[c] = welford_var_biased(welford_from_chunk<acc_t>(amp[c], aqp[c], na));
  }
}

// ---- normalize + affine + activation ------------------------------------------------------
template <int64_t act, typename scalar_t, typename acc_t>
void normalize_act(const scalar_t* z, scalar_t* y, Layout layout, int64_t N, int64_t C, int64_t HW,
                   const ChannelParams<acc_t>& p, acc_t slope) {
  const acc_t* mp = p.mean.data();
  const acc_t* ap = p.a.data();
  const acc_t* bp = p.beta.data();
  if (layout == Layout::NCHW) {
    for_each_plane(N, C, HW, [&](int64_t pl, int64_t c) {
      nchw_norm_plane(z + pl * HW, y + pl * HW, HW, mp[c], ap[c], bp[c], act, slope);
    });
  } else {
    at::parallel_for(0, N * HW, std::max<int64_t>(1, kGrainElems / C), [&](int64_t r0, int64_t r1) {
      nhwc_norm_rows(z, y, C, r0, r1, mp, ap, bp, act, slope);
    });
  }
}

// ---- channels_last backward -----------------------------------------------------------------
// Rows [r0, r1) of an [M x C] (NHWC) activation, each row one vector loop over its channels with
// the per-channel parameters read from small L1-resident arrays. Two things make these loops
// vector code: the dz coefficients come as three scalars (bn_backward_elem's scalar form; a
// BackwardCoeffs struct built per element left the loop scalar), and the loops are cloned for
// AVX2 (cpu_clones.h; the extension itself is built for baseline x86-64).
template <int64_t act, typename scalar_t, typename acc_t>
FB_CPU_INLINE void nhwc_sums_rows_t(const scalar_t* dy, const scalar_t* z, int64_t C, int64_t r0, int64_t r1,
                                    const acc_t* __restrict__ mp, const acc_t* __restrict__ ap,
                                    const acc_t* __restrict__ bp, acc_t slope, acc_t* __restrict__ u1,
                                    acc_t* __restrict__ u2) {
  for (int64_t c = 0; c < C; ++c) u1[c] = u2[c] = acc_t(0);
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* zp = z + r * C;
    const scalar_t* gp = dy + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t zv = acc_t(zp[c]);
      const acc_t g = act_backward(acc_t(gp[c]), bn_pre(zv, mp[c], ap[c], bp[c]), act, slope);
      u1[c] += g;
      u2[c] += g * (zv - mp[c]);
    }
  }
}

template <int64_t act, typename scalar_t, typename acc_t>
FB_CPU_INLINE void nhwc_elem_rows_t(const scalar_t* dy, const scalar_t* z, scalar_t* dz, int64_t C, int64_t r0,
                                    int64_t r1, const acc_t* __restrict__ mp, const acc_t* __restrict__ ap,
                                    const acc_t* __restrict__ bp, const acc_t* __restrict__ kp,
                                    const acc_t* __restrict__ gmp, const acc_t* __restrict__ gjp, acc_t slope) {
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* zp = z + r * C;
    const scalar_t* gp = dy + r * C;
    scalar_t* dp = dz + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const acc_t zv = acc_t(zp[c]);
      const acc_t g = act_backward(acc_t(gp[c]), bn_pre(zv, mp[c], ap[c], bp[c]), act, slope);
      dp[c] = scalar_t(bn_backward_elem(g, zv, mp[c], kp[c], gmp[c], gjp[c]));
    }
  }
}

// The cloned entry points: one per (scalar_t, acc_t), the activation dispatched inside.
#define FB_NHWC_BACKWARD(S, A)                                                                                   \
  FB_CPU_CLONES void nhwc_sums_rows(const S* dy, const S* z, int64_t C, int64_t r0, int64_t r1, const A* mp,     \
                                    const A* ap, const A* bp, int64_t act, A slope, A* u1, A* u2) {              \
    FB_WITH_ACT(act, (nhwc_sums_rows_t<act_c>(dy, z, C, r0, r1, mp, ap, bp, slope, u1, u2)))                      \
  }                                                                                                              \
  FB_CPU_CLONES void nhwc_elem_rows(const S* dy, const S* z, S* dz, int64_t C, int64_t r0, int64_t r1,          \
                                    const A* mp, const A* ap, const A* bp, const A* kp, const A* gmp,            \
                                    const A* gjp, int64_t act, A slope) {                                        \
    FB_WITH_ACT(act, (nhwc_elem_rows_t<act_c>(dy, z, dz, C, r0, r1, mp, ap, bp, kp, gmp, gjp, slope)))            \
  }
FB_NHWC_BACKWARD(float, float)
FB_NHWC_BACKWARD(double, double)
FB_NHWC_BACKWARD(at::BFloat16, float)
FB_NHWC_BACKWARD(at::Half, float)
#undef FB_NHWC_BACKWARD
#undef FB_WITH_ACT

// ---- backward sums: S1 = sum dy', S2 = sum dy' (z - m) --------------------------------------
// Channel c of an NCHW tensor: chunk sums in acc_t (vectorized), added across chunks in double.
template <typename scalar_t, typename acc_t>
void channel_sums_nchw(const scalar_t* dy, const scalar_t* z, int64_t N, int64_t C, int64_t HW, int64_t c, acc_t m,
                       acc_t a, acc_t be, int64_t act, acc_t slope, double& s1, double& s2) {
  double t1 = 0, t2 = 0;
  for (int64_t n = 0; n < N; ++n) {
    const scalar_t* zp = z + (n * C + c) * HW;
    const scalar_t* gp = dy + (n * C + c) * HW;
    for (int64_t off = 0; off < HW; off += kChunk) {
      acc_t u1, u2;
      nchw_sums_chunk(gp + off, zp + off, std::min(kChunk, HW - off), m, a, be, act, slope, u1, u2);
      t1 += double(u1);
      t2 += double(u2);
    }
  }
  s1 = t1;
  s2 = t2;
}

template <int64_t act, typename scalar_t, typename acc_t>
void backward_sums(const scalar_t* dy, const scalar_t* z, Layout layout, int64_t N, int64_t C, int64_t HW,
                   const ChannelParams<acc_t>& p, acc_t slope, double* s1, double* s2) {
  const acc_t* mp = p.mean.data();
  const acc_t* ap = p.a.data();
  const acc_t* bp = p.beta.data();
  if (layout == Layout::NCHW) {
    at::parallel_for(0, C, channel_grain(N * HW), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) channel_sums_nchw(dy, z, N, C, HW, c, mp[c], ap[c], bp[c], act, slope, s1[c], s2[c]);
    });
  } else {
    const int64_t M = N * HW;
    const int64_t rows = std::max<int64_t>(1, kChunk / C);
    const int64_t nblocks = (M + rows - 1) / rows;
    std::vector<double> part(nblocks * C * 2);
    at::parallel_for(0, nblocks, block_grain(rows * C), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> u(2 * C);
      acc_t* u1 = u.data();
      acc_t* u2 = u.data() + C;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * rows, r1 = std::min(M, r0 + rows);
        nhwc_sums_rows(dy, z, C, r0, r1, mp, ap, bp, act, slope, u1, u2);
        for (int64_t c = 0; c < C; ++c) {
          part[(b * C + c) * 2] = u1[c];
          part[(b * C + c) * 2 + 1] = u2[c];
        }
      }
    });
    for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += part[(b * C + c) * 2];
        s2[c] += part[(b * C + c) * 2 + 1];
      }
  }
}

template <int64_t act, typename scalar_t, typename acc_t>
void backward_elem(const scalar_t* dy, const scalar_t* z, scalar_t* dz, Layout layout, int64_t N, int64_t C,
                   int64_t HW, const ChannelParams<acc_t>& p, const std::vector<BackwardCoeffs<acc_t>>& k,
                   acc_t slope) {
  const acc_t* mp = p.mean.data();
  const acc_t* ap = p.a.data();
  const acc_t* bp = p.beta.data();
  if (layout == Layout::NCHW) {
    for_each_plane(N, C, HW, [&](int64_t pl, int64_t c) {
      nchw_elem_plane(dy + pl * HW, z + pl * HW, dz + pl * HW, HW, mp[c], ap[c], bp[c], k[c].k, k[c].g_mean,
                      k[c].g_proj, act, slope);
    });
  } else {
    std::vector<acc_t> kk(C), gm(C), gpj(C);
    for (int64_t c = 0; c < C; ++c) {
      kk[c] = k[c].k;
      gm[c] = k[c].g_mean;
      gpj[c] = k[c].g_proj;
    }
    const acc_t* kp = kk.data();
    const acc_t* gmp = gm.data();
    const acc_t* gjp = gpj.data();
    // tasks of whole row chunks: a chunk's rows of z, dy and dz stay in L1 while its channel
    // blocks go by (each block touches its part of every row)
    const int64_t chunk = std::max<int64_t>(1, kChunk / C);
    const int64_t M = N * HW, nchunks = (M + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, block_grain(chunk * C), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * chunk, r1 = std::min(M, r0 + chunk);
        nhwc_elem_rows(dy, z, dz, C, r0, r1, mp, ap, bp, kp, gmp, gjp, act, slope);
      }
    });
  }
}

// ---- NCHW, one task per channel: both passes while the channel is in cache -------------------
// A channel's N planes are read for its statistics (or backward sums) and at once again for the
// normalize (or dz) pass, which then hits L2 (N*HW*4 bytes: 100 KB at N8 56x56) instead of
// the whole tensor coming back from L3/DRAM, and each op is one parallel region instead of
// two. Same arithmetic, in the same order, as the two-pass path. Taken when there are enough
// channels to balance the threads (the two-pass path splits its elementwise pass by plane).
inline bool nchw_per_channel(int64_t C) { return C >= 4 * int64_t(at::get_num_threads()); }

template <typename scalar_t, typename acc_t>
void forward_nchw_per_channel(const scalar_t* z, scalar_t* y, int64_t N, int64_t C, int64_t HW, const acc_t* gamma,
                              const acc_t* beta, acc_t eps, int64_t act, acc_t slope, acc_t* mean, acc_t* var,
                              acc_t* invstd) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Welford<acc_t> w = channel_stats_nchw<scalar_t, acc_t>(z, N, C, HW, c);
      mean[c] = w.mean;
      var[c] = welford_var_biased(w);
      invstd[c] = invstd_of<acc_t>(var[c], eps);
      const acc_t a = bn_scale<acc_t>(gamma ? gamma[c] : acc_t(1), invstd[c]);
      const acc_t be = beta ? beta[c] : acc_t(0);
      for (int64_t n = 0; n < N; ++n)
        nchw_norm_plane(z + (n * C + c) * HW, y + (n * C + c) * HW, HW, mean[c], a, be, act, slope);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_nchw_per_channel(const scalar_t* dy, const scalar_t* z, scalar_t* dz, int64_t N, int64_t C, int64_t HW,
                               const ChannelParams<acc_t>& p, const acc_t* invstd, const acc_t* gamma, int64_t act,
                               acc_t slope, acc_t* dgamma, acc_t* dbeta) {
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const acc_t m = p.mean[c], a = p.a[c], be = p.beta[c];
      double s1, s2;
      channel_sums_nchw(dy, z, N, C, HW, c, m, a, be, act, slope, s1, s2);
      const BackwardCoeffs<acc_t> k =
          bn_backward_coeffs<acc_t>(acc_t(s1), acc_t(s2), invstd[c], gamma ? gamma[c] : acc_t(1), N * HW);
      dgamma[c] = k.dgamma;
      dbeta[c] = k.dbeta;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = (n * C + c) * HW;
        nchw_elem_plane(dy + o, z + o, dz + o, HW, m, a, be, k.k, k.g_mean, k.g_proj, act, slope);
      }
    }
  });
}

// ---- the ops ------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(
    const at::Tensor& z_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps, int64_t act, double slope) {
  check_forward(z_in, weight, bias, eps, act, slope);
  TORCH_CHECK(z_in.device().is_cpu(), "bn_act_forward (cpu): z must be a CPU tensor");
  auto [z, layout] = as_kernel_layout(z_in);
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3);
  const auto acc_opts = z.options().dtype(acc_type_of(z.scalar_type()));
  auto mean = at::empty({C}, acc_opts);
  auto var = at::empty({C}, acc_opts);
  auto invstd = at::empty({C}, acc_opts);
  auto y = empty_in_layout(z, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* vp = var.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    if (layout == Layout::NCHW && nchw_per_channel(C)) {
      at::Tensor w, b;
      if (weight.has_value() && weight->defined()) w = weight->to(mean.scalar_type()).contiguous();
      if (bias.has_value() && bias->defined()) b = bias->to(mean.scalar_type()).contiguous();
      forward_nchw_per_channel<scalar_t, acc_t>(z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, HW,
                                                w.defined() ? w.data_ptr<acc_t>() : nullptr,
                                                b.defined() ? b.data_ptr<acc_t>() : nullptr, acc_t(eps), act,
                                                acc_t(slope), mp, vp, ip);
      return;
    }
    if (layout == Layout::NCHW) {
      stats_nchw<scalar_t, acc_t>(z.data_ptr<scalar_t>(), N, C, HW, mp, vp);
    } else {
      stats_nhwc<scalar_t, acc_t>(z.data_ptr<scalar_t>(), N * HW, C, mp, vp);
    }
    for (int64_t c = 0; c < C; ++c) ip[c] = invstd_of<acc_t>(vp[c], acc_t(eps));
    const auto p = channel_params<scalar_t, acc_t>(mean, invstd, weight, bias, C);
    with_act(act, [&](auto A) {
      normalize_act<decltype(A)::value, scalar_t, acc_t>(z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), layout, N, C,
                                                         HW, p, acc_t(slope));
    });
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
  check_backward(dy_in, z_in, mean, invstd, weight, bias, act, slope);
  TORCH_CHECK(z_in.device().is_cpu(), "bn_act_backward (cpu): z must be a CPU tensor");
  auto [z, layout] = as_kernel_layout(z_in);
  const auto dy = in_layout(dy_in.to(z.scalar_type()), layout);
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3);
  const int64_t n = N * HW;
  const auto acc_opts = z.options().dtype(acc_type_of(z.scalar_type()));
  auto dz = empty_in_layout(z, layout);
  auto dgamma = at::empty({C}, acc_opts);
  auto dbeta = at::empty({C}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = channel_params<scalar_t, acc_t>(mean, invstd, weight, bias, C);
    const auto is = invstd.contiguous();
    const acc_t* ip = is.data_ptr<acc_t>();
    at::Tensor w;
    if (weight.has_value() && weight->defined()) w = weight->to(mean.scalar_type()).contiguous();
    const acc_t* wp = w.defined() ? w.data_ptr<acc_t>() : nullptr;
    acc_t* dgp = dgamma.data_ptr<acc_t>();
    acc_t* dbp = dbeta.data_ptr<acc_t>();
    if (layout == Layout::NCHW && nchw_per_channel(C)) {
      backward_nchw_per_channel<scalar_t, acc_t>(dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
                                                 N, C, HW, p, ip, wp, act, acc_t(slope), dgp, dbp);
      return;
    }
    std::vector<double> s1(C), s2(C);
    with_act(act, [&](auto A) {
      backward_sums<decltype(A)::value, scalar_t, acc_t>(dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), layout, N, C,
                                                         HW, p, acc_t(slope), s1.data(), s2.data());
    });
    std::vector<BackwardCoeffs<acc_t>> k(C);
    for (int64_t c = 0; c < C; ++c) {
      k[c] = bn_backward_coeffs<acc_t>(acc_t(s1[c]), acc_t(s2[c]), ip[c], wp ? wp[c] : acc_t(1), n);
      dgp[c] = k[c].dgamma;
      dbp[c] = k[c].dbeta;
    }
    with_act(act, [&](auto A) {
      backward_elem<decltype(A)::value, scalar_t, acc_t>(dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                                         dz.data_ptr<scalar_t>(), layout, N, C, HW, p, k, acc_t(slope));
    });
  });
  return {dz, dgamma, dbeta};
}

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var,
                                 at::Tensor& num_batches_tracked, const at::Tensor& mean, const at::Tensor& var,
                                 int64_t count, c10::optional<double> momentum) {
  check_running(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  TORCH_CHECK(mean.device().is_cpu(), "bn_update_running_stats_ (cpu): tensors must be on the CPU");
  int64_t* nbt = num_batches_tracked.data_ptr<int64_t>();
  nbt[0] += 1;
  const int64_t C = mean.numel();
  const auto m = mean.contiguous().to(at::kDouble);
  const auto v = var.contiguous().to(at::kDouble);
  const double factor = momentum.has_value() ? *momentum : 1.0 / double(nbt[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_running_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* rm = running_mean.data_ptr<scalar_t>();
    scalar_t* rv = running_var.data_ptr<scalar_t>();
    const double* mp = m.data_ptr<double>();
    const double* vp = v.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t a = acc_t(rm[c]), b = acc_t(rv[c]);
      running_update<acc_t>(a, b, acc_t(mp[c]), acc_t(vp[c]), count, acc_t(factor));
      rm[c] = scalar_t(a);
      rv[c] = scalar_t(b);
    }
  });
}

}  // namespace
}  // namespace cbr
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("bn_act_forward", &fastbig::cbr::bn_act_forward_cpu);
  m.impl("bn_act_backward", &fastbig::cbr::bn_act_backward_cpu);
  m.impl("bn_update_running_stats_", &fastbig::cbr::bn_update_running_stats_cpu);
}

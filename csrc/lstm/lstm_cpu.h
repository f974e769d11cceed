// The CPU kernels of the LSTM ops are split by op: lstm_cell_cpu.cpp (the pointwise cell),
// lstm_layer_cpu.cpp (the whole layer) and lstm_cell_step_cpu.cpp (one nn.LSTMCell step). This
// header holds what they share: the per-row microkernels over lstm_math.h's cell (scalar, and
// SIMD for float) and the functions one op's file calls in another's.
#pragma once
#include <ATen/OpMathType.h>
#include <torch/extension.h>

#include "lstm/lstm_layer.h"
#include "lstm/lstm_math.h"
#include "lstm/lstm_simd.h"

namespace fastbig {
namespace lstm {

// Rows of the batch are independent; grain so each task touches >= ~16K elements.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)); }

// Defined in lstm_layer_cpu.cpp: one step's pointwise kernel over its rows (the cell op runs it too).
void layer_fwd_pointwise_cpu(at::ScalarType st, const FwdStep& s);
void layer_bwd_pointwise_cpu(at::ScalarType st, const BwdStep& s);

// Defined in lstm_cell_cpu.cpp: the pointwise cell op (the cell step's ATen fallback runs it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(const at::Tensor& gates_in, const at::Tensor& c_prev_in);
std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const c10::optional<at::Tensor>& grad_h,
                                                          const c10::optional<at::Tensor>& grad_c,
                                                          const at::Tensor& act_in, const at::Tensor& c_prev_in,
                                                          const at::Tensor& c_in);

// ---- the per-row microkernels ---------------------------------------------------------------
// Units [j0, j1) of one row through the scalar instantiation of cell_forward/cell_backward (the
// tail of a float row, and other dtypes), or 8/16 units through the SIMD one (float).

template <typename scalar_t>
inline void fwd_row_scalar(int64_t j0, int64_t j1, int64_t H, scalar_t* g, const scalar_t* cp, scalar_t* c, scalar_t* h,
                           const scalar_t* bias) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = j0; j < j1; ++j) {
    Gates<acc_t> a;
    acc_t cv, hv;
    const Gates<acc_t> in = load_preact<acc_t>(g, bias, j, H);
    cell_forward<acc_t>(in.i, in.f, in.g, in.o, cp[j], a, cv, hv);
    store_gates(a, g, j, H);
    c[j] = cv;
    h[j] = hv;
  }
}

template <typename scalar_t>
inline void bwd_row_scalar(int64_t j0, int64_t j1, int64_t H, const scalar_t* dha, const scalar_t* dhb, scalar_t* dc,
                           const scalar_t* act, const scalar_t* cp, const scalar_t* c, scalar_t* dg) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = j0; j < j1; ++j) {
    const Gates<acc_t> a = load_gates<acc_t>(act, j, H);
    Gates<acc_t> d;
    acc_t dcp;
    const acc_t dh = acc_t(dha[j]) + (dhb ? acc_t(dhb[j]) : acc_t(0));
    cell_backward<acc_t>(dh, acc_t(dc[j]), a, cp[j], c[j], d, dcp);
    store_gates(d, dg, j, H);
    dc[j] = dcp;
  }
}

using simd::V16;
using simd::V8;
using simd::VecMath;

// float rows, vectorized: each caller runs these inside one body compiled twice, for AVX2+FMA and
// for the baseline target, picked at run time (cpu_has_avx2_fma); `flatten` inlines the whole
// cell (and the vector math) into each, so no vector ever crosses a call between code of
// different targets. A row goes 16 lanes at a time (two independent 8-lane halves per op: the cell is one long
// dependency chain, so two in flight run nearly twice as fast), then 8, then the scalar tail.
// Gate rows through lstm_math.h's load_gates/store_gates, V lanes each.
template <typename V, typename M>
inline void fwd_vec(float* g, const float* cp, float* c, float* h, const float* bias, int64_t j, int64_t H) {
  Gates<V> a;
  V cv, hv;
  const Gates<V> in = load_preact<V>(g, bias, j, H);
  cell_forward<V, M>(in.i, in.f, in.g, in.o, V::load(cp + j), a, cv, hv);
  store_gates(a, g, j, H);
  cv.store(c + j);
  hv.store(h + j);
}

template <typename V, typename M>
inline void bwd_vec(const float* dha, const float* dhb, float* dc, const float* act, const float* cp, const float* c,
                    float* dg, int64_t j, int64_t H) {
  const Gates<V> a = load_gates<V>(act, j, H);
  Gates<V> d;
  V dcp;
  V dh = V::load(dha + j);
  if (dhb) dh = dh + V::load(dhb + j);
  cell_backward<V, M>(dh, V::load(dc + j), a, V::load(cp + j), V::load(c + j), d, dcp);
  store_gates(d, dg, j, H);
  dcp.store(dc + j);
}

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace lstm
}  // namespace fastbig

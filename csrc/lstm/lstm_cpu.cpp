// CPU kernels of the LSTM ops: ATen GEMMs plus parallel pointwise loops over lstm_math.h.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "lstm/lstm_cell.h"
#include "lstm/lstm_layer.h"
#include "lstm/lstm_math.h"
#include "lstm/lstm_simd.h"

namespace fastbig {
namespace lstm {
namespace {

// Rows of the batch are independent; grain so each task touches >= ~16K elements.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)); }

void layer_fwd_pointwise_cpu(at::ScalarType st, const FwdStep& s);
void layer_bwd_pointwise_cpu(at::ScalarType st, const BwdStep& s);

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(const at::Tensor& gates_in,
                                                             const at::Tensor& c_prev_in) {
  check_cell_inputs(gates_in, c_prev_in);
  TORCH_CHECK(gates_in.device().is_cpu(), "lstm_cell (cpu): gates must be a CPU tensor");
  const auto gates = gates_in.contiguous();
  const auto c_prev = c_prev_in.contiguous();
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  auto h = at::empty({B, H}, gates.options());
  auto c = at::empty({B, H}, gates.options());
  auto act = at::empty({B, 4 * H}, gates.options());
  if (gates.scalar_type() == at::kFloat) {  // the layer op's vectorized step, in place on a copy
    act.copy_(gates);
    layer_fwd_pointwise_cpu(at::kFloat, FwdStep{act.data_ptr(), nullptr, 0, c_prev.data_ptr(), c.data_ptr(),
                                                h.data_ptr(), B, H});
    return {h, c, act};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gates.scalar_type(), "lstm_cell_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* a = gates.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    scalar_t* cn = c.data_ptr<scalar_t>();
    scalar_t* ap = act.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* ab = a + b * 4 * H;
        scalar_t* actb = ap + b * 4 * H;
        for (int64_t j = 0; j < H; ++j) {
          Gates<acc_t> g;
          acc_t cv, hv;
          cell_forward<acc_t>(ab[j], ab[H + j], ab[2 * H + j], ab[3 * H + j], cp[b * H + j], g, cv, hv);
          actb[j] = g.i;
          actb[H + j] = g.f;
          actb[2 * H + j] = g.g;
          actb[3 * H + j] = g.o;
          cn[b * H + j] = cv;
          hp[b * H + j] = hv;
        }
      }
    });
  });
  return {h, c, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const c10::optional<at::Tensor>& grad_h,
                                                          const c10::optional<at::Tensor>& grad_c,
                                                          const at::Tensor& act_in, const at::Tensor& c_prev_in,
                                                          const at::Tensor& c_in) {
  check_cell_backward_inputs(grad_h, grad_c, act_in, c_prev_in, c_in);
  const auto act = act_in.contiguous();
  const auto c_prev = c_prev_in.contiguous();
  const auto c = c_in.contiguous();
  const auto dh = grad_or_undefined(grad_h, act);
  const auto dc = grad_or_undefined(grad_c, act);
  const int64_t B = act.size(0), H = act.size(1) / 4;
  auto da = at::empty({B, 4 * H}, act.options());
  auto dcp = at::empty({B, H}, act.options());
  if (act.scalar_type() == at::kFloat) {  // the layer op's vectorized step; dc in/out in dcp
    if (dc.defined()) dcp.copy_(dc);
    else dcp.zero_();
    const auto dh_a = dh.defined() ? dh : at::zeros({B, H}, act.options());
    layer_bwd_pointwise_cpu(at::kFloat, BwdStep{dh_a.data_ptr(), nullptr, dcp.data_ptr(), act.data_ptr(), nullptr, 0,
                                                c_prev.data_ptr(), c.data_ptr(), da.data_ptr(), B, H});
    return {da, dcp};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "lstm_cell_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = act.data_ptr<scalar_t>();
    const scalar_t* cpp = c_prev.data_ptr<scalar_t>();
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* dhp = dh.defined() ? dh.data_ptr<scalar_t>() : nullptr;
    const scalar_t* dcp_in = dc.defined() ? dc.data_ptr<scalar_t>() : nullptr;
    scalar_t* dap = da.data_ptr<scalar_t>();
    scalar_t* dcpp = dcp.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* actb = ap + b * 4 * H;
        scalar_t* dab = dap + b * 4 * H;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = b * H + j;
          Gates<acc_t> g{actb[j], actb[H + j], actb[2 * H + j], actb[3 * H + j]};
          Gates<acc_t> d;
          acc_t dcprev;
          cell_backward<acc_t>(dhp ? acc_t(dhp[k]) : acc_t(0), dcp_in ? acc_t(dcp_in[k]) : acc_t(0), g,
                               cpp[k], cp[k], d, dcprev);
          dab[j] = d.i;
          dab[H + j] = d.f;
          dab[2 * H + j] = d.g;
          dab[3 * H + j] = d.o;
          dcpp[k] = dcprev;
        }
      }
    });
  });
  return {da, dcp};
}


// ---- whole-layer op: the per-step pointwise kernels ------------------------------------------
// Rows of one step in parallel; each row's H elements 8 at a time through the SIMD instantiation
// of cell_forward/cell_backward (float), the tail and other dtypes through the scalar one.

template <typename scalar_t>
inline void fwd_row_scalar(int64_t j0, int64_t H, scalar_t* g, const scalar_t* cp, scalar_t* c, scalar_t* h) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = j0; j < H; ++j) {
    Gates<acc_t> a;
    acc_t cv, hv;
    cell_forward<acc_t>(g[j], g[H + j], g[2 * H + j], g[3 * H + j], cp[j], a, cv, hv);
    g[j] = a.i;
    g[H + j] = a.f;
    g[2 * H + j] = a.g;
    g[3 * H + j] = a.o;
    c[j] = cv;
    h[j] = hv;
  }
}

template <typename scalar_t>
inline void bwd_row_scalar(int64_t j0, int64_t H, const scalar_t* dha, const scalar_t* dhb, scalar_t* dc,
                           const scalar_t* act, const scalar_t* cp, const scalar_t* c, scalar_t* dg) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = j0; j < H; ++j) {
    Gates<acc_t> a{act[j], act[H + j], act[2 * H + j], act[3 * H + j]};
    Gates<acc_t> d;
    acc_t dcp;
    const acc_t dh = acc_t(dha[j]) + (dhb ? acc_t(dhb[j]) : acc_t(0));
    cell_backward<acc_t>(dh, acc_t(dc[j]), a, cp[j], c[j], d, dcp);
    dg[j] = d.i;
    dg[H + j] = d.f;
    dg[2 * H + j] = d.g;
    dg[3 * H + j] = d.o;
    dc[j] = dcp;
  }
}

using simd::V8;
using simd::VecMath;

// float rows, vectorized: one body (the *_body templates below), compiled twice, for AVX2+FMA
// and for the baseline target, picked at run time. `flatten` inlines the whole cell (and the V8
// math) into each, so no V8 ever crosses a call between code of different targets.
template <int kDummy>
inline void fwd_rows_f32_body(const FwdStep& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H;
  for (int64_t b = b0; b < b1; ++b) {
    float* g = static_cast<float*>(s.gates) + b * 4 * H;
    const float* cp = (b < s.n_a ? static_cast<const float*>(s.cprev_a) : static_cast<const float*>(s.c0)) + b * H;
    float* c = static_cast<float*>(s.c_out) + b * H;
    float* h = static_cast<float*>(s.h_out) + b * H;
    int64_t j = 0;
    for (; j + 8 <= H; j += 8) {
      Gates<V8> a;
      V8 cv, hv;
      cell_forward<V8, VecMath>(V8::load(g + j), V8::load(g + H + j), V8::load(g + 2 * H + j),
                                V8::load(g + 3 * H + j), V8::load(cp + j), a, cv, hv);
      a.i.store(g + j);
      a.f.store(g + H + j);
      a.g.store(g + 2 * H + j);
      a.o.store(g + 3 * H + j);
      cv.store(c + j);
      hv.store(h + j);
    }
    fwd_row_scalar<float>(j, H, g, cp, c, h);
  }
}

template <int kDummy>
inline void bwd_rows_f32_body(const BwdStep& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H;
  for (int64_t b = b0; b < b1; ++b) {
    const float* dha = static_cast<const float*>(s.dh_a) + b * H;
    const float* dhb = s.dh_b ? static_cast<const float*>(s.dh_b) + b * H : nullptr;
    float* dc = static_cast<float*>(s.dc) + b * H;
    const float* act = static_cast<const float*>(s.act) + b * 4 * H;
    const float* cp = (b < s.n_a ? static_cast<const float*>(s.cprev_a) : static_cast<const float*>(s.c0)) + b * H;
    const float* c = static_cast<const float*>(s.c) + b * H;
    float* dg = static_cast<float*>(s.dgates) + b * 4 * H;
    int64_t j = 0;
    for (; j + 8 <= H; j += 8) {
      Gates<V8> a{V8::load(act + j), V8::load(act + H + j), V8::load(act + 2 * H + j), V8::load(act + 3 * H + j)};
      Gates<V8> d;
      V8 dcp;
      V8 dh = V8::load(dha + j);
      if (dhb) dh = dh + V8::load(dhb + j);
      cell_backward<V8, VecMath>(dh, V8::load(dc + j), a, V8::load(cp + j), V8::load(c + j), d, dcp);
      d.i.store(dg + j);
      d.f.store(dg + H + j);
      d.g.store(dg + 2 * H + j);
      d.o.store(dg + 3 * H + j);
      dcp.store(dc + j);
    }
    bwd_row_scalar<float>(j, H, dha, dhb, dc, act, cp, c, dg);
  }
}

__attribute__((target("avx2,fma"), flatten)) void fwd_rows_f32_avx2(const FwdStep& s, int64_t b0, int64_t b1) {
  fwd_rows_f32_body<0>(s, b0, b1);
}
__attribute__((flatten)) void fwd_rows_f32_base(const FwdStep& s, int64_t b0, int64_t b1) {
  fwd_rows_f32_body<1>(s, b0, b1);
}
__attribute__((target("avx2,fma"), flatten)) void bwd_rows_f32_avx2(const BwdStep& s, int64_t b0, int64_t b1) {
  bwd_rows_f32_body<0>(s, b0, b1);
}
__attribute__((flatten)) void bwd_rows_f32_base(const BwdStep& s, int64_t b0, int64_t b1) {
  bwd_rows_f32_body<1>(s, b0, b1);
}

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

void fwd_rows_f32(const FwdStep& s, int64_t b0, int64_t b1) {
  if (cpu_has_avx2_fma()) fwd_rows_f32_avx2(s, b0, b1);
  else fwd_rows_f32_base(s, b0, b1);
}
void bwd_rows_f32(const BwdStep& s, int64_t b0, int64_t b1) {
  if (cpu_has_avx2_fma()) bwd_rows_f32_avx2(s, b0, b1);
  else bwd_rows_f32_base(s, b0, b1);
}

void layer_fwd_pointwise_cpu(at::ScalarType st, const FwdStep& s) {
  at::parallel_for(0, s.n, row_grain(s.H), [&](int64_t b0, int64_t b1) {
    if (st == at::kFloat) return fwd_rows_f32(s, b0, b1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "lstm_layer_cpu", [&] {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* cp = (b < s.n_a ? static_cast<const scalar_t*>(s.cprev_a) : static_cast<const scalar_t*>(s.c0)) + b * s.H;
        fwd_row_scalar<scalar_t>(0, s.H, static_cast<scalar_t*>(s.gates) + b * 4 * s.H, cp,
                                 static_cast<scalar_t*>(s.c_out) + b * s.H, static_cast<scalar_t*>(s.h_out) + b * s.H);
      }
    });
  });
}

void layer_bwd_pointwise_cpu(at::ScalarType st, const BwdStep& s) {
  at::parallel_for(0, s.n, row_grain(s.H), [&](int64_t b0, int64_t b1) {
    if (st == at::kFloat) return bwd_rows_f32(s, b0, b1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "lstm_layer_backward_cpu", [&] {
      const int64_t H = s.H;
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* cp = (b < s.n_a ? static_cast<const scalar_t*>(s.cprev_a) : static_cast<const scalar_t*>(s.c0)) + b * H;
        bwd_row_scalar<scalar_t>(0, H, static_cast<const scalar_t*>(s.dh_a) + b * H,
                                 s.dh_b ? static_cast<const scalar_t*>(s.dh_b) + b * H : nullptr,
                                 static_cast<scalar_t*>(s.dc) + b * H, static_cast<const scalar_t*>(s.act) + b * 4 * H, cp,
                                 static_cast<const scalar_t*>(s.c) + b * H, static_cast<scalar_t*>(s.dgates) + b * 4 * H);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse) {
  TORCH_CHECK(x.device().is_cpu(), "fastbig::lstm_layer (cpu): x must be a CPU tensor, got ", x.device());
  return layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, &layer_fwd_pointwise_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward_cpu(
    const c10::optional<at::Tensor>& grad_y, const c10::optional<at::Tensor>& grad_hn,
    const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const at::Tensor& y, const at::Tensor& act,
    const at::Tensor& c_all, const at::Tensor& hraw) {
  TORCH_CHECK(x.device().is_cpu(), "fastbig::lstm_layer_backward (cpu): x must be a CPU tensor, got ", x.device());
  return layer_backward(grad_y, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, y, act, c_all,
                        hraw, &layer_bwd_pointwise_cpu);
}

}  // namespace
}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("lstm_cell", &fastbig::lstm::lstm_cell_cpu);
  m.impl("lstm_cell_backward", &fastbig::lstm::lstm_cell_backward_cpu);
  m.impl("lstm_layer", &fastbig::lstm::lstm_layer_cpu);
  m.impl("lstm_layer_backward", &fastbig::lstm::lstm_layer_backward_cpu);
}

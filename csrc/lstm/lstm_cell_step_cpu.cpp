// CPU kernels of the whole-cell LSTM op (fastbig::lstm_cell_step and its backward: one
// nn.LSTMCell step, GEMMs and cell in one call).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <limits>
#include <utility>

#include "common/blas.h"
#include "common/cpu_team.h"
#include "lstm/lstm_cell.h"
#include "lstm/lstm_cpu.h"

namespace fastbig {
namespace lstm {
namespace {

// ---- whole-cell op: one step of nn.LSTMCell, GEMMs and cell in one call --------------------
// A Python loop over LSTMCell (seq2seq decoders) runs, per step, x W_ih^T + h W_hh^T + b and the
// cell, and in backward the cell gradient, dx = dG W_ih, dh = dG W_hh, dW_ih = dG^T x,
// dW_hh = dG^T h, db = sum dG. With B = 64, H = 256 each GEMM is ~34 MFLOP: too small for a
// multi-threaded GEMM to split well (two threads on one such call gain far less than 2x; the
// bench's LSTMCell-loop cases measure the result). So float32 with BLAS runs one OpenMP team per
// call in which every thread does its own GEMMs single-threaded, and the pointwise work of the
// units it owns:
//   forward:  thread t owns hidden units [j0, j1): the gate columns q*H + [j0, j1) of
//             x W_ih^T + h W_hh^T (8 GEMM calls), then the cell on those units, no barrier;
//   backward: the cell gradient of its units -> dG columns and dc_prev, its rows of dW_ih,
//             dW_hh (from its own dG columns) and of db; one barrier; then its share of the
//             columns of dx = dG W_ih and dh = dG W_hh (which read all of dG).
// Other dtypes, and a torch without BLAS symbols, take ATen GEMMs plus the same cell kernels.

template <typename M>
inline void fwd_units_f32_body(float* g, const float* cp, float* c, float* h, const float* bias, int64_t j0,
                               int64_t j1, int64_t H) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) fwd_vec<V16, M>(g, cp, c, h, bias, j, H);
  for (; j + 8 <= j1; j += 8) fwd_vec<V8, M>(g, cp, c, h, bias, j, H);
  fwd_row_scalar<float>(j, j1, H, g, cp, c, h, bias);
}
template <typename M>
inline void bwd_units_f32_body(const float* dh, float* dc, const float* act, const float* cp, const float* c,
                               float* dg, int64_t j0, int64_t j1, int64_t H) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) bwd_vec<V16, M>(dh, nullptr, dc, act, cp, c, dg, j, H);
  for (; j + 8 <= j1; j += 8) bwd_vec<V8, M>(dh, nullptr, dc, act, cp, c, dg, j, H);
  bwd_row_scalar<float>(j, j1, H, dh, nullptr, dc, act, cp, c, dg);
}
__attribute__((target("avx2,fma"), flatten)) void fwd_units_f32_avx2(float* g, const float* cp, float* c, float* h,
                                                                     const float* bias, int64_t j0, int64_t j1,
                                                                     int64_t H) {
  fwd_units_f32_body<VecMath>(g, cp, c, h, bias, j0, j1, H);
}
__attribute__((flatten)) void fwd_units_f32_base(float* g, const float* cp, float* c, float* h, const float* bias,
                                                 int64_t j0, int64_t j1, int64_t H) {
  fwd_units_f32_body<VecMath>(g, cp, c, h, bias, j0, j1, H);
}
__attribute__((target("avx2,fma"), flatten)) void bwd_units_f32_avx2(const float* dh, float* dc, const float* act,
                                                                     const float* cp, const float* c, float* dg,
                                                                     int64_t j0, int64_t j1, int64_t H) {
  bwd_units_f32_body<VecMath>(dh, dc, act, cp, c, dg, j0, j1, H);
}
__attribute__((flatten)) void bwd_units_f32_base(const float* dh, float* dc, const float* act, const float* cp,
                                                 const float* c, float* dg, int64_t j0, int64_t j1, int64_t H) {
  bwd_units_f32_body<VecMath>(dh, dc, act, cp, c, dg, j0, j1, H);
}

// Hidden units [j0, j1) of thread tid of nt: contiguous, 16-aligned (full vectors) where H allows.
inline std::pair<int64_t, int64_t> unit_range(int64_t H, int tid, int nt) {
  const int64_t blocks = (H + 15) / 16;
  return {std::min(H, 16 * (blocks * tid / nt)), std::min(H, 16 * (blocks * (tid + 1) / nt))};
}

// Threads for one cell step: one per 64 hidden units at most, none for tiny problems.
inline int64_t cell_step_threads(int64_t B, int64_t I, int64_t H) {
  if (B * H * (I + H) < (int64_t(1) << 18)) return 1;
  return std::max<int64_t>(1, H / 64);
}

inline bool cell_step_fused_ok(const at::Tensor& x, int64_t B, int64_t I, int64_t H) {
  const int64_t lim = std::numeric_limits<int>::max();
  return x.scalar_type() == at::kFloat && blas::available() && B > 0 && I > 0 && H > 0 && 4 * H * std::max(I, H) < lim &&
         B * 4 * H < lim;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_step_cpu(
    const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& c_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh) {
  check_cell_step("fastbig::lstm_cell_step (cpu)", x_in, h_in, c_in, w_ih_in, w_hh_in, b_ih, b_hh);
  TORCH_CHECK(x_in.device().is_cpu(), "fastbig::lstm_cell_step (cpu): input must be a CPU tensor, got ", x_in.device());
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  const at::Tensor bias = bias_sum(b_ih, b_hh);
  if (!cell_step_fused_ok(x_in, B, I, H)) return cell_step_aten(x_in, h_in, c_in, w_ih_in, w_hh_in, bias, &lstm_cell_cpu);
  const auto x = x_in.contiguous(), h = h_in.contiguous(), cp = c_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  auto act = at::empty({B, 4 * H}, x.options());
  auto hn = at::empty({B, H}, x.options());
  auto cn = at::empty({B, H}, x.options());
  const float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *cpp = cp.data_ptr<float>();
  const float *wi = w_ih.data_ptr<float>(), *wh = w_hh.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float *ap = act.data_ptr<float>(), *hnp = hn.data_ptr<float>(), *cnp = cn.data_ptr<float>();
  const bool avx2 = cpu_has_avx2_fma();
  run_team(cell_step_threads(B, I, H), [&](int tid, int nt) {
    const auto [j0, j1] = unit_range(H, tid, nt);
    if (j0 >= j1) return;
    // the four gate blocks q*H + [j0, j1): one column range when a thread owns every unit
    const int64_t nq = j1 - j0 == H ? 1 : 4, cols = j1 - j0 == H ? 4 * H : j1 - j0;
    for (int64_t q = 0; q < nq; ++q) {
      float* g = ap + q * H + j0;
      blas::gemm_rm(false, true, B, cols, I, xp, I, wi + (q * H + j0) * I, I, 0.f, g, 4 * H);
      blas::gemm_rm(false, true, B, cols, H, hp, H, wh + (q * H + j0) * H, H, 1.f, g, 4 * H);
    }
    for (int64_t b = 0; b < B; ++b) {
      if (avx2) fwd_units_f32_avx2(ap + b * 4 * H, cpp + b * H, cnp + b * H, hnp + b * H, bp, j0, j1, H);
      else fwd_units_f32_base(ap + b * 4 * H, cpp + b * H, cnp + b * H, hnp + b * H, bp, j0, j1, H);
    }
  });
  return {hn, cn, act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_step_backward_cpu(
    const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& c_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const at::Tensor& c_new, const at::Tensor& act_in, bool need_input_grad, bool need_weight_grad) {
  check_cell_step_backward("fastbig::lstm_cell_step_backward (cpu)", grad_h, grad_c, x_in, h_in, c_in, w_ih_in,
                           w_hh_in, c_new, act_in);
  TORCH_CHECK(x_in.device().is_cpu(), "fastbig::lstm_cell_step_backward (cpu): input must be a CPU tensor, got ",
              x_in.device());
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  if (!cell_step_fused_ok(x_in, B, I, H))
    return cell_step_backward_aten(grad_h, grad_c, x_in, h_in, c_in, w_ih_in, w_hh_in, c_new, act_in, need_input_grad,
                                   need_weight_grad, &lstm_cell_backward_cpu);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };  // a gradient not asked for
  const auto x = x_in.contiguous(), h = h_in.contiguous(), cp = c_in.contiguous(), cn = c_new.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), act = act_in.contiguous();
  const auto opts = x.options();
  const at::Tensor dh_in = grad_h.has_value() && grad_h->defined() ? grad_h->contiguous() : at::zeros({B, H}, opts);
  // dc enters as dL/dc (from grad_c) and the cell kernel overwrites it with dL/dc_prev
  at::Tensor dcp = grad_c.has_value() && grad_c->defined() ? grad_c->clone(at::MemoryFormat::Contiguous)
                                                           : at::zeros({B, H}, opts);
  auto dG = at::empty({B, 4 * H}, opts);
  at::Tensor dx = need_input_grad ? at::empty({B, I}, opts) : empty();
  auto dh = at::empty({B, H}, opts);
  at::Tensor dwi = need_weight_grad ? at::empty({4 * H, I}, opts) : empty();
  at::Tensor dwh = need_weight_grad ? at::empty({4 * H, H}, opts) : empty();
  at::Tensor db = need_weight_grad ? at::empty({4 * H}, opts) : empty();
  const float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *cpp = cp.data_ptr<float>();
  const float *cnp = cn.data_ptr<float>(), *actp = act.data_ptr<float>(), *dhi = dh_in.data_ptr<float>();
  const float *wi = w_ih.data_ptr<float>(), *wh = w_hh.data_ptr<float>();
  float *dgp = dG.data_ptr<float>(), *dcpp = dcp.data_ptr<float>(), *dhp = dh.data_ptr<float>();
  float* dxp = need_input_grad ? dx.data_ptr<float>() : nullptr;
  float* dwip = need_weight_grad ? dwi.data_ptr<float>() : nullptr;
  float* dwhp = need_weight_grad ? dwh.data_ptr<float>() : nullptr;
  float* dbp = need_weight_grad ? db.data_ptr<float>() : nullptr;
  const bool avx2 = cpu_has_avx2_fma();
  run_team(cell_step_threads(B, I, H), [&](int tid, int nt) {
    const auto [j0, j1] = unit_range(H, tid, nt);
    if (j0 < j1) {
      for (int64_t b = 0; b < B; ++b) {
        if (avx2) bwd_units_f32_avx2(dhi + b * H, dcpp + b * H, actp + b * 4 * H, cpp + b * H, cnp + b * H,
                                     dgp + b * 4 * H, j0, j1, H);
        else bwd_units_f32_base(dhi + b * H, dcpp + b * H, actp + b * 4 * H, cpp + b * H, cnp + b * H,
                                dgp + b * 4 * H, j0, j1, H);
      }
      if (need_weight_grad) {
        const int64_t nq = j1 - j0 == H ? 1 : 4;  // as in the forward
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t r = q * H + j0, n = j1 - j0 == H ? 4 * H : j1 - j0;
          blas::gemm_rm(true, false, n, I, B, dgp + r, 4 * H, xp, I, 0.f, dwip + r * I, I);
          blas::gemm_rm(true, false, n, H, B, dgp + r, 4 * H, hp, H, 0.f, dwhp + r * H, H);
          float* d = dbp + r;
          for (int64_t j = 0; j < n; ++j) d[j] = 0.f;
          for (int64_t b = 0; b < B; ++b) {
            const float* g = dgp + b * 4 * H + r;
            for (int64_t j = 0; j < n; ++j) d[j] += g[j];
          }
        }
      }
    }
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp barrier
    }
#endif
    // columns of dx and dh, all of dG as the left operand
    if (need_input_grad) {
      const int64_t c0 = I * tid / nt, c1 = I * (tid + 1) / nt;
      if (c0 < c1) blas::gemm_rm(false, false, B, c1 - c0, 4 * H, dgp, 4 * H, wi + c0, I, 0.f, dxp + c0, I);
    }
    const int64_t c0 = H * tid / nt, c1 = H * (tid + 1) / nt;
    if (c0 < c1) blas::gemm_rm(false, false, B, c1 - c0, 4 * H, dgp, 4 * H, wh + c0, H, 0.f, dhp + c0, H);
  });
  return {dx, dh, dcp, dwi, dwh, db};
}

}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("lstm_cell_step", &fastbig::lstm::lstm_cell_step_cpu);
  m.impl("lstm_cell_step_backward", &fastbig::lstm::lstm_cell_step_backward_cpu);
}

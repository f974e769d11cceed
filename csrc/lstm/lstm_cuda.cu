// CUDA kernels of the LSTM ops. Launch code only: the arithmetic is lstm_math.h, shared with
// the CPU path. One thread per (b, j); the four gate loads of a warp are coalesced along j.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "lstm/lstm_cell.h"
#include "lstm/lstm_layer.h"
#include "lstm/lstm_math.h"

namespace fastbig {
namespace lstm {
namespace {

constexpr int kThreads = 256;

// The units (b, j) of rows [0, n) of a step, k = b * H + j, in a grid-stride loop: f(k, b, j).
// Consecutive threads take consecutive j, so a warp's loads of a gate block are coalesced.
template <typename F>
__device__ __forceinline__ void for_each_unit(int64_t n, int64_t H, F f) {
  const int64_t total = n * H;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = k / H;
    f(k, b, k - b * H);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cell_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ c_prev,
                                    scalar_t* __restrict__ h, scalar_t* __restrict__ c,
                                    scalar_t* __restrict__ act, int64_t B, int64_t H) {
  for_each_unit(B, H, [&](int64_t k, int64_t b, int64_t j) {
    const Gates<acc_t> in = load_gates<acc_t>(a + b * 4 * H, j, H);
    Gates<acc_t> g;
    acc_t cv, hv;
    cell_forward<acc_t>(in.i, in.f, in.g, in.o, acc_t(c_prev[k]), g, cv, hv);
    store_gates(g, act + b * 4 * H, j, H);
    c[k] = scalar_t(cv);
    h[k] = scalar_t(hv);
  });
}

template <typename scalar_t, typename acc_t>
__global__ void cell_backward_kernel(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ dc,
                                     const scalar_t* __restrict__ act, const scalar_t* __restrict__ c_prev,
                                     const scalar_t* __restrict__ c, scalar_t* __restrict__ da,
                                     scalar_t* __restrict__ dc_prev, int64_t B, int64_t H) {
  for_each_unit(B, H, [&](int64_t k, int64_t b, int64_t j) {
    const Gates<acc_t> g = load_gates<acc_t>(act + b * 4 * H, j, H);
    Gates<acc_t> d;
    acc_t dcp;
    cell_backward<acc_t>(dh ? acc_t(dh[k]) : acc_t(0), dc ? acc_t(dc[k]) : acc_t(0), g, acc_t(c_prev[k]),
                         acc_t(c[k]), d, dcp);
    store_gates(d, da + b * 4 * H, j, H);
    dc_prev[k] = scalar_t(dcp);
  });
}

inline unsigned grid_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cuda(const at::Tensor& gates_in,
                                                              const at::Tensor& c_prev_in) {
  const CellArgs a = cell_args(gates_in, c_prev_in);
  const c10::cuda::CUDAGuard guard(gates_in.device());
  const int64_t B = a.B, H = a.H;
  if (B * H == 0) return {a.h, a.c, a.act};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.gates.scalar_type(), "lstm_cell_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cell_forward_kernel<scalar_t, acc_t><<<grid_for(B * H), kThreads, 0, stream>>>(
        a.gates.data_ptr<scalar_t>(), a.c_prev.data_ptr<scalar_t>(), a.h.data_ptr<scalar_t>(),
        a.c.data_ptr<scalar_t>(), a.act.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a.h, a.c, a.act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cuda(const c10::optional<at::Tensor>& grad_h,
                                                           const c10::optional<at::Tensor>& grad_c,
                                                           const at::Tensor& act_in, const at::Tensor& c_prev_in,
                                                           const at::Tensor& c_in) {
  const CellBackwardArgs a = cell_backward_args(grad_h, grad_c, act_in, c_prev_in, c_in);
  const c10::cuda::CUDAGuard guard(act_in.device());
  const int64_t B = a.B, H = a.H;
  if (B * H == 0) return {a.da, a.dcp};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.act.scalar_type(), "lstm_cell_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cell_backward_kernel<scalar_t, acc_t><<<grid_for(B * H), kThreads, 0, stream>>>(
        a.dh.defined() ? a.dh.data_ptr<scalar_t>() : nullptr, a.dc.defined() ? a.dc.data_ptr<scalar_t>() : nullptr,
        a.act.data_ptr<scalar_t>(), a.c_prev.data_ptr<scalar_t>(), a.c.data_ptr<scalar_t>(),
        a.da.data_ptr<scalar_t>(), a.dcp.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {a.da, a.dcp};
}


// ---- whole-layer op: per-step fused pointwise kernels (the driver is lstm_layer.h) ----------
// One thread per (row b, unit j) of the step; gate loads of a warp are coalesced along j.
// c_prev of row b comes from the previous step's c (b < n_a) or from c0 (rows joining now).
template <typename scalar_t, typename acc_t>
__global__ void layer_forward_kernel(scalar_t* __restrict__ gates, const scalar_t* __restrict__ cprev_a,
                                     int64_t n_a, const scalar_t* __restrict__ c0, scalar_t* __restrict__ c_out,
                                     scalar_t* __restrict__ h_out, int64_t n, int64_t H,
                                     const scalar_t* __restrict__ bias) {
  for_each_unit(n, H, [&](int64_t k, int64_t b, int64_t j) {
    scalar_t* g = gates + b * 4 * H;
    const acc_t cp = acc_t(b < n_a ? cprev_a[k] : c0[k]);
    Gates<acc_t> a;
    acc_t cv, hv;
    const Gates<acc_t> in = load_preact<acc_t>(g, bias, j, H);
    cell_forward<acc_t>(in.i, in.f, in.g, in.o, cp, a, cv, hv);
    store_gates(a, g, j, H);
    c_out[k] = scalar_t(cv);
    h_out[k] = scalar_t(hv);
  });
}

template <typename scalar_t, typename acc_t>
__global__ void layer_backward_kernel(const scalar_t* __restrict__ dh_a, const scalar_t* __restrict__ dh_b,
                                      scalar_t* __restrict__ dc, const scalar_t* __restrict__ act,
                                      const scalar_t* __restrict__ cprev_a, int64_t n_a,
                                      const scalar_t* __restrict__ c0, const scalar_t* __restrict__ c,
                                      scalar_t* __restrict__ dgates, int64_t n, int64_t H) {
  for_each_unit(n, H, [&](int64_t k, int64_t b, int64_t j) {
    const Gates<acc_t> a = load_gates<acc_t>(act + b * 4 * H, j, H);
    const acc_t cp = acc_t(b < n_a ? cprev_a[k] : c0[k]);
    const acc_t dh = acc_t(dh_a[k]) + (dh_b ? acc_t(dh_b[k]) : acc_t(0));
    Gates<acc_t> d;
    acc_t dcp;
    cell_backward<acc_t>(dh, acc_t(dc[k]), a, cp, acc_t(c[k]), d, dcp);
    store_gates(d, dgates + b * 4 * H, j, H);
    dc[k] = scalar_t(dcp);
  });
}

void layer_fwd_pointwise_cuda(at::ScalarType st, const FwdStep& s) {
  if (s.n * s.H == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "lstm_layer_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_forward_kernel<scalar_t, acc_t><<<grid_for(s.n * s.H), kThreads, 0, stream>>>(
        static_cast<scalar_t*>(s.gates), static_cast<const scalar_t*>(s.cprev_a), s.n_a,
        static_cast<const scalar_t*>(s.c0), static_cast<scalar_t*>(s.c_out), static_cast<scalar_t*>(s.h_out), s.n,
        s.H, static_cast<const scalar_t*>(s.bias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void layer_bwd_pointwise_cuda(at::ScalarType st, const BwdStep& s) {
  if (s.n * s.H == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "lstm_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_backward_kernel<scalar_t, acc_t><<<grid_for(s.n * s.H), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(s.dh_a), static_cast<const scalar_t*>(s.dh_b), static_cast<scalar_t*>(s.dc),
        static_cast<const scalar_t*>(s.act), static_cast<const scalar_t*>(s.cprev_a), s.n_a,
        static_cast<const scalar_t*>(s.c0), static_cast<const scalar_t*>(s.c), static_cast<scalar_t*>(s.dgates),
        s.n, s.H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cuda(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse) {
  TORCH_CHECK(x.is_cuda(), "fastbig::lstm_layer (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, &layer_fwd_pointwise_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward_cuda(
    const c10::optional<at::Tensor>& grad_y, const c10::optional<at::Tensor>& grad_hn,
    const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const at::Tensor& y, const at::Tensor& act,
    const at::Tensor& c_all, const at::Tensor& hraw) {
  TORCH_CHECK(x.is_cuda(), "fastbig::lstm_layer_backward (cuda): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  return layer_backward(grad_y, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, y, act, c_all,
                        hraw, &layer_bwd_pointwise_cuda);
}

// One whole nn.LSTMCell step: cuBLAS GEMMs through ATen and the fused cell kernels above
// (lstm_cell.h's composite), as one op and one autograd node.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_step_cuda(const at::Tensor& x, const at::Tensor& h,
                                                                   const at::Tensor& c, const at::Tensor& w_ih,
                                                                   const at::Tensor& w_hh,
                                                                   const c10::optional<at::Tensor>& b_ih,
                                                                   const c10::optional<at::Tensor>& b_hh) {
  check_cell_step("fastbig::lstm_cell_step (cuda)", x, h, c, w_ih, w_hh, b_ih, b_hh);
  TORCH_CHECK(x.is_cuda(), "fastbig::lstm_cell_step (cuda): input must be a CUDA tensor, got ", x.device());
  return cell_step_aten(x, h, c, w_ih, w_hh, bias_sum(b_ih, b_hh), &lstm_cell_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_step_backward_cuda(
    const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c, const at::Tensor& x,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& c_new,
    const at::Tensor& act, bool need_input_grad, bool need_weight_grad) {
  check_cell_step_backward("fastbig::lstm_cell_step_backward (cuda)", grad_h, grad_c, x, h, c, w_ih, w_hh, c_new, act);
  TORCH_CHECK(x.is_cuda(), "fastbig::lstm_cell_step_backward (cuda): input must be a CUDA tensor, got ", x.device());
  return cell_step_backward_aten(grad_h, grad_c, x, h, c, w_ih, w_hh, c_new, act, need_input_grad, need_weight_grad,
                                 &lstm_cell_backward_cuda);
}

}  // namespace
}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CUDA, m) {
  m.impl("lstm_cell", &fastbig::lstm::lstm_cell_cuda);
  m.impl("lstm_cell_backward", &fastbig::lstm::lstm_cell_backward_cuda);
  m.impl("lstm_layer", &fastbig::lstm::lstm_layer_cuda);
  m.impl("lstm_layer_backward", &fastbig::lstm::lstm_layer_backward_cuda);
  m.impl("lstm_cell_step", &fastbig::lstm::lstm_cell_step_cuda);
  m.impl("lstm_cell_step_backward", &fastbig::lstm::lstm_cell_step_backward_cuda);
}

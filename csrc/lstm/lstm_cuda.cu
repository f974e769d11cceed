// CUDA kernels of the LSTM ops. Launch code only: the arithmetic is lstm_math.h, shared with
// the CPU path. One thread per (b, j); the four gate loads of a warp are coalesced along j.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "lstm/lstm_cell.h"
#include "lstm/lstm_math.h"

namespace fastbig {
namespace lstm {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void cell_forward_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ c_prev,
                                    scalar_t* __restrict__ h, scalar_t* __restrict__ c,
                                    scalar_t* __restrict__ act, int64_t B, int64_t H) {
  const int64_t n = B * H;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = k / H, j = k - b * H;
    const scalar_t* ab = a + b * 4 * H;
    Gates<acc_t> g;
    acc_t cv, hv;
    cell_forward<acc_t>(acc_t(ab[j]), acc_t(ab[H + j]), acc_t(ab[2 * H + j]), acc_t(ab[3 * H + j]),
                        acc_t(c_prev[k]), g, cv, hv);
    scalar_t* actb = act + b * 4 * H;
    actb[j] = scalar_t(g.i);
    actb[H + j] = scalar_t(g.f);
    actb[2 * H + j] = scalar_t(g.g);
    actb[3 * H + j] = scalar_t(g.o);
    c[k] = scalar_t(cv);
    h[k] = scalar_t(hv);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void cell_backward_kernel(const scalar_t* __restrict__ dh, const scalar_t* __restrict__ dc,
                                     const scalar_t* __restrict__ act, const scalar_t* __restrict__ c_prev,
                                     const scalar_t* __restrict__ c, scalar_t* __restrict__ da,
                                     scalar_t* __restrict__ dc_prev, int64_t B, int64_t H) {
  const int64_t n = B * H;
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = k / H, j = k - b * H;
    const scalar_t* actb = act + b * 4 * H;
    Gates<acc_t> g{acc_t(actb[j]), acc_t(actb[H + j]), acc_t(actb[2 * H + j]), acc_t(actb[3 * H + j])};
    Gates<acc_t> d;
    acc_t dcp;
    cell_backward<acc_t>(dh ? acc_t(dh[k]) : acc_t(0), dc ? acc_t(dc[k]) : acc_t(0), g, acc_t(c_prev[k]),
                         acc_t(c[k]), d, dcp);
    scalar_t* dab = da + b * 4 * H;
    dab[j] = scalar_t(d.i);
    dab[H + j] = scalar_t(d.f);
    dab[2 * H + j] = scalar_t(d.g);
    dab[3 * H + j] = scalar_t(d.o);
    dc_prev[k] = scalar_t(dcp);
  }
}

inline unsigned grid_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return (unsigned)std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cuda(const at::Tensor& gates_in,
                                                              const at::Tensor& c_prev_in) {
  check_cell_inputs(gates_in, c_prev_in);
  const c10::cuda::CUDAGuard guard(gates_in.device());
  const auto gates = gates_in.contiguous();
  const auto c_prev = c_prev_in.contiguous();
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  auto h = at::empty({B, H}, gates.options());
  auto c = at::empty({B, H}, gates.options());
  auto act = at::empty({B, 4 * H}, gates.options());
  if (B * H == 0) return {h, c, act};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gates.scalar_type(), "lstm_cell_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cell_forward_kernel<scalar_t, acc_t><<<grid_for(B * H), kThreads, 0, stream>>>(
        gates.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), act.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h, c, act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cuda(const c10::optional<at::Tensor>& grad_h,
                                                           const c10::optional<at::Tensor>& grad_c,
                                                           const at::Tensor& act_in, const at::Tensor& c_prev_in,
                                                           const at::Tensor& c_in) {
  check_cell_backward_inputs(grad_h, grad_c, act_in, c_prev_in, c_in);
  const c10::cuda::CUDAGuard guard(act_in.device());
  const auto act = act_in.contiguous();
  const auto c_prev = c_prev_in.contiguous();
  const auto c = c_in.contiguous();
  const auto dh = grad_or_undefined(grad_h, act);
  const auto dc = grad_or_undefined(grad_c, act);
  const int64_t B = act.size(0), H = act.size(1) / 4;
  auto da = at::empty({B, 4 * H}, act.options());
  auto dcp = at::empty({B, H}, act.options());
  if (B * H == 0) return {da, dcp};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, act.scalar_type(), "lstm_cell_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cell_backward_kernel<scalar_t, acc_t><<<grid_for(B * H), kThreads, 0, stream>>>(
        dh.defined() ? dh.data_ptr<scalar_t>() : nullptr, dc.defined() ? dc.data_ptr<scalar_t>() : nullptr,
        act.data_ptr<scalar_t>(), c_prev.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), da.data_ptr<scalar_t>(),
        dcp.data_ptr<scalar_t>(), B, H);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, dcp};
}

}  // namespace
}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CUDA, m) {
  m.impl("lstm_cell", &fastbig::lstm::lstm_cell_cuda);
  m.impl("lstm_cell_backward", &fastbig::lstm::lstm_cell_backward_cuda);
}

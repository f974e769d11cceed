// CPU kernels of the pointwise LSTM cell op (fastbig::lstm_cell and its backward): float32 runs
// the layer op's vectorized step, other dtypes a parallel loop over lstm_math.h's scalar cell.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "lstm/lstm_cell.h"
#include "lstm/lstm_cpu.h"

namespace fastbig {
namespace lstm {

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
                                                h.data_ptr(), B, H, nullptr});
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

}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("lstm_cell", &fastbig::lstm::lstm_cell_cpu);
  m.impl("lstm_cell_backward", &fastbig::lstm::lstm_cell_backward_cpu);
}

// CPU kernels of the pointwise LSTM cell op (fastbig::lstm_cell and its backward): the forward
// runs the layer op's step for every dtype; the backward runs it for float32 (vectorized), other
// dtypes a parallel loop over lstm_math.h's scalar cell.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "lstm/lstm_cell.h"
#include "lstm/lstm_cpu.h"

namespace fastbig {
namespace lstm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(const at::Tensor& gates_in,
                                                             const at::Tensor& c_prev_in) {
  const CellArgs a = cell_args(gates_in, c_prev_in);
  TORCH_CHECK(gates_in.device().is_cpu(), "lstm_cell (cpu): gates must be a CPU tensor");
  // the layer op's step (vectorized for float32, lstm_math.h's scalar cell otherwise), in place
  // on a copy of the gates
  a.act.copy_(a.gates);
  layer_fwd_pointwise_cpu(a.gates.scalar_type(), FwdStep{a.act.data_ptr(), nullptr, 0, a.c_prev.data_ptr(),
                                                         a.c.data_ptr(), a.h.data_ptr(), a.B, a.H, nullptr});
  return {a.h, a.c, a.act};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_backward_cpu(const c10::optional<at::Tensor>& grad_h,
                                                          const c10::optional<at::Tensor>& grad_c,
                                                          const at::Tensor& act_in, const at::Tensor& c_prev_in,
                                                          const at::Tensor& c_in) {
  const CellBackwardArgs a = cell_backward_args(grad_h, grad_c, act_in, c_prev_in, c_in);
  const int64_t B = a.B, H = a.H;
  if (a.act.scalar_type() == at::kFloat) {  // the layer op's vectorized step; dc in/out in dcp
    if (a.dc.defined()) a.dcp.copy_(a.dc);
    else a.dcp.zero_();
    const auto dh_a = a.dh.defined() ? a.dh : at::zeros({B, H}, a.act.options());
    layer_bwd_pointwise_cpu(at::kFloat, BwdStep{dh_a.data_ptr(), nullptr, a.dcp.data_ptr(), a.act.data_ptr(), nullptr,
                                                0, a.c_prev.data_ptr(), a.c.data_ptr(), a.da.data_ptr(), B, H});
    return {a.da, a.dcp};
  }
  // other dtypes: not the layer op's step, which adds dh + 0 (that would turn a -0 of grad_h to +0)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.act.scalar_type(), "lstm_cell_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.act.data_ptr<scalar_t>();
    const scalar_t* cpp = a.c_prev.data_ptr<scalar_t>();
    const scalar_t* cp = a.c.data_ptr<scalar_t>();
    const scalar_t* dhp = a.dh.defined() ? a.dh.data_ptr<scalar_t>() : nullptr;
    const scalar_t* dcp_in = a.dc.defined() ? a.dc.data_ptr<scalar_t>() : nullptr;
    scalar_t* dap = a.da.data_ptr<scalar_t>();
    scalar_t* dcpp = a.dcp.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = b * H + j;
          const Gates<acc_t> g = load_gates<acc_t>(ap + b * 4 * H, j, H);
          Gates<acc_t> d;
          acc_t dcprev;
          cell_backward<acc_t>(dhp ? acc_t(dhp[k]) : acc_t(0), dcp_in ? acc_t(dcp_in[k]) : acc_t(0), g,
                               cpp[k], cp[k], d, dcprev);
          store_gates(d, dap + b * 4 * H, j, H);
          dcpp[k] = dcprev;
        }
      }
    });
  });
  return {a.da, a.dcp};
}

}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("lstm_cell", &fastbig::lstm::lstm_cell_cpu);
  m.impl("lstm_cell_backward", &fastbig::lstm::lstm_cell_backward_cpu);
}

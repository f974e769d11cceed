// Shared argument checks for the lstm_cell and lstm_cell_step kernels (CPU and CUDA), and the
// ATen composite of a whole cell step that both devices use (CPU: where its fused kernel does not apply).
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace fastbig {
namespace lstm {

inline void check_cell_inputs(const at::Tensor& gates, const at::Tensor& c_prev) {
  TORCH_CHECK(gates.dim() == 2, "lstm_cell: gates must be 2-D [B, 4H], got ", gates.dim(), "-D");
  TORCH_CHECK(gates.size(1) % 4 == 0, "lstm_cell: gates.size(1) must be 4*H, got ", gates.size(1));
  const int64_t B = gates.size(0), H = gates.size(1) / 4;
  TORCH_CHECK(c_prev.dim() == 2 && c_prev.size(0) == B && c_prev.size(1) == H,
              "lstm_cell: c_prev must be [", B, ", ", H, "], got ", c_prev.sizes());
  TORCH_CHECK(c_prev.scalar_type() == gates.scalar_type(), "lstm_cell: c_prev dtype ",
              c_prev.scalar_type(), " does not match gates dtype ", gates.scalar_type());
  TORCH_CHECK(c_prev.device() == gates.device(), "lstm_cell: c_prev is on ", c_prev.device(),
              " but gates is on ", gates.device());
}

inline void check_cell_backward_inputs(const c10::optional<at::Tensor>& grad_h,
                                       const c10::optional<at::Tensor>& grad_c, const at::Tensor& act,
                                       const at::Tensor& c_prev, const at::Tensor& c) {
  check_cell_inputs(act, c_prev);
  TORCH_CHECK(c.sizes() == c_prev.sizes(), "lstm_cell_backward: c must be ", c_prev.sizes(), ", got ",
              c.sizes());
  for (const auto* g : {&grad_h, &grad_c}) {
    if (g->has_value() && (*g)->defined()) {
      TORCH_CHECK((*g)->sizes() == c_prev.sizes(), "lstm_cell_backward: grad_h/grad_c must be ",
                  c_prev.sizes(), ", got ", (*g)->sizes());
      TORCH_CHECK((*g)->device() == c_prev.device(), "lstm_cell_backward: gradients on ", (*g)->device(),
                  ", expected ", c_prev.device());
    }
  }
}

// A defined, contiguous gradient of act's dtype, or an undefined tensor.
inline at::Tensor grad_or_undefined(const c10::optional<at::Tensor>& g, const at::Tensor& like) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  return g->to(like.scalar_type()).contiguous();
}

// The cell op's inputs, checked and contiguous, and its fresh outputs (each device's kernel).
struct CellArgs {
  at::Tensor gates, c_prev;  // [B, 4H], [B, H]
  int64_t B, H;
  at::Tensor h, c, act;      // [B, H], [B, H], [B, 4H]
};
inline CellArgs cell_args(const at::Tensor& gates_in, const at::Tensor& c_prev_in) {
  check_cell_inputs(gates_in, c_prev_in);
  CellArgs a;
  a.gates = gates_in.contiguous();
  a.c_prev = c_prev_in.contiguous();
  a.B = a.gates.size(0);
  a.H = a.gates.size(1) / 4;
  a.h = at::empty({a.B, a.H}, a.gates.options());
  a.c = at::empty({a.B, a.H}, a.gates.options());
  a.act = at::empty({a.B, 4 * a.H}, a.gates.options());
  return a;
}

// The same for its backward: dh, dc in act's dtype, or undefined where no gradient came.
struct CellBackwardArgs {
  at::Tensor act, c_prev, c, dh, dc;  // [B, 4H], then [B, H] each
  int64_t B, H;
  at::Tensor da, dcp;  // [B, 4H], [B, H]
};
inline CellBackwardArgs cell_backward_args(const c10::optional<at::Tensor>& grad_h,
                                           const c10::optional<at::Tensor>& grad_c, const at::Tensor& act_in,
                                           const at::Tensor& c_prev_in, const at::Tensor& c_in) {
  check_cell_backward_inputs(grad_h, grad_c, act_in, c_prev_in, c_in);
  CellBackwardArgs a;
  a.act = act_in.contiguous();
  a.c_prev = c_prev_in.contiguous();
  a.c = c_in.contiguous();
  a.dh = grad_or_undefined(grad_h, a.act);
  a.dc = grad_or_undefined(grad_c, a.act);
  a.B = a.act.size(0);
  a.H = a.act.size(1) / 4;
  a.da = at::empty({a.B, 4 * a.H}, a.act.options());
  a.dcp = at::empty({a.B, a.H}, a.act.options());
  return a;
}

// ---- lstm_cell_step: one whole nn.LSTMCell step -------------------------------------------
// Shapes, dtypes and one device for all (each device's kernel checks that it is its own).
inline void check_cell_step(const char* op, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                            const c10::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0, op, ": w_ih must be [4*hidden_size, input_size], got ",
              w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4, I = w_ih.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == I, op, ": input must be [batch, ", I, "], got ", x.sizes());
  const int64_t B = x.size(0);
  TORCH_CHECK(h.dim() == 2 && h.size(0) == B && h.size(1) == H, op, ": hx must be [", B, ", ", H, "], got ",
              h.sizes());
  TORCH_CHECK(c.dim() == 2 && c.size(0) == B && c.size(1) == H, op, ": cx must be [", B, ", ", H, "], got ",
              c.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == H, op, ": w_hh must be [", 4 * H, ", ", H,
              "], got ", w_hh.sizes());
  for (const auto* b : {&b_ih, &b_hh}) {
    if (b->has_value() && (*b)->defined()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == 4 * H, op, ": biases must be [", 4 * H, "], got ",
                  (*b)->sizes());
      TORCH_CHECK((*b)->scalar_type() == x.scalar_type() && (*b)->device() == x.device(), op,
                  ": biases must have input's dtype and device");
    }
  }
  for (const auto* t : {&h, &c, &w_ih, &w_hh}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": all tensors must have input's dtype ", x.scalar_type(),
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), op, ": all tensors must be on input's device ", x.device(), ", got ",
                t->device());
  }
}

inline void check_cell_step_backward(const char* op, const c10::optional<at::Tensor>& grad_h,
                                     const c10::optional<at::Tensor>& grad_c, const at::Tensor& x, const at::Tensor& h,
                                     const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const at::Tensor& c_new, const at::Tensor& act) {
  check_cell_step(op, x, h, c, w_ih, w_hh, c10::nullopt, c10::nullopt);
  const int64_t B = x.size(0), H = h.size(1);
  TORCH_CHECK(act.sizes() == at::IntArrayRef({B, 4 * H}) && act.scalar_type() == x.scalar_type() &&
                  act.device() == x.device(),
              op, ": act must be [", B, ", ", 4 * H, "] of input's dtype and device, got ", act.sizes(), " ",
              act.scalar_type());
  TORCH_CHECK(c_new.sizes() == c.sizes() && c_new.scalar_type() == x.scalar_type() && c_new.device() == x.device(),
              op, ": c must be [", B, ", ", H, "] of input's dtype and device, got ", c_new.sizes());
  for (const auto* g : {&grad_h, &grad_c}) {
    if (g->has_value() && (*g)->defined())
      TORCH_CHECK((*g)->sizes() == c.sizes() && (*g)->scalar_type() == x.scalar_type() &&
                      (*g)->device() == x.device(),
                  op, ": grad_h/grad_c must be [", B, ", ", H, "] of input's dtype and device, got ", (*g)->sizes(),
                  " ", (*g)->scalar_type());
  }
}

// b_ih + b_hh (either may be absent), or undefined when both are.
inline at::Tensor bias_sum(const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh) {
  const bool hi = b_ih.has_value() && b_ih->defined(), hh = b_hh.has_value() && b_hh->defined();
  if (hi && hh) return (*b_ih + *b_hh).contiguous();
  if (hi) return b_ih->contiguous();
  if (hh) return b_hh->contiguous();
  return at::Tensor();
}

using CellFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&);
using CellBackwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const c10::optional<at::Tensor>&,
                                                              const c10::optional<at::Tensor>&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&);

// The step through ATen GEMMs (cuBLAS / the CPU BLAS) and the device's fused cell kernels: the
// two GEMMs into one [B, 4H] buffer (the bias folded into the first, the second accumulating in
// place), then the cell.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cell_step_aten(const at::Tensor& x, const at::Tensor& h,
                                                                     const at::Tensor& c, const at::Tensor& w_ih,
                                                                     const at::Tensor& w_hh, const at::Tensor& bias,
                                                                     CellFn cell) {
  at::Tensor gates = bias.defined() ? at::addmm(bias, x, w_ih.t()) : at::mm(x, w_ih.t());
  gates.addmm_(h, w_hh.t());
  return cell(gates, c);
}

// Its backward: the cell's gradient dG, then dx = dG W_ih (when need_input_grad), dh = dG W_hh,
// and dW_ih = dG^T x, dW_hh = dG^T h, db = sum_b dG (when need_weight_grad); a gradient not asked
// for is a fresh empty tensor.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_step_backward_aten(
    const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c, const at::Tensor& x,
    const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& c_new,
    const at::Tensor& act, bool need_input_grad, bool need_weight_grad, CellBackwardFn cell_backward) {
  const auto empty = [&] { return at::empty({0}, x.options()); };
  auto [dG, dcp] = cell_backward(grad_h, grad_c, act, c, c_new);
  at::Tensor dx = need_input_grad ? at::mm(dG, w_ih) : empty();
  at::Tensor dh = at::mm(dG, w_hh);
  at::Tensor dwi = need_weight_grad ? at::mm(dG.t(), x) : empty();
  at::Tensor dwh = need_weight_grad ? at::mm(dG.t(), h) : empty();
  at::Tensor db = need_weight_grad ? dG.sum(0) : empty();
  return {dx, dh, dcp, dwi, dwh, db};
}

}  // namespace lstm
}  // namespace fastbig

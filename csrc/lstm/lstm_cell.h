// Shared argument checks for the lstm_cell kernels (CPU and CUDA).
#pragma once
#include <torch/extension.h>

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

}  // namespace lstm
}  // namespace fastbig

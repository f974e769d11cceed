// Every fastbig op schema, in one place. Kernels register with TORCH_LIBRARY_IMPL beside
// their sources (csrc/<op>/<op>_cpu.cpp, <op>_cuda.cu); fake impls and autograd live in
// fastbig/ops/<op>.py.
#include <torch/extension.h>
#ifdef FASTBIG_WITH_CUDA
#include <cuda.h>
#endif

#ifndef FASTBIG_TORCH_VERSION
#define FASTBIG_TORCH_VERSION "unknown"
#endif

TORCH_LIBRARY(fastbig, m) {
  // ---- LSTM -----------------------------------------------------------------------------
  // One cell step from pre-activation gates [B, 4H] (i, f, g, o) and c_prev [B, H].
  // Returns h, c and the activated gates [B, 4H] that the backward needs.
  m.def("lstm_cell(Tensor gates, Tensor c_prev) -> (Tensor h, Tensor c, Tensor act)");
  m.def(
      "lstm_cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor act, Tensor c_prev, Tensor c)"
      " -> (Tensor grad_gates, Tensor grad_c_prev)");
  // One whole nn.LSTMCell step: gates = x W_ih^T + h W_hh^T + b_ih + b_hh, then the cell
  // (CPU: csrc/lstm/lstm_cell_step_cpu.cpp). x [B, I], hx/cx [B, H], w_ih [4H, I], w_hh [4H, H].
  // Returns h, c and the activated gates [B, 4H]. The backward computes grad_x only when
  // need_input_grad and the weight/bias gradients only when need_weight_grad (else empty).
  m.def(
      "lstm_cell_step(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh)"
      " -> (Tensor h, Tensor c, Tensor act)");
  m.def(
      "lstm_cell_step_backward(Tensor? grad_h, Tensor? grad_c, Tensor input, Tensor hx, Tensor cx, Tensor w_ih,"
      " Tensor w_hh, Tensor c, Tensor act, bool need_input_grad, bool need_weight_grad)"
      " -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b)");
  // A whole LSTM layer, one direction (csrc/lstm/lstm_layer.h). x [N, I] time-major, packed
  // when batch_sizes (1-D int64 CPU, non-increasing) is given, else N = T*B. h0 [B, P], c0 [B, H];
  // w_hr [P, H] when proj_size > 0. Returns y [N, P], h_n, c_n and what backward needs: the
  // activated gates [N, 4H], c of every step [N, H], the unprojected h [N, H] (or [0]).
  m.def(
      "lstm_layer(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
      " Tensor? w_hr, Tensor? batch_sizes, bool reverse)"
      " -> (Tensor y, Tensor h_n, Tensor c_n, Tensor act, Tensor c_all, Tensor hraw)");
  m.def(
      "lstm_layer_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor h0, Tensor c0,"
      " Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, Tensor y, Tensor act,"
      " Tensor c_all, Tensor hraw)"
      " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh,"
      " Tensor grad_b, Tensor grad_w_hr)");
}

namespace {
pybind11::dict build_info() {
  pybind11::dict d;
#ifdef FASTBIG_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = std::string(FASTBIG_CUDA_ARCHS);
#ifdef CUDA_VERSION
  d["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#endif
#else
  d["cuda"] = false;
  d["cuda_archs"] = std::string("");
#endif
  d["torch_version"] = std::string(FASTBIG_TORCH_VERSION);
  return d;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastbig C++/CUDA kernels; ops are registered under torch.ops.fastbig";
  m.def("build_info", &build_info, "What this extension was built with");
}

// ---- CONV-BN ------------------------------------------------------------------------------
// BatchNorm with batch statistics + activation, fused, after a conv that ATen runs
// (fastbig/ops/conv_bn_relu.py). act: 0 none, 1 relu, 2 leaky_relu(negative_slope).
// z [N, C, H, W] NCHW or channels_last. mean/invstd/var are per channel, float32 (float64 for
// float64 z); var is the biased batch variance.
TORCH_LIBRARY_FRAGMENT(fastbig, m) {
  m.def(
      "bn_act_forward(Tensor z, Tensor? weight, Tensor? bias, float eps, int act, float negative_slope)"
      " -> (Tensor y, Tensor mean, Tensor invstd, Tensor var)");
  m.def(
      "bn_act_backward(Tensor grad_y, Tensor z, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias,"
      " int act, float negative_slope) -> (Tensor grad_z, Tensor grad_weight, Tensor grad_bias)");
  // BatchNorm2d's running-statistic update, in place: num_batches_tracked += 1, then
  // factor = momentum (or 1/num_batches_tracked when None), unbiased var = var * count/(count-1).
  m.def(
      "bn_update_running_stats_(Tensor(a!) running_mean, Tensor(b!) running_var,"
      " Tensor(c!) num_batches_tracked, Tensor mean, Tensor var, int count, float? momentum) -> ()");
  // Eval (BatchNorm folded into weight and bias): act(conv1x1(x, weight) + bias) for a 1x1 conv
  // with stride 1, no padding, groups 1; x NCHW or channels_last (the output keeps it). CPU,
  // float32/float64; the epilogue runs on each output block while it is in cache.
  m.def("conv1x1_act(Tensor x, Tensor weight, Tensor? bias, int act, float negative_slope) -> Tensor");
}

// ---- ATTENTION (CPU) -----------------------------------------------------------------------
// Flash attention on CPU tensors (csrc/attention/attention_cpu.cpp; autograd, fake impls and the
// `auto` table in fastbig/ops/_attention_cpu.py). q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] float32,
// bfloat16 or float16 (innermost stride 1 read in place, else copied); attn_mask bool (True =
// attend) or additive, broadcastable as [B|1, Hq|1, Sq|1, Sk|1]; key_padding_mask bool [B, Sk]
// (True = padded); sinks [Hq]; alibi_slopes [Hq] or [B, Hq]; window -1 = unbounded (causal is
// window_right 0). Returns out (q's dtype) and lse fp32 [B, Hq, Sq] (includes the sink). The
// backward returns dq, dk, dv (input dtype), dmask fp32 [B, Hq, Sq, Sk] when mask_grad and the
// mask is additive (else [0]), and delta = rowsum(dO * O) fp32 [B, Hq, Sq] for the sinks' grad.
TORCH_LIBRARY_FRAGMENT(fastbig, m) {
  m.def(
      "attention_cpu_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask,"
      " Tensor? sinks, Tensor? alibi_slopes, float scale, float softcap, int window_left, int window_right,"
      " bool bottom_right) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_cpu_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? attn_mask, Tensor? key_padding_mask, Tensor? sinks, Tensor? alibi_slopes, float scale,"
      " float softcap, int window_left, int window_right, bool bottom_right, bool mask_grad)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask, Tensor delta)");
}

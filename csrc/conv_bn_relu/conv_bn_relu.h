// Shared argument checks and layout handling of the conv-bn-relu kernels (CPU and CUDA).
#pragma once
#include <torch/extension.h>

#include "conv_bn_relu/conv_bn_relu_math.h"

namespace fastbig {
namespace cbr {

// How the kernels index a 4-D activation z [N, C, H, W] without copying it:
//   NCHW (contiguous):      offset = (n * C + c) * HW + hw    -> channel c = (i / HW) % C
//   NHWC (channels_last):   offset = (n * HW + hw) * C + c    -> channel c = i % C
enum class Layout { NCHW, NHWC };

// The layout of z; a tensor that is neither is copied to NCHW (the only copy, and only then).
inline std::pair<at::Tensor, Layout> as_kernel_layout(const at::Tensor& z) {
  if (z.is_contiguous()) return {z, Layout::NCHW};
  if (z.is_contiguous(at::MemoryFormat::ChannelsLast)) return {z, Layout::NHWC};
  return {z.contiguous(), Layout::NCHW};
}

// A tensor of z's shape in the given layout: t itself when it already is, else a copy.
inline at::Tensor in_layout(const at::Tensor& t, Layout layout) {
  if (layout == Layout::NCHW) return t.is_contiguous() ? t : t.contiguous();
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::Tensor empty_in_layout(const at::Tensor& like, Layout layout) {
  return at::empty(like.sizes(), like.options().memory_format(layout == Layout::NCHW
                                                                   ? at::MemoryFormat::Contiguous
                                                                   : at::MemoryFormat::ChannelsLast));
}

inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_act(int64_t act, double slope) {
  TORCH_CHECK(act == kNone || act == kRelu || act == kLeakyRelu,
              "bn_act: act must be 0 (none), 1 (relu) or 2 (leaky_relu), got ", act);
  TORCH_CHECK(act != kLeakyRelu || slope > 0.0,
              "bn_act: negative_slope must be > 0 for leaky_relu (the backward reads the sign of y), got ",
              slope);
}

inline void check_channel_param(const char* op, const char* name, const c10::optional<at::Tensor>& p,
                                const at::Tensor& z) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == z.size(1), op, ": ", name, " must have shape [", z.size(1),
              "], got ", p->sizes());
  TORCH_CHECK(p->device() == z.device(), op, ": ", name, " is on ", p->device(), " but z is on ", z.device());
}

inline void check_z(const char* op, const at::Tensor& z) {
  TORCH_CHECK(z.dim() == 4, op, ": z must be 4-D [N, C, H, W], got ", z.dim(), "-D with shape ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), op, ": z must be floating point, got ", z.scalar_type());
  const int64_t n = z.size(1) > 0 ? z.numel() / z.size(1) : 0;
  TORCH_CHECK(n > 1, "Expected more than 1 value per channel when training, got input size ", z.sizes());
}

inline void check_forward(const at::Tensor& z, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, double eps, int64_t act, double slope) {
  check_z("bn_act_forward", z);
  check_channel_param("bn_act_forward", "weight", weight, z);
  check_channel_param("bn_act_forward", "bias", bias, z);
  TORCH_CHECK(eps > 0.0, "bn_act_forward: eps must be > 0, got ", eps);
  check_act(act, slope);
}

inline void check_backward(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& mean,
                           const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                           const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
  check_z("bn_act_backward", z);
  TORCH_CHECK(dy.sizes() == z.sizes(), "bn_act_backward: grad_y must have shape ", z.sizes(), ", got ",
              dy.sizes());
  TORCH_CHECK(dy.device() == z.device(), "bn_act_backward: grad_y is on ", dy.device(), " but z is on ",
              z.device());
  for (const auto* p : {&mean, &invstd}) {
    TORCH_CHECK(p->dim() == 1 && p->size(0) == z.size(1), "bn_act_backward: mean/invstd must be [",
                z.size(1), "], got ", p->sizes());
    TORCH_CHECK(p->scalar_type() == acc_type_of(z.scalar_type()), "bn_act_backward: mean/invstd must be ",
                acc_type_of(z.scalar_type()), ", got ", p->scalar_type());
  }
  check_channel_param("bn_act_backward", "weight", weight, z);
  check_channel_param("bn_act_backward", "bias", bias, z);
  check_act(act, slope);
}

inline void check_running(const at::Tensor& running_mean, const at::Tensor& running_var,
                          const at::Tensor& num_batches_tracked, const at::Tensor& mean, const at::Tensor& var,
                          int64_t count, c10::optional<double> momentum) {
  const int64_t C = mean.numel();
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(), "bn_update_running_stats_: mean and var must be "
              "1-D of one size, got ", mean.sizes(), " and ", var.sizes());
  TORCH_CHECK(running_mean.dim() == 1 && running_mean.size(0) == C && running_var.sizes() == running_mean.sizes(),
              "bn_update_running_stats_: running_mean/running_var must be [", C, "], got ", running_mean.sizes(),
              " and ", running_var.sizes());
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(),
              "bn_update_running_stats_: running_mean/running_var must be contiguous");
  TORCH_CHECK(running_var.scalar_type() == running_mean.scalar_type(),
              "bn_update_running_stats_: running_var dtype ", running_var.scalar_type(),
              " differs from running_mean dtype ", running_mean.scalar_type());
  TORCH_CHECK(num_batches_tracked.numel() == 1 && num_batches_tracked.scalar_type() == at::kLong,
              "bn_update_running_stats_: num_batches_tracked must be a one-element int64 tensor, got ",
              num_batches_tracked.scalar_type(), " ", num_batches_tracked.sizes());
  for (const auto* t : {&running_mean, &running_var, &num_batches_tracked, &var}) {
    TORCH_CHECK(t->device() == mean.device(), "bn_update_running_stats_: all tensors must be on ", mean.device(),
                ", got one on ", t->device());
  }
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "bn_update_running_stats_: mean/var must be float32 or float64, got ", mean.scalar_type());
  TORCH_CHECK(var.scalar_type() == mean.scalar_type(), "bn_update_running_stats_: var dtype differs from mean");
  TORCH_CHECK(count > 1, "bn_update_running_stats_: count must be > 1, got ", count);
  TORCH_CHECK(!momentum.has_value() || (*momentum >= 0.0 && *momentum <= 1.0),
              "bn_update_running_stats_: momentum must be in [0, 1] or None, got ", *momentum);
}

}  // namespace cbr
}  // namespace fastbig

// The whole-layer LSTM driver, shared by the CPU and CUDA builds: argument checks, the GEMMs
// (ATen: MKL/oneDNN on CPU, cuBLAS on GPU) and the time loop. The per-step fused pointwise
// kernels are supplied by lstm_layer_cpu.cpp / lstm_cuda.cu through the two function pointers below.
//
// Layout (the cuDNN "packed" layout): x is [N, I], the time-major concatenation of steps;
// step t holds the first bs[t] rows of the batch (batch_sizes non-increasing, as in a
// PackedSequence; absent = every step holds all B = h0.size(0) rows, N = T*B). A row that is not
// in step t keeps its h/c, so each sequence stops at its own length; h_n/c_n are each row's
// state after its last step. reverse runs t = T-1 .. 0 (rows join as their sequences start).
//
// Forward: G = x W_ih^T in one GEMM into the [N, 4H] buffer; per step one in-place addmm
// G_t += h_prev W_hh^T and one fused pointwise kernel that adds the bias (b_ih + b_hh), turns G_t
// into the activated gates (kept for backward), writes c_t and h_t = o*tanh(c_t) (or, with
// proj_size, hraw_t followed by the per-step GEMM y_t = hraw_t W_hr^T). No allocation inside the
// loop. (The bias goes into the pointwise step, not into the GEMM as addmm's broadcast input:
// that broadcast copy of [N, 4H] cost as much as a fifth of the layer on CPU.)
// A backend may take over the whole time loop for the inputs it handles better (LoopFn: the CPU
// build's fused small-batch GEMV + cell kernel); it gets the same buffers and must fill y, act
// and c_all exactly as the loop below does.
// Backward: per step one fused pointwise gradient kernel and one GEMM dh_prev = dG_t W_hh
// (plus dhraw = dh W_hr with projections); then big GEMMs for dX, dW_ih, dW_hh, dW_hr.
#pragma once
#include <torch/extension.h>

#include <vector>

namespace fastbig {
namespace lstm {

// One forward step of the pointwise kernel over n rows of width H.
// gates: [n, 4H] pre-activations in (without bias), activated gates out (in place).
// bias: [4H] added to every row's pre-activations, or nullptr.
// c_prev of row b: cprev_a[b] for b < n_a, else c0[b]. Writes c_out [n, H], h_out [n, H].
struct FwdStep {
  void* gates;
  const void* cprev_a;
  int64_t n_a;
  const void* c0;
  void* c_out;
  void* h_out;
  int64_t n, H;
  const void* bias;
};
// One backward step. dh of row b = dh_a[b] + (dh_b ? dh_b[b] : 0); dc: in (dL/dc_t) and out
// (dL/dc_prev), in place. act/c: this step's saved activated gates and c; c_prev as in FwdStep.
// Writes dgates [n, 4H].
struct BwdStep {
  const void* dh_a;
  const void* dh_b;
  void* dc;
  const void* act;
  const void* cprev_a;
  int64_t n_a;
  const void* c0;
  const void* c;
  void* dgates;
  int64_t n, H;
};
using FwdFn = void (*)(at::ScalarType, const FwdStep&);
using BwdFn = void (*)(at::ScalarType, const BwdStep&);

struct Steps {
  int64_t T = 0, B = 0;
  std::vector<int64_t> bs, off;  // per time index t
};

// Everything a whole-loop override needs (all tensors contiguous, of x's dtype). act holds
// x W_ih^T (no bias) on entry; the override must leave in y (or hraw), act and c_all what the
// generic loop leaves there. h_n/c_n are filled by the driver afterwards.
struct LoopArgs {
  const Steps* st;
  bool reverse;
  at::Tensor act, c_all, y, h0, c0, w_hh, bias;  // bias: [4H] or undefined
  bool proj;
};
// Returns false (having written nothing) when it does not take these inputs.
using LoopFn = bool (*)(const LoopArgs&);

// The backward time loop's buffers, for an override (no proj_size only). dh [B, P], dc [B, H]:
// the running dL/dh, dL/dc (in: from h_n/c_n; out: dL/dh0, dL/dc0); dy: grad_y [N, P] or
// undefined; dG [N, 4H] out: the gates' gradients of every step.
struct BwdLoopArgs {
  const Steps* st;
  bool reverse;
  at::Tensor dy, dh, dc, act, c_all, c0, w_hh, dG;
  bool proj;
};
using BwdLoopFn = bool (*)(const BwdLoopArgs&);

inline void check_same_kind(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fastbig::lstm_layer: ", name, " is on ", t.device(),
              " but x is on ", x.device(), "; expected all tensors on one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastbig::lstm_layer: ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type(), "; expected one dtype");
}

// Validates every argument; returns the step table.
inline Steps check_layer_args(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                              const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                              const c10::optional<at::Tensor>& w_hr,
                              const c10::optional<at::Tensor>& batch_sizes) {
  TORCH_CHECK(x.dim() == 2, "fastbig::lstm_layer: x must be 2-D [N, input_size], got shape ", x.sizes());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0,
              "fastbig::lstm_layer: w_ih must be [4*hidden_size, input_size], got ", w_ih.sizes());
  const int64_t H = w_ih.size(0) / 4, I = w_ih.size(1);
  const bool proj = w_hr.has_value() && w_hr->defined();
  const int64_t P = proj ? w_hr->size(0) : H;
  TORCH_CHECK(x.size(1) == I, "fastbig::lstm_layer: input.size(-1) must be equal to input_size. Expected ", I,
              ", got ", x.size(1));
  TORCH_CHECK(h0.dim() == 2 && h0.size(1) == P, "fastbig::lstm_layer: h0 must be [B, ", P, "], got ",
              h0.sizes());
  const int64_t B = h0.size(0);
  TORCH_CHECK(B > 0, "fastbig::lstm_layer: batch must be non-empty");
  TORCH_CHECK(c0.dim() == 2 && c0.size(0) == B && c0.size(1) == H, "fastbig::lstm_layer: c0 must be [", B,
              ", ", H, "], got ", c0.sizes());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * H && w_hh.size(1) == P,
              "fastbig::lstm_layer: w_hh must be [", 4 * H, ", ", P, "], got ", w_hh.sizes());
  if (proj) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == H && P > 0 && P < H,
                "fastbig::lstm_layer: w_hr must be [proj_size, ", H, "] with 0 < proj_size < ", H, ", got ",
                w_hr->sizes());
    check_same_kind("w_hr", *w_hr, x);
  }
  for (const auto* b : {&b_ih, &b_hh}) {
    if (b->has_value() && (*b)->defined()) {
      TORCH_CHECK((*b)->dim() == 1 && (*b)->size(0) == 4 * H, "fastbig::lstm_layer: biases must be [", 4 * H,
                  "], got ", (*b)->sizes());
      check_same_kind("bias", **b, x);
    }
  }
  check_same_kind("h0", h0, x);
  check_same_kind("c0", c0, x);
  check_same_kind("w_ih", w_ih, x);
  check_same_kind("w_hh", w_hh, x);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastbig::lstm_layer: x must be floating point, got ",
              x.scalar_type());
  Steps st;
  st.B = B;
  const int64_t N = x.size(0);
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    const auto& bsz = *batch_sizes;
    TORCH_CHECK(bsz.dim() == 1 && bsz.device().is_cpu() && bsz.scalar_type() == at::kLong,
                "fastbig::lstm_layer: batch_sizes must be a 1-D int64 CPU tensor, got ", bsz.sizes(), " ",
                bsz.scalar_type(), " on ", bsz.device());
    const auto bc = bsz.contiguous();
    const int64_t* p = bc.data_ptr<int64_t>();
    st.T = bc.size(0);
    TORCH_CHECK(st.T > 0, "fastbig::lstm_layer: batch_sizes must be non-empty");
    int64_t total = 0;
    for (int64_t t = 0; t < st.T; ++t) {
      TORCH_CHECK(p[t] > 0 && p[t] <= B && (t == 0 || p[t] <= p[t - 1]),
                  "fastbig::lstm_layer: batch_sizes must be positive, non-increasing and at most B=", B,
                  "; got ", bsz);
      st.bs.push_back(p[t]);
      st.off.push_back(total);
      total += p[t];
    }
    TORCH_CHECK(p[0] == B, "fastbig::lstm_layer: batch_sizes[0] must equal h0.size(0)=", B, ", got ", p[0]);
    TORCH_CHECK(total == N, "fastbig::lstm_layer: sum(batch_sizes)=", total, " must equal x.size(0)=", N);
  } else {
    TORCH_CHECK(N > 0 && N % B == 0, "fastbig::lstm_layer: x.size(0)=", N, " must be T*B with B=", B);
    st.T = N / B;
    for (int64_t t = 0; t < st.T; ++t) {
      st.bs.push_back(B);
      st.off.push_back(t * B);
    }
  }
  return st;
}

inline bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// -> y [N, P], h_n [B, P], c_n [B, H], act [N, 4H], c_all [N, H], hraw [N, H] (or [0]: no proj)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& c0_in, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
    FwdFn pointwise, LoopFn loop_override = nullptr) {
  const Steps st = check_layer_args(x_in, h0_in, c0_in, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes);
  const bool proj = defined(w_hr);
  const auto x = x_in.contiguous();
  const auto h0 = h0_in.contiguous();
  const auto c0 = c0_in.contiguous();
  const int64_t N = x.size(0), H = w_ih.size(0) / 4, P = proj ? w_hr->size(0) : H, B = st.B, T = st.T;
  const auto opts = x.options();
  auto act = at::empty({N, 4 * H}, opts);
  auto c_all = at::empty({N, H}, opts);
  auto y = at::empty({N, P}, opts);
  auto hraw = proj ? at::empty({N, H}, opts) : at::empty({0}, opts);
  auto h_n = at::empty({B, P}, opts);
  auto c_n = at::empty({B, H}, opts);
  const auto w_hh_t = w_hh.t();
  const auto w_hr_t = proj ? w_hr->t() : at::Tensor();

  // Input projection for every step at once; the biases are added by the pointwise step.
  at::Tensor bias;
  if (defined(b_ih) && defined(b_hh)) bias = *b_ih + *b_hh;
  else if (defined(b_ih)) bias = *b_ih;
  else if (defined(b_hh)) bias = *b_hh;
  if (bias.defined()) bias = bias.contiguous();
  at::mm_out(act, x, w_ih.t());
  const void* bias_p = bias.defined() ? bias.data_ptr() : nullptr;

  const bool taken =
      loop_override != nullptr &&
      loop_override(LoopArgs{&st, reverse, act, c_all, y, h0, c0, w_hh.contiguous(), bias, proj});
  const int64_t es = x.element_size();
  char* act_p = static_cast<char*>(act.data_ptr());
  char* c_p = static_cast<char*>(c_all.data_ptr());
  char* hout_p = static_cast<char*>(proj ? hraw.data_ptr() : y.data_ptr());
  int64_t tp = -1;
  for (int64_t s = 0; s < T && !taken; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = st.bs[t], off = st.off[t];
    auto g = act.narrow(0, off, n);
    int64_t n_a = 0;
    if (tp >= 0) {
      n_a = std::min(n, st.bs[tp]);
      if (n_a == n) g.addmm_(y.narrow(0, st.off[tp], n), w_hh_t);
      else g.narrow(0, 0, n_a).addmm_(y.narrow(0, st.off[tp], n_a), w_hh_t);
    }
    if (n_a < n) g.narrow(0, n_a, n - n_a).addmm_(h0.narrow(0, n_a, n - n_a), w_hh_t);
    FwdStep fs{act_p + off * 4 * H * es, tp >= 0 ? c_p + st.off[tp] * H * es : nullptr, n_a,
               c0.data_ptr(), c_p + off * H * es, hout_p + off * H * es, n, H, bias_p};
    pointwise(x.scalar_type(), fs);
    if (proj) {
      auto y_t = y.narrow(0, off, n);
      at::mm_out(y_t, hraw.narrow(0, off, n), w_hr_t);
    }
    tp = t;
  }
  // Rows whose sequence ends at step t (those not in the next step): their final state.
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = st.bs[t], off = st.off[t];
    const int64_t n_next = (s + 1 < T) ? st.bs[reverse ? t - 1 : t + 1] : 0;
    if (n_next < n) {
      h_n.narrow(0, n_next, n - n_next).copy_(y.narrow(0, off + n_next, n - n_next));
      c_n.narrow(0, n_next, n - n_next).copy_(c_all.narrow(0, off + n_next, n - n_next));
    }
  }
  return {y, h_n, c_n, act, c_all, hraw};
}

// -> dx [N, I], dh0 [B, P], dc0 [B, H], dw_ih [4H, I], dw_hh [4H, P], db [4H], dw_hr [P, H] (or [0])
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const c10::optional<at::Tensor>& grad_y, const c10::optional<at::Tensor>& grad_hn,
               const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x_in, const at::Tensor& h0_in,
               const at::Tensor& c0_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
               const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& batch_sizes, bool reverse,
               const at::Tensor& y_in, const at::Tensor& act_in, const at::Tensor& c_all_in,
               const at::Tensor& hraw_in, BwdFn pointwise, BwdLoopFn loop_override = nullptr) {
  const Steps st = check_layer_args(x_in, h0_in, c0_in, w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr, batch_sizes);
  const bool proj = defined(w_hr);
  const int64_t N = x_in.size(0), H = w_ih.size(0) / 4, P = proj ? w_hr->size(0) : H, B = st.B, T = st.T;
  auto expect = [&](const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape) {
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "fastbig::lstm_layer_backward: ", name, " must be ",
                at::IntArrayRef(shape), ", got ", t.sizes());
    check_same_kind(name, t, x_in);
  };
  expect("y", y_in, {N, P});
  expect("act", act_in, {N, 4 * H});
  expect("c_all", c_all_in, {N, H});
  if (proj) expect("hraw", hraw_in, {N, H});
  const auto x = x_in.contiguous();
  const auto h0 = h0_in.contiguous();
  const auto c0 = c0_in.contiguous();
  const auto y = y_in.contiguous();
  const auto act = act_in.contiguous();
  const auto c_all = c_all_in.contiguous();
  const auto opts = x.options();
  at::Tensor dy;
  if (defined(grad_y)) {
    expect("grad_y", *grad_y, {N, P});
    dy = grad_y->contiguous();
  }
  at::Tensor dh = at::zeros({B, P}, opts), dc = at::zeros({B, H}, opts);  // running dL/dh, dL/dc
  if (defined(grad_hn)) {
    expect("grad_h_n", *grad_hn, {B, P});
    dh.copy_(*grad_hn);
  }
  if (defined(grad_cn)) {
    expect("grad_c_n", *grad_cn, {B, H});
    dc.copy_(*grad_cn);
  }
  auto dG = at::empty({N, 4 * H}, opts);
  at::Tensor dht, dhraw;  // projections: dL/dh_t for every step, and dL/dhraw of one step
  if (proj) {
    dht = at::empty({N, P}, opts);
    dhraw = at::empty({B, H}, opts);
  }
  const int64_t es = x.element_size();
  const char* act_p = static_cast<const char*>(act.data_ptr());
  const char* c_p = static_cast<const char*>(c_all.data_ptr());
  char* dG_p = static_cast<char*>(dG.data_ptr());
  const bool taken = loop_override != nullptr &&
                     loop_override(BwdLoopArgs{&st, reverse, dy, dh, dc, act, c_all, c0, w_hh.contiguous(), dG, proj});
  for (int64_t s = T - 1; s >= 0 && !taken; --s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = st.bs[t], off = st.off[t];
    const int64_t tp = s > 0 ? (reverse ? t + 1 : t - 1) : -1;
    const int64_t n_a = tp >= 0 ? std::min(n, st.bs[tp]) : 0;
    const void* dh_a;
    const void* dh_b = nullptr;
    if (proj) {
      auto d = dht.narrow(0, off, n);
      if (dy.defined()) at::add_out(d, dh.narrow(0, 0, n), dy.narrow(0, off, n));
      else d.copy_(dh.narrow(0, 0, n));
      auto dhr = dhraw.narrow(0, 0, n);
      at::mm_out(dhr, d, *w_hr);
      dh_a = dhraw.data_ptr();
    } else {
      dh_a = dh.data_ptr();
      if (dy.defined()) dh_b = static_cast<const char*>(dy.data_ptr()) + off * P * es;
    }
    BwdStep bs{dh_a, dh_b, dc.data_ptr(), act_p + off * 4 * H * es, tp >= 0 ? c_p + st.off[tp] * H * es : nullptr,
               n_a, c0.data_ptr(), c_p + off * H * es, dG_p + off * 4 * H * es, n, H};
    pointwise(x.scalar_type(), bs);
    auto dh_prev = dh.narrow(0, 0, n);
    at::mm_out(dh_prev, dG.narrow(0, off, n), w_hh);
  }
  // h_prev of every row of every step, for dW_hh in one GEMM.
  auto hprev = at::empty({N, P}, opts);
  const bool uniform = st.bs.front() == st.bs.back();
  if (uniform && T > 1) {
    if (!reverse) {
      hprev.narrow(0, 0, B).copy_(h0);
      hprev.narrow(0, B, N - B).copy_(y.narrow(0, 0, N - B));
    } else {
      hprev.narrow(0, N - B, B).copy_(h0);
      hprev.narrow(0, 0, N - B).copy_(y.narrow(0, B, N - B));
    }
  } else {
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n = st.bs[t], off = st.off[t];
      const int64_t tp = s > 0 ? (reverse ? t + 1 : t - 1) : -1;
      const int64_t n_a = tp >= 0 ? std::min(n, st.bs[tp]) : 0;
      if (n_a > 0) hprev.narrow(0, off, n_a).copy_(y.narrow(0, st.off[tp], n_a));
      if (n_a < n) hprev.narrow(0, off + n_a, n - n_a).copy_(h0.narrow(0, n_a, n - n_a));
    }
  }
  const auto dGt = dG.t();
  auto dx = at::mm(dG, w_ih);
  auto dw_ih = at::mm(dGt, x);
  auto dw_hh = at::mm(dGt, hprev);
  auto db = dG.sum(0);
  auto dw_hr = proj ? at::mm(dht.t(), hraw_in.contiguous()) : at::empty({0}, opts);
  return {dx, dh, dc, dw_ih, dw_hh, db, dw_hr};
}

}  // namespace lstm
}  // namespace fastbig

// CPU 1x1 convolution (stride 1, no padding, groups 1) + bias + activation, the epilogue
// applied to each output block while that block is still in L2 (fastbig/ops/conv_bn_relu.py
// uses it for eval, where BatchNorm is folded into weight and bias).
//
// A 1x1 conv is one GEMM per image:
//   NCHW:          out[n] [Cout x HW] = W [Cout x Cin] @ x[n] [Cin x HW]
//   channels_last: out [N*HW x Cout]  = x [N*HW x Cin] @ W^T  (all images are one matrix)
// The output columns (NCHW: HW of one image; channels_last: rows of N*HW) are split into blocks
// whose input and output slices fit in L2 together; each block is one BLAS sgemm/dgemm call (the
// BLAS torch links, MKL on x86; inside at::parallel_for it runs on the calling thread) followed at once by out = act(out + bias) on that block: the output is written to memory once
// instead of written by the GEMM and then read and written again by a separate pass.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>

#include "conv_bn_relu/conv_bn_relu_math.h"
#include "common/blas.h"
#include "common/cpu_clones.h"

namespace fastbig {
namespace cbr {
namespace {

// Column-major C [m x n] = op(A) [m x k] @ B [k x n] (common/blas.h). Sizes were checked to fit in int.
template <typename T>
inline void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
                 T* c, int64_t ldc) {
  blas::gemm(trans_a, false, m, n, k, a, lda, b, ldb, T(0), c, ldc);
}

// Bytes of one task's working set (input slice + output slice + weight): half of a 512 KiB L2.
constexpr int64_t kBlockBytes = 256 * 1024;

// Columns per block for `cols` columns per image and N images: about the L2 budget, but at
// least 256 (a GEMM with fewer output columns runs well below MKL's peak: with Cin = Cout = 256
// the budget alone gave 64, and 14x14 images ran slower than torch's one GEMM per image),
// evened out over the image, and split further (down to 64) when there would be fewer blocks
// than threads.
template <typename scalar_t>
int64_t block_columns(int64_t Cin, int64_t Cout, int64_t cols, int64_t N) {
  const int64_t elems = kBlockBytes / int64_t(sizeof(scalar_t));
  const int64_t budget = (elems - Cin * Cout) / (Cin + Cout);
  int64_t nb = (cols + std::max<int64_t>(256, budget) - 1) / std::max<int64_t>(256, budget);
  const int64_t nt = at::get_num_threads();
  if (N * nb < nt) nb = std::max(nb, std::min((cols + 63) / 64, (nt + N - 1) / N));
  const int64_t bs = (cols + nb - 1) / nb;
  return std::min(cols, (bs + 15) / 16 * 16);
}

// The epilogue out = act(out + bias) on one output block: rows of len elements ld apart, the bias
// per row (NCHW: a row is one output channel) or per column (channels_last: a row is one pixel).
// The extension is compiled for baseline x86-64; the pass is cloned for AVX2 (cpu_clones.h), so
// it keeps up with the GEMM that just wrote the block.
template <int64_t act, bool bias_per_row, typename T>
FB_CPU_INLINE void epilogue_body(T* out, int64_t ld, int64_t rows, int64_t len, const T* bias, T slope) {
  for (int64_t r = 0; r < rows; ++r) {
    T* p = out + r * ld;
    if (bias == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) p[i] = act_forward(p[i], act, slope);
    } else if (bias_per_row) {
      const T b = bias[r];
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) p[i] = act_forward(p[i] + b, act, slope);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) p[i] = act_forward(p[i] + bias[i], act, slope);
    }
  }
}

#define FB_EPILOGUE(T)                                                                                     \
  FB_CPU_CLONES void epilogue(T* out, int64_t ld, int64_t rows, int64_t len, const T* bias, bool per_row,    \
                              int64_t act, T slope) {                                                       \
    if (act == kRelu) {                                                                                    \
      per_row ? epilogue_body<kRelu, true>(out, ld, rows, len, bias, slope)                                \
              : epilogue_body<kRelu, false>(out, ld, rows, len, bias, slope);                              \
    } else if (act == kLeakyRelu) {                                                                        \
      per_row ? epilogue_body<kLeakyRelu, true>(out, ld, rows, len, bias, slope)                           \
              : epilogue_body<kLeakyRelu, false>(out, ld, rows, len, bias, slope);                         \
    } else {                                                                                               \
      per_row ? epilogue_body<kNone, true>(out, ld, rows, len, bias, slope)                                \
              : epilogue_body<kNone, false>(out, ld, rows, len, bias, slope);                              \
    }                                                                                                      \
  }
FB_EPILOGUE(float)
FB_EPILOGUE(double)
#undef FB_EPILOGUE

template <int64_t act, typename scalar_t>
void conv1x1_nchw(const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* out, int64_t N,
                  int64_t Cin, int64_t Cout, int64_t HW, scalar_t slope) {
  const int64_t bs = block_columns<scalar_t>(Cin, Cout, HW, N);
  const int64_t nb = (HW + bs - 1) / bs;
  at::parallel_for(0, N * nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / nb, hw0 = (t % nb) * bs, len = std::min(bs, HW - hw0);
      const scalar_t* xb = x + n * Cin * HW + hw0;
      scalar_t* ob = out + n * Cout * HW + hw0;
      // column-major view: ob^T [len x Cout] (ld HW) = xb^T [len x Cin] (ld HW) @ W^T [Cin x Cout] (ld Cin)
      gemm(false, len, Cout, Cin, xb, HW, w, Cin, ob, HW);
      if (act != kNone || bias != nullptr) epilogue(ob, HW, Cout, len, bias, true, act, slope);
    }
  });
}

template <int64_t act, typename scalar_t>
void conv1x1_nhwc(const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* out, int64_t M,
                  int64_t Cin, int64_t Cout, scalar_t slope) {
  const int64_t bs = block_columns<scalar_t>(Cin, Cout, M, 1);
  const int64_t nb = (M + bs - 1) / bs;
  at::parallel_for(0, nb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * bs, len = std::min(bs, M - r0);
      const scalar_t* xb = x + r0 * Cin;
      scalar_t* ob = out + r0 * Cout;
      // column-major view: ob^T [Cout x len] (ld Cout) = W [Cout x Cin] (W^T stored, ld Cin) @ xb^T [Cin x len]
      gemm(true, Cout, len, Cin, w, Cin, xb, Cin, ob, Cout);
      if (act != kNone || bias != nullptr) epilogue(ob, Cout, len, Cout, bias, false, act, slope);
    }
  });
}

at::Tensor conv1x1_act_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
                           int64_t act, double slope) {
  TORCH_CHECK(x.device().is_cpu(), "conv1x1_act (cpu): x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "conv1x1_act: x must be 4-D [N, Cin, H, W], got ", x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "conv1x1_act: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1 && weight.size(1) == x.size(1),
              "conv1x1_act: weight must be [Cout, ", x.size(1), ", 1, 1], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              "conv1x1_act: weight must be ", x.scalar_type(), " on ", x.device(), ", got ", weight.scalar_type(),
              " on ", weight.device());
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3), Cout = weight.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = *bias_in;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == Cout, "conv1x1_act: bias must be [", Cout, "], got ",
                bias.sizes());
    TORCH_CHECK(bias.scalar_type() == x.scalar_type() && bias.device() == x.device(), "conv1x1_act: bias must be ",
                x.scalar_type(), " on ", x.device(), ", got ", bias.scalar_type(), " on ", bias.device());
    bias = bias.contiguous();
  }
  TORCH_CHECK(act == kNone || act == kRelu || act == kLeakyRelu,
              "conv1x1_act: act must be 0 (none), 1 (relu) or 2 (leaky_relu), got ", act);
  // channels_last stays channels_last (as torch's conv does); anything else is read as NCHW
  const bool nhwc = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xin = nhwc ? x : x.contiguous();
  const at::Tensor w = weight.reshape({Cout, Cin}).contiguous();  // [Cout, Cin] row-major
  auto out = at::empty({N, Cout, H, W}, x.options().memory_format(nhwc ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  TORCH_CHECK(blas::available(),
              "conv1x1_act: this torch exports no BLAS sgemm_/dgemm_ (built without MKL); use torch's conv");
  constexpr int64_t kIntMax = 2147483647;
  TORCH_CHECK(H * W <= kIntMax && Cin <= kIntMax && Cout <= kIntMax,
              "conv1x1_act: sizes must fit 32-bit BLAS indices, got x ", x.sizes(), " and weight ", weight.sizes());
  TORCH_CHECK(Cin > 0, "conv1x1_act: x must have at least one channel, got shape ", x.sizes());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv1x1_act_cpu", [&] {
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const auto s = scalar_t(slope);
    auto run = [&](auto A) {
      constexpr int64_t a = decltype(A)::value;
      if (nhwc) {
        conv1x1_nhwc<a, scalar_t>(xin.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(),
                                  N * H * W, Cin, Cout, s);
      } else {
        conv1x1_nchw<a, scalar_t>(xin.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bp, out.data_ptr<scalar_t>(), N,
                                  Cin, Cout, H * W, s);
      }
    };
    if (act == kRelu) {
      run(std::integral_constant<int64_t, kRelu>{});
    } else if (act == kLeakyRelu) {
      run(std::integral_constant<int64_t, kLeakyRelu>{});
    } else {
      run(std::integral_constant<int64_t, kNone>{});
    }
  });
  return out;
}

}  // namespace
}  // namespace cbr
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("conv1x1_act", &fastbig::cbr::conv1x1_act_cpu);
}

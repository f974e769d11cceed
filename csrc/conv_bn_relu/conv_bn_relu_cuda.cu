// CUDA kernels of the fused BatchNorm (batch statistics) + activation after a conv. Launch code
// only: grid, block, indexing, shared-memory staging. The arithmetic is common/welford.h and
// conv_bn_relu/conv_bn_relu_math.h, shared with the CPU path (conv_bn_relu_cpu.cpp).
//
// Forward:  stats_partial (per-thread Welford, block-level Chan merge in shared memory, one
//           partial per (split, channel)) -> stats_finalize (grid-level Chan merge of the
//           partials per channel, in a fixed order: deterministic; mean, var, invstd and the
//           affine coefficients) -> normalize_act (fused normalize + affine + activation).
// Backward: backward_partial (S1 = sum dy', S2 = sum dy' (z - m) per block) -> backward_finalize
//           (dgamma, dbeta, per-channel coefficients) -> backward_elem (dz).
// Two kernels per reduction instead of a host sync. Layouts read in place:
//   NCHW: a block's 256 threads walk consecutive hw of one channel (coalesced).
//   NHWC: a block is 32 channels x 8 rows; a warp reads 32 consecutive channels (coalesced).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "common/welford.h"
#include "conv_bn_relu/conv_bn_relu.h"
#include "conv_bn_relu/conv_bn_relu_math.h"

namespace fastbig {
namespace cbr {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 32;                   // NHWC: channels per block (threadIdx.x)
constexpr int kTileR = kThreads / kTileC;    // NHWC: rows per block step (threadIdx.y)

template <typename acc_t>
struct Sums2 {
  acc_t s1, s2;
};

template <typename acc_t>
__device__ __forceinline__ Sums2<acc_t> sums_merge(const Sums2<acc_t>& a, const Sums2<acc_t>& b) {
  return Sums2<acc_t>{a.s1 + b.s1, a.s2 + b.s2};
}

// Tree reduction of one value per thread over the threads that share a channel: all 256 (NCHW,
// step 1) or the 8 rows of a column (NHWC, step 32). The result lands in the threads with
// tid < step. Merge order is fixed, so results are deterministic.
template <typename S, typename Merge>
__device__ __forceinline__ S block_reduce(S v, S* smem, int step, Merge merge) {
  const int tid = threadIdx.x;
  smem[tid] = v;
  __syncthreads();
  for (int s = (kThreads / step) / 2; s > 0; s >>= 1) {
    if (tid / step < s) smem[tid] = merge(smem[tid], smem[tid + s * step]);
    __syncthreads();
  }
  S r = smem[tid % step];
  __syncthreads();
  return r;
}

// Slice [lo, hi) of the reduction range of split `split` out of `splits`.
__device__ __forceinline__ void split_range(int64_t total, int64_t splits, int64_t split, int64_t& lo,
                                            int64_t& hi) {
  const int64_t len = (total + splits - 1) / splits;
  lo = split * len;
  hi = lo + len < total ? lo + len : total;
}

// The per-channel reduction both statistics kernels run (stats_partial: Welford of z;
// backward_partial: the sums of dy' and dy' (z - m)): for each channel of this block, fold the
// elements of split blockIdx.x of the channel's N*HW into a per-thread S, starting from `zero`,
// with update(s, offset of the element), merge the block's threads in a fixed order and write
// part[c * splits + split]. for_channel(c) gives channel c's update (it reads the channel's
// numbers once; NHWC calls it only for c < C).
//   NCHW: blockIdx.y strides over channels; the block's 256 threads walk consecutive hw of one
//         channel (coalesced); hw carries into n without a division per element.
//   NHWC: blockIdx.y strides over tiles of 32 channels x 8 rows; a warp reads 32 consecutive
//         channels of a row (coalesced).
template <bool kNHWC, typename S, typename ForChannel, typename Merge>
__device__ __forceinline__ void channel_partials(int64_t N, int64_t C, int64_t HW, S zero, ForChannel for_channel,
                                                 Merge merge, S* smem, S* __restrict__ part) {
  const int64_t splits = gridDim.x, split = blockIdx.x;
  if (!kNHWC) {
    for (int64_t c = blockIdx.y; c < C; c += gridDim.y) {
      const auto update = for_channel(c);
      int64_t lo, hi;
      split_range(N * HW, splits, split, lo, hi);
      S s = zero;
      int64_t j = lo + threadIdx.x;
      int64_t n = j / HW, hw = j - n * HW;
      for (; j < hi; j += kThreads) {
        update(s, (n * C + c) * HW + hw);
        hw += kThreads;
        if (hw >= HW) {
          const int64_t q = hw / HW;
          n += q;
          hw -= q * HW;
        }
      }
      s = block_reduce(s, smem, 1, merge);
      if (threadIdx.x == 0) part[c * splits + split] = s;
    }
  } else {
    const int tx = threadIdx.x % kTileC, ty = threadIdx.x / kTileC;
    const int64_t M = N * HW;
    for (int64_t c0 = (int64_t)blockIdx.y * kTileC; c0 < C; c0 += (int64_t)gridDim.y * kTileC) {
      const int64_t c = c0 + tx;
      int64_t lo, hi;
      split_range(M, splits, split, lo, hi);
      S s = zero;
      if (c < C) {
        const auto update = for_channel(c);
        for (int64_t r = lo + ty; r < hi; r += kTileR) update(s, r * C + c);
      }
      s = block_reduce(s, smem, kTileC, merge);
      if (ty == 0 && c < C) part[c * splits + split] = s;
    }
  }
}

// ---- forward: statistics --------------------------------------------------------------------
template <typename scalar_t, typename acc_t, bool kNHWC>
__global__ void stats_partial_kernel(const scalar_t* __restrict__ z, int64_t N, int64_t C, int64_t HW,
                                     Welford<acc_t>* __restrict__ part) {
  __shared__ Welford<acc_t> smem[kThreads];
  auto merge = [](const Welford<acc_t>& a, const Welford<acc_t>& b) { return welford_merge(a, b); };
  auto for_channel = [=](int64_t) {
    return [=](Welford<acc_t>& w, int64_t off) { welford_update(w, acc_t(z[off])); };
  };
  channel_partials<kNHWC>(N, C, HW, welford_init<acc_t>(), for_channel, merge, smem, part);
}

// One thread per channel: Chan merge of the partials in split order, then the per-channel
// numbers the normalize pass and the backward need.
template <typename acc_t>
__global__ void stats_finalize_kernel(const Welford<acc_t>* __restrict__ part, int64_t C, int64_t splits,
                                      acc_t eps, const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                      acc_t* __restrict__ mean, acc_t* __restrict__ var, acc_t* __restrict__ invstd,
                                      acc_t* __restrict__ coef /* [2, C]: a, beta */) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford<acc_t> w = welford_init<acc_t>();
  for (int64_t s = 0; s < splits; ++s) w = welford_merge(w, part[c * splits + s]);
  const acc_t v = welford_var_biased(w);
  const acc_t is = invstd_of<acc_t>(v, eps);
  mean[c] = w.mean;
  var[c] = v;
  invstd[c] = is;
  coef[c] = bn_scale<acc_t>(gamma ? gamma[c] : acc_t(1), is);
  coef[C + c] = beta ? beta[c] : acc_t(0);
}

// ---- forward: normalize + affine + activation ----------------------------------------------
template <typename scalar_t, typename acc_t, bool kNHWC>
__global__ void normalize_act_kernel(const scalar_t* __restrict__ z, scalar_t* __restrict__ y, int64_t N,
                                     int64_t C, int64_t HW, const acc_t* __restrict__ mean,
                                     const acc_t* __restrict__ coef, int64_t act, acc_t slope) {
  if (!kNHWC) {  // blockIdx.y walks the (n, c) planes, x the hw of a plane
    for (int64_t p = blockIdx.y; p < N * C; p += gridDim.y) {
      const int64_t c = p % C;
      const acc_t m = mean[c], a = coef[c], be = coef[C + c];
      const scalar_t* zp = z + p * HW;
      scalar_t* yp = y + p * HW;
      for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < HW; i += (int64_t)gridDim.x * kThreads)
        yp[i] = scalar_t(act_forward(bn_pre(acc_t(zp[i]), m, a, be), act, slope));
    }
  } else {
    const int64_t total = N * HW * C;
    for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < total; i += (int64_t)gridDim.x * kThreads) {
      const int64_t c = i % C;
      y[i] = scalar_t(act_forward(bn_pre(acc_t(z[i]), mean[c], coef[c], coef[C + c]), act, slope));
    }
  }
}

// ---- backward ---------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t, bool kNHWC>
__global__ void backward_partial_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ z,
                                        int64_t N, int64_t C, int64_t HW, const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ coef, int64_t act, acc_t slope,
                                        Sums2<acc_t>* __restrict__ part) {
  __shared__ Sums2<acc_t> smem[kThreads];
  auto merge = [](const Sums2<acc_t>& a, const Sums2<acc_t>& b) { return sums_merge(a, b); };
  auto for_channel = [=](int64_t c) {
    const acc_t m = mean[c], a = coef[c], be = coef[C + c];
    return [=](Sums2<acc_t>& s, int64_t off) {
      const acc_t zv = acc_t(z[off]);
      const acc_t g = act_backward(acc_t(dy[off]), bn_pre(zv, m, a, be), act, slope);
      s.s1 += g;
      s.s2 += g * (zv - m);
    };
  };
  channel_partials<kNHWC>(N, C, HW, Sums2<acc_t>{acc_t(0), acc_t(0)}, for_channel, merge, smem, part);
}

template <typename acc_t>
__global__ void backward_finalize_kernel(const Sums2<acc_t>* __restrict__ part, int64_t C, int64_t splits,
                                         int64_t n, const acc_t* __restrict__ invstd,
                                         const acc_t* __restrict__ gamma, acc_t* __restrict__ dgamma,
                                         acc_t* __restrict__ dbeta, acc_t* __restrict__ bcoef /* [3, C] */) {
  const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (c >= C) return;
  Sums2<acc_t> s{acc_t(0), acc_t(0)};
  for (int64_t k = 0; k < splits; ++k) s = sums_merge(s, part[c * splits + k]);
  const BackwardCoeffs<acc_t> k = bn_backward_coeffs<acc_t>(s.s1, s.s2, invstd[c], gamma ? gamma[c] : acc_t(1), n);
  dgamma[c] = k.dgamma;
  dbeta[c] = k.dbeta;
  bcoef[c] = k.k;
  bcoef[C + c] = k.g_mean;
  bcoef[2 * C + c] = k.g_proj;
}

template <typename scalar_t, typename acc_t, bool kNHWC>
__global__ void backward_elem_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ z,
                                     scalar_t* __restrict__ dz, int64_t N, int64_t C, int64_t HW,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ coef,
                                     const acc_t* __restrict__ bcoef, int64_t act, acc_t slope) {
  if (!kNHWC) {
    for (int64_t p = blockIdx.y; p < N * C; p += gridDim.y) {
      const int64_t c = p % C;
      const acc_t m = mean[c], a = coef[c], be = coef[C + c];
      const BackwardCoeffs<acc_t> k{bcoef[c], bcoef[C + c], bcoef[2 * C + c], acc_t(0), acc_t(0)};
      const int64_t base = p * HW;
      for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < HW; i += (int64_t)gridDim.x * kThreads) {
        const acc_t zv = acc_t(z[base + i]);
        const acc_t g = act_backward(acc_t(dy[base + i]), bn_pre(zv, m, a, be), act, slope);
        dz[base + i] = scalar_t(bn_backward_elem(g, zv, m, k));
      }
    }
  } else {
    const int64_t total = N * HW * C;
    for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < total; i += (int64_t)gridDim.x * kThreads) {
      const int64_t c = i % C;
      const acc_t zv = acc_t(z[i]);
      const acc_t g = act_backward(acc_t(dy[i]), bn_pre(zv, mean[c], coef[c], coef[C + c]), act, slope);
      const BackwardCoeffs<acc_t> k{bcoef[c], bcoef[C + c], bcoef[2 * C + c], acc_t(0), acc_t(0)};
      dz[i] = scalar_t(bn_backward_elem(g, zv, mean[c], k));
    }
  }
}

// ---- running statistics: one block; every thread reads num_batches_tracked before thread 0
// writes the increment, so no host sync and no race.
template <typename scalar_t, typename acc_t>
__global__ void running_update_kernel(scalar_t* __restrict__ rm, scalar_t* __restrict__ rv,
                                      int64_t* __restrict__ nbt, const acc_t* __restrict__ mean,
                                      const acc_t* __restrict__ var, int64_t C, int64_t count, bool has_momentum,
                                      acc_t momentum) {
  const int64_t tracked = nbt[0] + 1;
  __syncthreads();
  if (threadIdx.x == 0) nbt[0] = tracked;
  const acc_t factor = has_momentum ? momentum : acc_t(1) / acc_t(tracked);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t a = acc_t(rm[c]), b = acc_t(rv[c]);
    running_update<acc_t>(a, b, mean[c], var[c], count, factor);
    rm[c] = scalar_t(a);
    rv[c] = scalar_t(b);
  }
}

// ---- launch helpers --------------------------------------------------------------------------
inline int64_t num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Splits of the reduction range so that the grid holds ~4 blocks per SM and each thread still
// reduces >= 8 elements.
inline int64_t reduction_splits(int64_t range, int64_t channel_blocks, int64_t per_block_step) {
  const int64_t target = std::max<int64_t>(1, (4 * num_sms() + channel_blocks - 1) / channel_blocks);
  const int64_t most = std::max<int64_t>(1, range / (per_block_step * 8));
  return std::min<int64_t>(std::min(target, most), 1024);
}

struct Grid {
  dim3 grid;
  int64_t splits;
};

inline Grid reduction_grid(Layout layout, int64_t N, int64_t C, int64_t HW) {
  const int64_t cblocks = layout == Layout::NCHW ? C : (C + kTileC - 1) / kTileC;
  const int64_t step = layout == Layout::NCHW ? kThreads : kTileR;
  const int64_t splits = reduction_splits(N * HW, cblocks, step);
  return {dim3((unsigned)splits, (unsigned)std::min<int64_t>(cblocks, 65535)), splits};
}

inline dim3 elementwise_grid(Layout layout, int64_t N, int64_t C, int64_t HW) {
  if (layout == Layout::NCHW) {
    const int64_t planes = N * C;
    const int64_t x = std::max<int64_t>(1, std::min<int64_t>((HW + kThreads - 1) / kThreads, 64));
    const int64_t y = std::max<int64_t>(1, std::min<int64_t>(planes, std::max<int64_t>(1, 32 * num_sms() / x)));
    return dim3((unsigned)x, (unsigned)std::min<int64_t>(y, 65535));
  }
  const int64_t total = N * HW * C;
  return dim3((unsigned)std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 32 * num_sms())));
}

inline at::Tensor acc_param(const c10::optional<at::Tensor>& p, at::ScalarType acc) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  return p->to(acc).contiguous();
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// ---- the ops ---------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cuda(
    const at::Tensor& z_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps, int64_t act, double slope) {
  check_forward(z_in, weight, bias, eps, act, slope);
  TORCH_CHECK(z_in.is_cuda(), "bn_act_forward (cuda): z must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(z_in.device());
  auto [z, layout] = as_kernel_layout(z_in);
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3);
  const auto acc = acc_type_of(z.scalar_type());
  const auto acc_opts = z.options().dtype(acc);
  auto mean = at::empty({C}, acc_opts);
  auto var = at::empty({C}, acc_opts);
  auto invstd = at::empty({C}, acc_opts);
  auto coef = at::empty({2, C}, acc_opts);
  auto y = empty_in_layout(z, layout);
  const auto gamma = acc_param(weight, acc);
  const auto beta = acc_param(bias, acc);
  const Grid rg = reduction_grid(layout, N, C, HW);
  const dim3 eg = elementwise_grid(layout, N, C, HW);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "bn_act_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto part = at::empty({C * rg.splits * (int64_t)sizeof(Welford<acc_t>)}, z.options().dtype(at::kByte));
    auto* pp = reinterpret_cast<Welford<acc_t>*>(part.data_ptr());
    if (layout == Layout::NCHW)
      stats_partial_kernel<scalar_t, acc_t, false><<<rg.grid, kThreads, 0, stream>>>(z.data_ptr<scalar_t>(), N, C,
                                                                                      HW, pp);
    else
      stats_partial_kernel<scalar_t, acc_t, true><<<rg.grid, kThreads, 0, stream>>>(z.data_ptr<scalar_t>(), N, C,
                                                                                     HW, pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    stats_finalize_kernel<acc_t><<<(unsigned)((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        pp, C, rg.splits, acc_t(eps), ptr_or_null<acc_t>(gamma), ptr_or_null<acc_t>(beta), mean.data_ptr<acc_t>(),
        var.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), coef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (layout == Layout::NCHW)
      normalize_act_kernel<scalar_t, acc_t, false><<<eg, kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, HW, mean.data_ptr<acc_t>(), coef.data_ptr<acc_t>(),
          act, acc_t(slope));
    else
      normalize_act_kernel<scalar_t, acc_t, true><<<eg, kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), N, C, HW, mean.data_ptr<acc_t>(), coef.data_ptr<acc_t>(),
          act, acc_t(slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, invstd, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, int64_t act, double slope) {
  check_backward(dy_in, z_in, mean, invstd, weight, bias, act, slope);
  TORCH_CHECK(z_in.is_cuda(), "bn_act_backward (cuda): z must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(z_in.device());
  auto [z, layout] = as_kernel_layout(z_in);
  const auto dy = in_layout(dy_in.to(z.scalar_type()), layout);
  const int64_t N = z.size(0), C = z.size(1), HW = z.size(2) * z.size(3);
  const auto acc = acc_type_of(z.scalar_type());
  const auto acc_opts = z.options().dtype(acc);
  const auto m = mean.contiguous();
  const auto is = invstd.contiguous();
  const auto gamma = acc_param(weight, acc);
  const auto beta = acc_param(bias, acc);
  // the forward's affine coefficients again (C elements): a = gamma * invstd, beta
  const auto a = gamma.defined() ? gamma * is : is;
  const auto coef = at::stack({a, beta.defined() ? beta : at::zeros_like(is)}).contiguous();
  auto dz = empty_in_layout(z, layout);
  auto dgamma = at::empty({C}, acc_opts);
  auto dbeta = at::empty({C}, acc_opts);
  auto bcoef = at::empty({3, C}, acc_opts);
  const Grid rg = reduction_grid(layout, N, C, HW);
  const dim3 eg = elementwise_grid(layout, N, C, HW);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto part = at::empty({C * rg.splits * (int64_t)sizeof(Sums2<acc_t>)}, z.options().dtype(at::kByte));
    auto* pp = reinterpret_cast<Sums2<acc_t>*>(part.data_ptr());
    if (layout == Layout::NCHW)
      backward_partial_kernel<scalar_t, acc_t, false><<<rg.grid, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), N, C, HW, m.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), act,
          acc_t(slope), pp);
    else
      backward_partial_kernel<scalar_t, acc_t, true><<<rg.grid, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), N, C, HW, m.data_ptr<acc_t>(), coef.data_ptr<acc_t>(), act,
          acc_t(slope), pp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    backward_finalize_kernel<acc_t><<<(unsigned)((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        pp, C, rg.splits, N * HW, is.data_ptr<acc_t>(), ptr_or_null<acc_t>(gamma), dgamma.data_ptr<acc_t>(),
        dbeta.data_ptr<acc_t>(), bcoef.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (layout == Layout::NCHW)
      backward_elem_kernel<scalar_t, acc_t, false><<<eg, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), N, C, HW, m.data_ptr<acc_t>(),
          coef.data_ptr<acc_t>(), bcoef.data_ptr<acc_t>(), act, acc_t(slope));
    else
      backward_elem_kernel<scalar_t, acc_t, true><<<eg, kThreads, 0, stream>>>(
          dy.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), N, C, HW, m.data_ptr<acc_t>(),
          coef.data_ptr<acc_t>(), bcoef.data_ptr<acc_t>(), act, acc_t(slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dz, dgamma, dbeta};
}

void bn_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                                  at::Tensor& num_batches_tracked, const at::Tensor& mean, const at::Tensor& var,
                                  int64_t count, c10::optional<double> momentum) {
  check_running(running_mean, running_var, num_batches_tracked, mean, var, count, momentum);
  TORCH_CHECK(mean.is_cuda(), "bn_update_running_stats_ (cuda): tensors must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = mean.numel();
  const auto m = mean.contiguous();
  const auto v = var.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_running_cuda", [&] {
    using rs_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "bn_running_cuda_acc", [&] {
      running_update_kernel<rs_t, scalar_t><<<1, kThreads, 0, stream>>>(
          running_mean.data_ptr<rs_t>(), running_var.data_ptr<rs_t>(), num_batches_tracked.data_ptr<int64_t>(),
          m.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), C, count, momentum.has_value(),
          scalar_t(momentum.has_value() ? *momentum : 0.0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace
}  // namespace cbr
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CUDA, m) {
  m.impl("bn_act_forward", &fastbig::cbr::bn_act_forward_cuda);
  m.impl("bn_act_backward", &fastbig::cbr::bn_act_backward_cuda);
  m.impl("bn_update_running_stats_", &fastbig::cbr::bn_update_running_stats_cuda);
}

// CPU kernels of the LSTM ops: ATen GEMMs plus parallel pointwise loops over lstm_math.h.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdlib>
#include <limits>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/blas.h"
#include "lstm/lstm_cell.h"
#include "lstm/lstm_layer.h"
#include "lstm/lstm_math.h"
#include "lstm/lstm_simd.h"

namespace fastbig {
namespace lstm {
namespace {

// Rows of the batch are independent; grain so each task touches >= ~16K elements.
inline int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, 4 * H)); }

void layer_fwd_pointwise_cpu(at::ScalarType st, const FwdStep& s);
void layer_bwd_pointwise_cpu(at::ScalarType st, const BwdStep& s);

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


// ---- whole-layer op: the per-step pointwise kernels ------------------------------------------
// Rows of one step in parallel; each row's H elements 8 at a time through the SIMD instantiation
// of cell_forward/cell_backward (float), the tail and other dtypes through the scalar one.

template <typename scalar_t>
inline void fwd_row_scalar(int64_t j0, int64_t j1, int64_t H, scalar_t* g, const scalar_t* cp, scalar_t* c, scalar_t* h,
                           const scalar_t* bias) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = j0; j < j1; ++j) {
    Gates<acc_t> a;
    acc_t cv, hv;
    acc_t ai = g[j], af = g[H + j], ag = g[2 * H + j], ao = g[3 * H + j];
    if (bias) {
      ai += acc_t(bias[j]);
      af += acc_t(bias[H + j]);
      ag += acc_t(bias[2 * H + j]);
      ao += acc_t(bias[3 * H + j]);
    }
    cell_forward<acc_t>(ai, af, ag, ao, cp[j], a, cv, hv);
    g[j] = a.i;
    g[H + j] = a.f;
    g[2 * H + j] = a.g;
    g[3 * H + j] = a.o;
    c[j] = cv;
    h[j] = hv;
  }
}

template <typename scalar_t>
inline void bwd_row_scalar(int64_t j0, int64_t j1, int64_t H, const scalar_t* dha, const scalar_t* dhb, scalar_t* dc,
                           const scalar_t* act, const scalar_t* cp, const scalar_t* c, scalar_t* dg) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = j0; j < j1; ++j) {
    Gates<acc_t> a{act[j], act[H + j], act[2 * H + j], act[3 * H + j]};
    Gates<acc_t> d;
    acc_t dcp;
    const acc_t dh = acc_t(dha[j]) + (dhb ? acc_t(dhb[j]) : acc_t(0));
    cell_backward<acc_t>(dh, acc_t(dc[j]), a, cp[j], c[j], d, dcp);
    dg[j] = d.i;
    dg[H + j] = d.f;
    dg[2 * H + j] = d.g;
    dg[3 * H + j] = d.o;
    dc[j] = dcp;
  }
}

using simd::V16;
using simd::V8;
using simd::VecMath;

// float rows, vectorized: one body (the *_body templates below), compiled twice, for AVX2+FMA
// and for the baseline target, picked at run time. `flatten` inlines the whole cell (and the
// vector math) into each, so no vector ever crosses a call between code of different targets.
// A row goes 16 lanes at a time (two independent 8-lane halves per op: the cell is one long
// dependency chain, so two in flight run nearly twice as fast), then 8, then the scalar tail.
// The four gates (i, f, g, o) of units j.. of one [4H] row, V lanes each.
template <typename V>
inline Gates<V> load_gates(const float* p, int64_t j, int64_t H) {
  return {V::load(p + j), V::load(p + H + j), V::load(p + 2 * H + j), V::load(p + 3 * H + j)};
}
template <typename V>
inline void store_gates(const Gates<V>& a, float* p, int64_t j, int64_t H) {
  a.i.store(p + j);
  a.f.store(p + H + j);
  a.g.store(p + 2 * H + j);
  a.o.store(p + 3 * H + j);
}

template <typename V, typename M>
inline void fwd_vec(float* g, const float* cp, float* c, float* h, const float* bias, int64_t j, int64_t H) {
  Gates<V> a;
  V cv, hv;
  Gates<V> in = load_gates<V>(g, j, H);
  if (bias) {
    const Gates<V> b = load_gates<V>(bias, j, H);
    in = {in.i + b.i, in.f + b.f, in.g + b.g, in.o + b.o};
  }
  cell_forward<V, M>(in.i, in.f, in.g, in.o, V::load(cp + j), a, cv, hv);
  store_gates(a, g, j, H);
  cv.store(c + j);
  hv.store(h + j);
}

template <typename V, typename M>
inline void bwd_vec(const float* dha, const float* dhb, float* dc, const float* act, const float* cp, const float* c,
                    float* dg, int64_t j, int64_t H) {
  const Gates<V> a = load_gates<V>(act, j, H);
  Gates<V> d;
  V dcp;
  V dh = V::load(dha + j);
  if (dhb) dh = dh + V::load(dhb + j);
  cell_backward<V, M>(dh, V::load(dc + j), a, V::load(cp + j), V::load(c + j), d, dcp);
  store_gates(d, dg, j, H);
  dcp.store(dc + j);
}

template <typename M>
inline void fwd_rows_f32_body(const FwdStep& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H;
  for (int64_t b = b0; b < b1; ++b) {
    float* g = static_cast<float*>(s.gates) + b * 4 * H;
    const float* cp = (b < s.n_a ? static_cast<const float*>(s.cprev_a) : static_cast<const float*>(s.c0)) + b * H;
    float* c = static_cast<float*>(s.c_out) + b * H;
    float* h = static_cast<float*>(s.h_out) + b * H;
    const float* bias = static_cast<const float*>(s.bias);
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) fwd_vec<V16, M>(g, cp, c, h, bias, j, H);
    for (; j + 8 <= H; j += 8) fwd_vec<V8, M>(g, cp, c, h, bias, j, H);
    fwd_row_scalar<float>(j, H, H, g, cp, c, h, bias);
  }
}

template <typename M>
inline void bwd_rows_f32_body(const BwdStep& s, int64_t b0, int64_t b1) {
  const int64_t H = s.H;
  for (int64_t b = b0; b < b1; ++b) {
    const float* dha = static_cast<const float*>(s.dh_a) + b * H;
    const float* dhb = s.dh_b ? static_cast<const float*>(s.dh_b) + b * H : nullptr;
    float* dc = static_cast<float*>(s.dc) + b * H;
    const float* act = static_cast<const float*>(s.act) + b * 4 * H;
    const float* cp = (b < s.n_a ? static_cast<const float*>(s.cprev_a) : static_cast<const float*>(s.c0)) + b * H;
    const float* c = static_cast<const float*>(s.c) + b * H;
    float* dg = static_cast<float*>(s.dgates) + b * 4 * H;
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) bwd_vec<V16, M>(dha, dhb, dc, act, cp, c, dg, j, H);
    for (; j + 8 <= H; j += 8) bwd_vec<V8, M>(dha, dhb, dc, act, cp, c, dg, j, H);
    bwd_row_scalar<float>(j, H, H, dha, dhb, dc, act, cp, c, dg);
  }
}

__attribute__((target("avx2,fma"), flatten)) void fwd_rows_f32_avx2(const FwdStep& s, int64_t b0, int64_t b1) {
  fwd_rows_f32_body<VecMath>(s, b0, b1);
}
__attribute__((flatten)) void fwd_rows_f32_base(const FwdStep& s, int64_t b0, int64_t b1) {
  fwd_rows_f32_body<VecMath>(s, b0, b1);
}
__attribute__((target("avx2,fma"), flatten)) void bwd_rows_f32_avx2(const BwdStep& s, int64_t b0, int64_t b1) {
  bwd_rows_f32_body<VecMath>(s, b0, b1);
}
__attribute__((flatten)) void bwd_rows_f32_base(const BwdStep& s, int64_t b0, int64_t b1) {
  bwd_rows_f32_body<VecMath>(s, b0, b1);
}

inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

void fwd_rows_f32(const FwdStep& s, int64_t b0, int64_t b1) {
  if (cpu_has_avx2_fma()) fwd_rows_f32_avx2(s, b0, b1);
  else fwd_rows_f32_base(s, b0, b1);
}
void bwd_rows_f32(const BwdStep& s, int64_t b0, int64_t b1) {
  if (cpu_has_avx2_fma()) bwd_rows_f32_avx2(s, b0, b1);
  else bwd_rows_f32_base(s, b0, b1);
}

void layer_fwd_pointwise_cpu(at::ScalarType st, const FwdStep& s) {
  at::parallel_for(0, s.n, row_grain(s.H), [&](int64_t b0, int64_t b1) {
    if (st == at::kFloat) return fwd_rows_f32(s, b0, b1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "lstm_layer_cpu", [&] {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* cp = (b < s.n_a ? static_cast<const scalar_t*>(s.cprev_a) : static_cast<const scalar_t*>(s.c0)) + b * s.H;
        fwd_row_scalar<scalar_t>(0, s.H, s.H, static_cast<scalar_t*>(s.gates) + b * 4 * s.H, cp,
                                 static_cast<scalar_t*>(s.c_out) + b * s.H, static_cast<scalar_t*>(s.h_out) + b * s.H,
                                 static_cast<const scalar_t*>(s.bias));
      }
    });
  });
}

void layer_bwd_pointwise_cpu(at::ScalarType st, const BwdStep& s) {
  at::parallel_for(0, s.n, row_grain(s.H), [&](int64_t b0, int64_t b1) {
    if (st == at::kFloat) return bwd_rows_f32(s, b0, b1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "lstm_layer_backward_cpu", [&] {
      const int64_t H = s.H;
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* cp = (b < s.n_a ? static_cast<const scalar_t*>(s.cprev_a) : static_cast<const scalar_t*>(s.c0)) + b * H;
        bwd_row_scalar<scalar_t>(0, H, H, static_cast<const scalar_t*>(s.dh_a) + b * H,
                                 s.dh_b ? static_cast<const scalar_t*>(s.dh_b) + b * H : nullptr,
                                 static_cast<scalar_t*>(s.dc) + b * H, static_cast<const scalar_t*>(s.act) + b * 4 * H, cp,
                                 static_cast<const scalar_t*>(s.c) + b * H, static_cast<scalar_t*>(s.dgates) + b * 4 * H);
      }
    });
  });
}

// ---- whole-layer op: the fused time loop (batch <= 64, float32, no proj_size) ----------------
// The recurrent GEMM of a step is [n, H] x [H, 4H] with few rows: its cost is streaming W_hh
// (16 H^2 bytes) through the cache plus per-step overhead (an ATen/MKL call per step repacks
// W_hh every time and forks/joins its threads; the pointwise kernel forks/joins again). Here W_hh
// is packed once per call into unit tiles: tile u holds, for every k, the 32 weights of hidden
// units 8u..8u+7 of the four gates (i, f, g, o), so one pass over a tile gives the complete
// pre-activations of 8 units for all rows of the step (k-blocked, so the tile block stays in L1
// while every row passes over it), and the cell (lstm_math.h, SIMD instantiation) runs on them at
// once. Each thread packs and owns a contiguous range of tiles, so its slice of W_hh stays in its
// own cache across steps; threads meet once per step (an OpenMP barrier: step t+1 reads all of
// h_t). Rows and packed sequences are handled as in the generic loop (lstm_layer.h).
// Measured (1 thread, T100 I256 H256 L2 inference, CPU time): batch 1 5.8 ms vs 8.1 ms for the
// generic loop, batch 16 47 vs 55 ms, batch 64 177 vs 176 ms (equal); with 2 threads the one
// barrier per step replaces two fork/joins.
// FASTBIG_LSTM_SMALL_BATCH=<max rows> overrides the batch limit (0: never; tests use it).

constexpr int64_t kSmallBatchMax = 64;
constexpr int64_t kSmallBatchCap = 64;  // the most rows the kernel takes (its stack buffers)

struct SmallCtx {
  const Steps* st;
  bool reverse;
  float* act;
  float* c_all;
  float* y;
  const float* h0;
  const float* c0;
  const float* bias;
  const float* w;  // w_hh [4H, H]
  float* wp;       // packed [ntiles][H][4 gates][8 units]
  int64_t H, ntiles;
};

__attribute__((target("avx2,fma"))) inline void pack_tiles(const SmallCtx& c, int64_t u0, int64_t u1) {
  const int64_t H = c.H;
  for (int64_t u = u0; u < u1; ++u) {
    float* dst = c.wp + u * H * 32;
    for (int64_t g = 0; g < 4; ++g) {
      for (int64_t l = 0; l < 8; ++l) {
        const int64_t j = u * 8 + l;
        if (j < H) {
          const float* src = c.w + (g * H + j) * H;
          for (int64_t k = 0; k < H; ++k) dst[k * 32 + g * 8 + l] = src[k];
        } else {
          for (int64_t k = 0; k < H; ++k) dst[k * 32 + g * 8 + l] = 0.0f;
        }
      }
    }
  }
}

// acc[r][g] (+)= sum_{k in [k0, k1)} wt[k][g][0..8) * h[r][k] for R <= 2 rows (8 accumulators:
// with 4 weight registers and a broadcast, 13 of the 16 ymm registers). R == 1 splits k over two
// accumulator sets (8 independent FMA chains instead of 4). acc lives in memory between k-blocks.
template <int R>
__attribute__((target("avx2,fma"), always_inline)) inline void gemv_tile(const float* wt, int64_t k0, int64_t k1,
                                                                          const float* const* h, float* acc_mem,
                                                                          bool first) {
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) acc[r][g] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc_mem + r * 32 + g * 8);
  int64_t k = k0;
  if (R == 1) {
    __m256 a2[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; k + 2 <= k1; k += 2) {
      const float* w = wt + k * 32;
      const __m256 h0 = _mm256_broadcast_ss(h[0] + k), h1 = _mm256_broadcast_ss(h[0] + k + 1);
      for (int g = 0; g < 4; ++g) {
        acc[0][g] = _mm256_fmadd_ps(_mm256_load_ps(w + g * 8), h0, acc[0][g]);
        a2[g] = _mm256_fmadd_ps(_mm256_load_ps(w + 32 + g * 8), h1, a2[g]);
      }
    }
    for (int g = 0; g < 4; ++g) acc[0][g] = _mm256_add_ps(acc[0][g], a2[g]);
  }
  for (; k < k1; ++k) {
    const float* w = wt + k * 32;
    const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8), w2 = _mm256_load_ps(w + 16),
                 w3 = _mm256_load_ps(w + 24);
    for (int r = 0; r < R; ++r) {
      const __m256 hb = _mm256_broadcast_ss(h[r] + k);
      acc[r][0] = _mm256_fmadd_ps(w0, hb, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, hb, acc[r][1]);
      acc[r][2] = _mm256_fmadd_ps(w2, hb, acc[r][2]);
      acc[r][3] = _mm256_fmadd_ps(w3, hb, acc[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) _mm256_store_ps(acc_mem + r * 32 + g * 8, acc[r][g]);
}

// The same for 6 rows and one gate pair (vectors V0, V0+1 of the tile): 12 accumulators, 2 weight
// registers and a broadcast (15 of 16 ymm), 12 independent FMA chains (an FMA's latency times its
// issue rate is ~10 on this class of core: 8 chains leave it idle, 12 keep it busy). Two calls,
// V0 = 0 and 2, cover the tile; the h rows are re-read from L1.
template <int V0>
__attribute__((target("avx2,fma"), always_inline)) inline void gemm_tile_6x2(const float* wt, int64_t k0, int64_t k1,
                                                                              const float* const* h, float* acc_mem,
                                                                              bool first) {
  __m256 acc[6][2];
  for (int r = 0; r < 6; ++r)
    for (int v = 0; v < 2; ++v)
      acc[r][v] = first ? _mm256_setzero_ps() : _mm256_load_ps(acc_mem + r * 32 + (V0 + v) * 8);
  for (int64_t k = k0; k < k1; ++k) {
    const float* w = wt + k * 32 + V0 * 8;
    const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8);
    for (int r = 0; r < 6; ++r) {
      const __m256 hb = _mm256_broadcast_ss(h[r] + k);
      acc[r][0] = _mm256_fmadd_ps(w0, hb, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, hb, acc[r][1]);
    }
  }
  for (int r = 0; r < 6; ++r)
    for (int v = 0; v < 2; ++v) _mm256_store_ps(acc_mem + r * 32 + (V0 + v) * 8, acc[r][v]);
}

// The cell on units j0..j0+8 of one row: pre-activations = acc + x W_ih^T (in g) + bias.
__attribute__((target("avx2,fma"), always_inline)) inline void tile_cell(const __m256 (&acc)[4], int64_t j0, int64_t H,
                                                                          float* g, const float* bias,
                                                                          const float* cp, float* c, float* h) {
  if (j0 + 8 <= H) {
    V8 a[4];
    for (int q = 0; q < 4; ++q) {
      a[q] = V8((simd::v8f)acc[q]) + V8::load(g + q * H + j0);
      if (bias) a[q] = a[q] + V8::load(bias + q * H + j0);
    }
    Gates<V8> o;
    V8 cv, hv;
    cell_forward<V8, VecMath>(a[0], a[1], a[2], a[3], V8::load(cp + j0), o, cv, hv);
    store_gates(o, g, j0, H);
    cv.store(c + j0);
    hv.store(h + j0);
    return;
  }
  alignas(32) float tmp[4][8];
  for (int q = 0; q < 4; ++q) _mm256_store_ps(tmp[q], acc[q]);
  for (int64_t l = 0; j0 + l < H; ++l) {
    const int64_t j = j0 + l;
    float a[4];
    for (int q = 0; q < 4; ++q) a[q] = tmp[q][l] + g[q * H + j] + (bias ? bias[q * H + j] : 0.0f);
    Gates<float> o;
    float cv, hv;
    cell_forward<float>(a[0], a[1], a[2], a[3], cp[j], o, cv, hv);
    g[j] = o.i;
    g[H + j] = o.f;
    g[2 * H + j] = o.g;
    g[3 * H + j] = o.o;
    c[j] = cv;
    h[j] = hv;
  }
}

// One tile (8 units) for the n rows of a step: W tile in k-blocks of kKb (kKb*128 bytes, L1
// resident while every row pair passes over it, so W_hh is read from L2/L3 once per step whatever
// n is), partial sums in acc_mem [n][32]; then the cell on each row.
constexpr int64_t kKb = 64;

// acc_mem[b*32 .. b*32+32) = rows[b] (K values) x one packed [K][32] tile, for b < n: K in
// kKb blocks (so the tile's block stays in L1 across rows), rows 6 at a time, then 2, then 1.
__attribute__((target("avx2,fma"), always_inline)) inline void tile_gemm(const float* wt, int64_t K,
                                                                          const float* const* rows, int64_t n,
                                                                          float* acc_mem) {
  for (int64_t k0 = 0; k0 < K; k0 += kKb) {
    const int64_t k1 = std::min(K, k0 + kKb);
    int64_t b = 0;
    for (; b + 6 <= n; b += 6) {
      gemm_tile_6x2<0>(wt, k0, k1, rows + b, acc_mem + b * 32, k0 == 0);
      gemm_tile_6x2<2>(wt, k0, k1, rows + b, acc_mem + b * 32, k0 == 0);
    }
    for (; b + 2 <= n; b += 2) gemv_tile<2>(wt, k0, k1, rows + b, acc_mem + b * 32, k0 == 0);
    if (b < n) gemv_tile<1>(wt, k0, k1, rows + b, acc_mem + b * 32, k0 == 0);
  }
}

__attribute__((target("avx2,fma"), always_inline)) inline void tile_step(const SmallCtx& c, int64_t u, int64_t off,
                                                                          int64_t n, int64_t n_a, int64_t off_p,
                                                                          float* acc_mem) {
  const int64_t H = c.H;
  const float* wt = c.wp + u * H * 32;
  const float* hp[kSmallBatchCap];
  for (int64_t b = 0; b < n; ++b) hp[b] = b < n_a ? c.y + (off_p + b) * H : c.h0 + b * H;
  tile_gemm(wt, H, hp, n, acc_mem);
  for (int64_t b = 0; b < n; ++b) {
    const float* cp = b < n_a ? c.c_all + (off_p + b) * H : c.c0 + b * H;
    __m256 acc[4];
    for (int g = 0; g < 4; ++g) acc[g] = _mm256_load_ps(acc_mem + b * 32 + g * 8);
    const int64_t row = off + b;
    tile_cell(acc, u * 8, H, c.act + row * 4 * H, c.bias, cp, c.c_all + row * H, c.y + row * H);
  }
}

// Runs worker(tid, nt) on a team of nt <= min(max_threads, torch's thread count) OpenMP threads
// that meet at the worker's own barriers; one thread (0, 1) inside an enclosing parallel region or
// without OpenMP. nt is the team OpenMP actually gave, which may be smaller than asked.
template <typename F>
void run_team(int64_t max_threads, const F& worker) {
  const int64_t want = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), max_threads);
#ifdef _OPENMP
  if (want > 1) {
#pragma omp parallel num_threads(static_cast<int>(want))
    worker(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  worker(0, 1);
}

__attribute__((target("avx2,fma"), flatten)) void small_batch_worker(const SmallCtx& c, int tid, int nt) {
  const int64_t u0 = c.ntiles * tid / nt, u1 = c.ntiles * (tid + 1) / nt;
  pack_tiles(c, u0, u1);  // a thread reads only the tiles it packed: no barrier needed here
  alignas(32) float acc_mem[kSmallBatchCap * 32];
  const Steps& st = *c.st;
  const int64_t T = st.T;
  int64_t tp = -1;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = c.reverse ? T - 1 - s : s;
    const int64_t n = st.bs[t], off = st.off[t];
    const int64_t n_a = tp >= 0 ? std::min(n, st.bs[tp]) : 0;
    const int64_t off_p = tp >= 0 ? st.off[tp] : 0;
    for (int64_t u = u0; u < u1; ++u) tile_step(c, u, off, n, n_a, off_p, acc_mem);
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp barrier
    }
#endif
    tp = t;
  }
}

int64_t small_batch_limit() {
  const char* e = std::getenv("FASTBIG_LSTM_SMALL_BATCH");
  if (e == nullptr || *e == '\0') return kSmallBatchMax;
  return std::min<int64_t>(kSmallBatchCap, std::strtoll(e, nullptr, 10));
}

bool small_batch_loop(const LoopArgs& a) {
  if (a.act.scalar_type() != at::kFloat || a.proj || a.st->B > small_batch_limit() || !cpu_has_avx2_fma())
    return false;
  const int64_t H = a.c0.size(1);
  const int64_t ntiles = (H + 7) / 8;
  auto wp = at::empty({ntiles * H * 32}, a.act.options());
  SmallCtx c{a.st,
             a.reverse,
             a.act.data_ptr<float>(),
             a.c_all.data_ptr<float>(),
             a.y.data_ptr<float>(),
             a.h0.data_ptr<float>(),
             a.c0.data_ptr<float>(),
             a.bias.defined() ? a.bias.data_ptr<float>() : nullptr,
             a.w_hh.data_ptr<float>(),
             wp.data_ptr<float>(),
             H,
             ntiles};
  // Threads: at most one per 4 tiles (a barrier per step costs ~1 us; below that a thread
  // has too little work to pay for it).
  run_team(ntiles / 4, [&](int tid, int nt) { small_batch_worker(c, tid, nt); });
  return true;
}

// ---- whole-layer op: the fused backward time loop (same inputs as the forward's) ------------
// Per step: the pointwise gradient of the cell (dG_t from dh, dc), then dh_prev = dG_t W_hh,
// [n, 4H] x [4H, H]. W_hh is packed once per call in column tiles (tile u: for every k < 4H the
// 32 weights W_hh[k, 32u .. 32u+32)), the same [k][32] layout the forward's microkernels read.
// Each thread owns a range of column tiles = a range of hidden units, and does the pointwise
// gradient for those units and the GEMM for those columns of dh_prev: the next step's pointwise
// reads only its own units of dh, so one barrier per step suffices (between the pointwise, which
// writes this step's dG, and the GEMM, which reads all of it).

struct BwdCtx {
  const Steps* st;
  bool reverse;
  const float* dy;  // grad_y [N, H] or nullptr
  float* dh;        // [B, H] running dL/dh
  float* dc;        // [B, H] running dL/dc
  const float* act;
  const float* c_all;
  const float* c0;
  const float* w;  // w_hh [4H, H]
  float* wp;       // packed [ntiles][4H][32]
  float* dG;
  int64_t H, ntiles;
};

__attribute__((target("avx2,fma"))) inline void pack_col_tiles(const BwdCtx& c, int64_t u0, int64_t u1) {
  const int64_t H = c.H, K = 4 * H;
  for (int64_t u = u0; u < u1; ++u) {
    float* dst = c.wp + u * K * 32;
    const int64_t w = std::min<int64_t>(32, H - u * 32);
    for (int64_t k = 0; k < K; ++k) {
      const float* src = c.w + k * H + u * 32;
      int64_t l = 0;
      for (; l < w; ++l) dst[k * 32 + l] = src[l];
      for (; l < 32; ++l) dst[k * 32 + l] = 0.0f;
    }
  }
}

__attribute__((target("avx2,fma"), flatten)) void bwd_loop_worker(const BwdCtx& c, int tid, int nt) {
  const int64_t H = c.H, K = 4 * H;
  const int64_t u0 = c.ntiles * tid / nt, u1 = c.ntiles * (tid + 1) / nt;
  const int64_t ja = std::min(H, u0 * 32), jb = std::min(H, u1 * 32);
  pack_col_tiles(c, u0, u1);  // a thread reads only the tiles it packed
  alignas(32) float acc_mem[kSmallBatchCap * 32];
  const float* hp[kSmallBatchCap];
  const Steps& st = *c.st;
  const int64_t T = st.T;
  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = c.reverse ? T - 1 - s : s;
    const int64_t n = st.bs[t], off = st.off[t];
    const int64_t tp = s > 0 ? (c.reverse ? t + 1 : t - 1) : -1;
    const int64_t n_a = tp >= 0 ? std::min(n, st.bs[tp]) : 0;
    // (1) the cell's gradient, this thread's units
    for (int64_t b = 0; b < n; ++b) {
      const float* dha = c.dh + b * H;
      const float* dhb = c.dy ? c.dy + (off + b) * H : nullptr;
      float* dc = c.dc + b * H;
      const float* act = c.act + (off + b) * K;
      const float* cp = b < n_a ? c.c_all + (st.off[tp] + b) * H : c.c0 + b * H;
      const float* cc = c.c_all + (off + b) * H;
      float* dg = c.dG + (off + b) * K;
      int64_t j = ja;
      for (; j + 16 <= jb; j += 16) bwd_vec<V16, VecMath>(dha, dhb, dc, act, cp, cc, dg, j, H);
      for (; j + 8 <= jb; j += 8) bwd_vec<V8, VecMath>(dha, dhb, dc, act, cp, cc, dg, j, H);
      for (; j < jb; ++j) {
        Gates<float> a{act[j], act[H + j], act[2 * H + j], act[3 * H + j]};
        Gates<float> d;
        float dcp;
        cell_backward<float>(dha[j] + (dhb ? dhb[j] : 0.0f), dc[j], a, cp[j], cc[j], d, dcp);
        dg[j] = d.i;
        dg[H + j] = d.f;
        dg[2 * H + j] = d.g;
        dg[3 * H + j] = d.o;
        dc[j] = dcp;
      }
    }
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp barrier
    }
#endif
    // (2) dh_prev = dG_t W_hh, this thread's columns; rows >= n keep their dh
    for (int64_t b = 0; b < n; ++b) hp[b] = c.dG + (off + b) * K;
    for (int64_t u = u0; u < u1; ++u) {
      const float* wt = c.wp + u * K * 32;
      tile_gemm(wt, K, hp, n, acc_mem);
      const int64_t w = std::min<int64_t>(32, H - u * 32);
      for (int64_t b = 0; b < n; ++b) {
        float* dst = c.dh + b * H + u * 32;
        if (w == 32) {
          for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + q * 8, _mm256_load_ps(acc_mem + b * 32 + q * 8));
        } else {
          for (int64_t l = 0; l < w; ++l) dst[l] = acc_mem[b * 32 + l];
        }
      }
    }
  }
}

bool bwd_fused_loop(const BwdLoopArgs& a) {
  if (a.act.scalar_type() != at::kFloat || a.proj || a.st->B > small_batch_limit() || !cpu_has_avx2_fma())
    return false;
  const int64_t H = a.dc.size(1);
  const int64_t ntiles = (H + 31) / 32;
  auto wp = at::empty({ntiles * 4 * H * 32}, a.act.options());
  BwdCtx c{a.st,
           a.reverse,
           a.dy.defined() ? a.dy.data_ptr<float>() : nullptr,
           a.dh.data_ptr<float>(),
           a.dc.data_ptr<float>(),
           a.act.data_ptr<float>(),
           a.c_all.data_ptr<float>(),
           a.c0.data_ptr<float>(),
           a.w_hh.data_ptr<float>(),
           wp.data_ptr<float>(),
           a.dG.data_ptr<float>(),
           H,
           ntiles};
  // Threads: at most one per 2 column tiles (64 units).
  run_team(ntiles / 2, [&](int tid, int nt) { bwd_loop_worker(c, tid, nt); });
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse) {
  TORCH_CHECK(x.device().is_cpu(), "fastbig::lstm_layer (cpu): x must be a CPU tensor, got ", x.device());
  return layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, &layer_fwd_pointwise_cpu,
                       &small_batch_loop);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_backward_cpu(
    const c10::optional<at::Tensor>& grad_y, const c10::optional<at::Tensor>& grad_hn,
    const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,
    const c10::optional<at::Tensor>& batch_sizes, bool reverse, const at::Tensor& y, const at::Tensor& act,
    const at::Tensor& c_all, const at::Tensor& hraw) {
  TORCH_CHECK(x.device().is_cpu(), "fastbig::lstm_layer_backward (cpu): x must be a CPU tensor, got ", x.device());
  return layer_backward(grad_y, grad_hn, grad_cn, x, h0, c0, w_ih, w_hh, w_hr, batch_sizes, reverse, y, act, c_all,
                        hraw, &layer_bwd_pointwise_cpu, &bwd_fused_loop);
}

// ---- whole-cell op: one step of nn.LSTMCell, GEMMs and cell in one call --------------------
// A Python loop over LSTMCell (seq2seq decoders) runs, per step, x W_ih^T + h W_hh^T + b and the
// cell, and in backward the cell gradient, dx = dG W_ih, dh = dG W_hh, dW_ih = dG^T x,
// dW_hh = dG^T h, db = sum dG. With B = 64, H = 256 each GEMM is ~34 MFLOP: too small for a
// multi-threaded GEMM to split well (a two-thread MKL call of x W_ih^T runs at ~115 GFLOP/s here,
// a single-threaded one at ~80). So float32 with BLAS runs one OpenMP team per call in which
// every thread does its own GEMMs single-threaded, and the pointwise work of the units it owns:
//   forward:  thread t owns hidden units [j0, j1): the gate columns q*H + [j0, j1) of
//             x W_ih^T + h W_hh^T (8 GEMM calls), then the cell on those units, no barrier;
//   backward: the cell gradient of its units -> dG columns and dc_prev, its rows of dW_ih,
//             dW_hh (from its own dG columns) and of db; one barrier; then its share of the
//             columns of dx = dG W_ih and dh = dG W_hh (which read all of dG).
// Other dtypes, and a torch without BLAS symbols, take ATen GEMMs plus the same cell kernels.

template <typename M>
inline void fwd_units_f32_body(float* g, const float* cp, float* c, float* h, const float* bias, int64_t j0,
                               int64_t j1, int64_t H) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) fwd_vec<V16, M>(g, cp, c, h, bias, j, H);
  for (; j + 8 <= j1; j += 8) fwd_vec<V8, M>(g, cp, c, h, bias, j, H);
  fwd_row_scalar<float>(j, j1, H, g, cp, c, h, bias);
}
template <typename M>
inline void bwd_units_f32_body(const float* dh, float* dc, const float* act, const float* cp, const float* c,
                               float* dg, int64_t j0, int64_t j1, int64_t H) {
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) bwd_vec<V16, M>(dh, nullptr, dc, act, cp, c, dg, j, H);
  for (; j + 8 <= j1; j += 8) bwd_vec<V8, M>(dh, nullptr, dc, act, cp, c, dg, j, H);
  bwd_row_scalar<float>(j, j1, H, dh, nullptr, dc, act, cp, c, dg);
}
__attribute__((target("avx2,fma"), flatten)) void fwd_units_f32_avx2(float* g, const float* cp, float* c, float* h,
                                                                     const float* bias, int64_t j0, int64_t j1,
                                                                     int64_t H) {
  fwd_units_f32_body<VecMath>(g, cp, c, h, bias, j0, j1, H);
}
__attribute__((flatten)) void fwd_units_f32_base(float* g, const float* cp, float* c, float* h, const float* bias,
                                                 int64_t j0, int64_t j1, int64_t H) {
  fwd_units_f32_body<VecMath>(g, cp, c, h, bias, j0, j1, H);
}
__attribute__((target("avx2,fma"), flatten)) void bwd_units_f32_avx2(const float* dh, float* dc, const float* act,
                                                                     const float* cp, const float* c, float* dg,
                                                                     int64_t j0, int64_t j1, int64_t H) {
  bwd_units_f32_body<VecMath>(dh, dc, act, cp, c, dg, j0, j1, H);
}
__attribute__((flatten)) void bwd_units_f32_base(const float* dh, float* dc, const float* act, const float* cp,
                                                 const float* c, float* dg, int64_t j0, int64_t j1, int64_t H) {
  bwd_units_f32_body<VecMath>(dh, dc, act, cp, c, dg, j0, j1, H);
}

// Hidden units [j0, j1) of thread tid of nt: contiguous, 16-aligned (full vectors) where H allows.
inline std::pair<int64_t, int64_t> unit_range(int64_t H, int tid, int nt) {
  const int64_t blocks = (H + 15) / 16;
  return {std::min(H, 16 * (blocks * tid / nt)), std::min(H, 16 * (blocks * (tid + 1) / nt))};
}

// Threads for one cell step: one per 64 hidden units at most, none for tiny problems.
inline int64_t cell_step_threads(int64_t B, int64_t I, int64_t H) {
  if (B * H * (I + H) < (int64_t(1) << 18)) return 1;
  return std::max<int64_t>(1, H / 64);
}

inline bool cell_step_fused_ok(const at::Tensor& x, int64_t B, int64_t I, int64_t H) {
  const int64_t lim = std::numeric_limits<int>::max();
  return x.scalar_type() == at::kFloat && blas::available() && B > 0 && I > 0 && H > 0 && 4 * H * std::max(I, H) < lim &&
         B * 4 * H < lim;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_step_cpu(
    const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& c_in, const at::Tensor& w_ih_in,
    const at::Tensor& w_hh_in, const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh) {
  check_cell_step("fastbig::lstm_cell_step (cpu)", x_in, h_in, c_in, w_ih_in, w_hh_in, b_ih, b_hh);
  TORCH_CHECK(x_in.device().is_cpu(), "fastbig::lstm_cell_step (cpu): input must be a CPU tensor, got ", x_in.device());
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  const at::Tensor bias = bias_sum(b_ih, b_hh);
  if (!cell_step_fused_ok(x_in, B, I, H)) return cell_step_aten(x_in, h_in, c_in, w_ih_in, w_hh_in, bias, &lstm_cell_cpu);
  const auto x = x_in.contiguous(), h = h_in.contiguous(), cp = c_in.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous();
  auto act = at::empty({B, 4 * H}, x.options());
  auto hn = at::empty({B, H}, x.options());
  auto cn = at::empty({B, H}, x.options());
  const float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *cpp = cp.data_ptr<float>();
  const float *wi = w_ih.data_ptr<float>(), *wh = w_hh.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float *ap = act.data_ptr<float>(), *hnp = hn.data_ptr<float>(), *cnp = cn.data_ptr<float>();
  const bool avx2 = cpu_has_avx2_fma();
  run_team(cell_step_threads(B, I, H), [&](int tid, int nt) {
    const auto [j0, j1] = unit_range(H, tid, nt);
    if (j0 >= j1) return;
    // the four gate blocks q*H + [j0, j1): one column range when a thread owns every unit
    const int64_t nq = j1 - j0 == H ? 1 : 4, cols = j1 - j0 == H ? 4 * H : j1 - j0;
    for (int64_t q = 0; q < nq; ++q) {
      float* g = ap + q * H + j0;
      blas::gemm_rm(false, true, B, cols, I, xp, I, wi + (q * H + j0) * I, I, 0.f, g, 4 * H);
      blas::gemm_rm(false, true, B, cols, H, hp, H, wh + (q * H + j0) * H, H, 1.f, g, 4 * H);
    }
    for (int64_t b = 0; b < B; ++b) {
      if (avx2) fwd_units_f32_avx2(ap + b * 4 * H, cpp + b * H, cnp + b * H, hnp + b * H, bp, j0, j1, H);
      else fwd_units_f32_base(ap + b * 4 * H, cpp + b * H, cnp + b * H, hnp + b * H, bp, j0, j1, H);
    }
  });
  return {hn, cn, act};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_step_backward_cpu(
    const c10::optional<at::Tensor>& grad_h, const c10::optional<at::Tensor>& grad_c, const at::Tensor& x_in,
    const at::Tensor& h_in, const at::Tensor& c_in, const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
    const at::Tensor& c_new, const at::Tensor& act_in, bool need_input_grad, bool need_weight_grad) {
  check_cell_step_backward("fastbig::lstm_cell_step_backward (cpu)", grad_h, grad_c, x_in, h_in, c_in, w_ih_in,
                           w_hh_in, c_new, act_in);
  TORCH_CHECK(x_in.device().is_cpu(), "fastbig::lstm_cell_step_backward (cpu): input must be a CPU tensor, got ",
              x_in.device());
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  if (!cell_step_fused_ok(x_in, B, I, H))
    return cell_step_backward_aten(grad_h, grad_c, x_in, h_in, c_in, w_ih_in, w_hh_in, c_new, act_in, need_input_grad,
                                   need_weight_grad, &lstm_cell_backward_cpu);
  const auto empty = [&] { return at::empty({0}, x_in.options()); };  // a gradient not asked for
  const auto x = x_in.contiguous(), h = h_in.contiguous(), cp = c_in.contiguous(), cn = c_new.contiguous();
  const auto w_ih = w_ih_in.contiguous(), w_hh = w_hh_in.contiguous(), act = act_in.contiguous();
  const auto opts = x.options();
  const at::Tensor dh_in = grad_h.has_value() && grad_h->defined() ? grad_h->contiguous() : at::zeros({B, H}, opts);
  // dc enters as dL/dc (from grad_c) and the cell kernel overwrites it with dL/dc_prev
  at::Tensor dcp = grad_c.has_value() && grad_c->defined() ? grad_c->clone(at::MemoryFormat::Contiguous)
                                                           : at::zeros({B, H}, opts);
  auto dG = at::empty({B, 4 * H}, opts);
  at::Tensor dx = need_input_grad ? at::empty({B, I}, opts) : empty();
  auto dh = at::empty({B, H}, opts);
  at::Tensor dwi = need_weight_grad ? at::empty({4 * H, I}, opts) : empty();
  at::Tensor dwh = need_weight_grad ? at::empty({4 * H, H}, opts) : empty();
  at::Tensor db = need_weight_grad ? at::empty({4 * H}, opts) : empty();
  const float *xp = x.data_ptr<float>(), *hp = h.data_ptr<float>(), *cpp = cp.data_ptr<float>();
  const float *cnp = cn.data_ptr<float>(), *actp = act.data_ptr<float>(), *dhi = dh_in.data_ptr<float>();
  const float *wi = w_ih.data_ptr<float>(), *wh = w_hh.data_ptr<float>();
  float *dgp = dG.data_ptr<float>(), *dcpp = dcp.data_ptr<float>(), *dhp = dh.data_ptr<float>();
  float* dxp = need_input_grad ? dx.data_ptr<float>() : nullptr;
  float* dwip = need_weight_grad ? dwi.data_ptr<float>() : nullptr;
  float* dwhp = need_weight_grad ? dwh.data_ptr<float>() : nullptr;
  float* dbp = need_weight_grad ? db.data_ptr<float>() : nullptr;
  const bool avx2 = cpu_has_avx2_fma();
  run_team(cell_step_threads(B, I, H), [&](int tid, int nt) {
    const auto [j0, j1] = unit_range(H, tid, nt);
    if (j0 < j1) {
      for (int64_t b = 0; b < B; ++b) {
        if (avx2) bwd_units_f32_avx2(dhi + b * H, dcpp + b * H, actp + b * 4 * H, cpp + b * H, cnp + b * H,
                                     dgp + b * 4 * H, j0, j1, H);
        else bwd_units_f32_base(dhi + b * H, dcpp + b * H, actp + b * 4 * H, cpp + b * H, cnp + b * H,
                                dgp + b * 4 * H, j0, j1, H);
      }
      if (need_weight_grad) {
        const int64_t nq = j1 - j0 == H ? 1 : 4;  // as in the forward
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t r = q * H + j0, n = j1 - j0 == H ? 4 * H : j1 - j0;
          blas::gemm_rm(true, false, n, I, B, dgp + r, 4 * H, xp, I, 0.f, dwip + r * I, I);
          blas::gemm_rm(true, false, n, H, B, dgp + r, 4 * H, hp, H, 0.f, dwhp + r * H, H);
          float* d = dbp + r;
          for (int64_t j = 0; j < n; ++j) d[j] = 0.f;
          for (int64_t b = 0; b < B; ++b) {
            const float* g = dgp + b * 4 * H + r;
            for (int64_t j = 0; j < n; ++j) d[j] += g[j];
          }
        }
      }
    }
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp barrier
    }
#endif
    // columns of dx and dh, all of dG as the left operand
    if (need_input_grad) {
      const int64_t c0 = I * tid / nt, c1 = I * (tid + 1) / nt;
      if (c0 < c1) blas::gemm_rm(false, false, B, c1 - c0, 4 * H, dgp, 4 * H, wi + c0, I, 0.f, dxp + c0, I);
    }
    const int64_t c0 = H * tid / nt, c1 = H * (tid + 1) / nt;
    if (c0 < c1) blas::gemm_rm(false, false, B, c1 - c0, 4 * H, dgp, 4 * H, wh + c0, H, 0.f, dhp + c0, H);
  });
  return {dx, dh, dcp, dwi, dwh, db};
}

}  // namespace
}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("lstm_cell", &fastbig::lstm::lstm_cell_cpu);
  m.impl("lstm_cell_backward", &fastbig::lstm::lstm_cell_backward_cpu);
  m.impl("lstm_layer", &fastbig::lstm::lstm_layer_cpu);
  m.impl("lstm_layer_backward", &fastbig::lstm::lstm_layer_backward_cpu);
  m.impl("lstm_cell_step", &fastbig::lstm::lstm_cell_step_cpu);
  m.impl("lstm_cell_step_backward", &fastbig::lstm::lstm_cell_step_backward_cpu);
}

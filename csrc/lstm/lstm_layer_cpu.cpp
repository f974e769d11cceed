// CPU kernels of the whole-layer LSTM op (fastbig::lstm_layer and its backward): the per-step
// pointwise kernels the generic loop of lstm_layer.h calls, and the fused time loops that take
// over small float32 batches.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <immintrin.h>

#include <cstdlib>

#include "common/cpu_team.h"
#include "lstm/lstm_cpu.h"
#include "lstm/lstm_layer.h"

namespace fastbig {
namespace lstm {
namespace {

// ---- whole-layer op: the per-step pointwise kernels ------------------------------------------
// Rows of one step in parallel (the fused loops below take over small float32 batches). float
// rows: one body, compiled twice, for AVX2+FMA and for the baseline target, picked at run time;
// `flatten` inlines the whole cell (and the vector math, lstm_cpu.h) into each, so no vector ever
// crosses a call between code of different targets.
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

void fwd_rows_f32(const FwdStep& s, int64_t b0, int64_t b1) {
  if (cpu_has_avx2_fma()) fwd_rows_f32_avx2(s, b0, b1);
  else fwd_rows_f32_base(s, b0, b1);
}
void bwd_rows_f32(const BwdStep& s, int64_t b0, int64_t b1) {
  if (cpu_has_avx2_fma()) bwd_rows_f32_avx2(s, b0, b1);
  else bwd_rows_f32_base(s, b0, b1);
}

}  // namespace

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

namespace {

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
// h_t). Rows and packed sequences are handled as in the generic loop (lstm_layer.h). It beats
// the generic loop most at small batches and draws level at the batch limit; with 2 threads the
// one barrier per step replaces two fork/joins.
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
  for (int64_t l = 0; j0 + l < H; ++l)
    for (int q = 0; q < 4; ++q) g[q * H + j0 + l] += tmp[q][l];  // then + bias, as the vector path
  fwd_row_scalar<float>(j0, H, H, g, cp, c, h, bias);
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
  // Threads: at most one per 4 tiles (below that a thread has too little work between two
  // barriers to pay for them).
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
      bwd_row_scalar<float>(j, jb, H, dha, dhb, dc, act, cp, cc, dg);
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
}  // namespace

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
}  // namespace lstm
}  // namespace fastbig

TORCH_LIBRARY_IMPL(fastbig, CPU, m) {
  m.impl("lstm_layer", &fastbig::lstm::lstm_layer_cpu);
  m.impl("lstm_layer_backward", &fastbig::lstm::lstm_layer_backward_cpu);
}

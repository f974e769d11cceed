// CPU flash attention: the kernel body. Included once per instruction set by attention_cpu.cpp,
// inside its own namespace and `#pragma GCC target` (AVX2+FMA+F16C, and the x86-64 / any-arch
// baseline); the library picks one at load time by CPU feature check. No #pragma once: it is
// meant to be included more than once. FB_ATTN_AVX2 selects the intrinsics of that build.
//
// Tiles: 8-wide float vectors (GCC vector extensions, lowered to one ymm on AVX2 and two xmm on
// the baseline). The products of the tiles (Q K^T, P V and the backward's five) all go through
// one register-tiled kernel gemm(): C[M][N] (+)= A[M][K] B[K][N] with B row-major and N a
// multiple of 16, A read by (row, column) strides so transposed operands need no copy; 6 x 16
// outputs live in 12 registers, each k step loads two B vectors and broadcasts 6 A values.

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));

#define FB_AI __attribute__((always_inline)) inline

FB_AI v8f vload(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof(r));
  return r;
}
FB_AI void vstore(float* p, v8f x) { std::memcpy(p, &x, sizeof(x)); }
FB_AI v8f vset(float s) { return v8f{s, s, s, s, s, s, s, s}; }
FB_AI v8f vfma(v8f a, v8f b, v8f c) {
#ifdef FB_ATTN_AVX2
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
FB_AI float hsum(v8f x) {
  return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}
// Maximum that keeps NaN (a NaN score must make its row NaN, as in the math).
FB_AI v8f vmax_nan(v8f a, v8f b) { return (b > a) | (b != b) ? b : a; }
FB_AI float hmax_nan(v8f x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = (x[i] > m || x[i] != x[i]) ? x[i] : m;
  return m;
}

// 8 elements of an input row (fp32, bf16 or fp16) as fp32.
FB_AI v8f vload_any(const void* base, int64_t idx, int dt) {
  if (dt == kF32) return vload(static_cast<const float*>(base) + idx);
  const uint16_t* p = static_cast<const uint16_t*>(base) + idx;
  if (dt == kBF16) {
    v8u16 h;
    std::memcpy(&h, p, sizeof(h));
    v8i w = __builtin_convertvector(h, v8i) << 16;
    return (v8f)w;
  }
#ifdef FB_ATTN_AVX2
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = f16_to_f32(p[i]);
  return r;
#endif
}
FB_AI float load_any(const void* base, int64_t idx, int dt) {
  if (dt == kF32) return static_cast<const float*>(base)[idx];
  const uint16_t h = static_cast<const uint16_t*>(base)[idx];
  return dt == kBF16 ? bf16_to_f32(h) : f16_to_f32(h);
}
// dst[0, n) = mul * src[0, n), then zeros up to npad.
FB_AI void load_row(float* dst, const void* src, int64_t idx, int dt, int64_t n, int64_t npad, float mul) {
  int64_t d = 0;
  const v8f m = vset(mul);
  for (; d + 8 <= n; d += 8) vstore(dst + d, vload_any(src, idx + d, dt) * m);
  for (; d < n; ++d) dst[d] = load_any(src, idx + d, dt) * mul;
  for (; d < npad; ++d) dst[d] = 0.f;
}

// exp: Cephes expf (ln2 range reduction in two parts, degree-6 polynomial, ~2 ulp); exactly 0
// below -87.3 (so -inf and masked scores give 0), NaN stays NaN.
FB_AI v8f vexp(v8f x) {
  const v8i under = x < -87.3f;
  v8f xc = x > 88.3f ? vset(88.3f) : x;
  xc = xc < -87.3f ? vset(-87.3f) : xc;
  constexpr float kMagic = 12582912.0f;
  const v8f t = vfma(xc, vset(1.44269504088896341f), vset(kMagic));
  const v8f fn = t - kMagic;
  v8f r = vfma(fn, vset(-0.693359375f), xc);
  r = vfma(fn, vset(2.12194440e-4f), r);
  const v8f z = r * r;
  v8f y = vfma(r, vset(1.9875691500E-4f), vset(1.3981999507E-3f));
  y = vfma(y, r, vset(8.3334519073E-3f));
  y = vfma(y, r, vset(4.1665795894E-2f));
  y = vfma(y, r, vset(1.6666665459E-1f));
  y = vfma(y, r, vset(5.0000001201E-1f));
  y = vfma(y, z, r + 1.0f);
  const v8i n = (v8i)t - (v8i)vset(kMagic);
  const v8i pw = (n + 127) << 23;
  v8f res = y * (v8f)pw;
  res = under ? vset(0.f) : res;
  return res;
}

// ---- the tile product ------------------------------------------------------------------------
template <int MR>
FB_AI void mk_tile(const float* A, int64_t ars, int64_t acs, const float* B, int64_t ldb, float* C, int64_t ldc,
                   int64_t K, bool accum) {
  v8f c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    if (accum) {
      c0[r] = vload(C + r * ldc);
      c1[r] = vload(C + r * ldc + 8);
    } else {
      c0[r] = vset(0.f);
      c1[r] = vset(0.f);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const v8f b0 = vload(B + k * ldb), b1 = vload(B + k * ldb + 8);
    const float* a = A + k * acs;
    for (int r = 0; r < MR; ++r) {
      const v8f av = vset(a[r * ars]);
      c0[r] = vfma(av, b0, c0[r]);
      c1[r] = vfma(av, b1, c1[r]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    vstore(C + r * ldc, c0[r]);
    vstore(C + r * ldc + 8, c1[r]);
  }
}

// C[M][N] (+)= A[M][K] B[K][N]; A[m][k] at A[m * ars + k * acs]; N % 16 == 0.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ars, int64_t acs, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accum) {
  for (int64_t n0 = 0; n0 < N; n0 += 16) {
    int64_t m0 = 0;
    for (; m0 + 6 <= M; m0 += 6) mk_tile<6>(A + m0 * ars, ars, acs, B + n0, ldb, C + m0 * ldc + n0, ldc, K, accum);
    const float* a = A + m0 * ars;
    float* c = C + m0 * ldc + n0;
    switch (M - m0) {
      case 5: mk_tile<5>(a, ars, acs, B + n0, ldb, c, ldc, K, accum); break;
      case 4: mk_tile<4>(a, ars, acs, B + n0, ldb, c, ldc, K, accum); break;
      case 3: mk_tile<3>(a, ars, acs, B + n0, ldb, c, ldc, K, accum); break;
      case 2: mk_tile<2>(a, ars, acs, B + n0, ldb, c, ldc, K, accum); break;
      case 1: mk_tile<1>(a, ars, acs, B + n0, ldb, c, ldc, K, accum); break;
      default: break;
    }
  }
}

// ---- packing ---------------------------------------------------------------------------------
// Key block kb of (b, kv head hk): Kt[d][BK] = k[j0 + c][d] (fp32, zero past Sk) and
// Vb[c][Dp] = v[j0 + c][d] (zero past D and past Sk).
inline void pack_kv_block(const Params& p, int64_t b, int64_t hk, int64_t kb, float* Kt, float* Vb, float* tmp) {
  const int64_t j0 = kb * BK, nk = std::min<int64_t>(BK, p.Sk - j0), D = p.D, Dp = p.Dp;
  const int64_t kbase = b * p.k_sb + hk * p.k_sh, vbase = b * p.v_sb + hk * p.v_sh;
  if (Kt) {
    for (int64_t c = 0; c < nk; ++c) {
      load_row(tmp, p.k, kbase + (j0 + c) * p.k_ss, p.dtype, D, D, 1.f);
      for (int64_t d = 0; d < D; ++d) Kt[d * BK + c] = tmp[d];
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = nk; c < BK; ++c) Kt[d * BK + c] = 0.f;
  }
  if (Vb) {
    for (int64_t c = 0; c < nk; ++c) load_row(Vb + c * Dp, p.v, vbase + (j0 + c) * p.v_ss, p.dtype, D, Dp, 1.f);
    for (int64_t c = nk; c < BK; ++c)
      for (int64_t d = 0; d < Dp; ++d) Vb[c * Dp + d] = 0.f;
  }
}

// ---- online softmax over one tile row --------------------------------------------------------
// s[0, BK): scores (masked = -inf); replaced by p = exp(s - m_new). Updates m, l and rescales the
// accumulator row acc[0, Dp).
FB_AI void softmax_row(float* s, float& m, float& l, float* acc, int64_t Dp, int64_t ncols) {
  v8f mx = vset(kNegInf);
  for (int64_t c = 0; c < ncols; c += 8) mx = vmax_nan(mx, vload(s + c));
  const float rmx = hmax_nan(mx);
  const float mnew = (rmx > m || rmx != rmx) ? rmx : m;
  if (mnew == kNegInf) {  // everything masked so far: p = 0, nothing changes
    for (int64_t c = 0; c < ncols; c += 8) vstore(s + c, vset(0.f));
    return;
  }
  if (mnew != m) {
    const float alpha = m == kNegInf ? 0.f : std::exp(m - mnew);
    l *= alpha;
    const v8f av = vset(alpha);
    for (int64_t d = 0; d < Dp; d += 8) vstore(acc + d, vload(acc + d) * av);
    m = mnew;
  }
  const v8f mv = vset(mnew);
  v8f sum = vset(0.f);
  for (int64_t c = 0; c < ncols; c += 8) {
    const v8f e = vexp(vload(s + c) - mv);
    vstore(s + c, e);
    sum += e;
  }
  l += hsum(sum);
}

// Final normalization of one row with the sink: out = acc / (l + e^{sink - m}), lse.
FB_AI void finish_row(const Params& p, int64_t h, float m, float l, const float* acc, float* out, float* lse) {
  const int64_t D = p.D;
  float L = l, lo;
  if (p.sinks) {
    const float sk = p.sinks[h];
    if (m == kNegInf) {
      for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
      *lse = sk;
      return;
    }
    const float M2 = sk > m ? sk : m;
    const float a = std::exp(m - M2);
    L = l * a + std::exp(sk - M2);
    const float f = a / L;
    for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * f;
    *lse = M2 + std::log(L);
    return;
  }
  if (m == kNegInf) {
    for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
    *lse = kNegInf;
    return;
  }
  lo = 1.f / L;
  for (int64_t d = 0; d < D; ++d) out[d] = acc[d] * lo;
  *lse = m + std::log(L);
}

// ---- forward, one (b, h, query block) ---------------------------------------------------------
// Kpack / Vpack: the packed key blocks of (b, h's kv head), block kb at kb * D * BK / kb * BK * Dp.
// ws: BQ * D (Q) + BQ * BK (S) + BQ * Dp (acc) + 2 * BQ floats.
inline void fwd_task(const Params& p, const float* Kpack, const float* Vpack, int64_t b, int64_t h, int64_t qb,
                     float* ws) {
  const int64_t D = p.D, Dp = p.Dp;
  const int64_t i0 = qb * BQ, nr = std::min<int64_t>(BQ, p.Sq - i0);
  float* Q = ws;
  float* S = Q + BQ * D;
  float* acc = S + BQ * BK;
  float* m = acc + BQ * Dp;
  float* l = m + BQ;
  const int64_t qbase = b * p.q_sb + h * p.q_sh;
  for (int64_t r = 0; r < nr; ++r) load_row(Q + r * D, p.q, qbase + (i0 + r) * p.q_ss, p.dtype, D, D, p.scale);
  for (int64_t r = 0; r < nr; ++r) {
    m[r] = kNegInf;
    l[r] = 0.f;
    for (int64_t d = 0; d < Dp; ++d) acc[r * Dp + d] = 0.f;
  }
  const int64_t klo = p.row_lo(i0), khi = p.row_hi(i0 + nr - 1);
  const bool feat = p.has_features();
  const int64_t last_lo = p.row_lo(i0 + nr - 1), first_hi = p.row_hi(i0);
  if (klo < khi) {
    for (int64_t kb = klo / BK; kb * BK < khi; ++kb) {
      const int64_t j0 = kb * BK, nk = std::min<int64_t>(BK, p.Sk - j0);
      const float* Kt = Kpack + kb * (D * BK);
      const float* Vb = Vpack + kb * (BK * Dp);
      gemm(nr, BK, D, Q, D, 1, Kt, BK, S, BK, false);
      const bool need_pos = j0 < last_lo || j0 + BK > first_hi;
      for (int64_t r = 0; r < nr; ++r) {
        float* s = S + r * BK;
        const int64_t i = i0 + r;
        if (feat) apply_features(p, s, nullptr, nk, b, h, i, j0);
        if (need_pos) mask_outside(s, BK, j0, p.row_lo(i), p.row_hi(i));
        softmax_row(s, m[r], l[r], acc + r * Dp, Dp, BK);
      }
      gemm(nr, Dp, BK, S, BK, 1, Vb, Dp, acc, Dp, true);
    }
  }
  const int64_t obase = ((b * p.Hq + h) * p.Sq + i0);
  for (int64_t r = 0; r < nr; ++r)
    finish_row(p, h, m[r], l[r], acc + r * Dp, p.out + (obase + r) * D, p.lse + obase + r);
}

// ---- decode: a few query rows against a long cache ---------------------------------------------
// One (b, kv head) group: all R = group * Sq query rows of its query heads share each pass over
// K/V, which are read in their own dtype (converted 8 elements at a time in registers). Keys
// [ks, ke) only; the partial (m, l, acc) goes to part_m/part_l/part_acc (R, R, R * Dp).
// ws: R * D (Q) + R * BKD (S) + Dp (one key row).
inline void decode_task(const Params& p, int64_t b, int64_t hk, int64_t ks, int64_t ke, float* part_m,
                        float* part_l, float* part_acc, float* ws) {
  const int64_t D = p.D, Dp = p.Dp, G = p.group(), Sq = p.Sq, R = G * Sq;
  float* Q = ws;
  float* S = Q + R * D;
  const int64_t kbase = b * p.k_sb + hk * p.k_sh, vbase = b * p.v_sb + hk * p.v_sh;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = hk * G + r / Sq, i = r % Sq;
    load_row(Q + r * D, p.q, b * p.q_sb + h * p.q_sh + i * p.q_ss, p.dtype, D, D, p.scale);
    part_m[r] = kNegInf;
    part_l[r] = 0.f;
    for (int64_t d = 0; d < Dp; ++d) part_acc[r * Dp + d] = 0.f;
  }
  const bool feat = p.has_features();
  const int64_t D8 = D & ~int64_t(7);
  const int dt = p.dtype;
  for (int64_t j0 = ks; j0 < ke; j0 += BKD) {
    const int64_t nk = std::min<int64_t>(BKD, ke - j0);
    // S[r][c] = q_r . k_{j0+c}
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t kidx = kbase + (j0 + c) * p.k_ss;
      if (R == 1) {
        v8f a0 = vset(0.f), a1 = vset(0.f);
        int64_t d = 0;
        for (; d + 16 <= D8; d += 16) {
          a0 = vfma(vload(Q + d), vload_any(p.k, kidx + d, dt), a0);
          a1 = vfma(vload(Q + d + 8), vload_any(p.k, kidx + d + 8, dt), a1);
        }
        for (; d < D8; d += 8) a0 = vfma(vload(Q + d), vload_any(p.k, kidx + d, dt), a0);
        float sc = hsum(a0 + a1);
        for (; d < D; ++d) sc += Q[d] * load_any(p.k, kidx + d, dt);
        S[c] = sc;
      } else {
        float* kr = ws + R * D + R * BKD;
        load_row(kr, p.k, kidx, dt, D, D, 1.f);
        for (int64_t r = 0; r < R; ++r) {
          const float* q = Q + r * D;
          v8f a0 = vset(0.f);
          int64_t d = 0;
          for (; d < D8; d += 8) a0 = vfma(vload(q + d), vload(kr + d), a0);
          float sc = hsum(a0);
          for (; d < D; ++d) sc += q[d] * kr[d];
          S[r * BKD + c] = sc;
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      float* s = S + r * BKD;
      for (int64_t c = nk; c < BKD; ++c) s[c] = kNegInf;
      const int64_t h = hk * G + r / Sq, i = r % Sq;
      if (feat) apply_features(p, s, nullptr, nk, b, h, i, j0);
      const int64_t lo = p.row_lo(i), hi = p.row_hi(i);
      if (j0 < lo || j0 + nk > hi) mask_outside(s, nk, j0, lo, hi);
      softmax_row(s, part_m[r], part_l[r], part_acc + r * Dp, Dp, BKD);
    }
    // acc_r += sum_c p[r][c] v_{j0+c}
    for (int64_t c = 0; c < nk; ++c) {
      const int64_t vidx = vbase + (j0 + c) * p.v_ss;
      int64_t d = 0;
      for (; d < D8; d += 8) {
        const v8f vv = vload_any(p.v, vidx + d, dt);
        for (int64_t r = 0; r < R; ++r) {
          float* a = part_acc + r * Dp + d;
          vstore(a, vfma(vset(S[r * BKD + c]), vv, vload(a)));
        }
      }
      for (; d < D; ++d) {
        const float vs = load_any(p.v, vidx + d, dt);
        for (int64_t r = 0; r < R; ++r) part_acc[r * Dp + d] += S[r * BKD + c] * vs;
      }
    }
  }
}

// ---- backward, one (b, kv head, key-block range) ------------------------------------------------
// FA2: recompute P from q, k and lse; dV += P^T dO, dP = dO V^T, dS = P (dP - Delta),
// dK += dS^T (scale q), dQ += dS K. The group's query heads accumulate into the same dK/dV; dQ
// goes to dq_out (rows of this task's heads, fp32, [G][Sq][Dp], not yet multiplied by scale).
// Every product runs on packed fp32 tiles:
//   Kt [nkb_task][D][BK], Kr [nk_task][Dp], Vt [nkb_task][D][BK], dKa/dVa [nk_task][Dp],
//   Qh/dOh [Sq][Dp], S/P/dP/G tiles [BQ][BK].
struct BwdWs {
  float *Kt, *Kr, *Vt, *dKa, *dVa, *Qh, *dOh, *S, *dP, *G, *tmp, *delta, *lse;
};

inline void bwd_task(const Params& p, int64_t b, int64_t hk, int64_t kb0, int64_t kb1, float* dq_out,
                     const BwdWs& w) {
  const int64_t D = p.D, Dp = p.Dp, G = p.group(), Sq = p.Sq, Sk = p.Sk;
  const int64_t nkt = kb1 - kb0;
  const bool feat = p.has_features();
  // pack this task's key blocks
  for (int64_t t = 0; t < nkt; ++t) {
    const int64_t kb = kb0 + t, j0 = kb * BK, nk = std::min<int64_t>(BK, Sk - j0);
    float* Kt = w.Kt + t * D * BK;
    float* Vt = w.Vt + t * D * BK;
    float* Kr = w.Kr + t * BK * Dp;
    pack_kv_block(p, b, hk, kb, Kt, nullptr, w.tmp);
    const int64_t vbase = b * p.v_sb + hk * p.v_sh, kbase = b * p.k_sb + hk * p.k_sh;
    for (int64_t c = 0; c < nk; ++c) {
      load_row(w.tmp, p.v, vbase + (j0 + c) * p.v_ss, p.dtype, D, D, 1.f);
      for (int64_t d = 0; d < D; ++d) Vt[d * BK + c] = w.tmp[d];
      load_row(Kr + c * Dp, p.k, kbase + (j0 + c) * p.k_ss, p.dtype, D, Dp, 1.f);
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t c = nk; c < BK; ++c) Vt[d * BK + c] = 0.f;
    for (int64_t c = nk; c < BK; ++c)
      for (int64_t d = 0; d < Dp; ++d) Kr[c * Dp + d] = 0.f;
  }
  std::memset(w.dKa, 0, sizeof(float) * nkt * BK * Dp);
  std::memset(w.dVa, 0, sizeof(float) * nkt * BK * Dp);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const int64_t qbase = b * p.q_sb + h * p.q_sh, dbase = b * p.do_sb + h * p.do_sh, obase = b * p.o_sb + h * p.o_sh;
    const int64_t rbase = (b * p.Hq + h) * Sq;
    for (int64_t i = 0; i < Sq; ++i) {
      load_row(w.Qh + i * Dp, p.q, qbase + i * p.q_ss, p.dtype, D, Dp, p.scale);
      load_row(w.dOh + i * Dp, p.dout, dbase + i * p.do_ss, p.dtype, D, Dp, 1.f);
      load_row(w.tmp, p.o, obase + i * p.o_ss, p.dtype, D, Dp, 1.f);
      v8f a = vset(0.f);
      for (int64_t d = 0; d < Dp; d += 8) a = vfma(vload(w.dOh + i * Dp + d), vload(w.tmp + d), a);
      w.delta[i] = hsum(a);
      w.lse[i] = p.lse_in[rbase + i];
    }
    if (p.delta && kb0 == 0)
      for (int64_t i = 0; i < Sq; ++i) p.delta[rbase + i] = w.delta[i];
    float* dQ = dq_out + g * Sq * Dp;
    std::memset(dQ, 0, sizeof(float) * Sq * Dp);
    for (int64_t t = 0; t < nkt; ++t) {
      const int64_t kb = kb0 + t, j0 = kb * BK, j1 = std::min<int64_t>(j0 + BK, Sk), nk = j1 - j0;
      // query rows whose key range meets [j0, j1)
      int64_t qmin = 0, qmax = Sq;
      if (p.wr >= 0) qmin = std::max<int64_t>(0, j0 - p.off - p.wr);
      if (p.wl >= 0) qmax = std::min<int64_t>(Sq, j1 - p.off + p.wl);
      const float* Kt = w.Kt + t * D * BK;
      const float* Vt = w.Vt + t * D * BK;
      const float* Kr = w.Kr + t * BK * Dp;
      float* dKa = w.dKa + t * BK * Dp;
      float* dVa = w.dVa + t * BK * Dp;
      for (int64_t i0 = qmin; i0 < qmax; i0 += BQ) {
        const int64_t nr = std::min<int64_t>(BQ, qmax - i0);
        const float* Qb = w.Qh + i0 * Dp;
        const float* dOb = w.dOh + i0 * Dp;
        gemm(nr, BK, D, Qb, Dp, 1, Kt, BK, w.S, BK, false);
        gemm(nr, BK, D, dOb, Dp, 1, Vt, BK, w.dP, BK, false);
        const bool need_pos = j0 < p.row_lo(i0 + nr - 1) || j0 + BK > p.row_hi(i0);
        const bool cap = p.softcap > 0.f;
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = i0 + r;
          float* s = w.S + r * BK;
          float* dp = w.dP + r * BK;
          float* gg = w.G + r * BK;
          if (feat) apply_features(p, s, cap ? gg : nullptr, nk, b, h, i, j0);
          if (need_pos) mask_outside(s, BK, j0, p.row_lo(i), p.row_hi(i));
          const float L = w.lse[i];
          if (L == kNegInf) {  // fully masked row: no gradient
            for (int64_t c = 0; c < BK; c += 8) {
              vstore(s + c, vset(0.f));
              vstore(dp + c, vset(0.f));
            }
          } else {
            const v8f lv = vset(L), dl = vset(w.delta[i]);
            for (int64_t c = 0; c < BK; c += 8) {
              const v8f pr = vexp(vload(s + c) - lv);
              vstore(s + c, pr);
              vstore(dp + c, pr * (vload(dp + c) - dl));
            }
          }
          if (p.dmask) {
            float* dm = p.dmask + ((rbase + i) * Sk + j0);
            for (int64_t c = 0; c < nk; ++c) dm[c] = dp[c];
          }
          if (cap)
            for (int64_t c = 0; c < nk; ++c) dp[c] *= gg[c];
        }
        // dV += P^T dO ; dK += dS^T Qs ; dQ += dS K
        gemm(BK, Dp, nr, w.S, 1, BK, dOb, Dp, dVa, Dp, true);
        gemm(BK, Dp, nr, w.dP, 1, BK, Qb, Dp, dKa, Dp, true);
        gemm(nr, Dp, BK, w.dP, BK, 1, Kr, Dp, dQ + i0 * Dp, Dp, true);
      }
    }
  }
  for (int64_t t = 0; t < nkt; ++t) {
    const int64_t j0 = (kb0 + t) * BK, nk = std::min<int64_t>(BK, Sk - j0);
    for (int64_t c = 0; c < nk; ++c) {
      float* dk = p.dk + ((b * p.Hkv + hk) * Sk + j0 + c) * D;
      float* dv = p.dv + ((b * p.Hkv + hk) * Sk + j0 + c) * D;
      std::memcpy(dk, w.dKa + (t * BK + c) * Dp, sizeof(float) * D);
      std::memcpy(dv, w.dVa + (t * BK + c) * Dp, sizeof(float) * D);
    }
  }
}

#undef FB_AI

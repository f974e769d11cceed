// CPU flash attention: the plain-C description of one call that every instruction-set build of
// the kernel body (attention_kernel.h) reads, and the scalar helpers that need no target.
// Semantics: /work/wt/notes/SPEC.md, the float64 reference fastbig/reference/attention.py.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace fastbig {
namespace attn {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAddMask = 2 };

#ifndef FB_ATTN_BQ
#define FB_ATTN_BQ 64
#endif
#ifndef FB_ATTN_BK
#define FB_ATTN_BK 64
#endif
constexpr int BQ = FB_ATTN_BQ;  // query rows of a forward/backward tile
constexpr int BK = FB_ATTN_BK;  // keys of a tile (the packed K^T / V blocks are padded to it)
constexpr int BKD = 64;  // keys of a decode chunk
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Params {
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, Dp = 0;  // Dp: D rounded up to 16
  int dtype = kF32;                                                // of q, k, v (and grad_out)
  const void* q = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_ss = 0;  // element strides; the D stride is 1
  const void* k = nullptr;
  int64_t k_sb = 0, k_sh = 0, k_ss = 0;
  const void* v = nullptr;
  int64_t v_sb = 0, v_sh = 0, v_ss = 0;
  float scale = 1.f, softcap = 0.f;
  int64_t wl = -1, wr = -1;  // window (left, right), -1 = unbounded; causal is wr = 0
  int64_t off = 0;           // Sk - Sq when bottom_right, else 0
  const uint8_t* kpm = nullptr;  // key_padding_mask [B, Sk] contiguous, nonzero = padded
  int mask_kind = kNoMask;
  const void* mask = nullptr;  // bool (uint8) or float32, read by strides (0 = broadcast)
  int64_t m_sb = 0, m_sh = 0, m_sq = 0, m_sk = 0;
  const float* sinks = nullptr;  // [Hq]
  const float* alibi = nullptr;  // [B, Hq] by strides
  int64_t al_sb = 0, al_sh = 0;
  float* out = nullptr;  // [B, Hq, Sq, D] contiguous fp32
  float* lse = nullptr;  // [B, Hq, Sq]
  // backward only
  const void* dout = nullptr;  // grad_out, same dtype as q
  int64_t do_sb = 0, do_sh = 0, do_ss = 0;
  const void* o = nullptr;  // the forward's out, same dtype as q
  int64_t o_sb = 0, o_sh = 0, o_ss = 0;
  const float* lse_in = nullptr;  // [B, Hq, Sq] contiguous
  float* dq = nullptr;            // [B, Hq, Sq, D] fp32
  float* dk = nullptr;            // [B, Hkv, Sk, D] fp32
  float* dv = nullptr;
  float* dmask = nullptr;  // [B, Hq, Sq, Sk] fp32 (dS) or null
  float* delta = nullptr;  // [B, Hq, Sq] fp32: rowsum(dO * O)

  int64_t group() const { return Hq / Hkv; }
  int64_t nkb() const { return (Sk + BK - 1) / BK; }
  // The keys query row i may see: [row_lo, row_hi), clamped to [0, Sk] (empty when lo >= hi).
  int64_t row_lo(int64_t i) const {
    int64_t lo = wl >= 0 ? i + off - wl : 0;
    return lo < 0 ? 0 : (lo > Sk ? Sk : lo);
  }
  int64_t row_hi(int64_t i) const {
    int64_t hi = wr >= 0 ? i + off + wr + 1 : Sk;
    return hi < 0 ? 0 : (hi > Sk ? Sk : hi);
  }
  bool has_features() const { return softcap > 0.f || alibi || mask_kind != kNoMask || kpm; }
};

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ff;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The score transform of one row segment s[0, n) = keys j0 .. j0+n-1 of query row i, head h,
// batch b, in the SPEC's order: softcap, ALiBi, additive mask, then -inf for a bool mask False
// and a padded key. g (optional) receives 1 - tanh^2 for the softcap gradient. Keys outside
// the row's causal/window range are the caller's (mask_outside).
inline void apply_features(const Params& p, float* s, float* g, int64_t n, int64_t b, int64_t h, int64_t i,
                           int64_t j0) {
  if (p.softcap > 0.f) {
    const float c = p.softcap, ic = 1.f / p.softcap;
    for (int64_t j = 0; j < n; ++j) {
      const float t = std::tanh(s[j] * ic);
      s[j] = c * t;
      if (g) g[j] = 1.f - t * t;
    }
  }
  if (p.alibi) {
    const float sl = p.alibi[b * p.al_sb + h * p.al_sh];
    const int64_t pos = i + p.off;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t d = pos - (j0 + j);
      s[j] -= sl * float(d < 0 ? -d : d);
    }
  }
  if (p.mask_kind == kAddMask) {
    const float* m = static_cast<const float*>(p.mask) + b * p.m_sb + h * p.m_sh + i * p.m_sq + j0 * p.m_sk;
    for (int64_t j = 0; j < n; ++j) s[j] += m[j * p.m_sk];
  } else if (p.mask_kind == kBoolMask) {
    const uint8_t* m = static_cast<const uint8_t*>(p.mask) + b * p.m_sb + h * p.m_sh + i * p.m_sq + j0 * p.m_sk;
    for (int64_t j = 0; j < n; ++j)
      if (!m[j * p.m_sk]) s[j] = kNegInf;
  }
  if (p.kpm) {
    const uint8_t* m = p.kpm + b * p.Sk + j0;
    for (int64_t j = 0; j < n; ++j)
      if (m[j]) s[j] = kNegInf;
  }
}

// -inf for the keys j0 + [0, n) outside [lo, hi).
inline void mask_outside(float* s, int64_t n, int64_t j0, int64_t lo, int64_t hi) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t jj = j0 + j;
    if (jj < lo || jj >= hi) s[j] = kNegInf;
  }
}

}  // namespace attn
}  // namespace fastbig

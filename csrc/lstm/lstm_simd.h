// CPU only: an 8-wide float type (GCC/Clang vector extensions, so any x86/ARM target compiles it;
// the layer loop is also cloned for AVX2+FMA) and the vector sigmoid/tanh that the shared cell
// formulas of lstm_math.h are instantiated with. The cell algebra is not repeated here: this
// file supplies only the primitives exp/sigmoid/tanh, as SLEEF does for ATen's Vectorized.
//
// exp: Cephes expf (range reduction by ln2 in two parts, degree-6 polynomial), max rel error
// ~2 ulp on [-87, 88]; inputs are clamped there, so sigmoid/tanh saturate cleanly and no inf or
// NaN is formed for finite input (a NaN input stays NaN). tanh: Cephes tanhf (odd polynomial for |x| < 0.625, else
// 1 - 2/(exp(2|x|) + 1) with the sign restored), ~2 ulp.
#pragma once
#include <cstdint>
#include <cstring>

#include "lstm/lstm_math.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // V8 by value inside one TU: the ABI note is moot
#endif

namespace fastbig {
namespace lstm {
namespace simd {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

struct V8 {
  v8f v;
  V8() = default;
  V8(v8f x) : v(x) {}
  V8(float s) : v(v8f{} + s) {}
  static V8 load(const float* p) {
    V8 r;
    std::memcpy(&r.v, p, sizeof(v8f));
    return r;
  }
  void store(float* p) const { std::memcpy(p, &v, sizeof(v8f)); }
};
inline V8 operator+(V8 a, V8 b) { return a.v + b.v; }
inline V8 operator-(V8 a, V8 b) { return a.v - b.v; }
inline V8 operator*(V8 a, V8 b) { return a.v * b.v; }
inline V8 operator/(V8 a, V8 b) { return a.v / b.v; }

// 16 floats as two independent 8-lane halves, each op applied to both. The cell is one long
// dependency chain (sigmoid -> c -> tanh(c) -> h, ~140 cycles); with one 8-lane vector per
// iteration the core mostly waits on it, with two adjacent independent chains it overlaps them.
// (Not a 64-byte GCC vector: GCC lowers those badly on AVX2, 5x slower.)
struct V16 {
  V8 a, b;
  V16() = default;
  V16(V8 x, V8 y) : a(x), b(y) {}
  V16(float s) : a(s), b(s) {}
  static V16 load(const float* p) { return V16(V8::load(p), V8::load(p + 8)); }
  void store(float* p) const {
    a.store(p);
    b.store(p + 8);
  }
};
inline V16 operator+(V16 x, V16 y) { return V16(x.a + y.a, x.b + y.b); }
inline V16 operator-(V16 x, V16 y) { return V16(x.a - y.a, x.b - y.b); }
inline V16 operator*(V16 x, V16 y) { return V16(x.a * y.a, x.b * y.b); }
inline V16 operator/(V16 x, V16 y) { return V16(x.a / y.a, x.b / y.b); }

inline v8f vmin(v8f a, v8f b) { return a < b ? a : b; }
inline v8f vmax(v8f a, v8f b) { return a > b ? a : b; }

inline v8f vexp(v8f x) {
  // Clamp to [-87, 88], NaN passing through (x < lo and x > hi are false for NaN; vmin/vmax
  // would turn it into a bound and a NaN input into a finite, wrong result).
  x = x < -87.0f ? v8f{} - 87.0f : x;
  x = x > 88.0f ? v8f{} + 88.0f : x;
  // n = round(x / ln2): adding 1.5 * 2^23 leaves the rounded integer in the low mantissa bits
  // (|x / ln2| < 2^22), so n and 2^n come from t's bits with two integer ops.
  constexpr float kMagic = 12582912.0f;  // 0x4B400000
  const v8f t = x * 1.44269504088896341f + kMagic;
  const v8f fn = t - kMagic;
  x = x - fn * 0.693359375f;
  x = x + fn * 2.12194440e-4f;
  const v8f z = x * x;
  v8f y = x * 1.9875691500E-4f + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * z + x + 1.0f;
  v8i bits;
  std::memcpy(&bits, &t, sizeof(v8f));
  bits = (bits - (0x4B400000 - 127)) << 23;  // 2^n, n in [-126, 127]
  v8f scale;
  std::memcpy(&scale, &bits, sizeof(v8f));
  return y * scale;
}

inline v8f vsigmoid(v8f x) { return 1.0f / (1.0f + vexp(v8f{} - x)); }

inline v8f vtanh(v8f x) {
  const v8f ax = vmax(x, v8f{} - x);  // NaN: -x, NaN
  // small |x|: x + x^3 P(x^2)
  const v8f z = x * x;
  v8f p = z * -5.70498872745E-3f + 2.06390887954E-2f;
  p = p * z - 5.37397155531E-2f;
  p = p * z + 1.33314422036E-1f;
  p = p * z - 3.33332819422E-1f;
  const v8f small = p * z * x + x;
  // large |x|: 1 - 2 / (exp(2|x|) + 1), sign of x
  v8f big = 1.0f - 2.0f / (vexp(ax + ax) + 1.0f);
  big = x < 0.0f ? v8f{} - big : big;
  return ax < 0.625f ? small : big;
}

struct VecMath {
  static V8 sigmoid(V8 x) { return vsigmoid(x.v); }
  static V8 tanh(V8 x) { return vtanh(x.v); }
  static V16 sigmoid(V16 x) { return V16(vsigmoid(x.a.v), vsigmoid(x.b.v)); }
  static V16 tanh(V16 x) { return V16(vtanh(x.a.v), vtanh(x.b.v)); }
};

}  // namespace simd
}  // namespace lstm
}  // namespace fastbig

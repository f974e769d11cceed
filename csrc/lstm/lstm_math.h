// LSTM pointwise math, torch.nn gate order (i, f, g, o). Host and device share this code.
//
//   i = sigmoid(a_i)  f = sigmoid(a_f)  g = tanh(a_g)  o = sigmoid(a_o)
//   c = f * c_prev + i * g        h = o * tanh(c)
//
// Backward, from dh and dc (the gradient flowing into c from the next step):
//   dc_total = dc + dh * o * (1 - tanh(c)^2)
//   da_i = dc_total * g * i (1 - i)      da_f = dc_total * c_prev * f (1 - f)
//   da_g = dc_total * i * (1 - g^2)      da_o = dh * tanh(c) * o (1 - o)
//   dc_prev = dc_total * f
//
// The formulas are written once, templated on the value type T and on a math policy M that
// supplies sigmoid and tanh. Scalars (float, double; host or device) use ScalarMath, which
// calls common/host_device.h. The CPU layer loop also instantiates them on an 8-wide SIMD float
// type with its own vector sigmoid/tanh (lstm_simd.h): the cell algebra stays this one definition.
// So does the layout of a gate row: [4H], block q (i, f, g, o) at q*H (load_gates, store_gates).
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/host_device.h"

namespace fastbig {
namespace lstm {

template <typename T>
struct Gates {
  T i, f, g, o;
};

// One value of type T at p, and its store: a scalar T converts one element (p may hold Half,
// BFloat16, float or double); a SIMD T (lstm_simd.h: V8, V16) loads/stores lanes of floats.
template <typename T, typename S>
FB_HD T load_as(const S* p) {
  if constexpr (std::is_floating_point_v<T>) return T(*p);
  else return T::load(p);
}
template <typename T, typename S>
FB_HD void store_as(S* p, const T& v) {
  if constexpr (std::is_floating_point_v<T>) *p = S(v);
  else v.store(p);
}

// The four gates (i, f, g, o) of unit j (lanes j.. for a SIMD T) of one [4H] gate row p.
template <typename T, typename S>
FB_HD Gates<T> load_gates(const S* p, int64_t j, int64_t H) {
  return {load_as<T>(p + j), load_as<T>(p + H + j), load_as<T>(p + 2 * H + j), load_as<T>(p + 3 * H + j)};
}
template <typename T, typename S>
FB_HD void store_gates(const Gates<T>& a, S* p, int64_t j, int64_t H) {
  store_as(p + j, a.i);
  store_as(p + H + j, a.f);
  store_as(p + 2 * H + j, a.g);
  store_as(p + 3 * H + j, a.o);
}

// The pre-activations of unit j: gate row g plus, when there is one, the bias row [4H].
template <typename T, typename S>
FB_HD Gates<T> load_preact(const S* g, const S* bias, int64_t j, int64_t H) {
  Gates<T> a = load_gates<T>(g, j, H);
  if (bias) {
    const Gates<T> b = load_gates<T>(bias, j, H);
    a = {a.i + b.i, a.f + b.f, a.g + b.g, a.o + b.o};
  }
  return a;
}

template <typename T>
struct ScalarMath {
  static FB_HD T sigmoid(T x) { return fb_sigmoid(x); }
  static FB_HD T tanh(T x) { return fb_tanh(x); }
};

// Forward for one (batch, hidden) element. a_*: pre-activations. Writes the activated gates.
template <typename T, typename M = ScalarMath<T>>
FB_HD void cell_forward(T a_i, T a_f, T a_g, T a_o, T c_prev, Gates<T>& act, T& c, T& h) {
  act.i = M::sigmoid(a_i);
  act.f = M::sigmoid(a_f);
  act.g = M::tanh(a_g);
  act.o = M::sigmoid(a_o);
  c = act.f * c_prev + act.i * act.g;
  h = act.o * M::tanh(c);
}

// Backward for one element. dh, dc may be zero (an undefined incoming gradient).
template <typename T, typename M = ScalarMath<T>>
FB_HD void cell_backward(T dh, T dc, const Gates<T>& act, T c_prev, T c, Gates<T>& da, T& dc_prev) {
  const T one = T(1);
  const T tc = M::tanh(c);
  const T dct = dc + dh * act.o * (one - tc * tc);
  da.i = dct * act.g * act.i * (one - act.i);
  da.f = dct * c_prev * act.f * (one - act.f);
  da.g = dct * act.i * (one - act.g * act.g);
  da.o = dh * tc * act.o * (one - act.o);
  dc_prev = dct * act.f;
}

}  // namespace lstm
}  // namespace fastbig

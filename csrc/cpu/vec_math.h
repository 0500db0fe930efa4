// Activations on at::vec SIMD vectors, so that the cells of cell_math.h run on whole
// vector registers on the CPU: float64 through Sleef (about 1 ulp), float32 as below.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "../cell_math.h"

namespace rnn_fused {

// float32 activations written out here rather than through Sleef: Sleef's functions are
// calls the compiler cannot inline, and every call spills the vector registers of the cell
// around it (in the LSTM step at T=200 B=16 H=128 on one thread, Intel Xeon, Sleef's tanhf
// took 2 of 8.5 ms). Inline, the steps of the cell's five activations interleave.

// e^y for float32 vectors with y <= 0, within 1 ulp: y = n ln2 + r with |r| <= ln2 / 2,
// e^r = 1 + r + r^2 P(r) (P fitted for relative error), times 2^n put in the exponent bits.
// Below y = -87.3, where e^y leaves the normal floats, the result stays about 1.2e-38.
template <class V>
V exp_nonpositive(const V& y) {
  using T = float;
  using Int = at::vec::Vectorized<int32_t>;
  const V yc = at::vec::maximum(y, V(T(-87.3)));
  const V n = (yc * V(T(1.4426950408889634))).round();
  V r = at::vec::fmadd(n, V(T(-0.693359375)), yc);  // ln2 in two parts: n * ln2 exact
  r = at::vec::fmadd(n, V(T(2.12194440e-4)), r);
  V p(T(0.0013814608405987273));
  p = at::vec::fmadd(p, r, V(T(0.00836871043265411)));
  p = at::vec::fmadd(p, r, V(T(0.04166838747333898)));
  p = at::vec::fmadd(p, r, V(T(0.16666520683636263)));
  p = at::vec::fmadd(p, r, V(T(0.4999999345112779)));
  const V e_r = at::vec::fmadd(r * r, p, r) + V(T(1));
  const Int two_n = (at::vec::convert_to_int_of_same_size(n) + Int(127)) << Int(23);
  return e_r * at::vec::cast<T>(two_n);
}

// sigmoid from t = e^-|x|: 1 / (1 + t) for x >= 0, t / (1 + t) below (no overflow, no
// cancellation).
template <class V>
V sigmoid_float(const V& x) {
  using T = float;
  const V t = exp_nonpositive(x.abs().neg());
  const V s = V(T(1)) / (V(T(1)) + t);
  return V::blendv(t * s, s, x >= V(T(0)));
}

// tanh: x + x^3 P(x^2) below |x| = 0.625 (P fitted for relative error), above it
// (1 - t) / (1 + t) with t = e^-2|x| and the sign of x. Within 2 ulp (tests/test_activations.py).
template <class V>
V tanh_float(const V& x) {
  using T = float;
  const V ax = x.abs(), z = x * x;
  V p(T(-0.005704992107242705));
  p = at::vec::fmadd(p, z, V(T(0.0206390935580542)));
  p = at::vec::fmadd(p, z, V(T(-0.05373971771734203)));
  p = at::vec::fmadd(p, z, V(T(0.13331442241332242)));
  p = at::vec::fmadd(p, z, V(T(-0.33333281944260446)));
  const V small = at::vec::fmadd(x * z, p, x);
  const V t = exp_nonpositive(ax * V(T(-2)));
  const V large = ((V(T(1)) - t) / (V(T(1)) + t)).copysign(x);
  return V::blendv(large, small, ax < V(T(0.625)));
}

template <class T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sigmoid(const V& x) {
    if constexpr (std::is_same_v<T, float>) return sigmoid_float(x);
    return V(T(1)) / (V(T(1)) + x.neg().exp());
  }
  static V tanh(const V& x) {
    if constexpr (std::is_same_v<T, float>) return tanh_float(x);
    return x.tanh();
  }
  static V relu(const V& x) { return at::vec::maximum(x, V(T(0))); }
  static V positive(const V& y) { return y.gt(V(T(0))); }
};

// Loads and stores that read the same for a scalar and a vector, so that one loop body
// serves the vector part of a row and its scalar tail.
template <class V>
struct Lanes {
  static constexpr int64_t size = 1;
  static V load(const V* p) { return *p; }
  static void store(const V& v, V* p) { *p = v; }
};

template <class T>
struct Lanes<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static constexpr int64_t size = V::size();
  static V load(const T* p) { return V::loadu(p); }
  static void store(const V& v, T* p) { v.store(p); }
};

}  // namespace rnn_fused

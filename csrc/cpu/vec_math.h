// Activations on at::vec SIMD vectors, so that the cells of cell_math.h run on whole
// vector registers on the CPU. Accurate to about 1 ulp (Sleef's u10 functions).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../cell_math.h"

namespace rnn_fused {

template <class T>
struct MathOps<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V sigmoid(const V& x) { return V(T(1)) / (V(T(1)) + x.neg().exp()); }
  static V tanh(const V& x) { return x.tanh(); }
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

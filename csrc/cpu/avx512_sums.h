// Horizontal sums of AVX-512 vectors, for the dot-product kernels of gemm.cpp and
// bf16_dot.cpp (compiled for AVX-512 function by function where the build targets less).
#pragma once

#include <immintrin.h>

namespace rnn_fused::cpu {

// Sum of each of 16 vectors, as one vector (lane r: the sum of v[r]): the per-row sums of
// 16 dot products at once, in 15 adds and 30 shuffles where 16 separate reductions take
// 64 adds and 64 shuffles (which were 60% of row_times_bt's time in perf, LSTMCell(32)).
__attribute__((target("avx512f"))) inline __m512 sums_of_16(const __m512 (&v)[16]) {
  // Pairs: per 128-bit block, lanes 0 and 2 hold v[2q]'s partial sums, 1 and 3 v[2q + 1]'s.
  __m512 t[8];
  for (int q = 0; q < 8; ++q) {
    t[q] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * q], v[2 * q + 1]),
                         _mm512_unpackhi_ps(v[2 * q], v[2 * q + 1]));
  }
  // Quads: per 128-bit block, lane i holds v[4q + i]'s partial sum over that block.
  __m512 u[4];
  for (int q = 0; q < 4; ++q) {
    u[q] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // The four 128-bit blocks: first added in pairs, then block q of the result is u[q]'s sum.
  __m512 s[2];
  for (int q = 0; q < 2; ++q) {
    s[q] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * q], u[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * q], u[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The same for 8 vectors of float64 (lane r: the sum of v[r]), in 7 adds and 14 shuffles.
__attribute__((target("avx512f"))) inline __m512d sums_of_8(const __m512d (&v)[8]) {
  // Pairs: per 128-bit block, lane 0 holds v[2q]'s partial sum, lane 1 v[2q + 1]'s.
  __m512d t[4];
  for (int q = 0; q < 4; ++q) {
    t[q] = _mm512_add_pd(_mm512_unpacklo_pd(v[2 * q], v[2 * q + 1]),
                         _mm512_unpackhi_pd(v[2 * q], v[2 * q + 1]));
  }
  // The four 128-bit blocks: first added in pairs, then block q of the result is t[q]'s sum.
  __m512d u[2];
  for (int q = 0; q < 2; ++q) {
    u[q] = _mm512_add_pd(_mm512_shuffle_f64x2(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f64x2(t[2 * q], t[2 * q + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  return _mm512_add_pd(_mm512_shuffle_f64x2(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f64x2(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

}  // namespace rnn_fused::cpu

// Square blocks transposed in registers: dst[j * ld_dst + i] = src[i * ld_src + j]. On
// AVX-512, for rows i < n and values j < m of the block: rows past n read as zeros, values
// past m neither read nor written; on AVX2, whole blocks only. For pack_panels.cpp's packing
// of weights seen transposed and the panels of tile_gemm.cpp. ATen's transpose_mxn passes its
// block through memory to a kernel sized at run time: 16% of perf's samples of a bfloat16
// LSTM's forward at T=17 B=1 H=256, the weights' packing, against 10% this way (Intel Xeon).
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <cstdint>

namespace rnn_fused::cpu {

// 16 x 16 float32 values in four rounds of shuffles: pairs of values, 64-bit halves, 128-bit
// quarters, then the halves of the result.
inline void transpose_block(const float* src, int64_t ld_src, int n, int m, float* dst,
                            int64_t ld_dst) {
  const __mmask16 values = static_cast<__mmask16>((1u << m) - 1);
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    r[i] = i < n ? _mm512_maskz_loadu_ps(values, src + i * ld_src) : _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512d lo = _mm512_castps_pd(t[i + h]), hi = _mm512_castps_pd(t[i + h + 2]);
      r[i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi));
      r[i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi));
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < 16; i += 8) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      t[i + q] = _mm512_shuffle_f32x4(r[i + q], r[i + q + 4], 0x88);
      t[i + q + 4] = _mm512_shuffle_f32x4(r[i + q], r[i + q + 4], 0xdd);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    if (j < m) _mm512_storeu_ps(dst + j * ld_dst, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    if (j + 8 < m)
      _mm512_storeu_ps(dst + (j + 8) * ld_dst, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
  }
}

// 8 x 8 float64 values: unpacks of pairs, then two rounds of 128-bit block shuffles.
inline void transpose_block(const double* src, int64_t ld_src, int n, int m, double* dst,
                            int64_t ld_dst) {
  const __mmask8 values = static_cast<__mmask8>((1u << m) - 1);
  __m512d r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    r[i] = i < n ? _mm512_maskz_loadu_pd(values, src + i * ld_src) : _mm512_setzero_pd();
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_pd(r[i], r[i + 1]);      // per 128-bit block: r[i][2b], r[i+1][2b]
    t[i + 1] = _mm512_unpackhi_pd(r[i], r[i + 1]);  // r[i][2b+1], r[i+1][2b+1]
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      r[i + h] = _mm512_shuffle_f64x2(t[i + h], t[i + h + 2], 0x88);      // blocks 0, 2
      r[i + h + 2] = _mm512_shuffle_f64x2(t[i + h], t[i + h + 2], 0xdd);  // blocks 1, 3
    }
  }
  // r[0..3] hold columns {0, 4}, {1, 5}, {2, 6}, {3, 7} of rows 0-3; r[4..7] those of rows 4-7.
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    if (q < m) _mm512_storeu_pd(dst + q * ld_dst, _mm512_shuffle_f64x2(r[q], r[q + 4], 0x88));
    if (q + 4 < m)
      _mm512_storeu_pd(dst + (q + 4) * ld_dst, _mm512_shuffle_f64x2(r[q], r[q + 4], 0xdd));
  }
}

}  // namespace rnn_fused::cpu

#elif defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include <cstdint>

namespace rnn_fused::cpu {

// Whole square blocks on AVX2, a vector's lanes a side (8 x 8 float32, 4 x 4 float64):
// dst[j * ld_dst + i] = src[i * ld_src + j]. ATen's transpose of a size known at run time is
// a loop of single values there.
inline void transpose_whole_block(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // per 128-bit half: r[i][0], r[i+1][0], [1], [1]
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // r[i][2], r[i+1][2], [3], [3]
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      r[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0x44);      // the first pairs
      r[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], 0xee);  // the second pairs
    }
  }
  // r[0..3] hold columns {0, 4}, {1, 5}, {2, 6}, {3, 7} of rows 0-3; r[4..7] those of rows 4-7.
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_ps(dst + q * ld_dst, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
    _mm256_storeu_ps(dst + (q + 4) * ld_dst, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
  }
}

inline void transpose_whole_block(const double* src, int64_t ld_src, double* dst, int64_t ld_dst) {
  __m256d r[4], t[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) r[i] = _mm256_loadu_pd(src + i * ld_src);
  t[0] = _mm256_unpacklo_pd(r[0], r[1]);  // per 128-bit half: r[0][0], r[1][0]
  t[1] = _mm256_unpackhi_pd(r[0], r[1]);  // r[0][1], r[1][1]
  t[2] = _mm256_unpacklo_pd(r[2], r[3]);
  t[3] = _mm256_unpackhi_pd(r[2], r[3]);
#pragma GCC unroll 2
  for (int q = 0; q < 2; ++q) {
    _mm256_storeu_pd(dst + q * ld_dst, _mm256_permute2f128_pd(t[q], t[q + 2], 0x20));
    _mm256_storeu_pd(dst + (q + 2) * ld_dst, _mm256_permute2f128_pd(t[q], t[q + 2], 0x31));
  }
}

}  // namespace rnn_fused::cpu

#endif

// One row times W^T on AVX2 (a cell's step at batch 1, W as torch stores it): the dot
// products of 8 rows of W (float32) or 4 (float64) in registers, their lanes summed together
// at the end. For AVX2 builds only (CPUs without AVX-512), where ATen's per-row reduction
// of the generic loop stores and reloads each lane.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace rnn_fused::cpu::avx2 {

// Lane r: the sum of v[r]'s 8 lanes, in 7 adds (hadd's pairs, then the two 128-bit halves).
inline __m256 sums_of_8(const __m256 (&v)[8]) {
  __m256 t[4], u[2];
  // Per 128-bit half: lanes 0-1 v[2q]'s pairwise sums, lanes 2-3 v[2q + 1]'s.
  for (int q = 0; q < 4; ++q) t[q] = _mm256_hadd_ps(v[2 * q], v[2 * q + 1]);
  // Per 128-bit half: lane i v[4q + i]'s sum over that half.
  for (int q = 0; q < 2; ++q) u[q] = _mm256_hadd_ps(t[2 * q], t[2 * q + 1]);
  return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                       _mm256_permute2f128_ps(u[0], u[1], 0x31));
}

// Lane r: the sum of v[r]'s 4 lanes.
inline __m256d sums_of_4(const __m256d (&v)[4]) {
  const __m256d t0 = _mm256_hadd_pd(v[0], v[1]), t1 = _mm256_hadd_pd(v[2], v[3]);
  return _mm256_add_pd(_mm256_permute2f128_pd(t0, t1, 0x20), _mm256_permute2f128_pd(t0, t1, 0x31));
}

// The first n lanes of a vector of 32-bit or 64-bit lanes, as maskload and maskstore take them.
inline __m256i first_lanes32(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i first_lanes64(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::min<int64_t>(n, 4)),
                            _mm256_setr_epi64x(0, 1, 2, 3));
}

inline __m256 load(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, first_lanes32(n));
}
inline __m256d load(const double* p, int64_t n) {
  return n >= 4 ? _mm256_loadu_pd(p) : _mm256_maskload_pd(p, first_lanes64(n));
}
inline void store(float* p, int64_t n, __m256 v) {
  if (n >= 8) return _mm256_storeu_ps(p, v);
  _mm256_maskstore_ps(p, first_lanes32(n), v);
}
inline void store(double* p, int64_t n, __m256d v) {
  if (n >= 4) return _mm256_storeu_pd(p, v);
  _mm256_maskstore_pd(p, first_lanes64(n), v);
}
inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256d fmadd(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256d add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
inline __m256 sums(const __m256 (&v)[8]) { return sums_of_8(v); }
inline __m256d sums(const __m256d (&v)[4]) { return sums_of_4(v); }

// c[j] (+)= sum_k a[k] B[j * ldb + k], j < N: kRows rows of B at a time (a vector's lanes),
// each row's sums in kLanes chains over k, summed together after.
template <class T, class V>
void rows_dot(int64_t N, int64_t K, const T* a, const T* B, int64_t ldb, T* c, bool accumulate) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(T), kRows = kLanes;
  for (int64_t j = 0; j < N; j += kRows) {
    const int64_t rows = std::min(kRows, N - j);
    V acc[kRows];
    for (auto& v : acc) v = V{};
    for (int64_t k = 0; k < K; k += kLanes) {
      const V x = load(a + k, K - k);
      for (int64_t r = 0; r < kRows; ++r) {
        if (r < rows) acc[r] = fmadd(load(B + (j + r) * ldb + k, K - k), x, acc[r]);
      }
    }
    V out = sums(acc);
    if (accumulate) out = add(out, load(c + j, rows));
    store(c + j, rows, out);
  }
}

}  // namespace rnn_fused::cpu::avx2

// GCC 12's false uninitialised-operand warning on inlined AVX-512 unpacks (see gemm.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "tile_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "register_transposes.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace rnn_fused::cpu {

namespace {
// force_tile_kernel's mode; kUnread until the environment is read.
constexpr int kUnread = -2;
std::atomic<int> forced_mode{kUnread};
}  // namespace

void force_tile_kernel(int mode) {
  TORCH_CHECK(mode >= -1 && mode <= 1, "force_tile_kernel: mode must be -1, 0 or 1, got ", mode);
  forced_mode.store(mode, std::memory_order_relaxed);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace {

// Beyond this many multiply-adds, or this K, a product's operands outgrow the caches that the
// kernel reads them from without blocking K, and MKL's blocked GEMM takes it. AVX2 (AMD EPYC
// Zen 3, one thread, against torch.mm): products of up to 2^21 multiply-adds with K <= 256
// ran in 0.55-0.92x MKL's time in float64 (C 204 x 51 = G^T A over 97 rows 0.64x, 48 x 204 =
// A W^T over 51 0.84x) and 0.75-0.99x in float32; at K = 512-2048 the tiles took 1.25-1.34x,
// and at 4-67 million with K = 100-128 1.0-1.2x. (AVX2 tiles hold 12 accumulators, not 18,
// and a column block of B, 8 float64 columns, fills Zen 3's 32 KiB L1 at K = 512.)
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kTileKernelMaxMacs = int64_t(1) << 27;
constexpr int64_t kTileKernelMaxK = std::numeric_limits<int64_t>::max();
constexpr bool kAvx2Build = false;
#else
constexpr int64_t kTileKernelMaxMacs = int64_t(1) << 21;
constexpr int64_t kTileKernelMaxK = 256;
constexpr bool kAvx2Build = true;
#endif
// AVX2 also leaves MKL a C of more values than this (C 1024 x 256 = G^T A over 4 rows took
// 1.35x MKL's time in float64, 512 x 256 0.85x), and products by B^T of fewer rows than
// this: each block of B^T is transposed for the rows that read it (LSTMCell(256) under
// no_grad at batch 4 took 1.2x the time in float64, at batch 16 1.17x; at batch 97 with H=51,
// 0.95x).
constexpr int64_t kAvx2MaxOutputs = int64_t(1) << 17;
constexpr int64_t kAvx2MinRowsTransB = 32;

// One vector register of T and the instructions the tiles use. `last` of a vector: its first
// lanes, those that are columns of C. AVX-512 loads and stores them under a mask; AVX2 loads
// whole vectors of B (kMaskedLoads false: a panel padded to whole vectors, see products) and
// stores the last vector of a row of C through memory, as AMD's masked stores are slow.
template <class T>
struct Simd;
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Simd<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr bool kMaskedLoads = true;
  static Mask first(int n) { return static_cast<Mask>((1u << n) - 1); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(Mask m, int, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
template <>
struct Simd<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int kLanes = 8;
  static constexpr bool kMaskedLoads = true;
  static Mask first(int n) { return static_cast<Mask>((1u << n) - 1); }
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V load(Mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static void store(Mask m, int, double* p, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
};
#else
// The first n lanes' values stored from `lanes`, a vector already stored to memory (by a
// store instruction: a memcpy from the vector's address made GCC keep half a tile's
// accumulators in memory through the loop over k).
template <class T>
inline void store_first(int n, T* p, const T* lanes) {
  for (int i = 0; i < n; ++i) p[i] = lanes[i];
}
template <>
struct Simd<float> {
  using V = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  static constexpr bool kMaskedLoads = false;
  static Mask first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(Mask m, const float* p) { return _mm256_maskload_ps(p, m); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static void store(Mask, int n, float* p, V v) {
    alignas(32) float lanes[kLanes];
    _mm256_store_ps(lanes, v);
    store_first(n, p, lanes);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
template <>
struct Simd<double> {
  using V = __m256d;
  using Mask = __m256i;
  static constexpr int kLanes = 4;
  static constexpr bool kMaskedLoads = false;
  static Mask first(int n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V load(Mask m, const double* p) { return _mm256_maskload_pd(p, m); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static void store(Mask, int n, double* p, V v) {
    alignas(32) double lanes[kLanes];
    _mm256_store_pd(lanes, v);
    store_first(n, p, lanes);
  }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
};
#endif

// A tile of C: kRows rows by kVecs vectors of accumulators in registers, each step of k
// reading kVecs vectors of B and broadcasting 6 values of A: 18 accumulators of AVX-512's 32
// registers, 12 of AVX2's 16.
constexpr int kRows = 6;
constexpr int kVecs = Simd<double>::kLanes == 8 ? 3 : 2;

// The k of a tile's chains of fused multiply-adds: each chain's sums are added to those of the
// chains before it (in memory: the accumulators fill the registers). In one chain over all of
// K, a GRU of one step at B=16 H=512 had dh_0 at 1.9x torch.nn's float32 error (relative
// norm against float64), an LSTM 1.8x; in chains of 128 no value of either is over 1.65x.
// No cost measured (cells at B=16-64, H=256-512, one thread, AMD EPYC).
constexpr int64_t kChain = 128;

// C[R, V vectors] (+)= op(A)[R, K] @ B[K, V vectors] (B's rows ldb apart; `last`: the lanes of
// the last vector that are columns of C, 1 to kLanes). A's row r, value k: A[r * lda + k], or
// A[k * lda + r] when kTransA.
template <class T, int R, int V, bool kTransA>
__attribute__((always_inline)) inline void tile(int64_t K, const T* A, int64_t lda, const T* B,
                                                int64_t ldb, T* C, int64_t ldc, bool accumulate,
                                                int last) {
  using S = Simd<T>;
  typename S::V c[R][V];
  alignas(64) T earlier[R][V][S::kLanes];  // the sums of the chains before the current one
  const T* a = A;
  for (int64_t k0 = 0;; k0 += kChain) {
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) c[r][v] = S::zero();
    const int64_t k1 = std::min(K, k0 + kChain);
    for (int64_t k = k0; k < k1; ++k, B += ldb, a += kTransA ? lda : 1) {
      typename S::V b[V];
#pragma GCC unroll 3
      for (int v = 0; v + 1 < V; ++v) b[v] = S::load(B + S::kLanes * v);
      if constexpr (S::kMaskedLoads)
        b[V - 1] = S::load(S::first(last), B + S::kLanes * (V - 1));
      else
        b[V - 1] = S::load(B + S::kLanes * (V - 1));
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const typename S::V x = S::set1(kTransA ? a[r] : a[r * lda]);
#pragma GCC unroll 3
        for (int v = 0; v < V; ++v) c[r][v] = S::fmadd(x, b[v], c[r][v]);
      }
    }
    const bool done = k1 == K;
    if (done && k0 == 0) break;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) {
        if (k0 > 0) c[r][v] = S::add(S::load(earlier[r][v]), c[r][v]);
        if (!done) S::store(earlier[r][v], c[r][v]);
      }
    }
    if (done) break;
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      T* out = C + r * ldc + S::kLanes * v;
      typename S::V sum = c[r][v];
      if (v + 1 < V || last == S::kLanes) {
        if (accumulate) sum = S::add(S::load(out), sum);
        S::store(out, sum);
      } else {
        const typename S::Mask last_mask = S::first(last);
        if (accumulate) sum = S::add(S::load(last_mask, out), sum);
        S::store(last_mask, last, out, sum);
      }
    }
  }
}

// All M rows of C against one block of B's columns (V vectors), in tiles of kRows rows and
// one tile of the rows left; row i of op(A) starts at A + i * row_stride.
template <class T, int V, bool kTransA>
void rows(int64_t M, int64_t K, const T* A, int64_t lda, int64_t row_stride, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate, int last) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    tile<T, kRows, V, kTransA>(K, A + i * row_stride, lda, B, ldb, C + i * ldc, ldc, accumulate,
                               last);
  }
  const T* a = A + i * row_stride;
  T* c = C + i * ldc;
  static_assert(kRows == 6, "the rows left below are 1 to 5");
  switch (M - i) {
    case 5:
      return tile<T, 5, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 4:
      return tile<T, 4, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 3:
      return tile<T, 3, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 2:
      return tile<T, 2, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 1:
      return tile<T, 1, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    default:
      return;
  }
}

// B^T's columns [j, j + n) for B stored [N, K] (a weight as torch keeps it): its rows j..j+n-1
// transposed into a panel [K, ld], read by the tiles like a row-major B.
// The lanes of its last vector past n are zeros.
template <class T>
void pack_transposed(const T* B, int64_t ldb, int64_t n, int64_t K, T* panel, int64_t ld) {
  constexpr int64_t L = Simd<T>::kLanes;
#if defined(CPU_CAPABILITY_AVX512)
  for (int64_t v = 0; v * L < n; ++v) {
    const int rows = static_cast<int>(std::min(L, n - L * v));
    for (int64_t k = 0; k < K; k += L) {
      transpose_block(B + L * v * ldb + k, ldb, rows, static_cast<int>(std::min(L, K - k)),
                      panel + k * ld + L * v, ld);
    }
  }
#else
  // Whole L x L blocks in registers (transpose_whole_block), the edges value by value.
  const int64_t n_whole = n / L * L, k_whole = K / L * L, n_padded = (n + L - 1) / L * L;
  for (int64_t c = 0; c < n_whole; c += L)
    for (int64_t k = 0; k < k_whole; k += L)
      transpose_whole_block(B + c * ldb + k, ldb, panel + k * ld + c, ld);
  for (int64_t k = 0; k < K; ++k) {
    T* row = panel + k * ld;
    if (k >= k_whole)
      for (int64_t c = 0; c < n_whole; ++c) row[c] = B[c * ldb + k];
    for (int64_t c = n_whole; c < n_padded; ++c) row[c] = c < n ? B[c * ldb + k] : T(0);
  }
#endif
}

// B's columns [0, n) (rows ldb apart) copied into a panel [K, ld], the lanes of its last
// vector past n zeros: for kernels that load whole vectors (Simd::kMaskedLoads false).
template <class T>
void pack_rows(const T* B, int64_t ldb, int64_t n, int64_t K, T* panel, int64_t ld) {
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t n_padded = (n + L - 1) / L * L;
  for (int64_t k = 0; k < K; ++k) {
    std::memcpy(panel + k * ld, B + k * ldb, n * sizeof(T));
    std::fill(panel + k * ld + n, panel + k * ld + n_padded, T(0));
  }
}

// Sums from which op(A) = A^T is packed first (pack_tiles_of_transposed). Shorter ones lose
// more to the copy than they gain: float64 products on one core, K = 256 to 512, 1-5% slower
// packed; K = 1024 the same or faster; K = 2048 1.4-1.6x faster (AMD EPYC).
constexpr int64_t kPackTransposedFromK = 1024;

// op(A) = A^T (A [K, M], rows lda apart) as tiles of kRows rows, each [K, kRows] contiguous
// (tile t's row r, value k at packed[t * kRows * K + k * kRows + r]): the tiles then read one
// line per few k instead of one line, lda apart, per k, and every column block reads it again
// (float64 weight gradients, 64 x 512 by K = 2048: a line 4 KiB apart at each k, from L3).
// float64 RNN T=100 B=64 H=512, forward and backward: 330-351 -> 235-244 ms (AMD EPYC).
template <class T>
void pack_tiles_of_transposed(int64_t M, int64_t K, const T* A, int64_t lda, T* packed) {
  for (int64_t i = 0; i < M; i += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, M - i);
    T* tile = packed + i * K;
    for (int64_t k = 0; k < K; ++k) {
      const T* a = A + k * lda + i;
      for (int64_t r = 0; r < rows; ++r) tile[k * kRows + r] = a[r];
    }
  }
}

template <class T, bool kTransA>
void products(bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
              int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int64_t L = Simd<T>::kLanes, kColumns = kVecs * L;
  int64_t row_stride = kTransA ? 1 : lda;
  if (kTransA && K >= kPackTransposedFromK) {
    thread_local std::vector<T> packed_a;
    const size_t size = static_cast<size_t>((M + kRows - 1) / kRows * kRows * K);
    if (packed_a.size() < size) packed_a.resize(size);
    pack_tiles_of_transposed(M, K, A, lda, packed_a.data());
    A = packed_a.data();
    lda = kRows;
    row_stride = K;
  }
  // One block of B^T's columns at a time, in L1 while every tile of rows reads it. Without
  // masked loads, a block of B as stored whose last vector is not whole is copied too.
  const bool partial = !Simd<T>::kMaskedLoads && N % L != 0;
  thread_local std::vector<T> panel;
  if ((trans_b || partial) && panel.size() < static_cast<size_t>(K * kColumns))
    panel.resize(K * kColumns);
  for (int64_t j = 0; j < N; j += kColumns) {
    const int64_t n = std::min(kColumns, N - j);
    const int vecs = static_cast<int>((n + L - 1) / L);
    const int last = static_cast<int>(n - L * (vecs - 1));
    const T* b = B + j;
    int64_t ld = ldb;
    if (trans_b || (partial && n % L != 0)) {
      if (trans_b)
        pack_transposed(B + j * ldb, ldb, n, K, panel.data(), kColumns);
      else
        pack_rows(B + j, ldb, n, K, panel.data(), kColumns);
      b = panel.data();
      ld = kColumns;
    }
    T* c = C + j;
    if constexpr (kVecs == 3) {
      if (vecs == 3) {
        rows<T, 3, kTransA>(M, K, A, lda, row_stride, b, ld, c, ldc, accumulate, last);
        continue;
      }
    }
    if (vecs == 2)
      rows<T, 2, kTransA>(M, K, A, lda, row_stride, b, ld, c, ldc, accumulate, last);
    else
      rows<T, 1, kTransA>(M, K, A, lda, row_stride, b, ld, c, ldc, accumulate, last);
  }
}

}  // namespace

bool tile_kernel_takes(int64_t M, int64_t N, int64_t K, bool trans_b) {
  if (M < 2 || N < 2 || K > kTileKernelMaxK || M * N * K > kTileKernelMaxMacs) return false;
  if (kAvx2Build && (M * N > kAvx2MaxOutputs || (trans_b && M < kAvx2MinRowsTransB))) return false;
  int mode = forced_mode.load(std::memory_order_relaxed);
  if (mode == kUnread) {
    const char* env = std::getenv("RNN_FUSED_TILE_KERNEL");
    mode = env == nullptr ? -1 : std::strcmp(env, "0") != 0 ? 1 : 0;
    int unread = kUnread;
    forced_mode.compare_exchange_strong(unread, mode);
  }
  if (mode >= 0) return mode == 1;
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

template <class T>
void tile_product_here(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                       int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (trans_a)
    products<T, true>(trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    products<T, false>(trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

#else

bool tile_kernel_takes(int64_t, int64_t, int64_t, bool) { return false; }

template <class T>
void tile_product_here(bool, bool, int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t,
                       T*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "tile_product_here needs an AVX-512 or AVX2 build");
}

#endif

template void tile_product_here<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                                       const float*, int64_t, float*, int64_t, bool);
template void tile_product_here<double>(bool, bool, int64_t, int64_t, int64_t, const double*,
                                        int64_t, const double*, int64_t, double*, int64_t, bool);

}  // namespace rnn_fused::cpu

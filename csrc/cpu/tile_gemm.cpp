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
#include <vector>

#include "register_transposes.h"

#if defined(CPU_CAPABILITY_AVX512)
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

#if defined(CPU_CAPABILITY_AVX512)
namespace {

// Beyond this many multiply-adds a product's operands outgrow the caches that the kernel
// reads them from without blocking K, and MKL's blocked GEMM takes it.
constexpr int64_t kTileKernelMaxMacs = int64_t(1) << 27;

// One vector register of T and the instructions the tiles use.
template <class T>
struct Simd;
template <>
struct Simd<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static void store(Mask m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
template <>
struct Simd<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr int kLanes = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V set1(double x) { return _mm512_set1_pd(x); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static V load(Mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm512_add_pd(a, b); }
  static void store(Mask m, double* p, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
};

// A tile of C: kRows rows by kVecs vectors, 18 accumulators in registers, each step of k
// reading 3 vectors of B and broadcasting 6 values of A for 18 multiply-adds.
constexpr int kRows = 6;
constexpr int kVecs = 3;

// The k of a tile's chains of fused multiply-adds: each chain's sums are added to those of the
// chains before it (in memory: the accumulators fill the registers). In one chain over all of
// K, a GRU of one step at B=16 H=512 had dh_0 at 1.9x torch.nn's float32 error (relative
// norm against float64), an LSTM 1.8x; in chains of 128 no value of either is over 1.65x.
// No cost measured (cells at B=16-64, H=256-512, one thread, AMD EPYC).
constexpr int64_t kChain = 128;

// C[R, V vectors] (+)= op(A)[R, K] @ B[K, V vectors] (B's rows ldb apart; `last`: the lanes of
// the last vector that are columns of C). A's row r, value k: A[r * lda + k], or A[k * lda + r]
// when kTransA.
template <class T, int R, int V, bool kTransA>
__attribute__((always_inline)) inline void tile(int64_t K, const T* A, int64_t lda, const T* B,
                                                int64_t ldb, T* C, int64_t ldc, bool accumulate,
                                                typename Simd<T>::Mask last) {
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
      b[V - 1] = S::load(last, B + S::kLanes * (V - 1));
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
  constexpr auto kAll = static_cast<typename S::Mask>(~0u);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      const typename S::Mask lanes = v + 1 < V ? kAll : last;
      T* out = C + r * ldc + S::kLanes * v;
      typename S::V sum = c[r][v];
      if (accumulate) sum = S::add(S::load(lanes, out), sum);
      S::store(lanes, out, sum);
    }
  }
}

// All M rows of C against one block of B's columns (V vectors), in tiles of kRows rows and
// one tile of the rows left; row i of op(A) starts at A + i * row_stride.
template <class T, int V, bool kTransA>
void rows(int64_t M, int64_t K, const T* A, int64_t lda, int64_t row_stride, const T* B,
          int64_t ldb, T* C, int64_t ldc, bool accumulate, typename Simd<T>::Mask last) {
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
template <class T>
void pack_transposed(const T* B, int64_t ldb, int64_t n, int64_t K, T* panel, int64_t ld) {
  constexpr int64_t L = Simd<T>::kLanes;
  for (int64_t v = 0; v * L < n; ++v) {
    const int rows = static_cast<int>(std::min(L, n - L * v));
    for (int64_t k = 0; k < K; k += L) {
      transpose_block(B + L * v * ldb + k, ldb, rows, static_cast<int>(std::min(L, K - k)),
                      panel + k * ld + L * v, ld);
    }
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
  // One block of B^T's columns at a time, in L1 while every tile of rows reads it.
  thread_local std::vector<T> panel;
  if (trans_b && panel.size() < static_cast<size_t>(K * kColumns)) panel.resize(K * kColumns);
  for (int64_t j = 0; j < N; j += kColumns) {
    const int64_t n = std::min(kColumns, N - j);
    const int vecs = static_cast<int>((n + L - 1) / L);
    const auto last = static_cast<typename Simd<T>::Mask>((1u << (n - L * (vecs - 1))) - 1);
    const T* b = B + j;
    int64_t ld = ldb;
    if (trans_b) {
      pack_transposed(B + j * ldb, ldb, n, K, panel.data(), kColumns);
      b = panel.data();
      ld = kColumns;
    }
    T* c = C + j;
    if (vecs == 3)
      rows<T, 3, kTransA>(M, K, A, lda, row_stride, b, ld, c, ldc, accumulate, last);
    else if (vecs == 2)
      rows<T, 2, kTransA>(M, K, A, lda, row_stride, b, ld, c, ldc, accumulate, last);
    else
      rows<T, 1, kTransA>(M, K, A, lda, row_stride, b, ld, c, ldc, accumulate, last);
  }
}

}  // namespace

bool tile_kernel_takes(int64_t M, int64_t N, int64_t K) {
  if (M < 2 || N < 2 || M * N * K > kTileKernelMaxMacs) return false;
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

bool tile_kernel_takes(int64_t, int64_t, int64_t) { return false; }

template <class T>
void tile_product_here(bool, bool, int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t,
                       T*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "tile_product_here needs an AVX-512 build");
}

#endif

template void tile_product_here<float>(bool, bool, int64_t, int64_t, int64_t, const float*, int64_t,
                                       const float*, int64_t, float*, int64_t, bool);
template void tile_product_here<double>(bool, bool, int64_t, int64_t, int64_t, const double*,
                                        int64_t, const double*, int64_t, double*, int64_t, bool);

}  // namespace rnn_fused::cpu

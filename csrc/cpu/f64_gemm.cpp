// GCC 12's false uninitialised-operand warning on inlined AVX-512 unpacks (see gemm.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "f64_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace rnn_fused::cpu {

// Beyond this many multiply-adds a product's operands outgrow the caches that the kernel
// reads them from without blocking K, and MKL's blocked GEMM takes it.
constexpr int64_t kF64KernelMaxMacs = int64_t(1) << 27;

#if defined(CPU_CAPABILITY_AVX512)
namespace {

// A tile of C: kRows rows by kVecs vectors of 8 columns, 18 accumulators in registers, each
// step of k reading 3 vectors of B and broadcasting 6 values of A for 18 multiply-adds.
constexpr int kRows = 6;
constexpr int kVecs = 3;
constexpr int64_t kPanelColumns = 8 * kVecs;

// C[R, V vectors] (+)= op(A)[R, K] @ B[K, V vectors] (B's rows ldb apart; `last`: the lanes of
// the last vector that are columns of C). A's row r, value k: A[r * lda + k], or A[k * lda + r]
// when kTransA.
template <int R, int V, bool kTransA>
__attribute__((always_inline)) inline void tile(int64_t K, const double* A, int64_t lda,
                                                const double* B, int64_t ldb, double* C,
                                                int64_t ldc, bool accumulate, __mmask8 last) {
  __m512d c[R][V];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) c[r][v] = _mm512_setzero_pd();
  const double* a = A;
  for (int64_t k = 0; k < K; ++k, B += ldb, a += kTransA ? lda : 1) {
    __m512d b[V];
#pragma GCC unroll 3
    for (int v = 0; v + 1 < V; ++v) b[v] = _mm512_loadu_pd(B + 8 * v);
    b[V - 1] = _mm512_maskz_loadu_pd(last, B + 8 * (V - 1));
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512d x = _mm512_set1_pd(kTransA ? a[r] : a[r * lda]);
#pragma GCC unroll 3
      for (int v = 0; v < V; ++v) c[r][v] = _mm512_fmadd_pd(x, b[v], c[r][v]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 3
    for (int v = 0; v < V; ++v) {
      const __mmask8 lanes = v + 1 < V ? __mmask8(0xff) : last;
      double* out = C + r * ldc + 8 * v;
      __m512d sum = c[r][v];
      if (accumulate) sum = _mm512_add_pd(_mm512_maskz_loadu_pd(lanes, out), sum);
      _mm512_mask_storeu_pd(out, lanes, sum);
    }
  }
}

// All M rows of C against one block of B's columns (V vectors), in tiles of kRows rows and
// one tile of the rows left.
template <int V, bool kTransA>
void rows(int64_t M, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
          double* C, int64_t ldc, bool accumulate, __mmask8 last) {
  const int64_t row_stride = kTransA ? 1 : lda;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    tile<kRows, V, kTransA>(K, A + i * row_stride, lda, B, ldb, C + i * ldc, ldc, accumulate, last);
  }
  const double* a = A + i * row_stride;
  double* c = C + i * ldc;
  static_assert(kRows == 6, "the rows left below are 1 to 5");
  switch (M - i) {
    case 5:
      return tile<5, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 4:
      return tile<4, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 3:
      return tile<3, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 2:
      return tile<2, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    case 1:
      return tile<1, V, kTransA>(K, a, lda, B, ldb, c, ldc, accumulate, last);
    default:
      return;
  }
}

// 8 rows of 8 values (rows past `n` read as zeros, values past `m` not read) transposed into
// dst's rows 0..m-1 (ld_dst apart), 8 values each: unpacks of pairs, then two rounds of
// 128-bit block shuffles.
inline void transpose_8x8(const double* src, int64_t ld_src, int n, int m, double* dst,
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

// B^T's columns [j, j + n) for B stored [N, K] (a weight as torch keeps it): its rows j..j+n-1
// transposed into a panel [K, kPanelColumns], read by the tiles like a row-major B.
void pack_transposed(const double* B, int64_t ldb, int64_t n, int64_t K, double* panel) {
  for (int64_t v = 0; v * 8 < n; ++v) {
    const int rows = static_cast<int>(std::min<int64_t>(8, n - 8 * v));
    for (int64_t k = 0; k < K; k += 8) {
      transpose_8x8(B + 8 * v * ldb + k, ldb, rows, static_cast<int>(std::min<int64_t>(8, K - k)),
                    panel + k * kPanelColumns + 8 * v, kPanelColumns);
    }
  }
}

template <bool kTransA>
void products(bool trans_b, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
              const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  // One block of B^T's columns at a time, in L1 while every tile of rows reads it.
  thread_local std::vector<double> panel;
  if (trans_b && panel.size() < static_cast<size_t>(K * kPanelColumns))
    panel.resize(K * kPanelColumns);
  for (int64_t j = 0; j < N; j += kPanelColumns) {
    const int64_t n = std::min(kPanelColumns, N - j);
    const int vecs = static_cast<int>((n + 7) / 8);
    const __mmask8 last = static_cast<__mmask8>((1u << (n - 8 * (vecs - 1))) - 1);
    const double* b = B + j;
    int64_t ld = ldb;
    if (trans_b) {
      pack_transposed(B + j * ldb, ldb, n, K, panel.data());
      b = panel.data();
      ld = kPanelColumns;
    }
    double* c = C + j;
    if (vecs == 3)
      rows<3, kTransA>(M, K, A, lda, b, ld, c, ldc, accumulate, last);
    else if (vecs == 2)
      rows<2, kTransA>(M, K, A, lda, b, ld, c, ldc, accumulate, last);
    else
      rows<1, kTransA>(M, K, A, lda, b, ld, c, ldc, accumulate, last);
  }
}

}  // namespace

bool f64_kernel_takes(int64_t M, int64_t N, int64_t K) {
  if (M < 2 || N < 2 || M * N * K > kF64KernelMaxMacs) return false;
  const char* env = std::getenv("RNN_FUSED_F64_KERNEL");
  if (env != nullptr) return std::strcmp(env, "0") != 0;
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

void f64_product_here(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
                      int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc,
                      bool accumulate) {
  if (trans_a)
    products<true>(trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    products<false>(trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

#else

bool f64_kernel_takes(int64_t, int64_t, int64_t) { return false; }

void f64_product_here(bool, bool, int64_t, int64_t, int64_t, const double*, int64_t, const double*,
                      int64_t, double*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "f64_product_here needs an AVX-512 build");
}

#endif

}  // namespace rnn_fused::cpu

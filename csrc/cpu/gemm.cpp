// GCC 12 takes the unused operand that AVX-512 intrinsics leave undefined (unpacklo/hi_ps)
// for an uninitialised variable once they are inlined: a false warning, silenced before the
// intrinsics' headers come in.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "amx_gates.h"
#include "avx512_sums.h"
#include "tile_gemm.h"
#include "workspace.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#elif defined(CPU_CAPABILITY_AVX2)
#include "avx2_rows_dot.h"
#endif

// The Fortran BLAS that libtorch_cpu exports (MKL on x86). Weak, so that a torch build
// without them still loads; we then fall back to at::mm.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
void sgemv_(const char* trans, const int* m, const int* n, const float* alpha, const float* a,
            const int* lda, const float* x, const int* incx, const float* beta, float* y,
            const int* incy) __attribute__((weak));
void dgemv_(const char* trans, const int* m, const int* n, const double* alpha, const double* a,
            const int* lda, const double* x, const int* incx, const double* beta, double* y,
            const int* incy) __attribute__((weak));
// MKL's thread count for the calling thread (libtorch_cpu exports it on x86).
int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
}

namespace rnn_fused::cpu {
namespace {

// MKL held to one thread on the calling thread while in scope (where libtorch has MKL): our
// threads split the products into blocks set by the shape, so that the bits do not depend on
// the thread count; MKL's own threads would split the sums.
class OneBlasThread {
 public:
  OneBlasThread()
      : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int previous_;
};

// Block sizes of C and of the reduction for brgemm. On the 2-core AVX-512 CPU of
// the project (AMD EPYC) the per-step 64x512x2048 product runs at about 430 GFLOP/s this way, MKL's
// sgemm at 175 (MKL takes its AVX2 path on that CPU).
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = Panels::kPanel;
constexpr int64_t kBlockK = 512;

// Products with at most this many rows (batches of 1 to 4) are matrix-vector work bound by
// reading B; a register-blocked loop over B's rows beats a GEMM kernel's set-up there. Its
// sums run in chains of kSmallRowsChain rows of B, added in order (small_rows_block).
constexpr int64_t kSmallRows = 4;
constexpr int64_t kSmallRowsChain = 128;

// ATen's fp32 brgemm (oneDNN micro-kernels) came with torch 2.6, which defines
// CPUBLAS_BRGEMM_F32F32F32 with it; older builds take the BLAS path.
#if defined(CPUBLAS_BRGEMM_F32F32F32)
constexpr bool kHasBrgemm = true;
void brgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
            const float* A, const float* B, float* C) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c, A, B, C, /*is_vnni=*/false);
}
void brgemm_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/false); }
#else
constexpr bool kHasBrgemm = false;
void brgemm(int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*,
            float*) {
  TORCH_INTERNAL_ASSERT(false, "brgemm used without ATen's fp32 brgemm");
}
void brgemm_release() {}
#endif

// Whether ATen's brgemm runs a small product right: on CPUs with AVX2 and no AVX-512 it runs
// oneDNN's AVX2 micro-kernels, which a torch whose oneDNN lacks them refuses by raising.
bool brgemm_runs() {
  constexpr int64_t kM = 2, kN = 8, kK = 3;
  const float a[kM * kK] = {1, 2, 3, 4, 5, 6};
  float b[kK * kN], c[kM * kN];
  for (int64_t i = 0; i < kK * kN; ++i) b[i] = static_cast<float>(i % 5);
  try {
    brgemm(kM, kN, kK, kK, kN, kN, false, a, b, c);
    brgemm_release();
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t i = 0; i < kM; ++i) {
    for (int64_t j = 0; j < kN; ++j) {
      float sum = 0;
      for (int64_t k = 0; k < kK; ++k) sum += a[i * kK + k] * b[k * kN + j];
      if (c[i * kN + j] != sum) return false;
    }
  }
  return true;
}

// ATen's brgemm for float32 products of more than kSmallRows rows where the CPU has AVX-512,
// and where it has AVX2 only but for the steps (brgemm_steps). There, against MKL's sgemm
// (the input projections, the gradients of inputs and weights), one thread (AMD EPYC Zen 3,
// with the transposes of register_transposes.h): LSTM T=100 B=64 H=512 under no_grad 0.86x
// the time, T=32 B=64 H=256 forward and backward 0.86x, RNN 0.76x.
bool use_brgemm() {
  static const bool ok =
      kHasBrgemm &&
      (__builtin_cpu_supports("avx512f") ||
       (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && brgemm_runs()));
  return ok;
}

// The steps' products on brgemm: with AVX-512 only. On AVX2 the loop of 1-4 rows
// (small_rows) ran them as fast within this machine's noise (LSTM at B=6-64, H=64-512, 2
// threads, AMD EPYC Zen 3: 0.82-1.27x brgemm's speed, one shape's runs as far apart).
bool brgemm_steps() {
  static const bool ok = use_brgemm() && __builtin_cpu_supports("avx512f");
  return ok;
}

// C[m, n] (+)= A[m, K] @ B[K, n] on brgemm, m <= kBlockM and n <= kBlockN: the sums of each
// `chain` rows of B (0: kBlockK), then added to C in order (C added last: gemm.h).
void brgemm_sums(int64_t m, int64_t n, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate, int64_t chain) {
  alignas(64) float sums[kBlockM * kBlockN];
  chain = chain > 0 ? chain : kBlockK;
  for (int64_t k0 = 0; k0 < K; k0 += chain) {
    const bool first = k0 == 0 && !accumulate;
    float* out = first ? C : sums;
    brgemm(m, n, std::min(chain, K - k0), lda, ldb, first ? ldc : kBlockN, false, A + k0,
           B + k0 * ldb, out);
    if (first) continue;
    using V = at::vec::Vectorized<float>;
    for (int64_t i = 0; i < m; ++i) {
      float* c = C + i * ldc;
      const float* block = sums + i * kBlockN;
      for (int64_t j = 0; j < n; j += V::size()) {
        const int w = static_cast<int>(std::min<int64_t>(V::size(), n - j));
        (V::loadu(block + j, w) + V::loadu(c + j, w)).store(c + j, w);
      }
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// C[R, 64] accumulators over rows [k0, k1) of a full float32 panel (rows 64 apart), A's R rows
// lda apart; kPrefetch: `lines` cache lines from pf into L2 at each row (pf advances).
template <int R, bool kPrefetch>
__attribute__((always_inline)) inline void panel_rows(int64_t k0, int64_t k1, const float* A,
                                                      int64_t lda, const float* B,
                                                      __m512 (&c)[R][4], const char*& pf,
                                                      int lines) {
  constexpr int64_t P = Panels::kPanel;
  for (int64_t k = k0; k < k1; ++k) {
    const float* b = B + k * P;
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
    const __m512 b2 = _mm512_loadu_ps(b + 32), b3 = _mm512_loadu_ps(b + 48);
    if constexpr (kPrefetch) {
      for (int q = 0; q < lines; ++q, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      c[r][0] = _mm512_fmadd_ps(a, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(a, b1, c[r][1]);
      c[r][2] = _mm512_fmadd_ps(a, b2, c[r][2]);
      c[r][3] = _mm512_fmadd_ps(a, b3, c[r][3]);
    }
  }
}

// C[R, 64] (+)= A[R, K] @ a full float32 panel, its accumulators in 4R registers (C added
// last: gemm.h); the first rows of the k loop also fetch up to `lines` lines a row of
// [pf, pf_end) into L2.
template <int R>
void panel_block(int64_t K, const float* A, int64_t lda, const float* B, float* C, int64_t ldc,
                 bool accumulate, const char*& pf, const char* pf_end, int lines) {
  __m512 c[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) c[r][v] = _mm512_setzero_ps();
  }
  const int64_t fetching = std::min<int64_t>(K, (pf_end - pf) / (64 * lines));
  panel_rows<R, true>(0, fetching, A, lda, B, c, pf, lines);
  panel_rows<R, false>(fetching, K, A, lda, B, c, pf, 0);
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < 4; ++v) {
      float* out = C + r * ldc + 16 * v;
      _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(c[r][v], _mm512_loadu_ps(out)) : c[r][v]);
    }
  }
}

// C[M, 64] (+)= A[M, K] @ a full float32 panel in blocks of 6 rows (24 accumulators, the
// panel's row in 4 registers), each over all of K, while the panel the caller reads next
// (`next`, K x 64 values) is fetched into L2 along the way. At T=100 B=64 H=512 a thread's
// step streams all of W_hh's 4 MiB of panels from L3: without the fetches ATen's brgemm ran
// a loop like it at 76 GFLOP/s on one core, this kernel at 86-87 (its rate with the panels in
// L2 is a little below brgemm's: 80-86 against 80-91; Intel Xeon with AMX).
void streamed_panel(int64_t M, int64_t K, const float* A, int64_t lda, const float* B, float* C,
                    int64_t ldc, bool accumulate, const float* next) {
  constexpr int kRows = 6;
  const char* pf = reinterpret_cast<const char*>(next);
  const char* const pf_end = next == nullptr ? pf : pf + K * Panels::kPanel * sizeof(float);
  // Lines a row of the k loop fetches: the panel's 4K lines spread over the blocks' K rows.
  const int64_t blocks = (M + kRows - 1) / kRows;
  const int lines = static_cast<int>(std::max<int64_t>(1, (4 + blocks - 1) / blocks));
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    panel_block<kRows>(K, A + i * lda, lda, B, C + i * ldc, ldc, accumulate, pf, pf_end, lines);
  }
  const float* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5:
      return panel_block<5>(K, a, lda, B, c, ldc, accumulate, pf, pf_end, lines);
    case 4:
      return panel_block<4>(K, a, lda, B, c, ldc, accumulate, pf, pf_end, lines);
    case 3:
      return panel_block<3>(K, a, lda, B, c, ldc, accumulate, pf, pf_end, lines);
    case 2:
      return panel_block<2>(K, a, lda, B, c, ldc, accumulate, pf, pf_end, lines);
    case 1:
      return panel_block<1>(K, a, lda, B, c, ldc, accumulate, pf, pf_end, lines);
    default:
      return;
  }
}

#endif

// streamed: panels read by streamed_panel, as in the steps (panel_product): LSTM T=100 B=64
// H=512 forward 1.03x (median of seven runs, 0.97-1.09; Intel Xeon with AMX).
void brgemm_blocks(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                   int64_t ldb, float* C, int64_t ldc, bool accumulate, bool panels, bool streamed,
                   int64_t chain) {
  const int64_t mb = (M + kBlockM - 1) / kBlockM, nb = (N + kBlockN - 1) / kBlockN;
  split_over_threads(mb * nb, std::min(M, kBlockM) * kBlockN * K, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      // Column-block-major order: consecutive blocks of a thread reuse one panel of B.
      const int64_t ib = blk % mb, jb = blk / mb;
      const int64_t i = ib * kBlockM, j = jb * kBlockN;
      const int64_t m = std::min(kBlockM, M - i), n = std::min(kBlockN, N - j);
      const float* b = panels ? B + jb * K * kBlockN : B + j;
      const int64_t ld_b = panels ? kBlockN : ldb;
#if defined(CPU_CAPABILITY_AVX512)
      if (streamed && n == kBlockN) {
        // The block after a panel's last reads the thread's next panel: fetched meanwhile.
        const int64_t after = blk + 1 < end ? blk + 1 : begin;
        streamed_panel(m, K, A + i * lda, lda, b, C + i * ldc + j, ldc, accumulate,
                       ib + 1 < mb ? nullptr : B + after / mb * K * kBlockN);
        continue;
      }
#endif
      brgemm_sums(m, n, K, A + i * lda, lda, b, ld_b, C + i * ldc + j, ldc, accumulate, chain);
    }
    brgemm_release();
  });
}

// With one or two rows, 4 or 8 chains of dependent FMAs cannot fill the FMA units:
// small_rows_block runs this many sets of accumulators over alternate rows of B, added at the
// end.
constexpr int64_t small_rows_sets(int64_t rows) { return rows <= 2 ? 2 : 1; }

// C[0:kRows, 0:width] (+)= A[0:kRows, :] @ B[:, 0:width] over kVecs vectors of columns,
// width <= kVecs vectors, the last one's columns past width written masked. kMaskB: B's rows
// end at width (read masked too); else they hold whole vectors (a panel's zero padding),
// whose columns past width reach only lanes that are not written. The trip counts are
// constants and the accumulators live in registers.
template <class T, int64_t kRows, int64_t kVecs, bool kMaskB>
void small_rows_block(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate, int64_t width) {
  using Vec = at::vec::Vectorized<T>;
  const int64_t last = width - (kVecs - 1) * Vec::size();  // columns of the last vector
  const auto lanes = [&](int64_t v) { return v == kVecs - 1 ? last : Vec::size(); };
  constexpr int64_t kSets = small_rows_sets(kRows);
  Vec acc[kSets][kRows][kVecs];
  // The sums of the chains of kSmallRowsChain rows of B before the current one (in memory:
  // the accumulators and B's vectors fill the registers). In one chain over all of K, steps
  // of 3-4 rows at H=1024 had 2-2.8x torch.nn's float32 error (an LSTM's dh_0, an RNN's
  // output), whose BLAS blocks its sums over k.
  alignas(64) T earlier[kRows][kVecs][Vec::size()];
  const auto step = [&](int64_t k, Vec(&sum)[kRows][kVecs]) {
    const T* b = B + k * ldb;
    Vec bv[kVecs];
    for (int64_t v = 0; v < kVecs; ++v)
      bv[v] = kMaskB ? Vec::loadu(b + v * Vec::size(), lanes(v)) : Vec::loadu(b + v * Vec::size());
    for (int64_t m = 0; m < kRows; ++m) {
      const Vec a(A[m * lda + k]);
      for (int64_t v = 0; v < kVecs; ++v) sum[m][v] = at::vec::fmadd(a, bv[v], sum[m][v]);
    }
  };
  for (int64_t k0 = 0;; k0 += kSmallRowsChain) {
    for (int64_t s = 0; s < kSets; ++s)
      for (int64_t m = 0; m < kRows; ++m)
        for (int64_t v = 0; v < kVecs; ++v) acc[s][m][v] = Vec(T(0));
    const int64_t k1 = std::min(K, k0 + kSmallRowsChain);
    int64_t k = k0;
    for (; k + kSets <= k1; k += kSets)
      for (int64_t s = 0; s < kSets; ++s) step(k + s, acc[s]);
    for (; k < k1; ++k) step(k, acc[0]);
    for (int64_t s = 1; s < kSets; ++s)
      for (int64_t m = 0; m < kRows; ++m)
        for (int64_t v = 0; v < kVecs; ++v) acc[0][m][v] = acc[0][m][v] + acc[s][m][v];
    if (k0 == 0 && k1 == K) break;
    for (int64_t m = 0; m < kRows; ++m) {
      for (int64_t v = 0; v < kVecs; ++v) {
        if (k0 > 0) acc[0][m][v] = Vec::loadu(earlier[m][v]) + acc[0][m][v];
        if (k1 < K) acc[0][m][v].store(earlier[m][v]);
      }
    }
    if (k1 == K) break;
  }
  for (int64_t m = 0; m < kRows; ++m) {
    T* c = C + m * ldc;
    for (int64_t v = 0; v < kVecs; ++v) {
      Vec out = acc[0][m][v];
      if (accumulate) out = out + Vec::loadu(c + v * Vec::size(), lanes(v));
      out.store(c + v * Vec::size(), lanes(v));
    }
  }
}

// The vectors of C that one small_rows_block of kRows rows keeps in registers: a whole
// panel's on AVX-512 (as measured there), and for one row, whose B vectors are each read once,
// by the FMAs from memory. Otherwise, on AVX2, whose 16 registers must hold the accumulators
// (kSets a row), B's vectors and A's broadcast, as many as fit, or the loop spills to the
// stack every step. In blocks, against all 8 of a panel's float32 vectors (LSTM under
// no_grad, one thread, AMD EPYC, Zen 3, AVX2 only): T=32 B=64 H=256 0.70x the time (0.63x ->
// 0.91x torch.nn's speed), T=64 B=4 H=256 0.82x, B=2 H=64 0.85x, but B=2-3 H=256 (weights
// streamed from L3) 1.04x; one row's panel in two blocks, T=64 B=1 H=256, 1.20x.
template <class T, int64_t kRows>
constexpr int64_t small_rows_fitting_vecs() {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t kPanelVecs = Panels::kPanel / Vec::size();
  if constexpr (sizeof(Vec) == 64 || kRows == 1) return kPanelVecs;
  return std::clamp<int64_t>(15 / (small_rows_sets(kRows) * kRows + 1), 1, kPanelVecs);
}

// small_rows_block on the vectors that width columns take, kVecs at most; padded: B is a
// panel (rows kPanel apart, zeros past width), read in whole vectors without masks. A gate's last
// panel ran all of a panel's vectors, those of a panel narrower than kPanel masked in the loop: at
// H=513 (9 panels a gate, the last of 1 column) an LSTM under no_grad at B=3 ran 0.71x torch.nn's
// speed, at H=500 0.81x (AMD EPYC, 2 threads).
template <class T, int64_t kRows, int64_t kVecs = Panels::kPanel / at::vec::Vectorized<T>::size()>
void small_rows_width(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate, int64_t width, bool padded) {
  constexpr int64_t kLanes = at::vec::Vectorized<T>::size();
  constexpr int64_t kFit = small_rows_fitting_vecs<T, kRows>();
  if constexpr (kVecs > kFit) {
    // Column blocks of at most kFit vectors, as even as they go (16 float64 vectors in blocks
    // of 3: 3, 3, 3, 3, 2, 2, not a last block of one). Each value of C keeps its sums' order,
    // and its bits.
    const int64_t vecs = (width + kLanes - 1) / kLanes, blocks = (vecs + kFit - 1) / kFit;
    for (int64_t b = 0, j = 0; b < blocks; ++b) {
      const int64_t n = std::min(width - j, (vecs / blocks + (b < vecs % blocks)) * kLanes);
      small_rows_width<T, kRows, kFit>(K, A, lda, B + j, ldb, C + j, ldc, accumulate, n, padded);
      j += n;
    }
    return;
  }
  if constexpr (kVecs > 1) {
    if (width <= (kVecs - 1) * kLanes) {
      return small_rows_width<T, kRows, kVecs - 1>(K, A, lda, B, ldb, C, ldc, accumulate, width,
                                                   padded);
    }
  }
  if (padded || width == kVecs * kLanes) {
    small_rows_block<T, kRows, kVecs, false>(K, A, lda, B, ldb, C, ldc, accumulate, width);
  } else {
    small_rows_block<T, kRows, kVecs, true>(K, A, lda, B, ldb, C, ldc, accumulate, width);
  }
}

// M rows, 1 <= M <= kSmallRows.
template <class T>
void small_rows(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                int64_t ldc, bool accumulate, int64_t width, bool padded) {
  switch (M) {
    case 1:
      return small_rows_width<T, 1>(K, A, lda, B, ldb, C, ldc, accumulate, width, padded);
    case 2:
      return small_rows_width<T, 2>(K, A, lda, B, ldb, C, ldc, accumulate, width, padded);
    case 3:
      return small_rows_width<T, 3>(K, A, lda, B, ldb, C, ldc, accumulate, width, padded);
    default:
      return small_rows_width<T, 4>(K, A, lda, B, ldb, C, ldc, accumulate, width, padded);
  }
}

// C[M, width] (+)= A[M, K] @ one panel (defined below).
template <class T>
void one_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, int64_t width, T* C,
               int64_t ldc, bool accumulate, const T* next);

// M <= kSmallRows. Threads split the column panels, so a thread reads the same panels of a
// per-step weight at every step and keeps them in its cache.
template <class T>
void matmul_small_rows(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
                       int64_t ldb, T* C, int64_t ldc, bool accumulate, bool panels) {
  const int64_t nb = (N + Panels::kPanel - 1) / Panels::kPanel;
  split_over_threads(nb, M * Panels::kPanel * K, [&](int64_t begin, int64_t end) {
    for (int64_t jb = begin; jb < end; ++jb) {
      const int64_t j = jb * Panels::kPanel, width = std::min(Panels::kPanel, N - j);
      if (panels) {
        one_panel<T>(M, K, A, lda, B + j * K, width, C + j, ldc, accumulate, nullptr);
      } else {
        small_rows<T>(M, K, A, lda, B + j, ldb, C + j, ldc, accumulate, width, false);
      }
    }
  });
}

int blas_int(int64_t v) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, "rnn_fused: matrix size ", v,
              " does not fit the 32-bit BLAS interface");
  return static_cast<int>(v);
}

// One row of A times a small matrix: a cell's step at batch 1. BLAS's gemv costs about
// 1.2 us a call for 32 x 128 (perf, Intel Xeon: a sixth of an LSTMCell(32) call), for
// 4 thousand multiply-adds; these loops about a third of that. Sums run in k order.
constexpr int64_t kOwnRowProductWork = int64_t(1) << 16;
constexpr int64_t kOwnRowProductMaxK = 1024;

// c[j] (+)= sum_k a[k] B[j * ldb + k], j < N: B stored N x K (a weight as torch keeps it).
template <class T>
void row_times_bt(int64_t N, int64_t K, const T* a, const T* B, int64_t ldb, T* c,
                  bool accumulate) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kRows = 4;
  const auto lanes = [&](int64_t k) {
    return static_cast<int>(std::min<int64_t>(V::size(), K - k));
  };
  for (int64_t j = 0; j < N; j += kRows) {
    const int64_t rows = std::min(kRows, N - j);
    V acc[kRows] = {V(T(0)), V(T(0)), V(T(0)), V(T(0))};
    for (int64_t k = 0; k < K; k += V::size()) {
      const V x = V::loadu(a + k, lanes(k));
      for (int64_t r = 0; r < rows; ++r)
        acc[r] = at::vec::fmadd(V::loadu(B + (j + r) * ldb + k, lanes(k)), x, acc[r]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const T sum =
          at::vec::vec_reduce_all<T>([](const V& u, const V& v) { return u + v; }, acc[r]);
      c[j + r] = accumulate ? c[j + r] + sum : sum;
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// On AVX2, 8 rows of B at a time (4 in float64), their sums reduced together (avx2_rows_dot.h).
template <>
void row_times_bt<float>(int64_t N, int64_t K, const float* a, const float* B, int64_t ldb,
                         float* c, bool accumulate) {
  avx2::rows_dot<float, __m256>(N, K, a, B, ldb, c, accumulate);
}
template <>
void row_times_bt<double>(int64_t N, int64_t K, const double* a, const double* B, int64_t ldb,
                          double* c, bool accumulate) {
  avx2::rows_dot<double, __m256d>(N, K, a, B, ldb, c, accumulate);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// 16 values at p (those under `lanes`; zeros past them) as float32. A half-type weight's
// values are widened exactly as they are read.
inline __m512 load16(const float* p, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 lanes) {
  // A bfloat16 holds the upper half of a float32's bits.
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const at::Half* p, __mmask16 lanes) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, p));
}

// row_times_bt on AVX-512 for a B of float32 or a half type: 16 rows of B at a time, their
// 16 accumulators in registers, reduced together.
template <class W>
void rows_dot16(int64_t N, int64_t K, const float* a, const W* B, int64_t ldb, float* c,
                bool accumulate) {
  for (int64_t j = 0; j < N; j += 16) {
    const int rows = static_cast<int>(std::min<int64_t>(16, N - j));
    __m512 acc[16];
    for (int r = 0; r < 16; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 lanes = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(lanes, a + k);
      for (int r = 0; r < 16; ++r) {
        if (r < rows) {
          const __m512 w = load16(B + (j + r) * ldb + k, lanes);
          acc[r] = _mm512_fmadd_ps(w, x, acc[r]);
        }
      }
    }
    const __mmask16 out = rows == 16 ? __mmask16(0xffff) : __mmask16((1u << rows) - 1);
    __m512 sums = sums_of_16(acc);
    if (accumulate) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(out, c + j));
    _mm512_mask_storeu_ps(c + j, out, sums);
  }
}

template <>
void row_times_bt<float>(int64_t N, int64_t K, const float* a, const float* B, int64_t ldb,
                         float* c, bool accumulate) {
  rows_dot16(N, K, a, B, ldb, c, accumulate);
}

// The same for float64, 8 rows of B at a time. The generic loop's reduction of each row
// (ATen's vec_reduce_all for float64: a store and a reload per lane) took 60% of an
// LSTMCell(64) call at batch 1 under no_grad, 21 of 36 us (torch.nn 27; AMD EPYC).
template <>
void row_times_bt<double>(int64_t N, int64_t K, const double* a, const double* B, int64_t ldb,
                          double* c, bool accumulate) {
  for (int64_t j = 0; j < N; j += 8) {
    const int rows = static_cast<int>(std::min<int64_t>(8, N - j));
    __m512d acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm512_setzero_pd();
    for (int64_t k = 0; k < K; k += 8) {
      const __mmask8 lanes = K - k >= 8 ? __mmask8(0xff) : __mmask8((1u << (K - k)) - 1);
      const __m512d x = _mm512_maskz_loadu_pd(lanes, a + k);
      for (int r = 0; r < 8; ++r) {
        if (r < rows) {
          acc[r] = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(lanes, B + (j + r) * ldb + k), x, acc[r]);
        }
      }
    }
    const __mmask8 out = rows == 8 ? __mmask8(0xff) : __mmask8((1u << rows) - 1);
    __m512d sums = sums_of_8(acc);
    if (accumulate) sums = _mm512_add_pd(sums, _mm512_maskz_loadu_pd(out, c + j));
    _mm512_mask_storeu_pd(c + j, out, sums);
  }
}

// row_times_b for a half-type B on AVX-512: 64 columns at a time, in four accumulators
// whose sums run in k order (row_times_b's order), each row of B read in whole cache lines.
template <class W>
void row_times_half_b(int64_t N, int64_t K, const float* a, const W* B, int64_t ldb, float* c,
                      bool accumulate) {
  constexpr int kVecs = 4;
  for (int64_t j = 0; j < N; j += 16 * kVecs) {
    __mmask16 lanes[kVecs];
    __m512 acc[kVecs];
    for (int v = 0; v < kVecs; ++v) {
      const int64_t n = std::clamp<int64_t>(N - j - 16 * v, 0, 16);
      lanes[v] = static_cast<__mmask16>((1u << n) - 1u);
      acc[v] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K; ++k) {
      const __m512 x = _mm512_set1_ps(a[k]);
      for (int v = 0; v < kVecs; ++v)
        acc[v] = _mm512_fmadd_ps(x, load16(B + k * ldb + j + 16 * v, lanes[v]), acc[v]);
    }
    for (int v = 0; v < kVecs; ++v) {
      float* out = c + j + 16 * v;
      if (accumulate) acc[v] = _mm512_add_ps(acc[v], _mm512_maskz_loadu_ps(lanes[v], out));
      _mm512_mask_storeu_ps(out, lanes[v], acc[v]);
    }
  }
}
#endif

// c[j] (+)= sum_k a[k] B[k * ldb + j], j < N: B stored K x N.
template <class T>
void row_times_b(int64_t N, int64_t K, const T* a, const T* B, int64_t ldb, T* c, bool accumulate) {
  using V = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < N; j += V::size()) {
    const int n = static_cast<int>(std::min<int64_t>(V::size(), N - j));
    V acc(T(0));
    for (int64_t k = 0; k < K; ++k)
      acc = at::vec::fmadd(V(a[k]), V::loadu(B + k * ldb + j, n), acc);
    if (accumulate) acc = acc + V::loadu(c + j, n);
    acc.store(c + j, n);
  }
}

template <class T>
void blas_call(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
               const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate);

// Rows of A and B up to which matmul_blas sums A^T B (outer products) in its own loop, and
// what writing one value of C costs there in multiply-adds' time (the loop is bound by its
// writes): counted as one, a weight gradient of 256 x 256 at batch 1 stayed on one thread,
// and RNNCell(256)'s forward and backward took 100-109 us against 92-100 on both (AMD EPYC).
constexpr int64_t kOwnOuterMaxK = 4;
constexpr int64_t kOuterWriteCost = 3;

// Columns of C per BLAS call of matmul_blas (kBlasColumns, up to kBlasMaxColumns for a wide
// C), and the blocks of C it makes where the rows allow (row blocks of at most kBlasRows
// rows; see matmul_blas).
constexpr int64_t kBlasColumns = 64;
constexpr int64_t kBlasMaxColumns = 256;
constexpr int64_t kMinBlasBlocks = 4;
constexpr int64_t kBlasRows = 48;

template <class T>
void matmul_blas(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                 int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // One row against W as stored (a cell's step at batch 1): our dot products of 16 rows
  // (float32) or 8 (float64) at every size, over the threads by blocks of 16 rows of W when
  // large, so that each thread reads the same rows at every step (from its own L2). MKL's gemv
  // on both threads: LSTMCell(256) 32-39 us a call against 19-23 (float32, Intel Xeon); MKL by
  // blocks of 64 columns: LSTMCell(256) 56-57 us against 38-39, LSTMCell(1024) 1.66-1.72 ms
  // against 1.01-1.18 (float64 under no_grad, one thread, AMD EPYC). On AVX2 (8 and 4 rows,
  // avx2_rows_dot.h), against MKL's gemv and the generic loop: float32 LSTMCell(256) 70 -> 52
  // us, LSTMCell(1024) 1.68 -> 1.34 ms, float64 RNNCell(256) 56 -> 33 us, LSTMCell(64) 34 ->
  // 17 us, but LSTMCell(1024) 2.97 -> 3.14 ms (no_grad, one thread, AMD EPYC Zen 3).
  if (M == 1 && trans_b && !trans_a) {
    return split_over_threads((N + 15) / 16, 16 * K, [&](int64_t begin, int64_t end) {
      const int64_t j = begin * 16, n = std::min(N, end * 16) - j;
      row_times_bt<T>(n, K, A, B + j * ldb, ldb, C + j, accumulate);
    });
  }
#endif
  if (M == 1 && N * K <= kOwnRowProductWork && K <= kOwnRowProductMaxK) {
    // The row of A is strided when trans_a: gathered first.
    T gathered[kOwnRowProductMaxK];
    const T* a = A;
    if (trans_a && K > 1 && lda != 1) {
      for (int64_t k = 0; k < K; ++k) gathered[k] = A[k * lda];
      a = gathered;
    }
    return trans_b ? row_times_bt(N, K, a, B, ldb, C, accumulate)
                   : row_times_b(N, K, a, B, ldb, C, accumulate);
  }
  if (trans_a && !trans_b && K <= kOwnOuterMaxK) {
    // A sum of a few outer products (a weight gradient of one step at batch 1 to 4): each
    // row of C is the rows of B scaled and added, written once. MKL's GEMM set-up for so
    // short a sum took most of its time (GRUCell(256) at batch 1, forward and backward against
    // torch.nn: 1.62-1.82x -> 1.76-1.90x, AMD EPYC).
    return split_over_threads(M, N * (K + kOuterWriteCost), [&](int64_t begin, int64_t end) {
      T a[kOwnOuterMaxK];
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t k = 0; k < K; ++k) a[k] = A[k * lda + i];
        row_times_b(N, K, a, B, ldb, C + i * ldc, accumulate);
      }
    });
  }
  // Blocks of kBlasColumns columns of C, each one BLAS call held to one thread, split over
  // our threads: MKL's own threads change the order of its sums with their count (float64 on
  // AMD EPYC: one thread and two gave other bits), and the bits must not depend on threads.
  // With fewer than kMinBlasBlocks such blocks, C's rows are split too, into blocks of at
  // most kBlasRows rows and no more than make kMinBlasBlocks in all, so that a narrow product
  // still has blocks for every thread (the split depends on the shape only): the weight
  // gradients and dh of a cell's step at batch 97, H=51 ran on one thread (float64 client of
  // the per-call rows, training: 1.10-1.20x torch.nn -> 1.26-1.45x, AMD EPYC).
  // Each call packs its rows of A and its columns of B. A C wide enough for kMinBlasBlocks
  // blocks of more than kBlasColumns columns takes such blocks, up to kBlasMaxColumns: in
  // blocks of 64 columns a product of 256 x 1024 by 1024 x 4096 took 54 ms in float64 and 24
  // in float32, in blocks of 256 44 and 23. A C of rows enough for kMinBlasBlocks row blocks
  // whose column blocks would pack no less (rows of A plus columns of B, over all its calls)
  // goes in row blocks of the full width: a weight gradient of 1024 x 1024 at batch 256 took
  // 8.3 ms in 16 column blocks, 5.6-5.8 in 2 or 4 row blocks; 1024 x 1024 by 1024 x 3072 in
  // float64 153 ms in 12 column blocks, 136 in 4 row blocks (one thread; AMD EPYC).
  const int64_t wide =
      std::clamp(N / kMinBlasBlocks / kBlasColumns * kBlasColumns, kBlasColumns, kBlasMaxColumns);
  const int64_t wide_blocks = (N + wide - 1) / wide, row_limit = (M + kBlasRows - 1) / kBlasRows;
  const int64_t wide_row_blocks =
      std::min(row_limit, (kMinBlasBlocks + wide_blocks - 1) / wide_blocks);
  const bool by_rows = row_limit >= kMinBlasBlocks &&
                       M + kMinBlasBlocks * N <= wide_blocks * M + wide_row_blocks * N;
  const int64_t columns = by_rows ? N : wide;
  const int64_t col_blocks = by_rows ? 1 : wide_blocks;
  const int64_t row_blocks = by_rows ? kMinBlasBlocks : wide_row_blocks;
  const int64_t rows = (M + row_blocks - 1) / row_blocks;
  split_over_threads(row_blocks * col_blocks, rows * columns * K, [&](int64_t begin, int64_t end) {
    const OneBlasThread one_thread;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i = blk % row_blocks * rows, j = blk / row_blocks * columns;
      blas_call<T>(trans_a, trans_b, std::min(rows, M - i), std::min(columns, N - j), K,
                   A + (trans_a ? i : i * lda), lda, B + (trans_b ? j * ldb : j), ldb,
                   C + i * ldc + j, ldc, accumulate);
    }
  });
}

// C = op(A) @ op(B) (accumulate: C += ...) on the calling thread by our tile kernel where it
// takes the shape (tile_gemm.h: on the AMD kind), else in one call of libtorch's BLAS (MKL on
// x86), or at::mm where it has none.
template <class T>
void blas_call(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda,
               const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (tile_kernel_takes(M, N, K, trans_b))
    return tile_product_here<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: pass B first.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int m = blas_int(N), n = blas_int(M), k = blas_int(K);
  const int la = blas_int(std::max<int64_t>(ldb, 1)), lb = blas_int(std::max<int64_t>(lda, 1));
  const int lc = blas_int(ldc);
  const T one = 1, beta = accumulate ? 1 : 0;
  if (M == 1 && accumulate) {
    // C added last (gemm.h): MKL's gemv adding into C (beta = 1) on W as stored had 1.5-2.3x
    // the error (a GRU's dh_0 at batch 1 and H=1024 had 4.7x torch.nn's float32 error).
    c10::SmallVector<T, 256> sums(N);
    blas_call<T>(trans_a, trans_b, 1, N, K, A, lda, B, ldb, sums.data(), N, false);
    for (int64_t j = 0; j < N; ++j) C[j] += sums[j];
    return;
  }
  if (M == 1) {
    // One row (a cell's step at batch 1): a matrix-vector product, which BLAS runs faster
    // than a GEMM of one row. Column-major, B is op(B)^T, an N x K matrix (transposed for
    // trans_b: then stored K x N); the row of A has stride lda when trans_a.
    const char tv = trans_b ? 'T' : 'N';
    const int rows = trans_b ? k : m, cols = trans_b ? m : k, inc_a = trans_a ? lb : 1, inc_c = 1;
    if constexpr (std::is_same_v<T, float>) {
      if (sgemv_ != nullptr)
        return sgemv_(&tv, &rows, &cols, &one, B, &la, A, &inc_a, &beta, C, &inc_c);
    } else {
      if (dgemv_ != nullptr)
        return dgemv_(&tv, &rows, &cols, &one, B, &la, A, &inc_a, &beta, C, &inc_c);
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    auto v = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? v.t() : v;
  };
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  auto a = view(A, M, K, lda, trans_a), b = view(B, K, N, ldb, trans_b);
  accumulate ? c.addmm_(a, b) : c.copy_(at::mm(a, b));
}

// A product with no sums (an empty C, or K = 0: C = 0, or left as it is when accumulating)
// done here; whether it was one.
template <class T>
bool empty_product(int64_t M, int64_t N, int64_t K, T* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return true;
  if (K != 0) return false;
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
  return true;
}

// Shared by both forms: B is either row-major with ldb, or panels (ldb unused; streamed:
// Panels::streamed).
template <class T>
void product(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
             T* C, int64_t ldc, bool accumulate, bool panels, bool streamed = false,
             int64_t chain = 0) {
  if (empty_product(M, N, K, C, ldc, accumulate)) return;
  if (M <= kSmallRows)
    return matmul_small_rows<T>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, panels);
  if constexpr (std::is_same_v<T, float>) {
    if (use_brgemm())
      return brgemm_blocks(M, N, K, A, lda, B, ldb, C, ldc, accumulate, panels, streamed, chain);
  }
  if (!panels) return matmul_blas<T>(false, false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  // Per panel, the panels split over threads: panels in stripes (panel_stripe) as a step's
  // panel, whole ones by BLAS.
  constexpr int64_t P = Panels::kPanel;
  split_over_threads((N + P - 1) / P, M * P * K, [&](int64_t begin, int64_t end) {
    for (int64_t jb = begin; jb < end; ++jb) {
      const int64_t j = jb * P, width = std::min(P, N - j);
      if constexpr (panel_stripe<T>() < P) {
        one_panel<T>(M, K, A, lda, B + j * K, width, C + j, ldc, accumulate, nullptr);
      } else {
        matmul_blas<T>(false, false, M, width, K, A, lda, B + j * K, P, C + j, ldc, accumulate);
      }
    }
  });
}

// C[M, width] (+)= A[M, K] @ one float panel (width <= kPanel); `next`, the panel read after
// it, is given for streamed panels only (Panels::streamed).
template <class T>
void one_panel(int64_t M, int64_t K, const T* A, int64_t lda, const T* panel, int64_t width, T* C,
               int64_t ldc, bool accumulate, const T* next) {
  constexpr int64_t P = Panels::kPanel;
  if (empty_product(M, width, K, C, ldc, accumulate)) return;
  // float64 steps on the tile kernel where it runs: LSTM T=100 B=32 H=128 forward 1.12x,
  // forward and backward 1.09x the loop below (AMD EPYC). float32 steps run as fast on
  // brgemm (0.99-1.02x at T=200 B=16 H=128, T=100 B=64 H=512, T=50 B=32 H=256).
  if constexpr (std::is_same_v<T, double> && panel_stripe<T>() == P) {
    if (M > kSmallRows && tile_kernel_takes(M, width, K, false)) {
      return tile_product_here<T>(false, false, M, width, K, A, lda, panel, P, C, ldc, accumulate);
    }
  }
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (M > kSmallRows && width == P && next != nullptr) {
      return streamed_panel(M, K, A, lda, panel, C, ldc, accumulate, next);
    }
#endif
    if (M > kSmallRows && brgemm_steps()) {
      for (int64_t i = 0; i < M; i += kBlockM) {
        brgemm_sums(std::min(kBlockM, M - i), width, K, A + i * lda, lda, panel, P, C + i * ldc,
                    ldc, accumulate, 0);
      }
      brgemm_release();
      return;
    }
  }
  // Stripe by stripe (panel_stripe), all the row blocks on one while it is in L1.
  constexpr int64_t S = panel_stripe<T>();
  for (int64_t s = 0; s < width; s += S) {
    for (int64_t i = 0; i < M; i += kSmallRows) {
      small_rows<T>(std::min(kSmallRows, M - i), K, A + i * lda, lda, panel + s * K, S,
                    C + i * ldc + s, ldc, accumulate, std::min(S, width - s), /*padded=*/true);
    }
  }
}

// C = A @ B for B = W^T with W as stored (Panels::as_stored), on AMX tiles: blocks of
// kAmxGateRows rows of A by panels (kPanel rows of W), split over the threads with the panels
// of a row block together, so that each thread packs a block's rows once for all its panels.
void stored_rows_matmul(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B, float* C,
                        int64_t ldc) {
  const int64_t groups = B.N / B.group, nb = groups * B.per_group;
  const int64_t mb = (M + kAmxGateRows - 1) / kAmxGateRows;
  const PanelColumns columns{B.group, B.per_group};
  split_over_threads(mb * nb, std::min(M, kAmxGateRows) * Panels::kPanel * B.K,
                     [&](int64_t begin, int64_t end) {
                       AmxGateTiles tiles;
                       int64_t taken = -1;
                       for (int64_t blk = begin; blk < end; ++blk) {
                         const int64_t rb = blk / nb, jb = columns.in_unit_order(blk % nb, groups);
                         const int64_t i = rb * kAmxGateRows, g = jb / B.per_group;
                         const int64_t j = jb % B.per_group * Panels::kPanel;
                         if (rb != taken)
                           tiles.take_rows(std::min(kAmxGateRows, M - i), B.K, A + i * lda, lda);
                         taken = rb;
                         tiles.rows_times_w(B.panel<at::BFloat16>(g, jb % B.per_group), B.K,
                                            std::min(Panels::kPanel, B.group - j),
                                            C + i * ldc + g * B.group + j, ldc);
                       }
                     });
}

// C (+)= A @ B on bfloat16 panels, A in bfloat16 with its rows in pairs (lda even), into
// float32 C or (not accumulated, no tiles) bfloat16 C: blocks of rows and panels split over
// threads.
template <class Out>
void bf16_rows_matmul(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B, Out* C,
                      int64_t ldc, bool accumulate) {
  if (B.as_stored) {
    TORCH_INTERNAL_ASSERT((std::is_same_v<Out, float>) && !accumulate);
    if constexpr (std::is_same_v<Out, float>) return stored_rows_matmul(M, A, lda, B, C, ldc);
  }
  const int64_t K = B.K;
  const int64_t groups = B.N / B.group, mb = (M + kBlockM - 1) / kBlockM, nb = groups * B.per_group;
  const PanelColumns columns{B.group, B.per_group};
  split_over_threads(
      mb * nb, std::min(M, kBlockM) * Panels::kPanel * K, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t i = blk % mb * kBlockM, jb = columns.in_unit_order(blk / mb, groups);
          const int64_t g = jb / B.per_group, j = jb % B.per_group * Panels::kPanel;
          const int64_t m = std::min(kBlockM, M - i), width = std::min(Panels::kPanel, B.group - j);
          const at::BFloat16* panel = B.panel<at::BFloat16>(g, jb % B.per_group);
          Out* c = C + i * ldc + g * B.group + j;
          if constexpr (std::is_same_v<Out, float>) {
            bf16_panel_product(m, K, A + i * lda, lda, panel, width, c, ldc, accumulate, B.tiles);
          } else {
            TORCH_INTERNAL_ASSERT(!accumulate);
            bf16_panel_product(m, K, A + i * lda, lda, panel, width, c, ldc, B.tiles);
          }
        }
        bf16_tiles_release();
      });
}

// The same on float32 A, rounded once first.
void bf16_matmul(int64_t M, const float* A, int64_t lda, const Panels& B, float* C, int64_t ldc,
                 bool accumulate) {
  const int64_t K = B.K, ld = (K + 1) / 2 * 2;
  const at::Tensor rounded = buffer_empty({M, ld}, at::TensorOptions(at::kBFloat16));
  at::BFloat16* a = rounded.data_ptr<at::BFloat16>();
  split_over_threads(M, K, [&](int64_t begin, int64_t end) {
    bf16_round_rows(end - begin, K, A + begin * lda, lda, a + begin * ld, ld);
  });
  bf16_rows_matmul(M, a, ld, B, C, ldc, accumulate);
}

}  // namespace

#if defined(CPU_CAPABILITY_AVX512)
void row_times_wt_here(int64_t N, int64_t K, const float* a, const float* W, int64_t ldw,
                       float* c) {
  row_times_bt<float>(N, K, a, W, ldw, c, false);
}
#endif

namespace {

// A^T [M, K rounded up to even] in bfloat16 for A [K, M], in a buffer from the cache: its rows
// [m0, m1) written by transpose(m0, m1, out, ld) on the thread that takes them, in blocks of
// 32 of A's columns (the transposes' blocks).
template <class F>
at::Tensor bf16_transposed_by(int64_t K, int64_t M, const F& transpose) {
  const int64_t ld = (K + 1) / 2 * 2;
  constexpr int64_t kColumns = 32;
  at::Tensor out = buffer_empty({M, ld}, at::TensorOptions(at::kBFloat16));
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  split_over_threads((M + kColumns - 1) / kColumns, kColumns * K, [&](int64_t begin, int64_t end) {
    transpose(begin * kColumns, std::min(M, end * kColumns), o, ld);
  });
  return out;
}

// bf16_matmul_transposed's work: A^T in bfloat16 (bf16_transposed_by), then the product.
template <class F>
void transposed_then_matmul(int64_t M, const Panels& B, float* C, int64_t ldc, bool accumulate,
                            const F& transpose) {
  TORCH_INTERNAL_ASSERT(B.bf16() && B.group == B.N);
  if (M == 0) return;
  const at::Tensor a_t = bf16_transposed_by(B.K, M, transpose);
  bf16_rows_matmul(M, a_t.data_ptr<at::BFloat16>(), a_t.size(1), B, C, ldc, accumulate);
}

}  // namespace

void bf16_matmul_transposed(int64_t M, const float* A, int64_t lda, const Panels& B, float* C,
                            int64_t ldc, bool accumulate) {
  transposed_then_matmul(M, B, C, ldc, accumulate,
                         [&](int64_t m0, int64_t m1, at::BFloat16* a, int64_t ld) {
                           bf16_round_transposed(B.K, m1 - m0, A + m0, lda, a + m0 * ld, ld);
                         });
}

void bf16_matmul_transposed(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B,
                            float* C, int64_t ldc, bool accumulate) {
  transposed_then_matmul(M, B, C, ldc, accumulate,
                         [&](int64_t m0, int64_t m1, at::BFloat16* a, int64_t ld) {
                           bf16_transpose(B.K, m0, m1, A, lda, a, ld);
                         });
}

void half_weight_product(bool trans, int64_t M, int64_t N, int64_t K, const at::BFloat16* A,
                         int64_t lda, const at::Tensor& W, float* C, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(W.dim() == 2 && W.stride(1) == 1 && W.scalar_type() == at::kBFloat16 &&
                        has_bf16_dot());
  const int64_t ldw = W.stride(0);
  const at::BFloat16* w = W.data_ptr<at::BFloat16>();
  // Blocks of C's columns over the threads, each block's part of W read by one.
  const int64_t block = trans ? 16 : 64;
  split_over_threads((N + block - 1) / block, block * K * M, [&](int64_t begin, int64_t end) {
    const int64_t j = begin * block, n = std::min(N, end * block) - j;
    if (trans) {
      bf16_times_w_rows(M, n, K, A, lda, w + j * ldw, ldw, C + j, ldc, accumulate);
    } else {
      bf16_times_w(M, n, K, A, lda, w + j, ldw, C + j, ldc, accumulate);
    }
  });
}

void half_weight_product(bool trans, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                         const at::Tensor& W, float* C, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(W.dim() == 2 && W.stride(1) == 1);
  if (M == 0 || N == 0) return;
  const int64_t ldw = W.stride(0);
  if (M > kHalfWeightRows) {
    int64_t ld = 0;
    const at::BFloat16* a = bf16_rounded_rows(M, K, A, lda, &ld);
    return half_weight_product(trans, M, N, K, a, ld, W, C, ldc, accumulate);
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(W.scalar_type(), "rnn_fused_half_weight_product", [&] {
    const scalar_t* w = W.data_ptr<scalar_t>();
#if defined(CPU_CAPABILITY_AVX512)
    // Blocks of C's columns over the threads, as the float32 row product splits them, so
    // that a thread reads the same rows of W at every step (from its own L2).
    const int64_t block = trans ? 16 : 64;
    split_over_threads((N + block - 1) / block, block * K * M, [&](int64_t begin, int64_t end) {
      const int64_t j = begin * block, n = std::min(N, end * block) - j;
      for (int64_t m = 0; m < M; ++m) {
        if (trans) {
          rows_dot16(n, K, A + m * lda, w + j * ldw, ldw, C + m * ldc + j, accumulate);
        } else {
          row_times_half_b(n, K, A + m * lda, w + j, ldw, C + m * ldc + j, accumulate);
        }
      }
    });
#else
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < N; ++j) {
        float sum = 0;
        for (int64_t k = 0; k < K; ++k)
          sum += A[m * lda + k] * static_cast<float>(trans ? w[j * ldw + k] : w[k * ldw + j]);
        C[m * ldc + j] = accumulate ? C[m * ldc + j] + sum : sum;
      }
    }
#endif
  });
}

namespace {

// weight_product_on for one row (a cell's step at batch 1): W (+)= g a^T with a rounded to
// bfloat16. Each sum is then one product of two bfloat16 values, exact in float32; taken as the
// tiles and the dot products take it (the pad's +0 added, a product under float32's normal
// range flushed to +0), it gives their bits, without packing a or running products of K=1.
// bfloat16 LSTMCell(256) at batch 1, forward and backward: 331-351 -> 222-225 us (Intel Xeon
// with AMX).
template <class Out>
void outer_product(int64_t M, int64_t N, const at::BFloat16* g_t, int64_t ld_g, const float* A,
                   Out* W, bool accumulate) {
  using Vec = at::vec::Vectorized<float>;
  std::vector<float> a(N);
  for (int64_t j = 0; j < N; ++j) a[j] = static_cast<float>(static_cast<at::BFloat16>(A[j]));
  const auto times = [](float g, float x) {
    const float p = g * x + 0.0f;
    return std::abs(p) < std::numeric_limits<float>::min() ? 0.0f : p;
  };
  const auto times_vec = [](const Vec& g, const Vec& x) {
    const Vec p = g * x + Vec(0.0f);
    return Vec::blendv(p, Vec(0.0f), p.abs() < Vec(std::numeric_limits<float>::min()));
  };
  split_over_threads(M, N, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = static_cast<float>(g_t[i * ld_g]);
      Out* w = W + i * N;
      int64_t j = 0;
      if constexpr (std::is_same_v<Out, at::BFloat16>) {
        TORCH_INTERNAL_ASSERT(!accumulate);
        for (; j + 2 * Vec::size() <= N; j += 2 * Vec::size()) {
          const Vec lo = times_vec(Vec(g), Vec::loadu(a.data() + j));
          const Vec hi = times_vec(Vec(g), Vec::loadu(a.data() + j + Vec::size()));
          at::vec::convert_float_bfloat16(lo, hi).store(w + j);
        }
        for (; j < N; ++j) w[j] = static_cast<at::BFloat16>(times(g, a[j]));
      } else {
        for (; j < N; ++j) w[j] = accumulate ? w[j] + times(g, a[j]) : times(g, a[j]);
      }
    }
  });
}

// bf16_weight_product on G^T rounded, into float32 or bfloat16 W: A's rows in bfloat16 panels
// (one pass over A, as rounding it alone would be), for the forward's kernel. Read as stored,
// their pairs interleaved as they were read, the shuffles took a fifth of the dot products'
// issue slots: 179 GFLOP/s a core against 219 (RNNCell(1024) in bfloat16 at batch 256, AMD
// EPYC). AMX tiles where there are: bfloat16 cells at H=256 forward and backward, torch.nn's
// time over ours, LSTMCell batch 64 0.95 -> 1.26x, 200 0.62 -> 1.09x, GRUCell 1.03 -> 1.32x
// and 0.66 -> 1.07x (Intel Xeon).
template <class Out>
void weight_product_on(int64_t M, int64_t N, int64_t rows, const at::BFloat16* g_t, int64_t ld_g,
                       const float* A, int64_t lda, Out* W, bool accumulate) {
  TORCH_INTERNAL_ASSERT(has_bf16_dot());
  if (M == 0 || N == 0) return;
  if (rows == 1) return outer_product(M, N, g_t, ld_g, A, W, accumulate);
  const at::Tensor a =
      at::from_blob(const_cast<float*>(A), {rows, N}, {lda, 1}, at::TensorOptions(at::kFloat));
  Panels panels = pack_panels(a, /*group=*/0, /*bf16=*/true);
  panels.tiles = bf16_tiles_allowed();
  bf16_rows_matmul(M, g_t, ld_g, panels, W, N, accumulate);
}

// bf16_weight_product on float32 G, rounded and transposed here.
template <class Out>
void weight_product_of(int64_t M, int64_t N, int64_t rows, const float* G, int64_t ldg,
                       const float* A, int64_t lda, Out* W, bool accumulate) {
  if (M == 0 || N == 0) return;
  const at::Tensor g_t = bf16_transposed(rows, M, G, ldg);
  weight_product_on(M, N, rows, g_t.data_ptr<at::BFloat16>(), g_t.size(1), A, lda, W, accumulate);
}

}  // namespace

void bf16_weight_product(int64_t M, int64_t N, int64_t rows, const float* G, int64_t ldg,
                         const float* A, int64_t lda, float* W, bool accumulate) {
  weight_product_of(M, N, rows, G, ldg, A, lda, W, accumulate);
}

void bf16_weight_product(int64_t M, int64_t N, int64_t rows, const float* G, int64_t ldg,
                         const float* A, int64_t lda, at::BFloat16* W) {
  weight_product_of(M, N, rows, G, ldg, A, lda, W, false);
}

void bf16_weight_product(int64_t M, int64_t N, int64_t rows, const at::BFloat16* g_t, int64_t ld_g,
                         const float* A, int64_t lda, at::BFloat16* W) {
  weight_product_on(M, N, rows, g_t, ld_g, A, lda, W, false);
}

at::Tensor bf16_transposed(int64_t rows, int64_t M, const at::BFloat16* G, int64_t ldg) {
  return bf16_transposed_by(rows, M, [&](int64_t m0, int64_t m1, at::BFloat16* out, int64_t ld) {
    bf16_transpose(rows, m0, m1, G, ldg, out, ld);
  });
}

at::Tensor bf16_transposed(int64_t rows, int64_t M, const float* G, int64_t ldg) {
  return bf16_transposed_by(rows, M, [&](int64_t m0, int64_t m1, at::BFloat16* out, int64_t ld) {
    bf16_round_transposed(rows, m1 - m0, G + m0, ldg, out + m0 * ld, ld);
  });
}

template <class T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
            int64_t ldc, bool accumulate, int64_t chain) {
  product<T>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, /*panels=*/false, false, chain);
}

template <class T>
void matmul(int64_t M, const T* A, int64_t lda, const Panels& B, T* C, int64_t ldc, bool accumulate,
            int64_t chain) {
  if constexpr (std::is_same_v<T, float>) {
    if (B.bf16()) return M == 0 ? void() : bf16_matmul(M, A, lda, B, C, ldc, accumulate);
  }
  TORCH_INTERNAL_ASSERT(B.group == B.N, "a full product needs panels packed in one group");
  product<T>(M, B.N, B.K, A, lda, B.data.data_ptr<T>(), 0, C, ldc, accumulate, /*panels=*/true,
             B.streamed, chain);
}

void matmul(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B, float* C, int64_t ldc,
            bool accumulate) {
  TORCH_INTERNAL_ASSERT(B.bf16() && B.K % 2 == 0 && lda % 2 == 0);
  if (M > 0) bf16_rows_matmul(M, A, lda, B, C, ldc, accumulate);
}

template <class T>
void panel_product(int64_t M, const T* A, int64_t lda, const Panels& B, int64_t g, int64_t j, T* C,
                   int64_t ldc, bool accumulate, const T* next) {
  const int64_t width = std::min(Panels::kPanel, B.group - j * Panels::kPanel);
  if constexpr (std::is_same_v<T, float>) {
    if (B.bf16()) {
      return bf16_panel_product(M, B.K, A, lda, B.panel<at::BFloat16>(g, j), width, C, ldc,
                                accumulate, B.tiles);
    }
  }
  one_panel<T>(M, B.K, A, lda, B.panel<T>(g, j), width, C, ldc, accumulate,
               B.streamed ? next : nullptr);
}

void panel_product(int64_t M, const at::BFloat16* A, int64_t lda, const Panels& B, int64_t g,
                   int64_t j, float* C, int64_t ldc, bool accumulate) {
  TORCH_INTERNAL_ASSERT(B.bf16() && lda % 2 == 0);
  const int64_t width = std::min(Panels::kPanel, B.group - j * Panels::kPanel);
  bf16_panel_product(M, B.K, A, lda, B.panel<at::BFloat16>(g, j), width, C, ldc, accumulate,
                     B.tiles);
}

template <class T>
void blas_product(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                  int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (empty_product(M, N, K, C, ldc, accumulate)) return;
  matmul_blas<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <class T>
void blas_product_here(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                       int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if (empty_product(M, N, K, C, ldc, accumulate)) return;
  const OneBlasThread one_thread;
  blas_call<T>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <class T>
void blas_at_b(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) return blas_product<T>(true, false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  // About 8 blocks (each call packs its operands anew: fewer, larger calls pack less), of a
  // size that depends on M only.
  const int64_t kRowsPerCall = std::max<int64_t>(64, (M + 8 * 16 - 1) / (8 * 16) * 16);
  const auto rows = [&](int64_t begin, int64_t end) {
    const OneBlasThread one_thread;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i = blk * kRowsPerCall, m = std::min(kRowsPerCall, M - i);
      blas_call<T>(true, false, m, N, K, A + i, lda, B, ldb, C + i * ldc, ldc, accumulate);
    }
  };
  split_over_threads((M + kRowsPerCall - 1) / kRowsPerCall, kRowsPerCall * N * K, rows);
}

#define RF_INSTANTIATE(T)                                                                         \
  template void matmul<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*,    \
                          int64_t, bool, int64_t);                                                \
  template void matmul<T>(int64_t, const T*, int64_t, const Panels&, T*, int64_t, bool, int64_t); \
  template void blas_product<T>(bool, bool, int64_t, int64_t, int64_t, const T*, int64_t,         \
                                const T*, int64_t, T*, int64_t, bool);                            \
  template void panel_product<T>(int64_t, const T*, int64_t, const Panels&, int64_t, int64_t, T*, \
                                 int64_t, bool, const T*);                                        \
  template void blas_at_b<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, \
                             int64_t, bool);                                                      \
  template void blas_product_here<T>(bool, bool, int64_t, int64_t, int64_t, const T*, int64_t,    \
                                     const T*, int64_t, T*, int64_t, bool);
RF_INSTANTIATE(float)
RF_INSTANTIATE(double)
#undef RF_INSTANTIATE

}  // namespace rnn_fused::cpu

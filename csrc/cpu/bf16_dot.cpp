// Products on AVX-512 BF16 dot-product instructions (vdpbf16ps: per float32 lane, the sum
// of two bfloat16 products added to the lane). Compiled for that instruction set function by
// function, whatever the rest of the build targets, and called only where the CPU has it.
// AMX tile products go through ATen's brgemm, which generates its kernels at run time.
#include "bf16_dot.h"

#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_sums.h"

namespace rnn_fused::cpu {
namespace {

#define RF_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kVecs = kBf16Panel / 16;  // float32 vectors across a panel
// K is taken in slices whose rounded A rows sit on the stack, kRows rows at a time.
constexpr int64_t kSliceK = 512;
constexpr int64_t kRows = 4;

// Mask of the lanes of vector v that fall inside `width` columns.
RF_BF16_TARGET inline __mmask16 lanes(int64_t width, int64_t v) {
  const int64_t n = std::clamp<int64_t>(width - v * 16, 0, 16);
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Rounds k values of a float32 row to bfloat16 (to nearest even), padded with one zero when
// k is odd so that the row splits into pairs.
RF_BF16_TARGET void round_row(int64_t k, const float* row, uint16_t* out) {
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(row + j));
    std::memcpy(out + j, &h, sizeof(h));
  }
  if (j < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - j)) - 1u);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + j));
    // Lanes past k are zeros: one of them pads an odd row.
    std::memcpy(out + j, &h, sizeof(uint16_t) * std::min<int64_t>((k + 1) / 2 * 2 - j, 16));
  }
}

// 16 float32 sums rounded to bfloat16 (to nearest even), stored where `lanes` says.
RF_BF16_TARGET inline void store_rounded(uint16_t* c, __mmask16 lanes, __m512 sums) {
  const __m256bh rounded = _mm512_cvtneps_pbh(sums);
  __m256i bits;
  std::memcpy(&bits, &rounded, sizeof(bits));
  _mm256_mask_storeu_epi16(c, lanes, bits);
}

// M rows of `width` float32 sums rounded into C's rows.
RF_BF16_TARGET void round_rows(int64_t M, int64_t width, const float* sums, int64_t ld_sums,
                               uint16_t* c, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 lanes =
          static_cast<__mmask16>(width - j >= 16 ? 0xFFFFu : (1u << (width - j)) - 1u);
      store_rounded(c + i * ldc + j, lanes, _mm512_maskz_loadu_ps(lanes, sums + i * ld_sums + j));
    }
  }
}

// R rows of A (bfloat16, rows split into `pairs` pairs) times a panel, into R rows of float32
// C, or (not accumulated) of bfloat16 C rounded to nearest even. The accumulators stay in
// registers over all of K: full unrolling keeps them there. V: the vectors that `width`
// columns take (a gate's last panel, or all of a small layer's: at H=8 an LSTM's panels hold 8
// columns of 64, and all four vectors took 27% of a bfloat16 forward at T=64 B=257; with
// staged cell math, 2.13 -> 1.25 ms, one thread, AMD EPYC).
template <int R, int V, class Out>
RF_BF16_TARGET void rows_times_panel(int64_t pairs, const uint16_t* A, int64_t lda,
                                     const uint16_t* panel, int64_t width, Out* C, int64_t ldc,
                                     bool accumulate) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if constexpr (std::is_same_v<Out, float>) {
        acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(lanes(width, v), C + r * ldc + 16 * v)
                               : _mm512_setzero_ps();
      } else {
        acc[r][v] = _mm512_setzero_ps();
      }
    }
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512i bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = _mm512_loadu_si512(panel + p * 2 * kBf16Panel + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, (__m512bh)bv[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if constexpr (std::is_same_v<Out, float>) {
        _mm512_mask_storeu_ps(C + r * ldc + 16 * v, lanes(width, v), acc[r][v]);
      } else {
        store_rounded(C + r * ldc + 16 * v, lanes(width, v), acc[r][v]);
      }
    }
  }
}

// Rows [0, M) of bfloat16 A in blocks of kRows, on the V vectors that width columns take.
template <int V = kVecs, class Out>
void rows_times_panel_all(int64_t M, int64_t pairs, const uint16_t* A, int64_t lda,
                          const uint16_t* b, int64_t width, Out* C, int64_t ldc, bool accumulate) {
  if constexpr (V > 1) {
    if (width <= (V - 1) * 16)
      return rows_times_panel_all<V - 1>(M, pairs, A, lda, b, width, C, ldc, accumulate);
  }
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows)
    rows_times_panel<kRows, V>(pairs, A + i * lda, lda, b, width, C + i * ldc, ldc, accumulate);
  switch (M - i) {
    case 3:
      return rows_times_panel<3, V>(pairs, A + i * lda, lda, b, width, C + i * ldc, ldc,
                                    accumulate);
    case 2:
      return rows_times_panel<2, V>(pairs, A + i * lda, lda, b, width, C + i * ldc, ldc,
                                    accumulate);
    case 1:
      return rows_times_panel<1, V>(pairs, A + i * lda, lda, b, width, C + i * ldc, ldc,
                                    accumulate);
    default:
      return;
  }
}

// Rows of A by rows of W in blocks of kDotRows x kDotRows: 16 accumulators, each the partial
// sums of one dot product in 16 lanes, summed together at the end (sums_of_16). Rows of A
// in groups of kDotRowsPerPass, which stay in L2 while a thread's rows of W go by.
constexpr int kDotRows = 4;
constexpr int64_t kDotRowsPerPass = 64;

// One step of block_dots: values k .. k + 32 (those under m) of each row.
RF_BF16_TARGET inline void dots_at(int64_t k, __mmask32 m, const uint16_t* const (&a)[kDotRows],
                                   const uint16_t* const (&w)[kDotRows],
                                   __m512 (&acc)[kDotRows * kDotRows]) {
  __m512i av[kDotRows], wv[kDotRows];
#pragma GCC unroll 4
  for (int r = 0; r < kDotRows; ++r) {
    av[r] = _mm512_maskz_loadu_epi16(m, a[r] + k);
    wv[r] = _mm512_maskz_loadu_epi16(m, w[r] + k);
  }
#pragma GCC unroll 4
  for (int r = 0; r < kDotRows; ++r) {
#pragma GCC unroll 4
    for (int c = 0; c < kDotRows; ++c) {
      acc[r * kDotRows + c] =
          _mm512_dpbf16_ps(acc[r * kDotRows + c], (__m512bh)av[r], (__m512bh)wv[c]);
    }
  }
}

// The 16 dot products of rows a[r] and w[c] over K values (pairs: lane l of a product sums
// values 2l and 2l + 1), lane 4 r + c of the result.
RF_BF16_TARGET __m512 block_dots(int64_t K, const uint16_t* const (&a)[kDotRows],
                                 const uint16_t* const (&w)[kDotRows]) {
  __m512 acc[kDotRows * kDotRows];
  for (__m512& v : acc) v = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) dots_at(k, ~__mmask32(0), a, w, acc);
  // Values past K are read as zeros, in A (whose pad is not read) as in W.
  if (k < K) dots_at(k, static_cast<__mmask32>((1ull << (K - k)) - 1), a, w, acc);
  return sums_of_16(acc);
}

// rows[r]: row first + r of M (rows ld apart), for r < count; past count the last of those
// again (read, its sums not stored).
inline void block_rows(const uint16_t* M, int64_t ld, int64_t first, int64_t count,
                       const uint16_t* (&rows)[kDotRows]) {
  for (int r = 0; r < kDotRows; ++r) rows[r] = M + (first + std::min<int64_t>(r, count - 1)) * ld;
}

// bf16_times_w: kDotRows rows of A by kWColumns columns of W, whose rows 2p and 2p + 1 are
// interleaved by 16-bit unpacks within 128-bit blocks: the low unpack holds the pairs of
// columns 0-3, 8-11, 16-19 and 24-27 of 32, the high one the others, put back in order as
// they are stored (column_order).
constexpr int64_t kWColumns = 64;
constexpr int kWHalves = kWColumns / 32;  // 32 columns: one 512-bit load of a row

// Accumulators of 16 columns each, the low unpacks' then the high ones', per 32 columns:
// block b of C's 16 columns, in order.
RF_BF16_TARGET inline __m512 column_order(__m512 low, __m512 high, int half) {
  const __m512i order =
      half == 0 ? _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0)
                : _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  return _mm512_permutex2var_ps(low, order, high);
}

// The first `rows` rows of A (at most kDotRows) times the first `width` columns of W (at most
// kWColumns), into C.
RF_BF16_TARGET void rows_times_w_columns(int64_t K, const uint16_t* A, int64_t lda, int64_t rows,
                                         const uint16_t* W, int64_t ldw, int64_t width, float* C,
                                         int64_t ldc, bool accumulate) {
  __mmask32 cols[kWHalves];
  for (int h = 0; h < kWHalves; ++h)
    cols[h] =
        static_cast<__mmask32>((uint64_t(1) << std::clamp<int64_t>(width - 32 * h, 0, 32)) - 1);
  const uint16_t* a[kDotRows];
  block_rows(A, lda, 0, rows, a);
  // Per half of the columns: the low unpack's accumulator, then the high one's. Loops over
  // them unrolled in full, so that they stay in registers.
  __m512 acc[kDotRows][2 * kWHalves];
#pragma GCC unroll 4
  for (int r = 0; r < kDotRows; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 2 * kWHalves; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t* first = W + k * ldw;
    // An odd K's last pair: its second row is zeros.
    const bool pair = k + 1 < K;
    __m512i wv[2 * kWHalves];
#pragma GCC unroll 2
    for (int h = 0; h < kWHalves; ++h) {
      const __m512i even = _mm512_maskz_loadu_epi16(cols[h], first + 32 * h);
      const __m512i odd =
          _mm512_maskz_loadu_epi16(pair ? cols[h] : __mmask32(0), first + ldw + 32 * h);
      wv[2 * h] = _mm512_unpacklo_epi16(even, odd);
      wv[2 * h + 1] = _mm512_unpackhi_epi16(even, odd);
    }
#pragma GCC unroll 4
    for (int r = 0; r < kDotRows; ++r) {
      int32_t bits;
      std::memcpy(&bits, a[r] + k, sizeof(bits));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(bits);
#pragma GCC unroll 4
      for (int v = 0; v < 2 * kWHalves; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, (__m512bh)wv[v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kDotRows; ++r) {
#pragma GCC unroll 2
    for (int h = 0; h < kWHalves; ++h) {
#pragma GCC unroll 2
      for (int b = 0; b < 2; ++b) {
        const int64_t c0 = 32 * h + 16 * b;
        const __mmask16 out = r < rows ? lanes(width - c0, 0) : __mmask16(0);
        float* c = C + r * ldc + c0;
        __m512 sums = column_order(acc[r][2 * h], acc[r][2 * h + 1], b);
        if (accumulate) sums = _mm512_add_ps(sums, _mm512_maskz_loadu_ps(out, c));
        _mm512_mask_storeu_ps(c, out, sums);
      }
    }
  }
}

// 16 values of each of two rows, interleaved: lane 2c of the result holds a[c], lane 2c + 1
// holds b[c] (bfloat16 in the low 16 bits of each 32-bit word, as the dot products read
// pairs).
RF_BF16_TARGET inline __m512i interleave(__m256i a, __m256i b) {
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, both);
}

// width values of a row (16 at most) as bfloat16, zeros past width or for a missing row.
RF_BF16_TARGET inline __m256i bf16_values(const float* row, int64_t width) {
  if (row == nullptr) return _mm256_setzero_si256();
  const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes(width, 0), row));
  __m256i bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}
RF_BF16_TARGET inline __m256i bf16_values(const at::BFloat16* row, int64_t width) {
  if (row == nullptr) return _mm256_setzero_si256();
  return _mm256_maskz_loadu_epi16(lanes(width, 0), row);
}

template <class T>
RF_BF16_TARGET void pair_rows(const T* first, const T* second, int64_t width, at::BFloat16* to) {
  for (int64_t c = 0; c < width; c += 16) {
    const int64_t n = std::min<int64_t>(16, width - c);
    const __m512i pairs = interleave(bf16_values(first + c, n),
                                     bf16_values(second == nullptr ? nullptr : second + c, n));
    const __mmask32 m = n == 16 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (2 * n)) - 1);
    _mm512_mask_storeu_epi16(to + 2 * c, m, pairs);
  }
}

// AMX tile products through ATen's bfloat16 brgemm (oneDNN's micro-kernels), which reads a
// panel as it is: its pairs of rows are the VNNI layout the tiles take. ATen keeps the tile
// configuration of the last kernel per thread; tiles_in_use marks a thread that must release it
// (bf16_tiles_release) before other code configures the tiles its own way.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
bool has_amx() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}
thread_local bool tiles_in_use = false;

void tile_product(int64_t M, int64_t K, const at::BFloat16* A, int64_t lda,
                  const at::BFloat16* panel, int64_t width, float* C, int64_t ldc,
                  bool accumulate) {
  tiles_in_use = true;
  at::native::cpublas::brgemm(M, width, (K + 1) / 2 * 2, lda, kBf16Panel, ldc, accumulate, A, panel,
                              C, /*is_vnni=*/true);
}
void release_tiles() {
  if (!tiles_in_use) return;
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  tiles_in_use = false;
}
void take_tiles() {
  if (!has_amx()) return;
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  tiles_in_use = false;
}
#else
bool has_amx() { return false; }
void tile_product(int64_t, int64_t, const at::BFloat16*, int64_t, const at::BFloat16*, int64_t,
                  float*, int64_t, bool) {
  TORCH_INTERNAL_ASSERT(false, "AMX products without ATen's bfloat16 brgemm");
}
void release_tiles() {}
void take_tiles() {}
#endif

}  // namespace

bool bf16_tiles_allowed() {
  const char* env = std::getenv("RNN_FUSED_BF16_TILES");
  return has_amx() && (env == nullptr || std::strcmp(env, "0") != 0);
}

void bf16_tiles_release() { release_tiles(); }
void bf16_tiles_take() { take_tiles(); }

void bf16_pair_rows(const float* first, const float* second, int64_t width, at::BFloat16* to) {
  pair_rows(first, second, width, to);
}

void bf16_pair_rows(const at::BFloat16* first, const at::BFloat16* second, int64_t width,
                    at::BFloat16* to) {
  pair_rows(first, second, width, to);
}

bool has_bf16_dot() {
  // VL too: the pair packing uses 256-bit masked loads (every CPU with BF16 has it so far).
  static const bool ok = __builtin_cpu_supports("avx512bf16") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return ok;
}

void bf16_round_rows(int64_t M, int64_t K, const float* A, int64_t lda, at::BFloat16* out,
                     int64_t ld_out) {
  for (int64_t i = 0; i < M; ++i)
    round_row(K, A + i * lda, reinterpret_cast<uint16_t*>(out) + i * ld_out);
}

RF_BF16_TARGET void bf16_round_transposed(int64_t K, int64_t M, const float* A, int64_t lda,
                                          at::BFloat16* out, int64_t ld_out) {
  constexpr int64_t kBlock = 32;
  alignas(64) at::BFloat16 block[kBlock * kBlock];
  for (int64_t m0 = 0; m0 < M; m0 += kBlock) {
    const int64_t mc = std::min(kBlock, M - m0);
    for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
      const int64_t kc = std::min(kBlock, K - k0);
      for (int64_t k = 0; k < kc; ++k) {
        const float* row = A + (k0 + k) * lda + m0;
        for (int64_t half = 0; half < mc; half += 16) {
          const __mmask16 m = lanes(mc - half, 0);
          const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, row + half));
          std::memcpy(block + k * kBlock + half, &h, sizeof(h));
        }
      }
      at::vec::transpose_mxn<at::BFloat16>(block, kBlock, out + m0 * ld_out + k0, ld_out,
                                           static_cast<int>(kc), static_cast<int>(mc));
    }
    if (K % 2 != 0)
      for (int64_t m = m0; m < m0 + mc; ++m) out[m * ld_out + K] = at::BFloat16(0.0f);
  }
}

void bf16_transpose(int64_t K, int64_t m0, int64_t m1, const at::BFloat16* A, int64_t lda,
                    at::BFloat16* out, int64_t ld_out) {
  constexpr int64_t kBlock = 32;
  for (int64_t m = m0; m < m1; m += kBlock) {
    const int64_t mc = std::min(kBlock, m1 - m);
    for (int64_t k = 0; k < K; k += kBlock) {
      at::vec::transpose_mxn<at::BFloat16>(A + k * lda + m, lda, out + m * ld_out + k, ld_out,
                                           static_cast<int>(std::min(kBlock, K - k)),
                                           static_cast<int>(mc));
    }
    if (K % 2 != 0)
      for (int64_t r = m; r < m + mc; ++r) out[r * ld_out + K] = at::BFloat16(0.0f);
  }
}

const at::BFloat16* bf16_rounded_rows(int64_t M, int64_t K, const float* A, int64_t lda,
                                      int64_t* ld) {
  thread_local std::vector<at::BFloat16> rounded;
  *ld = (K + 1) / 2 * 2;
  if (static_cast<int64_t>(rounded.size()) < M * *ld) rounded.resize(M * *ld);
  bf16_round_rows(M, K, A, lda, rounded.data(), *ld);
  return rounded.data();
}

RF_BF16_TARGET void bf16_times_w_rows(int64_t M, int64_t N, int64_t K, const at::BFloat16* A,
                                      int64_t lda, const at::BFloat16* W, int64_t ldw, float* C,
                                      int64_t ldc, bool accumulate) {
  const auto* a16 = reinterpret_cast<const uint16_t*>(A);
  const auto* w16 = reinterpret_cast<const uint16_t*>(W);
  for (int64_t p0 = 0; p0 < M; p0 += kDotRowsPerPass) {
    const int64_t p1 = std::min(M, p0 + kDotRowsPerPass);
    for (int64_t n0 = 0; n0 < N; n0 += kDotRows) {
      const int64_t wn = std::min<int64_t>(kDotRows, N - n0);
      const uint16_t* w[kDotRows];
      block_rows(w16, ldw, n0, wn, w);
      for (int64_t m0 = p0; m0 < p1; m0 += kDotRows) {
        const int64_t am = std::min<int64_t>(kDotRows, p1 - m0);
        const uint16_t* a[kDotRows];
        block_rows(a16, lda, m0, am, a);
        alignas(64) float sums[kDotRows * kDotRows];
        _mm512_store_ps(sums, block_dots(K, a, w));
        for (int64_t r = 0; r < am; ++r) {
          float* c = C + (m0 + r) * ldc + n0;
          for (int64_t j = 0; j < wn; ++j)
            c[j] = accumulate ? c[j] + sums[r * kDotRows + j] : sums[r * kDotRows + j];
        }
      }
    }
  }
}

void bf16_times_w(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                  const at::BFloat16* W, int64_t ldw, float* C, int64_t ldc, bool accumulate) {
  const auto* a16 = reinterpret_cast<const uint16_t*>(A);
  const auto* w16 = reinterpret_cast<const uint16_t*>(W);
  // A strip of W's columns stays in L2 while the rows of A go by.
  for (int64_t j = 0; j < N; j += kWColumns) {
    for (int64_t m0 = 0; m0 < M; m0 += kDotRows) {
      rows_times_w_columns(K, a16 + m0 * lda, lda, std::min<int64_t>(kDotRows, M - m0), w16 + j,
                           ldw, std::min(kWColumns, N - j), C + m0 * ldc + j, ldc, accumulate);
    }
  }
}

void bf16_panel_product(int64_t M, int64_t K, const at::BFloat16* A, int64_t lda,
                        const at::BFloat16* panel, int64_t width, float* C, int64_t ldc,
                        bool accumulate, bool tiles) {
  if (tiles && M >= kTileMinRows)
    return tile_product(M, K, A, lda, panel, width, C, ldc, accumulate);
  rows_times_panel_all(M, (K + 1) / 2, reinterpret_cast<const uint16_t*>(A), lda,
                       reinterpret_cast<const uint16_t*>(panel), width, C, ldc, accumulate);
}

void bf16_panel_product(int64_t M, int64_t K, const at::BFloat16* A, int64_t lda,
                        const at::BFloat16* panel, int64_t width, at::BFloat16* C, int64_t ldc,
                        bool tiles) {
  auto* c = reinterpret_cast<uint16_t*>(C);
  if (tiles && M >= kTileMinRows) {
    // The tiles' float32 sums, kSumRows rows at a time, rounded as the dot products round.
    constexpr int64_t kSumRows = 64;
    alignas(64) float sums[kSumRows * kBf16Panel];
    for (int64_t i = 0; i < M; i += kSumRows) {
      const int64_t rows = std::min(kSumRows, M - i);
      tile_product(rows, K, A + i * lda, lda, panel, width, sums, kBf16Panel, false);
      round_rows(rows, width, sums, kBf16Panel, c + i * ldc, ldc);
    }
    return;
  }
  rows_times_panel_all(M, (K + 1) / 2, reinterpret_cast<const uint16_t*>(A), lda,
                       reinterpret_cast<const uint16_t*>(panel), width,
                       reinterpret_cast<uint16_t*>(C), ldc, /*accumulate=*/false);
}

void bf16_panel_product(int64_t M, int64_t K, const float* A, int64_t lda,
                        const at::BFloat16* panel, int64_t width, float* C, int64_t ldc,
                        bool accumulate, bool tiles) {
  if (tiles && M >= kTileMinRows) {
    int64_t ld = 0;
    const at::BFloat16* rounded = bf16_rounded_rows(M, K, A, lda, &ld);
    return tile_product(M, K, rounded, ld, panel, width, C, ldc, accumulate);
  }
  // K in slices whose rounded rows, kRows at a time, sit on the stack.
  alignas(64) uint16_t a[kRows * (kSliceK + 32)];
  const auto* b = reinterpret_cast<const uint16_t*>(panel);
  for (int64_t i = 0; i < M; i += kRows) {
    const int64_t rows = std::min(kRows, M - i);
    for (int64_t k0 = 0; k0 < K; k0 += kSliceK) {
      const int64_t k = std::min(kSliceK, K - k0);
      for (int64_t r = 0; r < rows; ++r)
        round_row(k, A + (i + r) * lda + k0, a + r * (kSliceK + 32));
      // k0 is even: the slice starts at pair row k0 / 2 of the panel.
      rows_times_panel_all(rows, (k + 1) / 2, a, kSliceK + 32, b + k0 * kBf16Panel, width,
                           C + i * ldc, ldc, accumulate || k0 > 0);
    }
  }
}

}  // namespace rnn_fused::cpu

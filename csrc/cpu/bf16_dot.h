// Products with bfloat16 operands and float32 sums on AVX-512 BF16 dot products, for
// bfloat16 calls on CPUs that have them (has_bf16_dot; others run such calls in float32),
// and on AMX tiles for products of 2 rows or more where the CPU has AMX-BF16 too.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace rnn_fused::cpu {

// Columns of one bfloat16 panel (as Panels::kPanel for float32 panels).
constexpr int64_t kBf16Panel = 64;

// Whether this CPU has the AVX-512 BF16 dot-product instructions.
bool has_bf16_dot();

// Whether bfloat16 products may run on AMX tiles: the CPU has AMX-BF16 and
// RNN_FUSED_BF16_TILES is not "0" (read at each call: the tests run both paths). Products
// with at least kTileMinRows rows of A take the tiles then: a tile holds 16 rows, but even
// a few of them beat the dot products, which on that CPU run at float32's rate. bfloat16
// LSTM T=100 H=256 under no_grad, tiles from 16 rows -> from 2 (Intel Xeon): B=2 0.75 ->
// 0.60 ms, B=4 1.32 -> 0.79, B=6 1.97 -> 1.01, B=8 2.50 -> 1.22 (torch.nn 1.06-1.45); B=1
// 0.43 against 0.50 on tiles, hence 2.
bool bf16_tiles_allowed();
constexpr int64_t kTileMinRows = 2;

// Ends the calling thread's use of the AMX tiles, if any: every thread that ran bfloat16
// products calls it before returning to code that may configure the tiles its own way.
void bf16_tiles_release();
// Before tiles configured by code of our own (AmxGateTiles): ATen's brgemm told to configure
// its tiles again at its next call on this thread, whoever called it last. Its own callers
// release after their products, but a caller that did not would find, at its next call with
// the same kernel, tiles we released, and fault.
void bf16_tiles_take();

// C[M, width] = A[M, K] @ panel (accumulate: C += ...), width <= kBf16Panel. A is float32,
// rounded to bfloat16 (to nearest even) as it is read; panel holds K rows of kBf16Panel
// columns in pairs of rows ([ceil(K/2), kBf16Panel, 2], the pair of the last odd row padded
// with zeros), as pack_panels lays them out. tiles: AMX tiles for kTileMinRows rows or more
// (bf16_tiles_allowed). Runs on the calling thread.
void bf16_panel_product(int64_t M, int64_t K, const float* A, int64_t lda,
                        const at::BFloat16* panel, int64_t width, float* C, int64_t ldc,
                        bool accumulate, bool tiles);

// The same on A rounded beforehand (bf16_round_rows, lda even): for an A that many panels
// read.
void bf16_panel_product(int64_t M, int64_t K, const at::BFloat16* A, int64_t lda,
                        const at::BFloat16* panel, int64_t width, float* C, int64_t ldc,
                        bool accumulate, bool tiles);

// The same into a bfloat16 C (not accumulated): the float32 sums rounded to nearest even.
void bf16_panel_product(int64_t M, int64_t K, const at::BFloat16* A, int64_t lda,
                        const at::BFloat16* panel, int64_t width, at::BFloat16* C, int64_t ldc,
                        bool tiles);

// C[M, N] = A[M, K] @ W^T (accumulate: C += ...) for a bfloat16 W [N, K] as stored (rows
// ldw apart) and A rounded to bfloat16 (rows lda apart): a row of W holds its values in the
// pairs the dot products take, as a row of A does, so W needs no packing. For the products
// of a small problem (read once per call: packing would cost more than they do). Runs on the
// calling thread.
void bf16_times_w_rows(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                       const at::BFloat16* W, int64_t ldw, float* C, int64_t ldc, bool accumulate);

// C[M, N] = A[M, K] @ W (accumulate: C += ...) for a bfloat16 W [K, N] as stored (rows ldw
// apart) and A rounded to bfloat16 (bf16_round_rows: lda even, an odd K's pad zero): pairs of
// W's rows interleaved as they are read, for the same products as bf16_times_w_rows. Runs on
// the calling thread.
void bf16_times_w(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                  const at::BFloat16* W, int64_t ldw, float* C, int64_t ldc, bool accumulate);

// One pair row of a bfloat16 panel from two rows of b (row-major): to[2c] = first[c],
// to[2c + 1] = second[c] (zero where second is nullptr), rounded to bfloat16 (to nearest
// even), for c < width.
void bf16_pair_rows(const float* first, const float* second, int64_t width, at::BFloat16* to);
void bf16_pair_rows(const at::BFloat16* first, const at::BFloat16* second, int64_t width,
                    at::BFloat16* to);

// A[M, K] rounded to bfloat16 into the calling thread's buffer (rows *ld apart, ld = K rounded
// up to even), valid until this thread's next call: for a product on AMX tiles, which read
// whole rows of A.
const at::BFloat16* bf16_rounded_rows(int64_t M, int64_t K, const float* A, int64_t lda,
                                      int64_t* ld);

// out[M, K rounded up to even] = A[M, K] rounded to bfloat16 (to nearest even), a zero after
// each row of odd K; ld_out even.
void bf16_round_rows(int64_t M, int64_t K, const float* A, int64_t lda, at::BFloat16* out,
                     int64_t ld_out);

// Rows [m0, m1) of out[M, K rounded up to even] = A^T for a bfloat16 A [K, M] (rows lda
// apart), a zero after each row of odd K; ld_out even: the columns of A a thread transposes.
void bf16_transpose(int64_t K, int64_t m0, int64_t m1, const at::BFloat16* A, int64_t lda,
                    at::BFloat16* out, int64_t ld_out);

// out[M, K rounded up to even] = A^T rounded to bfloat16 (to nearest even), for A [K, M]
// (rows lda apart), a zero after each row of odd K; ld_out even. One pass: values rounded
// in blocks of 32 x 32 and transposed while in L1, instead of a float32 transpose through
// memory and a rounding pass after it.
void bf16_round_transposed(int64_t K, int64_t M, const float* A, int64_t lda, at::BFloat16* out,
                           int64_t ld_out);

}  // namespace rnn_fused::cpu

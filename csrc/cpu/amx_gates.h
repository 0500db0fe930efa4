// A step's hidden-side products for one block of up to 32 rows and one unit block on AMX tiles of
// our own: every gate's panel of W_hh against the block's rows of h (bfloat16), the float32
// sums into a small buffer that the cell math reads next, from L1. Through ATen's brgemm the
// same products cost a kernel-cache lookup per gate and land in the step's [rows, gates * H]
// buffer, whose 8 KiB rows (at H=512) the cell math then reads back from L2.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <vector>

#include "gemm.h"

namespace rnn_fused::cpu {

// Rows of one call at most; sums of units per gate (one panel).
constexpr int64_t kAmxGateRows = 32;
constexpr int64_t kAmxGateUnits = Panels::kPanel;

// Whether AmxGateTiles::products takes W's panels: bfloat16 panels on AMX tiles (Panels::tiles,
// set where the CPU has AMX-BF16) with K a multiple of 32 (a tile's row of pairs).
bool amx_gate_products_fit(const Panels& W);

// The tiles of one thread's products over a step loop: configured at the first call and again
// only where a block's row count changes, released by release() or when it goes out of scope.
// Configured and released around every call, they cost a bfloat16 forward at T=100 H=256
// 5-9% at batches 1 to 16 (LSTM B=1 0.48 -> 0.44 ms, GRU B=1 0.41 -> 0.37) and 2-4% at B=64
// H=512 (Intel Xeon with AMX). Call release() before anything else on the thread uses the
// tiles (ATen's brgemm).
class AmxGateTiles {
 public:
  AmxGateTiles() = default;
  AmxGateTiles(const AmxGateTiles&) = delete;
  AmxGateTiles& operator=(const AmxGateTiles&) = delete;
  ~AmxGateTiles() { release(); }

  // out[r, g, c] = sum over k of A[r, k] W[k, g * W.group + j * kAmxGateUnits + c] for
  // r < rows (1 to kAmxGateRows), g < gates, c < kAmxGateUnits (columns past the group are the
  // panels' zeros): out holds `rows` rows of gates * kAmxGateUnits values. A's rows are lda
  // apart. The sums are those of ATen's brgemm on the same panel: K in steps of 32, each a
  // tile product added to the tile of sums. Runs on the calling thread.
  // W as stored (Panels::as_stored): take_rows(A), then rows_times_w for each gate.
  void products(int64_t rows, const at::BFloat16* A, int64_t lda, const Panels& W, int64_t gates,
                int64_t j, float* out);

  // Rows [0, rows) of A (bfloat16, 1 to kAmxGateRows rows lda apart, lda even, K a multiple
  // of 32) packed as pairs of values for rows_times_w, until the next take_rows.
  void take_rows(int64_t rows, int64_t K, const at::BFloat16* A, int64_t lda);
  // C[r, c] = sum over k of A[r, k] W[c, k] for the taken rows r and c < width (a multiple of
  // 16, at most kAmxGateUnits): W a bfloat16 matrix as stored, rows ldw apart. The tiles read
  // W's rows as they are, in products W A^T, and the sums go back to C transposed: the sums
  // of products() on W packed, bit for bit (a tile product's sums do not depend on which
  // operand is which). C's rows ldc apart.
  void rows_times_w(const at::BFloat16* W, int64_t ldw, int64_t width, float* C, int64_t ldc);
  void release();

 private:
  int64_t configured_rows_ = 0;  // 0: the tiles are not ours; kSquare: rows_times_w's
  static constexpr int64_t kSquare = -1;
  int64_t taken_rows_ = 0, taken_k_ = 0;
  std::vector<uint32_t> pairs_;  // the taken rows' pairs, [K / 2, kAmxGateRows]
};

// Whether rows_times_w can run: an AVX-512 build (its transposes), AMX tiles allowed
// (bf16_tiles_allowed) and granted by the system; RNN_FUSED_STORED_TILES=0 turns it off (read
// at each call: the tests compare both).
bool amx_stored_rows_usable();

}  // namespace rnn_fused::cpu

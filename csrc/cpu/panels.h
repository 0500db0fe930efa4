// Column panels, the layout in which the CPU products read a right-hand side used at every
// step (a weight), and transposed copies of other operands; both made in pack_panels.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "bf16_dot.h"

namespace rnn_fused::cpu {

// A right-hand side used at every step, repacked as column panels. Its N columns form
// groups of `group` columns (the gates of a weight: i, f, g, o); panel j of group g holds
// columns g*group + j*kPanel .. + kPanel as a contiguous [K, kPanel] block (in stripes:
// panel_stripe), zero padded at the end of each group. Read step after step, a panel streams in
// order and stays in the cache of the thread that owns it (a plain row-major B whose row length is
// a power of two would thrash cache sets), and one thread can own the same units of every gate.
//
// bfloat16 panels (for products on bfloat16 dot products, bf16_dot.h) hold each panel's K
// rows in pairs: [ceil(K/2), kPanel, 2], an odd last row padded with zeros.
struct Panels {
  static constexpr int64_t kPanel = 64;
  at::Tensor data;  // [groups, panels_per_group, K, kPanel], or the pairs of rows of bfloat16
  int64_t K = 0, N = 0, group = 0, per_group = 0;
  bool tiles = false;     // bfloat16 products on AMX tiles where rows allow (bf16_tiles_allowed)
  bool streamed = false;  // float32 panels beyond L2: gemm.cpp's streamed_panel reads them
  // Not packed: data is a bfloat16 W [N, K] as stored (B = W^T), whose rows the AMX kernels
  // of amx_gates.h read as they are (stored_rows_for_tiles); a panel is kPanel rows of W.
  bool as_stored = false;

  bool bf16() const { return data.defined() && data.scalar_type() == at::kBFloat16; }
  // Values of one panel: K rows, or K rounded up to even for bfloat16.
  int64_t panel_size() const { return (bf16() ? (K + 1) / 2 * 2 : K) * kPanel; }
  template <class T>
  const T* panel(int64_t g, int64_t j) const {
    if (as_stored) return data.data_ptr<T>() + (g * group + j * kPanel) * K;
    return data.data_ptr<T>() + (g * per_group + j) * panel_size();
  }
};

static_assert(Panels::kPanel == kBf16Panel, "one panel width for both layouts");

// A float32 or float64 panel is stored as kPanel / panel_stripe<T>() stripes of that many
// columns, each a contiguous [K, stripe] block. float64 without AVX-512: stripes of 8
// columns, one cache line a row, which the steps' loop of few rows (gemm.cpp, small_rows)
// reads one after another; a whole panel's row is 8 lines, of which a block of 2-3 vectors
// read a piece at every k. 64 x 256 x 1024 in blocks of 4 x 2 vectors ran 46 GFLOP/s on
// stripes against 35 on whole panels (one thread, AMD EPYC Zen 3, AVX2 only). float32
// stripes of 16 columns gained nothing there (82 against 83 GFLOP/s); AVX-512's kernels
// read whole panels.
template <class T>
constexpr int64_t panel_stripe() {
#if defined(CPU_CAPABILITY_AVX512)
  return Panels::kPanel;
#else
  return std::is_same_v<T, double> ? 8 : Panels::kPanel;
#endif
}

// b: [K, N] with any strides (a transposed view is fine); group must divide N (default N).
// bf16: bfloat16 panels of b's values rounded to nearest even.
Panels pack_panels(const at::Tensor& b, int64_t group = 0, bool bf16 = false);

// A bfloat16 w [N, K] (contiguous) as the Panels of B = w^T without packing (Panels::as_stored),
// for products on AMX tiles that read its rows as they are (amx_gates.h): group (0: N) a
// multiple of 16, K of 32.
Panels stored_rows_for_tiles(const at::Tensor& w, int64_t group = 0);

// Where panel `panel` (numbered group by group) starts among b's columns, and how many it
// holds (a group's last may be narrower): for the packings (pack_panels.cpp) and
// the products (gemm.cpp).
struct PanelColumns {
  int64_t group, per_group;
  int64_t first(int64_t panel) const {
    return panel / per_group * group + panel % per_group * Panels::kPanel;
  }
  int64_t width(int64_t panel) const {
    return std::min(Panels::kPanel, group - panel % per_group * Panels::kPanel);
  }
  // The q-th panel in unit order (the first panel of every group, then the second, ...) among
  // `groups` groups. Split over threads, a thread packs the units it takes in the steps where
  // their tiles split units (tile_at: a step of up to kTileRows rows, or by_units), so the
  // panels it reads there are in its own cache: 5-8% off a bfloat16 or float32 LSTM forward
  // at T=100 B=1 H=256 (Intel Xeon with AMX). bf16_rows_matmul's blocks of output columns
  // follow it too, for W_ih's panels grouped by gate (run_forward).
  int64_t in_unit_order(int64_t q, int64_t groups) const {
    return q % groups * per_group + q / groups;
  }
};

// m [M, N] (rows contiguous, any row stride) transposed into a new [N, M] tensor (from the
// buffer cache), on the threads by blocks of rows, with ATen's SIMD transposes of 16 x 16
// blocks: ATen's own transposed copy runs on one thread (1.5-2% of an LSTM's forward and
// backward at T=100 B=32 H=256, the other thread waiting; AMD EPYC). float32 and float64.
at::Tensor transposed(const at::Tensor& m);

}  // namespace rnn_fused::cpu

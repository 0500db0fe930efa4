// The fused pointwise passes of the CPU recurrence, and the tiles of rows and hidden units
// that a step is split into: the cell math of cell_math.h on SIMD vectors of units, the
// last one of a row partly filled (masked loads and stores; unused lanes compute on zeros).
#pragma once

#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cstdint>

#include "../cell_math.h"
#include "vec_math.h"

namespace rnn_fused::cpu {

// Tiles of a step: kTileRows rows by kTileUnits hidden units, numbered row block by row
// block, so that a static split gives each thread mostly rows of its own; or (by_units) unit
// block by unit block, so that it gives each thread units of its own, and their weights.
constexpr int64_t kTileRows = 32;
constexpr int64_t kTileUnits = 64;

struct Tile {
  int64_t i0, rows, u0, u1;  // rows [i0, i0 + rows), units [u0, u1)
};

inline int64_t unit_blocks(int64_t H) { return (H + kTileUnits - 1) / kTileUnits; }
inline int64_t tile_count(int64_t n, int64_t H) {
  return (n + kTileRows - 1) / kTileRows * unit_blocks(H);
}
inline Tile tile_at(int64_t tile, int64_t n, int64_t H, bool by_units = false) {
  const int64_t row_blocks = (n + kTileRows - 1) / kTileRows;
  const int64_t i0 = (by_units ? tile % row_blocks : tile / unit_blocks(H)) * kTileRows;
  const int64_t u0 = (by_units ? tile / row_blocks : tile % unit_blocks(H)) * kTileUnits;
  return {i0, std::min(kTileRows, n - i0), u0, std::min(H, u0 + kTileUnits)};
}

// Blocks of a batch's rows for forward steps whose threads keep their own rows through a
// chunk (run_forward's own_rows): set by the batch and the kind of product alone, so that a
// product's rows, and its bits, do not depend on the number of threads; at least two, of
// about `block` rows: kOwnRowsBlock, or kOwnRowsTileBlock where bfloat16 products run on AMX
// tiles. A tile's product is one call per gate through ATen's brgemm, each with a lookup in
// its kernel cache; blocks of 128 rows instead of 16, bfloat16 against torch.nn's, three
// alternations of processes: LSTM forward T=100 B=128 H=256 0.82-0.84 -> 0.90-0.98, T=50
// B=256 0.76-0.90 -> 0.88-0.98, T=20 B=512 0.75-0.76 -> 0.85-1.01, forward and backward
// T=100 B=128 1.66-1.71 -> 1.79-1.81; GRU forward and backward B=128 2.37-2.45 ->
// 2.47-2.57 (Intel Xeon with AMX).
constexpr int64_t kOwnRowsBlock = 16;
constexpr int64_t kOwnRowsTileBlock = 128;
inline int64_t own_row_blocks(int64_t batch, int64_t block) {
  return std::max<int64_t>(2, (batch + block - 1) / block);
}
// Tile `tile` of the row blocks from b0 on (unit block by unit block within a row block),
// its rows clipped to a step's n rows: none where the block lies past them.
inline Tile own_rows_tile(int64_t tile, int64_t b0, int64_t batch, int64_t block, int64_t n,
                          int64_t H) {
  const int64_t blocks = own_row_blocks(batch, block), per = (batch + blocks - 1) / blocks;
  const int64_t b = b0 + tile / unit_blocks(H), u0 = tile % unit_blocks(H) * kTileUnits;
  const int64_t i0 = std::min(n, b * per);
  return {i0, std::min(n, (b + 1) * per) - i0, u0, std::min(H, u0 + kTileUnits)};
}

// Pointers into one row of the forward's buffers.
template <class T>
struct ForwardRow {
  const T* x;           // input-side pre-activations, without bias [gates*H]
  const T* hh;          // hidden-side pre-activations, without bias [gates*H]
  const T* b_ih;        // or nullptr
  const T* b_hh;        // or nullptr
  const T* h_prev;      // [H], read by cells with kUsesPrevH and by zoneout
  T* c;                 // cell state [H]: c_{t-1} in, c_t out (LSTM)
  T* saved;             // [saved_blocks*H], or nullptr when nothing is kept for a backward
  T* h;                 // h_t out [H]
  T* h_copy;            // a second destination of h_t, or nullptr
  const T* keep;        // zoneout's weights of h_{t-1} [H] (LayerArgs::zoneout), or nullptr
  T* h_next = nullptr;  // a third destination of h_t (where the next step reads it), or nullptr
  // h_t rounded to a half type, for a half-type call's output (T is float32 then), or nullptr.
  at::BFloat16* h_bf16 = nullptr;
  at::Half* h_fp16 = nullptr;
  // h_t rounded to bfloat16 where the next step's products read it, or nullptr.
  at::BFloat16* h_next_bf16 = nullptr;
  // Whether `saved` is written past the caches (non-temporal stores, where aligned): a step
  // the backward reads long after (run_forward's kCachedSavedBytes).
  bool stream_saved = false;
  // Where hh is a compact buffer of a few units per gate (AmxGateTiles::products'): the distance
  // from one gate to the next (else 0: H), and the unit at its start.
  int64_t hh_gate_stride = 0, hh_unit_offset = 0;
};

// The cell's saved values of units j .. j + n of one row. Streamed (ForwardRow::stream_saved)
// only as whole aligned vectors; the writing thread fences them (sfence) before others read.
template <class Cell, class V, class T>
C10_ALWAYS_INLINE void store_saved(const ForwardRow<T>& r, const V (&saved)[Cell::kSaved],
                                   int64_t H, int64_t j, int n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const bool aligned = reinterpret_cast<uintptr_t>(r.saved + j) % 64 == 0 && H % 16 == 0;
    if (r.stream_saved && n == 16 && aligned) {
      for (int k = 0; k < Cell::kSaved; ++k) _mm512_stream_ps(r.saved + k * H + j, saved[k]);
      return;
    }
  }
#endif
  for (int k = 0; k < Cell::kSaved; ++k) saved[k].store(r.saved + k * H + j, n);
}

// Makes this thread's streamed saved rows visible to other threads (after its last step).
inline void fence_streamed_saved() {
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The cell on units j .. j + n of one row, n at most a vector's width. A partial vector
// rather than a scalar tail: at H=51 in float64 the scalar libm calls of three units a row
// cost more than the other 48.
template <class Cell, class V, class T>
inline void forward_units(const ForwardRow<T>& r, int64_t H, int64_t j, int n) {
  const auto load = [n](const T* p) { return V::loadu(p, n); };
  const int64_t hh_stride = r.hh_gate_stride != 0 ? r.hh_gate_stride : H;
  const T* const hh_at = r.hh + (j - r.hh_unit_offset);
  V x[Cell::kGates], hh[Cell::kGates], saved[Cell::kSaved];
  for (int k = 0; k < Cell::kGates; ++k) {
    x[k] = load(r.x + k * H + j);
    hh[k] = load(hh_at + k * hh_stride);
    if (r.b_ih != nullptr) {
      x[k] = x[k] + load(r.b_ih + k * H + j);
      hh[k] = hh[k] + load(r.b_hh + k * H + j);
    }
  }
  V h_prev(T(0)), c_prev(T(0)), h(T(0)), c(T(0));
  if constexpr (Cell::kUsesPrevH) h_prev = load(r.h_prev + j);
  if constexpr (Cell::kCellState) c_prev = load(r.c + j);
  Cell::forward(x, hh, h_prev, c_prev, h, c, saved);
  if (r.keep != nullptr) {
    if constexpr (!Cell::kUsesPrevH) h_prev = load(r.h_prev + j);
    // keep h_prev + (1 - keep) h: a kept unit (keep 1) keeps h_prev's bits.
    const V keep = load(r.keep + j);
    h = keep * h_prev + (V(T(1)) - keep) * h;
  }
  if (r.saved != nullptr) store_saved<Cell>(r, saved, H, j, n);
  if constexpr (Cell::kCellState) c.store(r.c + j, n);
  h.store(r.h + j, n);
  if (r.h_copy != nullptr) h.store(r.h_copy + j, n);
  if (r.h_next != nullptr) h.store(r.h_next + j, n);
  if constexpr (std::is_same_v<T, float>) {
    if (r.h_bf16 != nullptr || r.h_next_bf16 != nullptr) {
      const auto rounded = at::vec::convert_from_float<at::BFloat16>(h, h);
      if (r.h_bf16 != nullptr) rounded.store(r.h_bf16 + j, n);
      if (r.h_next_bf16 != nullptr) rounded.store(r.h_next_bf16 + j, n);
    }
    if (r.h_fp16 != nullptr) at::vec::convert_from_float<at::Half>(h, h).store(r.h_fp16 + j, n);
  }
}

// Units [begin, end) of a row (begin a multiple of the vector width), on vectors Vec: T's, or
// Bf16CellVec for the cheaper activations of a call on the bfloat16 products.
template <template <class> class CellT, class T, class Vec = at::vec::Vectorized<T>>
void forward_row(const ForwardRow<T>& r, int64_t H, int64_t begin, int64_t end) {
  int64_t j = begin;
  for (; j + Vec::size() <= end; j += Vec::size())
    forward_units<CellT<Vec>, Vec>(r, H, j, Vec::size());
  if (j < end) forward_units<CellT<Vec>, Vec>(r, H, j, end - j);
}

// Staged cell math, for rows of few units: a row's cell math runs on whole vectors, and at
// H=8 float32's 16 lanes are half idle, at H=1 all but one. Rows of such sizes are gathered
// into one long row of up to kStagedUnits units (biases added as forward_units adds them),
// the cell runs on it, and its results are put back: the same operations on each value, the
// same bits. float32 LSTM under no_grad at T=64 B=257, one thread: H=1 1.72 -> 1.12 ms, H=8
// 1.96 -> 1.64 (AMD EPYC).
constexpr int64_t kStagedUnits = 256;

// Whether rows of H units run staged: where half of a row's vector or more is idle.
template <class Vec>
constexpr bool staged_rows(int64_t H) {
  return 2 * H <= Vec::size();
}

// Copies n values, each plus bias's where bias is given (forward_units' add), in vectors.
template <class T>
C10_ALWAYS_INLINE void copy_plus(T* out, const T* in, const T* bias, int64_t n) {
  using V = at::vec::Vectorized<T>;
  for (int64_t u = 0; u < n; u += V::size()) {
    const int w = static_cast<int>(std::min<int64_t>(V::size(), n - u));
    V v = V::loadu(in + u, w);
    if constexpr (std::is_floating_point_v<T>) {
      if (bias != nullptr) v = v + V::loadu(bias + u, w);
    }
    v.store(out + u, w);
  }
}

// Rows [i0, i1) of H units, row i's pointers row_at(i) (none of a compact hh: hh_gate_stride
// 0), staged as above.
template <template <class> class CellT, class T, class Vec, class RowAt>
void forward_rows_staged(int64_t i0, int64_t i1, int64_t H, const RowAt& row_at) {
  using Cell = CellT<Vec>;
  constexpr int G = Cell::kGates, S = Cell::kSaved;
  constexpr int64_t E = kStagedUnits;
  alignas(64) T x[G * E], hh[G * E], saved[S * E], h_prev[E], c[E], keep[E], h[E];
  alignas(64) at::BFloat16 h_bf16[E];
  alignas(64) at::Half h_fp16[E];
  const int64_t per = std::max<int64_t>(1, E / H);
  for (int64_t b0 = i0; b0 < i1; b0 += per) {
    const int64_t count = std::min(per, i1 - b0), n = count * H;
    const ForwardRow<T> first = row_at(b0);
    for (int64_t i = 0; i < count; ++i) {
      const ForwardRow<T> r = row_at(b0 + i);
      const bool bias = r.b_ih != nullptr;
      for (int k = 0; k < G; ++k) {
        copy_plus(x + k * n + i * H, r.x + k * H, bias ? r.b_ih + k * H : nullptr, H);
        copy_plus(hh + k * n + i * H, r.hh + k * H, bias ? r.b_hh + k * H : nullptr, H);
      }
      if (Cell::kUsesPrevH || r.keep != nullptr) copy_plus<T>(h_prev + i * H, r.h_prev, nullptr, H);
      if (Cell::kCellState) copy_plus<T>(c + i * H, r.c, nullptr, H);
      if (r.keep != nullptr) copy_plus<T>(keep + i * H, r.keep, nullptr, H);
    }
    ForwardRow<T> all{x,
                      hh,
                      nullptr,
                      nullptr,
                      h_prev,
                      c,
                      first.saved == nullptr ? nullptr : saved,
                      h,
                      nullptr,
                      first.keep == nullptr ? nullptr : keep};
    if (first.h_bf16 != nullptr || first.h_next_bf16 != nullptr) all.h_bf16 = h_bf16;
    if (first.h_fp16 != nullptr) all.h_fp16 = h_fp16;
    forward_row<CellT, T, Vec>(all, n, 0, n);
    for (int64_t i = 0; i < count; ++i) {
      const ForwardRow<T> r = row_at(b0 + i);
      for (int k = 0; k < S && r.saved != nullptr; ++k)
        copy_plus<T>(r.saved + k * H, saved + k * n + i * H, nullptr, H);
      if (Cell::kCellState) copy_plus<T>(r.c, c + i * H, nullptr, H);
      for (T* out : {r.h, r.h_copy, r.h_next}) {
        if (out != nullptr) copy_plus<T>(out, h + i * H, nullptr, H);
      }
      for (at::BFloat16* out : {r.h_bf16, r.h_next_bf16}) {
        if (out != nullptr) copy_plus<at::BFloat16>(out, h_bf16 + i * H, nullptr, H);
      }
      if (r.h_fp16 != nullptr) copy_plus<at::Half>(r.h_fp16, h_fp16 + i * H, nullptr, H);
    }
  }
}

// Pointers into one row of the backward's buffers.
template <class T>
struct BackwardRow {
  const T* dh;        // dL/dh_t: the sum of dh and dh_extra
  const T* dh_extra;  // or nullptr
  T* dc;              // dL/dc_t in, dL/dc_{t-1} out (LSTM)
  const T* saved;
  const T* h_prev;
  T* dx;          // input-side pre-activation gradients out [gates*H]
  T* dhh;         // hidden-side ones out (cells with kSplitGrads)
  T* dh_prev;     // the part of dL/dh_{t-1} not through W_hh (kUsesPrevH cells, or zoneout)
  const T* keep;  // as ForwardRow's
};

template <class Cell, class V, class T>
inline void backward_units(const BackwardRow<T>& r, int64_t H, int64_t j, int n) {
  const auto load = [n](const T* p) { return V::loadu(p, n); };
  V saved[Cell::kSaved], dx[Cell::kGates], dhh[Cell::kGates];
  for (int k = 0; k < Cell::kSaved; ++k) saved[k] = load(r.saved + k * H + j);
  V dh = load(r.dh + j);
  if (r.dh_extra != nullptr) dh = dh + load(r.dh_extra + j);
  // Zoneout: the kept share of dh goes straight to h_{t-1}, the rest through the cell.
  V dh_kept(T(0));
  if (r.keep != nullptr) {
    dh_kept = load(r.keep + j) * dh;
    dh = dh - dh_kept;
  }
  V h_prev(T(0)), dc(T(0)), dh_prev(T(0)), dc_prev(T(0));
  if constexpr (Cell::kUsesPrevH) h_prev = load(r.h_prev + j);
  if constexpr (Cell::kCellState) dc = load(r.dc + j);
  Cell::backward(dh, dc, saved, h_prev, dx, dhh, dh_prev, dc_prev);
  for (int k = 0; k < Cell::kGates; ++k) {
    dx[k].store(r.dx + k * H + j, n);
    if constexpr (Cell::kSplitGrads) dhh[k].store(r.dhh + k * H + j, n);
  }
  if constexpr (Cell::kCellState) dc_prev.store(r.dc + j, n);
  if (Cell::kUsesPrevH || r.keep != nullptr) (dh_prev + dh_kept).store(r.dh_prev + j, n);
}

// Units [begin, end) of a row (begin a multiple of the vector width).
template <template <class> class CellT, class T>
void backward_row(const BackwardRow<T>& r, int64_t H, int64_t begin, int64_t end) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = begin;
  for (; j + Vec::size() <= end; j += Vec::size())
    backward_units<CellT<Vec>, Vec>(r, H, j, Vec::size());
  if (j < end) backward_units<CellT<Vec>, Vec>(r, H, j, end - j);
}

}  // namespace rnn_fused::cpu

// The CPU engine's forward: a layer's steps in chunks, each chunk's input projection, then
// per step and tile of rows and units the hidden-side products and the cell math (the
// picture: recurrence_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../op_adapters.h"
#include "../problem.h"
#include "amx_gates.h"
#include "bf16_dot.h"
#include "engine.h"
#include "gemm.h"
#include "layer_norm_rows.h"
#include "pointwise.h"
#include "step_weight.h"
#include "team.h"
#include "workspace.h"

namespace rnn_fused::cpu {
namespace {

// Target size of a chunk's gate buffer. Forward: about half the L2 cache of a core, so the
// input projection is still cached when the steps read it. Backward: larger, because the
// weight gradients are accumulated once per chunk and each accumulation reads and writes
// them whole (LSTM T=100 B=64 H=512 on a 2-core AMD EPYC: 8 MiB 140 ms, 1 MiB 170).
constexpr int64_t kForwardChunkBytes = int64_t(1) << 20;
// Where bfloat16 products run on AMX tiles the forward's chunks are larger: a larger input
// projection per chunk and fewer chunks, each a parallel region of steps. 4 MiB against 1,
// bfloat16 against torch.nn's in one process, seven rounds: LSTM T=200 B=16 H=128 forward
// 1.25-1.31 -> 1.50-1.61x, T=100 B=64 H=512 0.97-1.01 -> 1.06-1.08x, GRU 2.30 -> 2.54x; a
// 2-layer bidirectional LSTM T=50 B=32 H=256 forward and backward 1.71 -> 1.87x, others
// unchanged (Intel Xeon with AMX). Float32 stays at 1 MiB: the 2-layer bidirectional LSTM's
// forward 1.08 -> 0.99x at 4 MiB.
constexpr int64_t kForwardChunkBytesTiles = int64_t(4) << 20;
// A training forward's saved workspace (gates and states for the backward) but its last
// kCachedSavedBytes is written with non-temporal stores (ForwardRow::stream_saved): the
// backward reads it in reverse, the last steps first, long after the rest has left the
// caches, and a cached store first reads the line it writes. Forward and backward, against
// cached stores throughout (one process, alternating, Intel Xeon with AMX): bfloat16 LSTM
// T=100 I=H=512 B=64 58.3 -> 50.7 ms, B=128 131-134 -> 115, GRU B=64 48.4 -> 40.9, RNN 16.6
// -> 14.8; float32 GRU B=64 179 -> 160-164. Streaming every step instead lost 3-8% where the
// whole workspace is 8-16 MiB (LSTM T=200 B=16 H=128, T=100 B=32 H=256).
constexpr int64_t kCachedSavedBytes = int64_t(16) << 20;

// Forward steps whose threads keep their own rows (run_forward's own_rows): batches of at
// least this many rows, W_hh's packed panels of at most this many bytes.
constexpr int64_t kOwnRowsMinBatch = 8;
constexpr int64_t kOwnRowsPanelBytes = int64_t(1) << 20;

// One step of one row with float32 weights read as stored (a cell's call at batch 1, a layer
// of one step) splits its hidden units over the threads in one parallel region, each thread
// through the input- and hidden-side products of its units in every gate and their cell
// math: where each product alone is too small to split (kMinParallelMacs), the step ran on
// one thread, and where each is split, it opened two regions. Each thread gets at least
// kMinParallelMacs multiply-adds. Every unit's sums are those of the one-row kernel wherever
// its block starts, so the bits do not depend on the threads. Not with LayerNorm (its
// normalisations need whole rows), a projection or an element-wise recurrence.
constexpr int64_t kOneRowUnitBlock = 16;
bool one_row_by_units(const Problem& p) {
  return kRowKernel && p.steps == 1 && p.batch == 1 && !p.elementwise && !p.proj && !p.layer_norm &&
         at::get_num_threads() > 1 &&
         p.gate_width() * (p.input_size + p.out_size) >= 2 * kMinParallelMacs;
}
// units(u0, u1) over a row's H units in blocks of kOneRowUnitBlock, in one parallel region;
// `macs`: a unit's multiply-adds.
template <class F>
void for_unit_blocks(int64_t H, int64_t macs, const F& units) {
  const int64_t blocks = (H + kOneRowUnitBlock - 1) / kOneRowUnitBlock;
  const int64_t grain = std::max<int64_t>(1, kMinParallelMacs / (kOneRowUnitBlock * macs));
  at::parallel_for(0, blocks, grain, [&](int64_t b_begin, int64_t b_end) {
    units(b_begin * kOneRowUnitBlock, std::min(H, b_end * kOneRowUnitBlock));
  });
}

struct ForwardBuffers {
  at::Tensor output, h_state, c_state, saved, h_prev;  // saved / h_prev: empty unless train
  // h_0, read where it is by the first step (h_state then starts unwritten), or undefined.
  at::Tensor h0;
};

// Whether the weights suit stored_rows_for_tiles: bfloat16 and contiguous.
bool weights_fit_stored_tiles(const at::Tensor& w_ih, const at::Tensor& w_hh) {
  for (const at::Tensor& w : {w_ih, w_hh})
    if (w.scalar_type() != at::kBFloat16 || !w.is_contiguous()) return false;
  return true;
}

template <template <class> class CellT, class T>
void run_forward(const Problem& p, bool train, Bf16Dots dots, const LayerArgs& a,
                 ForwardBuffers& out) {
  const bool bf16 = dots == Bf16Dots::kAll;
  const at::Tensor &input = a.input, &w_ih = a.w_ih, &w_hh = a.w_hh;
  const OptTensor &b_ih = a.b_ih, &b_hh = a.b_hh, &w_hr = a.w_hr;
  using Cell = CellT<T>;
  const int64_t H = p.hidden, Hout = p.out_size, GH = p.gate_width(), SW = p.saved_width();
  const int64_t I = p.input_size;
  const auto opts = input.options().dtype(c10::CppTypeToScalarType<T>::value);
  // Products with the transposed weights ([in, out]); W_hh's panels are grouped by gate.
  const bool pack = !small_problem(p);
  // A half-type W_ih read as stored (StepWeight) at a batch of up to kHalfWeightRows rows:
  // chunks of that many rows, so that each chunk's input projection reads it as stored too,
  // instead of a float32 copy for a chunk of more rows.
  const bool x_rows_as_stored =
      !pack && w_ih.scalar_type() != opts.dtype().toScalarType() && p.batch <= kHalfWeightRows;
  const int64_t chunk_bytes = x_rows_as_stored ? kHalfWeightRows * GH * int64_t(sizeof(T))
                              : bf16 && bf16_tiles_allowed() ? kForwardChunkBytesTiles
                                                             : kForwardChunkBytes;
  const std::vector<Chunk> chunks = make_chunks(p, sizeof(T), chunk_bytes);
  // A small problem's bfloat16 weights, read as stored, run on the dot products too
  // (StepWeight), instead of float32 copies through BLAS: LSTMCell(512) in bfloat16 under
  // no_grad at batch 5 216 us against 778, at batch 64 1017 against 2186; LSTM T=2 B=32
  // H=512 1.39 ms against 2.75 (AMD EPYC).
  const bool bf16_dots = bf16 || (!pack && bf16_dot_products(p));
  // Below kOwnRowsMinBatch rows a step's threads split its units (tile_at), a unit block of
  // every gate each. W_ih's bfloat16 panels grouped by gate too are split the same way in the
  // input projection (bf16_rows_matmul, in unit order), so that each thread's steps read the
  // pre-activations it wrote, from its own core (the same bits): bfloat16 forward at T=100
  // H=256, LSTM B=1 3-5% faster, B=4 5-7%, GRU B=1 2-4%; no gain at B=32 (own rows) or B=64
  // H=512 (by units) (Intel Xeon with AMX).
  const bool ih_bf16 = bf16_dots || dots == Bf16Dots::kInput;
  const int64_t ih_group = ih_bf16 && p.batch < kOwnRowsMinBatch ? H : 0;
  // A short bfloat16 call on AMX tiles (stored_tiles_fit) reads both weights as stored
  // (stored_rows_for_tiles), its products on the tiles as W x^T and W h^T, sums transposed back:
  // the same bits as on the weights packed, without the packing, which took about a quarter of
  // a cell's call at batch 64.
  const bool tiles_as_stored = std::is_same_v<T, float> && bf16 && pack && stored_tiles_fit(p) &&
                               weights_fit_stored_tiles(w_ih, w_hh);
  // float64's input projection in BLAS calls on W_ih as stored, as the backward's dX: on
  // panels, each panel's call packed the chunk's inputs again (LSTM T=32 B=64 H=256 under
  // no_grad 0.75x the time, GRU 0.74x, LSTM T=100 B=1 0.84x; AMD EPYC Zen 3, one thread).
  const bool pack_ih = pack && !std::is_same_v<T, double>;
  const StepWeight<T> w_ih_t(w_ih, /*transpose=*/true, pack_ih, ih_group, ih_bf16, max_rows(chunks),
                             tiles_as_stored);
  const StepWeight<T> w_hh_t(w_hh, /*transpose=*/true, pack, /*group=*/H, bf16_dots, p.batch,
                             tiles_as_stored);
  const std::optional<StepWeight<T>> w_hr_t =
      p.proj ? std::optional<StepWeight<T>>(std::in_place, *w_hr, true, pack, 0, bf16_dots, p.batch)
             : std::nullopt;
  // One scratch buffer (a short call's is the thread's own: see thread_scratch): xg, the
  // input-side pre-activations of a chunk; hg, a step's hidden-side ones (none where the tile
  // kernel sums them in the thread's gate_sums: amx_gates, below); h_start, the state
  // a step starts from when it is not kept for the backward (the step's threads overwrite
  // h_state while others still read it); h_scratch, the unprojected h of a step when it is
  // not kept in `saved`.
  const int64_t xg_size = padded(max_rows(chunks) * GH);
  // Where the cell math writes a step's whole h (no projection, no LayerNorm), it also writes
  // h where the next step reads h_{t-1}: the next step's rows of h_prev (training), or the
  // other of two h_start buffers (inference); and rounded for bfloat16 products. The next step
  // then starts without a copy and a barrier: float32 LSTM T=100 B=1 H=256 forward 2.26 -> 2.06
  // ms, bf16 GRU T=200 B=16 H=128 forward 4.29 -> 3.68 ms (Intel Xeon with AMX).
  const bool carry_in_cell = !a.layer_norm.has_value() && !p.proj;
  const int64_t h_start_half = padded(p.batch * Hout);
  const int64_t h_start_size = train ? 0 : (carry_in_cell ? 2 : 1) * h_start_half;
  const int64_t h_scratch_size = p.proj && !train ? padded(p.batch * H) : 0;
  // bfloat16 products: a step's h_prev rounded once (rows ld_bf apart, in pairs) for all the
  // panels that read it, instead of once per tile and gate (5.6% of an LSTM's bf16 forward at
  // T=100 B=64 H=512 in perf, AMD EPYC).
  const bool round_h = bf16 && w_hh_t.packed();
  // In two buffers too: the cell math rounds the units it writes into the other one; as it
  // writes them (ForwardRow::h_next_bf16) where a row's values pair up without padding (an
  // even Hout), else in a pass over the tile after it (which cost bf16 LSTM T=100 B=64
  // I=H=512 forward 14.3 -> 15.2 ms, GRU 10.3 -> 11.0; Intel Xeon with AMX).
  const bool round_in_cell = round_h && carry_in_cell;
  const bool cell_writes_h_bf = round_in_cell && Hout % 2 == 0;
  const int64_t ld_bf = (Hout + 1) / 2 * 2;
  // bfloat16 steps on AMX tiles (W_hh's K a multiple of 32): a tile's products on
  // AmxGateTiles::products instead of brgemm, every gate's sums of a block of up to 32 rows
  // into the thread's gate_sums (below) for the cell math to read.
  // LayerNorm cells normalise whole rows of the step's buffer: they keep brgemm.
  const bool amx_gates =
      round_h && !a.layer_norm.has_value() && amx_gate_products_fit(w_hh_t.panels());
  constexpr int64_t kSumsRow = Cell::kGates * kAmxGateUnits;
  const int64_t bf_buffer = padded(p.batch * ld_bf / 2);  // in T values
  const int64_t h_bf_size = round_h ? 2 * bf_buffer : 0;
  const int64_t hg_size = amx_gates ? 0 : padded(p.batch * GH);
  const int64_t scratch_size = xg_size + hg_size + h_start_size + h_scratch_size + h_bf_size;
  at::Tensor scratch;  // when the thread's own scratch is too small
  T* xg_p = static_cast<T*>(thread_scratch(sizeof(T) * scratch_size));
  if (xg_p == nullptr) {
    // From the cache when large: fresh memory faulted on each page at every call (2% of an
    // LSTM's bf16 forward at T=200 B=16 H=128, AMD EPYC).
    scratch = buffer_empty({scratch_size}, opts);
    xg_p = scratch.data_ptr<T>();
  }
  T* const hg_p = xg_p + xg_size;
  T* const h_start_p = hg_p + hg_size;
  T* const h_scratch_p = h_start_p + h_start_size;
  T* const h_bf_p = h_scratch_p + h_scratch_size;

  // A bfloat16 call's input may come in bfloat16 (forward_wanting): read as it is.
  const bool x_bf16 = input.scalar_type() == at::kBFloat16;
  const T* x_p = x_bf16 ? nullptr : input.data_ptr<T>();
  const T* b_ih_p = ptr_or_null<T>(b_ih);
  const T* b_hh_p = ptr_or_null<T>(b_hh);
  // The output in a half type (ForwardWants::half_output): written rounded by the cell math,
  // which writes h to the state only.
  const at::ScalarType out_dtype = out.output.scalar_type();
  const bool half_out = out_dtype != c10::CppTypeToScalarType<T>::value;
  T* out_p = half_out ? nullptr : out.output.data_ptr<T>();
  at::BFloat16* const out_bf16 =
      out_dtype == at::kBFloat16 ? out.output.data_ptr<at::BFloat16>() : nullptr;
  at::Half* const out_fp16 = out_dtype == at::kHalf ? out.output.data_ptr<at::Half>() : nullptr;
  T* h_p = out.h_state.data_ptr<T>();
  const T* const h0_p = out.h0.defined() ? out.h0.data_ptr<T>() : nullptr;
  T* c_p = Cell::kCellState ? out.c_state.data_ptr<T>() : nullptr;
  T* saved_p = train ? out.saved.data_ptr<T>() : nullptr;
  T* hprev_p = train ? out.h_prev.data_ptr<T>() : nullptr;
  const T* keep_p = ptr_or_null<T>(a.zoneout);
  // LayerNorm cells: the gains of the input and hidden sides, and the cell state's gain and
  // bias (LSTM); the raw pre-activations kept at the layout's raw_offset in training.
  const T* ln_p = ptr_or_null<T>(a.layer_norm);
  const int64_t raw = p.layout.raw_offset();
  // What reads h_{t-1} but the products of h_bf: the cell math (GRU, zoneout, LayerNorm), the
  // backward, the products in the engine's dtype.
  const bool h_prev_read =
      train || !round_h || Cell::kUsesPrevH || keep_p != nullptr || ln_p != nullptr;

  static_assert(kTileUnits == Panels::kPanel, "a tile's units are one panel per gate");
  // On AMX tiles with W_hh's panels beyond kOwnRowsPanelBytes, each thread takes whole unit
  // blocks of every row (tile_at by_units), and reads its half of the panels at each step, not
  // all of them: LSTM T=100 B=64 H=512 bf16 forward 3-5% faster in four interleaved runs.
  // Smaller panels take own_rows below: bf16 against torch.nn's, four alternations, by units
  // -> own rows: LSTM T=200 B=16 H=128 0.96-1.05 -> 1.16-1.22, T=100 B=32 H=256 0.85-0.98 ->
  // 0.97-1.05, forward and backward T=20 B=128 0.97-1.01 -> 1.13-1.21, GRU T=20 B=128
  // 1.76-2.12 -> 2.41-2.48; a 2-layer bidirectional LSTM T=50 B=32 H=256 forward (a thread
  // a direction) 1.29-1.42 -> 1.11-1.33 (Intel Xeon with AMX).
  const bool by_units = w_hh_t.packed() && w_hh_t.panels().tiles &&
                        w_hh_t.panels().data.nbytes() > kOwnRowsPanelBytes;
  // Where W_hh's panels are small enough for each thread to keep all of them in its cache,
  // each thread takes whole blocks of rows (own_rows_tile) through all steps of a chunk: a
  // row's next step reads only its own h, so the steps need no barrier, and no thread reads
  // h from another core. LSTM T=200 B=16 H=128 float32 forward 1.05-1.08x, GRU 1.08x,
  // bfloat16 1.09x, float64 1.07x, forward and backward 1.04-1.05x; H=64 1.37-1.48x (one unit
  // block: one thread had all the work); a 2-layer LSTM at T=35 B=20 H=200 (800 KiB) 1.09-1.13x,
  // B=32 H=256 (1 MiB) 1.03-1.19x; B=64 H=512 (4 MiB of float32 panels) unchanged or slower;
  // B=4, two rows a thread, 0.87-0.95x (AMD EPYC).
  const bool own_rows = w_hh_t.packed() && carry_in_cell && p.batch >= kOwnRowsMinBatch &&
                        w_hh_t.panels().data.nbytes() <= kOwnRowsPanelBytes;
  const int64_t own_block = own_rows && w_hh_t.panels().tiles ? kOwnRowsTileBlock : kOwnRowsBlock;
  // A step of many rows in one region (step_in_one_region), with weights and input in T.
  const bool rows_in_one_region = step_in_one_region(p) && ln_p == nullptr && !x_bf16 &&
                                  w_ih.scalar_type() == w_hh.scalar_type() &&
                                  w_hh.scalar_type() == opts.dtype().toScalarType();
  // One row's step by units in one region (one_row_by_units), both weights unpacked in float32.
  const bool row_by_units = std::is_same_v<T, float> && one_row_by_units(p) && !x_bf16 &&
                            w_ih_t.unpacked_in_t() && w_hh_t.unpacked_in_t();
  for (const Chunk& ch : chunks) {
    if (rows_in_one_region || row_by_units) {
      // The products come with the cell math below.
    } else if (x_bf16) {
      if constexpr (std::is_same_v<T, float>)
        w_ih_t.product(ch.rows, input.data_ptr<at::BFloat16>() + ch.row_begin * I, I, xg_p, GH,
                       false);
    } else {
      w_ih_t.product(ch.rows, x_p + ch.row_begin * I, I, xg_p, GH, false);
    }
    if (ln_p != nullptr) {
      at::parallel_for(0, ch.rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          T* v = xg_p + r * GH;
          if (train) std::memcpy(saved_p + (ch.row_begin + r) * SW + raw, v, sizeof(T) * GH);
          normalize_row(v, v, GH, ln_p, row_stats(v, GH));
        }
      });
    }
    // An element-wise recurrence: each unit's state reads only its own (u * h), so a thread
    // runs its units through every step of the chunk with no barrier (the steps below take
    // three a step, the product on one thread): IndRNN T=200 B=16 H=128 forward 0.83 -> 0.58
    // ms, forward and backward 3.3 -> 2.2 (AMD EPYC).
    if constexpr (Cell::kGates == 1) {
      if (p.elementwise) {
        const T* u = w_hh.data_ptr<T>();
        const bool copy_h_prev = train || Cell::kUsesPrevH || keep_p != nullptr;
        with_team(unit_threads(p, ch.rows), [&](const Team& team) {
          const auto [u0, u1] = units_of(team, H);
          for (int64_t s = ch.s_begin; s < ch.s_end; ++s) {
            const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
            T* h_prev = train ? hprev_p + r0 * Hout : h_start_p;
            for (int64_t i = 0; i < n; ++i) {
              T* h = h_p + i * Hout;
              T* hp = copy_h_prev ? h_prev + i * Hout : h;
              T* hg = hg_p + i * GH;
              for (int64_t j = u0; j < u1; ++j) {
                if (copy_h_prev) hp[j] = h[j];
                hg[j] = h[j] * u[j];
              }
              const ForwardRow<T> row{xg_p + (r0 - ch.row_begin + i) * GH,
                                      hg,
                                      b_ih_p,
                                      b_hh_p,
                                      hp,
                                      nullptr,
                                      train ? saved_p + (r0 + i) * SW : nullptr,
                                      out_p + (r0 + i) * Hout,
                                      h,
                                      keep_p == nullptr ? nullptr : keep_p + (r0 + i) * Hout};
              forward_row<CellT, T>(row, H, u0, u1);
            }
          }
        });
        continue;
      }
    }
    with_team(step_threads(p), [&](const Team& team) {
      // This thread's tile products' sums (32 KiB for an LSTM), read from L1.
      alignas(64) float gate_sums[kAmxGateRows * kSumsRow];
      AmxGateTiles gate_tiles;
      bool streamed = false;
      for (int64_t s = ch.s_begin; s < ch.s_end; ++s) {
        const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
        // Saved rows of the steps after this one, which the backward reads before it.
        const bool stream_saved =
            train && (p.steps - 1 - s) * p.batch * SW * int64_t(sizeof(T)) > kCachedSavedBytes;
        streamed = streamed || stream_saved;
        // The state each row starts from (h_prev; kept for the backward in training), and where
        // the next step's is (h_next, its first n_next rows: carry_in_cell).
        const int64_t n_next = s + 1 < p.steps ? p.batch_sizes[p.step_at(s + 1)] : 0;
        T* const h_prev_buf = train           ? hprev_p + r0 * Hout
                              : carry_in_cell ? h_start_p + s % 2 * h_start_half
                                              : h_start_p;
        // Where this step's h_{t-1} is: h_0 in place at the first step (see forward_native),
        // read there too in inference; in training h_prev keeps it for the backward.
        const bool h0_here = s == 0 && h0_p != nullptr;
        const T* const h_from = h0_here ? h0_p : h_p;
        const bool read_h0 = h0_here && !train;
        const T* const h_prev = read_h0 ? h0_p : h_prev_buf;
        T* const h_next = !carry_in_cell || !h_prev_read || n_next == 0 ? nullptr
                          : train ? hprev_p + p.offsets[p.step_at(s + 1)] * Hout
                                  : h_start_p + (s + 1) % 2 * h_start_half;
        // h_prev rounded: this step's buffer, and the next step's (round_in_cell).
        auto* const bf_base = reinterpret_cast<at::BFloat16*>(h_bf_p);
        at::BFloat16* const h_bf = bf_base + s % 2 * 2 * bf_buffer;
        at::BFloat16* const h_bf_next = bf_base + (s + 1) % 2 * 2 * bf_buffer;
        // Rows the step before wrote in its cell math: all of this step's, but at the first
        // step and where a packed batch grows.
        const bool carried = carry_in_cell && s > 0 && n <= p.batch_sizes[p.step_at(s - 1)];
        if (!carried) {
          // own_rows: the step before ended without a barrier.
          if (own_rows && s > ch.s_begin) team.barrier();
          if (team.id == 0 && h_prev_read && !read_h0)
            std::memcpy(h_prev_buf, h_from, sizeof(T) * n * Hout);
          if constexpr (std::is_same_v<T, float>) {
            if (round_h) {
              const int64_t i0 = team.begin(n);
              bf16_round_rows(team.end(n) - i0, Hout, h_from + i0 * Hout, Hout, h_bf + i0 * ld_bf,
                              ld_bf);
            }
          }
          team.barrier();
        }
        // Unpacked (a small problem), the hidden-side product comes first, whole.
        if (!w_hh_t.packed() && !rows_in_one_region && !row_by_units) {
          w_hh_t.product(team, n, h_prev, Hout, hg_p, GH, false);
          team.barrier();
        }
        // With a projection the cell's h is unprojected: kept in the last saved block.
        T* h_unproj = !p.proj ? nullptr
                      : train ? saved_p + r0 * SW + p.layout.unprojected_offset()
                              : h_scratch_p;
        const int64_t h_unproj_ld = train ? SW : H;
        // The cell math of rows [i0, i1), units [u0, u1) (LayerNorm cells: see below).
        // hh_block: the hidden-side sums of these rows and units, AmxGateTiles::products' layout.
        const auto forward_rows = [&](int64_t i0, int64_t i1, int64_t u0, int64_t u1,
                                      const T* hh_block = nullptr) {
          if (ln_p != nullptr) return;
          const auto row_at = [&](int64_t i) {
            ForwardRow<T> row{xg_p + (r0 - ch.row_begin + i) * GH,
                              hh_block == nullptr ? hg_p + i * GH : hh_block + (i - i0) * kSumsRow,
                              b_ih_p,
                              b_hh_p,
                              h_prev + i * Hout,
                              c_p == nullptr ? nullptr : c_p + i * H,
                              train ? saved_p + (r0 + i) * SW : nullptr,
                              p.proj     ? h_unproj + i * h_unproj_ld
                              : half_out ? h_p + i * Hout
                                         : out_p + (r0 + i) * Hout,
                              p.proj || half_out ? nullptr : h_p + i * Hout,
                              keep_p == nullptr ? nullptr : keep_p + (r0 + i) * Hout,
                              h_next != nullptr && i < n_next ? h_next + i * Hout : nullptr};
            if (out_bf16 != nullptr) row.h_bf16 = out_bf16 + (r0 + i) * Hout;
            if (out_fp16 != nullptr) row.h_fp16 = out_fp16 + (r0 + i) * Hout;
            if (cell_writes_h_bf) row.h_next_bf16 = h_bf_next + i * ld_bf;
            row.stream_saved = stream_saved;
            if (hh_block != nullptr) {
              row.hh_gate_stride = kAmxGateUnits;
              row.hh_unit_offset = u0;
            }
            return row;
          };
          // Rows of few units, staged (a compact hh block's rows are not: they run one by one).
          const bool stage = hh_block == nullptr && u0 == 0 && u1 == H && i1 - i0 > 1;
          if constexpr (std::is_same_v<T, float>) {
            if (bf16 && stage && staged_rows<Bf16CellVec>(H))
              return forward_rows_staged<CellT, T, Bf16CellVec>(i0, i1, H, row_at);
          }
          if (!bf16 && stage && staged_rows<at::vec::Vectorized<T>>(H))
            return forward_rows_staged<CellT, T, at::vec::Vectorized<T>>(i0, i1, H, row_at);
          for (int64_t i = i0; i < i1; ++i) {
            const ForwardRow<T> row = row_at(i);
            // On the bfloat16 products, the cheaper activations of Bf16CellVec.
            if constexpr (std::is_same_v<T, float>) {
              if (bf16) {
                forward_row<CellT, T, Bf16CellVec>(row, H, u0, u1);
                continue;
              }
            }
            forward_row<CellT, T>(row, H, u0, u1);
          }
        };
        // A small problem's many rows over the threads, after the product on all of them; or
        // with their products (rows_in_one_region).
        bool split_rows = false;
        if (rows_in_one_region) {
          for_row_blocks(n, [&](int64_t i0, int64_t rows) {
            w_ih_t.product_here(rows, x_p + (r0 + i0) * I, I, xg_p + (r0 - ch.row_begin + i0) * GH,
                                GH);
            w_hh_t.product_here(rows, h_prev + i0 * Hout, Hout, hg_p + i0 * GH, GH);
            forward_rows(i0, i0 + rows, 0, H);
          });
          split_rows = true;
        } else if (row_by_units) {
#if defined(CPU_CAPABILITY_AVX512)
          if constexpr (std::is_same_v<T, float>) {
            for_unit_blocks(H, Cell::kGates * (I + Hout), [&](int64_t u0, int64_t u1) {
              for (int64_t k = 0; k < Cell::kGates; ++k) {
                w_ih_t.row_columns_here(x_p + r0 * I, k * H + u0, k * H + u1, xg_p);
                w_hh_t.row_columns_here(h_prev, k * H + u0, k * H + u1, hg_p);
              }
              forward_rows(0, n, u0, u1);
            });
          }
#endif
          split_rows = true;
        } else {
          // Each of these threads fences its own streamed rows (a small problem's first of two
          // steps can stream); the team's threads fence after their loop.
          split_rows =
              !pack && ln_p == nullptr && cell_rows_over_threads(n, H, [&](int64_t i0, int64_t i1) {
                forward_rows(i0, i1, 0, H);
                if (stream_saved) fence_streamed_saved();
              });
        }
        // Per tile of rows and hidden units: the hidden-side products of its units in every
        // gate, then the cell math of those units while they are in cache. LayerNorm cells
        // normalise whole rows: all products first, then the rows.
        const int64_t tiles = split_rows ? 0 : tile_count(n, H);
        const int64_t row_blocks = own_rows ? own_row_blocks(p.batch, own_block) : 0;
        const int64_t first_block = team.begin(row_blocks);
        const int64_t t_begin = own_rows ? 0 : team.begin(tiles);
        const int64_t t_end =
            own_rows ? (team.end(row_blocks) - first_block) * unit_blocks(H) : team.end(tiles);
        const auto tile_of = [&](int64_t k_tile) {
          return own_rows ? own_rows_tile(k_tile, first_block, p.batch, own_block, n, H)
                          : tile_at(k_tile, n, H, by_units);
        };
        // Where the sums of all of this thread's tiles fit gate_sums at once (a few rows in two
        // tiles or more), their products run back to back and the cell math after them all: the
        // same bits, bf16 forward T=100 H=256, three alternations (Intel Xeon with AMX): B=2
        // 0.47-0.48 -> 0.45 ms, B=4 0.61-0.62 -> 0.59-0.60, B=8 1.08-1.09 -> 1.00-1.03, GRU B=16
        // 1.14-1.16 -> 1.06-1.07, LSTM T=200 B=16 H=128 1.14-1.20 -> 1.10-1.11. At a batch of 1 the
        // tile after tile order was faster (0.376-0.379 ms against 0.388-0.389).
        int64_t thread_rows = 0;
        for (int64_t k_tile = t_begin; amx_gates && k_tile < t_end; ++k_tile)
          thread_rows += tile_of(k_tile).rows;
        const bool products_first =
            amx_gates && t_end - t_begin > 1 && thread_rows <= kAmxGateRows && n >= 2;
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t k_tile = t_begin, at = 0; products_first && k_tile < t_end; ++k_tile) {
            const Tile tl = tile_of(k_tile);
            if (tl.rows == 0) continue;
            gate_tiles.products(tl.rows, h_bf + tl.i0 * ld_bf, ld_bf, w_hh_t.panels(), Cell::kGates,
                                tl.u0 / Panels::kPanel, gate_sums + at * kSumsRow);
            at += tl.rows;
          }
        }
        int64_t sums_at = 0;  // products_first: where the next tile's sums are
        for (int64_t k_tile = t_begin; k_tile < t_end; ++k_tile) {
          const Tile tl = tile_of(k_tile);
          if (tl.rows == 0) continue;
          if constexpr (std::is_same_v<T, float>) {
            if (products_first) {
              forward_rows(tl.i0, tl.i0 + tl.rows, tl.u0, tl.u1, gate_sums + sums_at * kSumsRow);
              sums_at += tl.rows;
            }
            // In blocks of up to kAmxGateRows rows, each block's cell math reading its sums.
            for (int64_t i0 = tl.i0; amx_gates && !products_first && i0 < tl.i0 + tl.rows;
                 i0 += kAmxGateRows) {
              const int64_t rows = std::min(kAmxGateRows, tl.i0 + tl.rows - i0);
              gate_tiles.products(rows, h_bf + i0 * ld_bf, ld_bf, w_hh_t.panels(), Cell::kGates,
                                  tl.u0 / Panels::kPanel, gate_sums);
              forward_rows(i0, i0 + rows, tl.u0, tl.u1, gate_sums);
            }
          }
          // The panel this thread reads after gate k's: the next gate's, then the next tile's
          // first (at the step's last tile, its first tile's, for the next step).
          const auto next_panel = [&](int64_t k) -> const T* {
            const Panels& w = w_hh_t.panels();
            if (w.bf16()) return nullptr;
            if (k + 1 < Cell::kGates) return w.panel<T>(k + 1, tl.u0 / Panels::kPanel);
            const int64_t after = k_tile + 1 < t_end ? k_tile + 1 : t_begin;
            return w.panel<T>(0, tile_of(after).u0 / Panels::kPanel);
          };
          for (int64_t k = 0; k < Cell::kGates && w_hh_t.packed() && !amx_gates; ++k) {
            T* hg_tile = hg_p + tl.i0 * GH + k * H + tl.u0;
            if constexpr (std::is_same_v<T, float>) {
              if (round_h) {
                panel_product(tl.rows, h_bf + tl.i0 * ld_bf, ld_bf, w_hh_t.panels(), k,
                              tl.u0 / Panels::kPanel, hg_tile, GH);
                continue;
              }
            }
            panel_product<T>(tl.rows, h_prev + tl.i0 * Hout, Hout, w_hh_t.panels(), k,
                             tl.u0 / Panels::kPanel, hg_tile, GH, false, next_panel(k));
          }
          if (!amx_gates) forward_rows(tl.i0, tl.i0 + tl.rows, tl.u0, tl.u1);
          if constexpr (std::is_same_v<T, float>) {
            if (round_in_cell && !cell_writes_h_bf) {
              bf16_round_rows(tl.rows, tl.u1 - tl.u0, h_p + tl.i0 * Hout + tl.u0, Hout,
                              h_bf_next + tl.i0 * ld_bf + tl.u0, ld_bf);
            }
          }
        }
        if (ln_p != nullptr) {
          team.barrier();
          for (int64_t i = team.begin(n); i < team.end(n); ++i) {
            T* v = hg_p + i * GH;
            if (train) std::memcpy(saved_p + (r0 + i) * SW + raw + GH, v, sizeof(T) * GH);
            normalize_row(v, v, GH, ln_p + GH, row_stats(v, GH));
            const T* x_row = xg_p + (r0 - ch.row_begin + i) * GH;
            T* saved_row = train ? saved_p + (r0 + i) * SW : nullptr;
            const T* keep_row = keep_p == nullptr ? nullptr : keep_p + (r0 + i) * Hout;
            if constexpr (Cell::kCellState) {
              ln_lstm_forward_row<T>(x_row, v, b_ih_p, b_hh_p, c_p + i * H, saved_row,
                                     ln_p + 2 * GH, ln_p + 2 * GH + H, h_prev + i * Hout, keep_row,
                                     out_p + (r0 + i) * Hout, h_p + i * Hout, H);
            } else {
              ForwardRow<T> row{x_row,
                                v,
                                b_ih_p,
                                b_hh_p,
                                h_prev + i * Hout,
                                nullptr,
                                saved_row,
                                out_p + (r0 + i) * Hout,
                                h_p + i * Hout,
                                keep_row};
              forward_row<CellT, T>(row, H, 0, H);
            }
          }
        }
        if (!own_rows) team.barrier();
        if (p.proj) {
          gate_tiles.release();  // the projection's products may run on brgemm's tiles
          T* out_rows = out_p + r0 * Hout;
          w_hr_t->product(team, n, h_unproj, h_unproj_ld, out_rows, Hout, false);
          team.barrier();
          if (team.id == 0) std::memcpy(h_p, out_rows, sizeof(T) * n * Hout);
          // The next step's threads round their rows of h_p (round_h): not before it is whole.
          if (round_h) team.barrier();
        }
      }
      if (streamed) fence_streamed_saved();
    });
  }
}

}  // namespace

ForwardResult forward_native(const Problem& p, const LayerArgs& a, bool train, Bf16Dots dots,
                             ForwardWants wants) {
  // The engine's dtype: float32 for bf16 products, whose input may stay in bfloat16.
  const at::ScalarType dtype = dots != Bf16Dots::kNone ? at::kFloat : a.input.scalar_type();
  const auto opts = a.input.options().dtype(dtype);
  const int64_t kept_rows = train ? p.rows : 0;

  ForwardBuffers out;
  // The states in the engine's dtype, converted as they are copied (a half-type call's). A
  // first step that every row of the batch takes writes all of h_state: it reads an h_0 of
  // the engine's dtype where it is, and in inference the step reads it there too, with no copy
  // (two copies of h_0 were 6% of a float64 LSTMCell(51) model's prediction at batch 97).
  // Not for an element-wise recurrence, whose steps update h_state in place.
  const bool h0_in_place = a.hx.has_value() && !p.elementwise && p.steps > 0 &&
                           a.hx->scalar_type() == dtype && a.hx->is_contiguous() &&
                           p.batch_sizes[p.step_at(0)] == p.batch;
  if (h0_in_place) out.h0 = *a.hx;
  out.h_state = h0_in_place        ? buffer_empty({p.batch, p.out_size}, opts)
                : a.hx.has_value() ? converted_copy(*a.hx, dtype)
                                   : buffer_zeros({p.batch, p.out_size}, opts);
  // One step of rows [B, H] without projection: the output is h_n, row for row (the engine
  // writes the same values to both).
  const bool output_is_h_n =
      !wants.output && p.packed && p.steps == 1 && p.rows == p.batch && !p.proj;
  // The output and the workspace come from the buffer cache when large: from the C library,
  // a training loop's freed blocks went back to the system between calls, and every call
  // faulted on their pages (with the backward's: 140-1100 faults a call of an LSTM's forward
  // and backward at T=100 B=32 H=256, about 0 from the cache; AMD EPYC).
  const bool half_out = wants.half_output != at::ScalarType::Undefined && dtype == at::kFloat &&
                        !output_is_h_n && !p.proj && !p.layer_norm && !p.elementwise;
  const auto out_opts = half_out ? opts.dtype(wants.half_output) : opts;
  out.output = output_is_h_n ? out.h_state
               : p.packed    ? buffer_empty({p.rows, p.out_size}, out_opts)
                             : buffer_empty({p.steps, p.batch, p.out_size}, out_opts);
  out.c_state = p.kind != CellKind::LSTM ? cpu_empty({0}, opts)
                : a.cx.has_value()       ? converted_copy(*a.cx, dtype)
                                         : buffer_zeros({p.batch, p.hidden}, opts);
  if (train || wants.workspace) {
    out.saved = buffer_empty({kept_rows, p.saved_width()}, opts);
    out.h_prev = buffer_empty({kept_rows, p.out_size}, opts);
  }

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_fused_forward_cpu", [&] {
    dispatch_cell(p.kind, [&](auto tag) {
      using Tag = decltype(tag);
      run_forward<Tag::template Cell, scalar_t>(p, train, dots, a, out);
    });
  });
  return {out.output, out.h_state, out.c_state, out.saved, out.h_prev};
}

}  // namespace rnn_fused::cpu

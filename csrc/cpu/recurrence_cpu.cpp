// The CPU recurrence: forward and backward of one layer and one direction over all steps.
//
// Steps run in chunks of consecutive steps (their rows are contiguous) sized so that a
// chunk's gate buffer stays in cache:
//   forward:  per chunk, the input projection X W_ih^T of all its rows as one product;
//             per step and tile of rows and hidden units, the product h W_hh^T for the
//             tile's units in every gate, then the cell math of those units, keeping what
//             the backward needs (in training).
//   backward: per step, one fused pass of the cell derivative and one product dG W_hh;
//             per chunk, dX = dG W_ih and the weight and bias gradients accumulated.
// Chunking keeps the large per-row gate matrices out of memory: only the per-row values
// the backward needs are stored for the whole sequence.
#include "recurrence_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../op_adapters.h"
#include "../problem.h"
#include "amx_gates.h"
#include "bf16_dot.h"
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
constexpr int64_t kBackwardChunkBytes = int64_t(8) << 20;
// Steps with fewer multiply-adds than this run on one thread: below it a barrier between
// threads costs more than the work it splits.
constexpr int64_t kParallelStepWork = 32768;
// Forward steps whose threads keep their own rows (run_forward's own_rows): batches of at
// least this many rows, W_hh's packed panels of at most this many bytes.
constexpr int64_t kOwnRowsMinBatch = 8;
constexpr int64_t kOwnRowsPanelBytes = int64_t(1) << 20;

// Small problems skip the weight packing and the team of threads: calls of at most this
// many rows (steps x batch), or of at most this many steps (a cell's step at any batch).
// Packing costs about a few reads of each weight, which so few rows, or a weight read at
// so few steps, cannot repay; their products go to BLAS as stored, whose own threads split
// a large product without a team's barriers.
constexpr int64_t kSmallProblemRows = 32;
constexpr int64_t kSmallProblemSteps = 2;
// bfloat16 calls whose packed products run on bfloat16 dot products (bf16_dot_products)
// pack sooner: those products beat the small problems' float32 ones by more than the
// packing costs. bfloat16 LSTM at H=256, B=1 (Intel Xeon with AMX): T=32 under no_grad
// 0.805 ms unpacked against 0.510 packed (torch.nn 0.708), T=20 0.503 against 0.320; in
// training T=10 2.06 against 2.38, T=20 2.47 against 2.32. float16 keeps the float32 rule
// (its packed products are float32 ones: T=20 0.86 unpacked against 1.07).
constexpr int64_t kSmallBf16ProblemRows = 16;
// Their calls of one or two steps pack from this many rows on; below it their weights are
// read as stored (StepWeight), on the dot products too. LSTMCell(512) in bfloat16, packed
// against read as stored: batch 64 1.01x, 128 0.92-0.94x, 256 0.93x; LSTMCell(128) at batch
// 512 0.68x (AMD EPYC).
constexpr int64_t kBf16PackedStepRows = 96;
// With AMX tiles they pack from a batch of kTilePackedStepRows, each step's products on the
// tiles: bfloat16 cells at H=256 against torch.nn's, read as stored -> packed, under
// no_grad: LSTMCell batch 17 1.01 -> 1.57x, 64 0.63 -> 1.53x, GRUCell batch 64 0.63 -> 1.82x;
// forward and backward LSTMCell batch 64 0.72 -> 0.96x, GRUCell 0.79 -> 1.09x (Intel Xeon).
constexpr int64_t kTilePackedStepRows = 16;
bool packs_bf16_step(const Problem& p) {
  return p.rows >= kBf16PackedStepRows || (p.batch >= kTilePackedStepRows && bf16_tiles_allowed());
}
bool bf16_dot_products(const Problem& p);
bool bf16_weight_grads(const Problem& p, const BackwardArgs& a);
bool rounds_gate_grads_once(const Problem& p, const BackwardArgs& a);
bool small_problem(const Problem& p) {
  if (bf16_dot_products(p)) {
    return p.rows <= kSmallBf16ProblemRows ||
           (p.steps <= kSmallProblemSteps && !packs_bf16_step(p));
  }
  return p.rows <= kSmallProblemRows || p.steps <= kSmallProblemSteps;
}

// Hidden units of a small problem's step from which its cell math is split over threads by
// rows, after its hidden-side product on all of them (BLAS's threads): a cell's call at a
// large batch, whose cell math on one thread took two fifths of the call (LSTMCell(51) at
// B=97, float64, Intel Xeon).
constexpr int64_t kParallelCellUnits = 2048;

// rows(i0, i1) over a small problem's step of n rows of H units, split over the threads by
// rows when it has at least kParallelCellUnits units (its team is one thread: step_threads).
// Whether it ran.
template <class F>
bool cell_rows_over_threads(int64_t n, int64_t H, const F& rows) {
  if (n * H < kParallelCellUnits) return false;
  at::parallel_for(0, n, (kParallelCellUnits / 2 + H - 1) / H, rows);
  return true;
}

// A single step of many rows (a cell at a large batch, a layer of one step; always a small
// problem: weights read as stored) runs in one parallel region, by blocks of rows, each
// through its products (one BLAS call each) and the cell math on one thread, forward and
// backward; a region for each product and one for the cell math cost LSTMCell(51) at B=97,
// float64, 1.16-1.19x its time with x of 51 columns, 1.26-1.35x with one (the per-call
// client's two cells; Intel Xeon with AMX). The blocks (about kRegionBlockRows rows, two at
// the least) are set by the rows alone, so that the bits do not depend on the threads.
// Not for weights of more than kRegionMaxWeight elements: each block's BLAS call packs all of
// the weight it reads, and one of 16 MiB (LSTMCell(1024), float32) took 72 GFLOP/s in calls
// of 64 rows against 87 in calls of 256 (one thread; 88-98 for 4 MiB at every size from 64
// rows; AMD EPYC). Those steps take each product over all threads, then the cell math by
// rows (float32 LSTMCell(1024) at B=1024 under no_grad: 0.83-0.86x torch.nn -> 1.06-1.07x).
constexpr int64_t kRegionBlockRows = 64;
constexpr int64_t kRegionBlockMinRows = 16;
constexpr int64_t kRegionMaxWeight = int64_t{1} << 20;
bool step_in_one_region(const Problem& p) {
  return p.steps == 1 && !p.elementwise && !p.proj && p.batch >= 2 * kRegionBlockMinRows &&
         p.batch * p.hidden >= kParallelCellUnits &&
         p.gate_width() * std::max(p.input_size, p.out_size) <= kRegionMaxWeight;
}
// block(i0, rows) over the blocks of a step's n rows, in one parallel region.
template <class F>
void for_row_blocks(int64_t n, const F& block) {
  const int64_t blocks = std::max<int64_t>(2, (n + kRegionBlockRows - 1) / kRegionBlockRows);
  const int64_t per = (n + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) block(b * per, std::min(n, (b + 1) * per) - b * per);
  });
}

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

int step_threads(const Problem& p) {
  if (small_problem(p)) return 1;
  // A step's multiply-adds, or their like (an element-wise recurrence: see unit_threads).
  const int64_t work = p.batch * p.gate_width() * (p.out_size + 8);
  return work < kParallelStepWork ? 1 : at::get_num_threads();
}

// An element-wise recurrence (IndRNN) runs its units on separate threads through all steps
// of a chunk, without barriers (see run_forward): blocks of units a thread takes (whole SIMD
// vectors of float32 and float64), and the units times rows of a chunk from which it takes
// more than one thread (T=100 B=1 H=256, 25600, ran no faster on two; AMD EPYC).
constexpr int64_t kUnitBlock = 16;
constexpr int64_t kParallelUnitRows = 65536;
struct UnitRange {
  int64_t begin, end;
};
UnitRange units_of(const Team& team, int64_t H) {
  const int64_t blocks = (H + kUnitBlock - 1) / kUnitBlock;
  return {std::min(H, team.begin(blocks) * kUnitBlock), std::min(H, team.end(blocks) * kUnitBlock)};
}
int unit_threads(const Problem& p, int64_t rows) {
  return rows * p.hidden < kParallelUnitRows ? 1 : at::get_num_threads();
}

// Consecutive processing steps [s_begin, s_end) whose rows are [row_begin, row_begin + rows).
struct Chunk {
  int64_t s_begin, s_end, row_begin, rows;
};

std::vector<Chunk> make_chunks(const Problem& p, int64_t elem_size, int64_t chunk_bytes) {
  const int64_t row_bytes = std::max<int64_t>(p.gate_width(), 1) * elem_size;
  const int64_t max_rows = std::max<int64_t>(1, chunk_bytes / row_bytes);
  std::vector<Chunk> chunks;
  Chunk c{0, 0, 0, 0};
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.step_at(s), n = p.batch_sizes[t];
    if (c.s_end > c.s_begin && c.rows + n > max_rows) {
      chunks.push_back(c);
      c = Chunk{s, s, 0, 0};
    }
    // Forward order adds rows after the chunk, reverse order before it.
    c.row_begin = (c.s_end == c.s_begin || p.reverse) ? p.offsets[t] : c.row_begin;
    c.rows += n;
    c.s_end = s + 1;
  }
  chunks.push_back(c);
  return chunks;
}

int64_t max_rows(const std::vector<Chunk>& chunks) {
  int64_t m = 0;
  for (const Chunk& c : chunks) m = std::max(m, c.rows);
  return m;
}

// A buffer's size rounded up to a multiple of 16 values (whole 64-byte lines), so that
// buffers carved out of one allocation start on cache lines of their own.
inline int64_t padded(int64_t elements) { return (elements + 15) / 16 * 16; }

// Sums of the columns of rows [0, rows) of m (rows ld apart) into sum, or added to it: the
// bias gradients of a chunk, in our own loops (a reduction op per chunk costs more than the
// sums of a short call's few rows). Threads take blocks of columns, each summed over the
// rows in order, so the bits do not depend on the number of threads.
template <class T>
void column_sums(int64_t rows, int64_t cols, const T* m, int64_t ld, T* sum, bool add) {
  constexpr int64_t kColumns = 64;
  const int64_t blocks = (cols + kColumns - 1) / kColumns;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(rows, 1) / kColumns);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t j0 = begin * kColumns, j1 = std::min(cols, end * kColumns);
    if (!add) std::fill(sum + j0, sum + j1, T(0));
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = m + i * ld;
      for (int64_t j = j0; j < j1; ++j) sum[j] += row[j];
    }
  });
}

// Which products of a forward run on bfloat16 dot products (float32 tensors then, and the
// input perhaps in bfloat16): none, the input projection alone (bf16_input_products), or all
// of those of packed weights (bf16_products).
enum class Bf16Dots { kNone, kInput, kAll };

struct ForwardBuffers {
  at::Tensor output, h_state, c_state, saved, h_prev;  // saved / h_prev: empty unless train
  // h_0, read where it is by the first step (h_state then starts unwritten), or undefined.
  at::Tensor h0;
};

// What a forward's caller reads besides h_n and c_n (forward_native).
struct ForwardWants {
  bool workspace = true;  // saved and h_prev, even when empty
  bool output = true;     // an output tensor of its own
  // The output in this half type (a half type's call), where the cell math writes it whole (no
  // projection, no LayerNorm, a matrix recurrence): torch's conversion pass after the engine
  // took 2% of an LSTM's bf16 forward (perf, Intel Xeon with AMX).
  at::ScalarType half_output = at::ScalarType::Undefined;
};

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
  const StepWeight<T> w_ih_t(w_ih, /*transpose=*/true, pack, ih_group, ih_bf16, max_rows(chunks));
  const StepWeight<T> w_hh_t(w_hh, /*transpose=*/true, pack, /*group=*/H, bf16_dots, p.batch);
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
          for (int64_t i = i0; i < i1 && ln_p == nullptr; ++i) {
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
          split_rows = !pack && ln_p == nullptr &&
                       cell_rows_over_threads(
                           n, H, [&](int64_t i0, int64_t i1) { forward_rows(i0, i1, 0, H); });
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
        for (int64_t k_tile = t_begin; k_tile < t_end; ++k_tile) {
          const Tile tl = tile_of(k_tile);
          if (tl.rows == 0) continue;
          if constexpr (std::is_same_v<T, float>) {
            // In blocks of up to kAmxGateRows rows, each block's cell math reading its sums.
            for (int64_t i0 = tl.i0; amx_gates && i0 < tl.i0 + tl.rows; i0 += kAmxGateRows) {
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

bool half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// Values from which a conversion runs over all threads.
constexpr int64_t kParallelConversionValues = int64_t(1) << 16;

// Whether converted_copy converts t itself: a contiguous CPU tensor, float32 to or from a half
// type, or to its own dtype.
bool own_conversion(const at::Tensor& t, at::ScalarType dtype) {
  const at::ScalarType from = t.scalar_type();
  const bool pair = from == dtype || (from == at::kFloat && half_type(dtype)) ||
                    (half_type(from) && dtype == at::kFloat);
  return pair && t.is_contiguous() && t.is_cpu();
}

// A new contiguous copy of t in dtype (narrowing rounds to nearest even, as Tensor::to does).
// Made without the dispatcher (clone's and Tensor::to's TensorIterator cost more than a short
// call's conversions: seven in a bfloat16 LSTMCell's step, LSTMCell(32) 37.5 -> 18.1 us a
// step, Intel Xeon), and large ones in the buffer cache: from the C library, a step's states
// and conversions of a megabyte each went back to the system between calls or not, by how
// its heap happened to lie, and RNNCell(256)'s bfloat16 step at batch 1024 under no_grad took
// 0.81 ms in one process and 1.5 or 2.2 in another (AMD EPYC).
at::Tensor converted_copy(const at::Tensor& t, at::ScalarType dtype) {
  if (!own_conversion(t, dtype)) return t.to(dtype, /*non_blocking=*/false, /*copy=*/true);
  at::Tensor out = buffer_empty(t.sizes(), t.options().dtype(dtype));
  const int64_t n = t.numel();
  const at::ScalarType from = t.scalar_type();
  if (from == dtype) {
    if (n > 0) std::memcpy(out.data_ptr(), t.data_ptr(), t.nbytes());
    return out;
  }
  AT_DISPATCH_REDUCED_FLOATING_TYPES(from == at::kFloat ? dtype : from, "rnn_fused_converted", [&] {
    const auto values = [&](int64_t begin, int64_t end) {
      if (from == at::kFloat) {
        at::vec::convert(t.data_ptr<float>() + begin, out.data_ptr<scalar_t>() + begin,
                         end - begin);
      } else {
        at::vec::convert(t.data_ptr<scalar_t>() + begin, out.data_ptr<float>() + begin,
                         end - begin);
      }
    };
    if (n < kParallelConversionValues) return values(0, n);
    at::parallel_for(0, n, kParallelConversionValues / 2, values);
  });
  return out;
}

// forward_native and backward_native run float32 and float64 calls in their own dtype. bf16
// (the backward's), Bf16Dots::kAll (the forward's): the products of packed weights (and the
// backward's weight gradients) round their operands to bfloat16 and run on bfloat16 dot
// products, for bfloat16 calls (float32 tensors then).
// `wants` drops what a caller past the operator does not read (see layer_without_graph):
// the empty workspace of an inference call, and a cell's output apart from its h_n.
ForwardResult forward_native(const Problem& p, const LayerArgs& a, bool train, Bf16Dots dots,
                             ForwardWants wants = {}) {
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

// Whether a backward's weight gradients W (+)= dG^T A (dG: a chunk's gate gradients, A: its
// inputs or previous states) go to BLAS on the operands as stored, into the weights' own
// layout, or run as W^T (+)= A^T dG with A transposed and dG packed (rows_as_panels). BLAS:
// small problems (see small_problem), float64, and float32 on Intel CPUs, where MKL's sgemm
// beat the packed products (forward+backward against torch.nn, LSTM T=200 B=16 H=128
// 0.90-1.0 -> 0.98-1.09x, 2-layer bidirectional T=50 B=32 H=256 1.03-1.11 -> 1.11-1.18x,
// Intel Xeon without AMX). Packed: bfloat16 products, and float32 elsewhere (on AMD EPYC,
// MKL runs its AVX2 path, at about 40% of the packed products' rate).
// RNN_FUSED_CPU_WEIGHT_GRADS=blas or =packed chooses (the tests run both).
bool blas_weight_grads(const Problem& p, bool bf16, at::ScalarType engine_dtype) {
  if (small_problem(p)) return true;
  if (bf16) return false;
  const char* env = std::getenv("RNN_FUSED_CPU_WEIGHT_GRADS");
  if (env != nullptr && std::strcmp(env, "blas") == 0) return true;
  if (env != nullptr && std::strcmp(env, "packed") == 0) return false;
  static const bool intel = __builtin_cpu_is("intel");
  return engine_dtype != at::kFloat || intel;
}

struct BackwardBuffers {
  at::Tensor grad_input, dh_state, dc_state;
  // Accumulated weight gradients: as the weights ([out, in]) when they go to BLAS
  // (blas_grads) or are in bfloat16 (bf16_weight_grads), else transposed ([in, out]) (see
  // blas_weight_grads).
  at::Tensor grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr;
  at::Tensor grad_layer_norm;  // written by the first chunk
  bool blas_grads = false, bf16_grads = false, rounded_once = false;
};

// Rows of A (summed over the products) from which float32 gate gradients are worth packing.
// Read in place, a product's rows of b, a gate width apart (often a power of two), fall into a
// few cache sets: LSTM T=100 B=64 H=512's weight gradients (1024 rows of A) ran 40% slower
// than the input projection of the same size. Packing costs a copy and the page faults of a
// new buffer, about what 350 rows of A gained at T=200 B=16 H=128 (Intel Xeon).
constexpr int64_t kPackReaders = 384;

// The first `rows` rows of b as panels for the weight gradients' products, read by `readers`
// rows of A: bfloat16 panels when the products are in bfloat16, float32 ones with enough
// readers, else none.
template <class T>
Panels rows_as_panels(const at::Tensor& b, int64_t rows, bool bf16, int64_t readers) {
  if (!bf16 && !(std::is_same_v<T, float> && readers >= kPackReaders)) return Panels{};
  return pack_panels(b.narrow(0, 0, rows), 0, bf16);
}

// C[M, N] (+)= A^T B for A a chunk's rows of activations ([rows, M], rows contiguous) and B
// b's first rows ([.., N], contiguous), read from its panels when there are (rows_as_panels):
// A transposed for the products (rounded in the same pass for bfloat16 panels).
template <class T>
void transposed_times_rows(const at::Tensor& a, const at::Tensor& b, const Panels& b_panels, T* C,
                           int64_t ldc, bool accumulate) {
  const int64_t rows = a.size(0), M = a.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (a.scalar_type() == at::kBFloat16) {
      TORCH_INTERNAL_ASSERT(b_panels.data.defined() && b_panels.bf16());
      return bf16_matmul_transposed(M, a.data_ptr<at::BFloat16>(), a.stride(0), b_panels, C, ldc,
                                    accumulate);
    }
    if (b_panels.data.defined() && b_panels.bf16())
      return bf16_matmul_transposed(M, a.data_ptr<float>(), a.stride(0), b_panels, C, ldc,
                                    accumulate);
  }
  const at::Tensor a_t = transposed(a);
  if (b_panels.data.defined())
    return matmul<T>(M, a_t.data_ptr<T>(), rows, b_panels, C, ldc, accumulate);
  const int64_t N = b.size(1);
  matmul<T>(M, N, rows, a_t.data_ptr<T>(), rows, b.data_ptr<T>(), N, C, ldc, accumulate);
}

// W[M, N] (+)= G^T A (G [rows, M], A [rows, N] as stored): a weight gradient through BLAS
// (see blas_weight_grads); small problems in one call, others split by blas_at_b so that
// their bits do not depend on the number of threads. A bfloat16 call's small problem on the
// dot products (bf16_dots: see run_backward).
template <class T>
void weight_product(bool small, bool bf16_dots, int64_t M, int64_t N, int64_t rows, const T* G,
                    int64_t ldg, const T* A, int64_t lda, T* W, bool accumulate) {
  if constexpr (std::is_same_v<T, float>) {
    if (bf16_dots) return bf16_weight_product(M, N, rows, G, ldg, A, lda, W, accumulate);
  }
  if (small) return blas_product<T>(true, false, M, N, rows, G, ldg, A, lda, W, N, accumulate);
  blas_at_b<T>(M, N, rows, G, ldg, A, lda, W, N, accumulate);
}

// Rows per block of a LayerNorm cell's chunk sums (layer_norm_chunk).
constexpr int64_t kSumRows = 64;

// A LayerNorm cell after a chunk's steps, row by row while the row is in cache: the row's
// terms of the bias and gain gradients (from dxg and dhg, the normalised sides' gradients,
// and dcell), then the input side's normalisation backward, in place in dxg (dhg may be dxg:
// it is read first). x_raw: the chunk's raw input sides, rows ld_raw apart, the hidden
// sides GH after them (h_stats: their statistics). The sums run over blocks of kSumRows rows,
// each in row order, then over the blocks in order, so their bits do not depend on the
// number of threads. (Per-row gain gradients, summed afterwards, were a buffer twice the size
// of dxg, whose page faults cost a fifth of the LayerNorm LSTM's backward.)
template <class Cell, class T>
void layer_norm_chunk(int64_t rows, int64_t H, int64_t GH, const T* x_raw, int64_t ld_raw,
                      const RowStats<T>* h_stats, const T* gains, T* dxg, const T* dhg,
                      const T* dcell, BackwardBuffers& g, bool weights, bool add) {
  // A block's partial sums: b_ih, b_hh (GRU), the two sides' gains, the cell's gain and bias.
  const int64_t split = Cell::kSplitGrads ? GH : 0, cell = Cell::kCellState ? 2 * H : 0;
  const int64_t width = padded(3 * GH + split + cell), blocks = (rows + kSumRows - 1) / kSumRows;
  std::vector<T> partial(weights ? blocks * width : 0);  // zeros
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* const sums = weights ? partial.data() + b * width : nullptr;
      for (int64_t r = b * kSumRows; r < std::min(rows, (b + 1) * kSumRows); ++r) {
        const T* x = x_raw + r * ld_raw;
        const RowStats<T> xs = row_stats(x, GH);
        T* const dx = dxg + r * GH;
        if (weights) {
          add_row(dx, sums, GH);
          if (split != 0) add_row(dhg + r * GH, sums + GH, GH);
          add_gain_row(x, dx, xs, sums + GH + split, GH);
          add_gain_row(x + GH, dhg + r * GH, h_stats[r], sums + 2 * GH + split, GH);
          if (cell != 0) add_row(dcell + r * cell, sums + 3 * GH + split, cell);
        }
        normalize_row_backward(x, dx, dx, GH, gains, xs);
      }
    }
  });
  if (!weights) return;
  T* const grad_ln = g.grad_layer_norm.data_ptr<T>();
  const auto sum_blocks = [&](int64_t offset, int64_t cols, T* out) {
    column_sums<T>(blocks, cols, partial.data() + offset, width, out, add);
  };
  sum_blocks(0, GH, g.grad_b_ih.data_ptr<T>());
  if (split != 0) sum_blocks(GH, GH, g.grad_b_hh.data_ptr<T>());
  sum_blocks(GH + split, 2 * GH + cell, grad_ln);
}

template <template <class> class CellT, class T>
void run_backward(const Problem& p, bool bf16, const BackwardArgs& a, BackwardBuffers& g) {
  const at::Tensor &input = a.layer.input, &w_ih = a.layer.w_ih, &w_hh = a.layer.w_hh;
  const at::Tensor &saved = a.saved, &h_prev_all = a.h_prev;
  const OptTensor& w_hr = a.layer.w_hr;
  using Cell = CellT<T>;
  const int64_t H = p.hidden, Hout = p.out_size, GH = p.gate_width(), SW = p.saved_width();
  const int64_t I = p.input_size;
  const auto opts = saved.options();
  const std::vector<Chunk> chunks = make_chunks(p, sizeof(T), kBackwardChunkBytes);
  const int64_t chunk_rows = max_rows(chunks);
  const at::Tensor x2d = input.reshape({p.rows, I});
  // Gate gradients of a chunk, input side and (GRU) hidden side.
  at::Tensor dxg = buffer_empty({chunk_rows, GH}, opts);
  at::Tensor dhg = Cell::kSplitGrads ? buffer_empty({chunk_rows, GH}, opts) : dxg;
  // LayerNorm cells: dxg and dhg hold the gradients of the normalised sides (what the biases
  // and gains get); the products take those of the raw sides, through the normalisations'
  // backward: the hidden side's into dhg_raw at each step (h_stats: its rows' statistics),
  // the input side's in place in dxg once the chunk's sums have read it (layer_norm_chunk).
  // dcell: each row's gradients of the LSTM's cell-state gain and bias.
  const T* ln_p = ptr_or_null<T>(a.layer.layer_norm);
  const bool ln = ln_p != nullptr;
  const at::Tensor dhg_raw = ln ? buffer_empty({chunk_rows, GH}, opts) : dhg;
  std::vector<RowStats<T>> h_stats(ln ? chunk_rows : 0);
  const at::Tensor dcell =
      ln && Cell::kCellState ? buffer_empty({chunk_rows, 2 * H}, opts) : at::Tensor();
  const int64_t raw = p.layout.raw_offset();
  // With a projection: dL/dr of a chunk's rows, and dL/dh of the current step.
  at::Tensor dr = p.proj ? buffer_empty({chunk_rows, Hout}, opts) : at::Tensor();
  at::Tensor dh_step = p.proj ? cpu_empty({p.batch, H}, opts) : at::Tensor();
  const int64_t h_block = p.layout.unprojected_offset();

  const T* gout_p = ptr_or_null<T>(a.grad_output);
  const bool small = small_problem(p), blas_grads = g.blas_grads;
  // As in run_forward: a small problem's bfloat16 weights on the dot products too, and its
  // weight gradients (weight_product): LSTMCell(512)'s forward and backward in bfloat16 at
  // batch 16 1.87 ms against 3.46, at batch 64 4.04 against 8.02 (AMD EPYC).
  const bool bf16_dots = bf16 || (small && bf16_dot_products(p));
  // Weights packed, but for a small problem's and a step whose gate gradients are rounded
  // once (rounds_gate_grads_once: each weight read by one product, as stored).
  const bool packs = !small && !g.rounded_once;
  const StepWeight<T> w_hh_b(w_hh, /*transpose=*/false, packs, 0, bf16_dots, p.batch);
  const std::optional<StepWeight<T>> w_hr_b =
      p.proj
          ? std::optional<StepWeight<T>>(std::in_place, *w_hr, false, packs, 0, bf16_dots, p.batch)
          : std::nullopt;
  // dX = dG W_ih: on panels of W_ih packed once (bfloat16 ones when products are in
  // bfloat16), but for float64, whose products go to BLAS, and for a small problem's weight
  // in a half type, read as stored (StepWeight).
  const bool w_ih_as_stored = w_ih.scalar_type() != saved.scalar_type();
  const std::optional<StepWeight<T>> w_ih_b =
      (bf16 || std::is_same_v<T, float>) && (!small || w_ih_as_stored) && a.mask.input
          ? std::optional<StepWeight<T>>(std::in_place, w_ih, false, packs, 0, bf16_dots,
                                         chunk_rows)
          : std::nullopt;
  const T* saved_p = saved.data_ptr<T>();
  const T* hprev_p = h_prev_all.data_ptr<T>();
  T* gin_p = a.mask.input ? g.grad_input.data_ptr<T>() : nullptr;
  T* dh_p = g.dh_state.data_ptr<T>();
  T* dc_p = Cell::kCellState ? g.dc_state.data_ptr<T>() : nullptr;
  T* dxg_p = dxg.data_ptr<T>();
  T* dhg_p = dhg.data_ptr<T>();
  T* const dhg_raw_p = dhg_raw.data_ptr<T>();
  T* const dcell_p = dcell.defined() ? dcell.data_ptr<T>() : nullptr;
  T* dr_p = p.proj ? dr.data_ptr<T>() : nullptr;
  T* dh_step_p = p.proj ? dh_step.data_ptr<T>() : nullptr;
  const T* keep_p = ptr_or_null<T>(a.layer.zoneout);
  // bfloat16 products: the hidden-side gate gradients of a chunk's rows rounded once, each
  // thread its own rows right after their cell math, for every panel of W_hh that reads them
  // at the step (each thread rounded every row for its own panels before) and, once the
  // chunk's steps all did, for the chunk's weight gradients and (LSTM, RNN) its dX. A step
  // whose weights are read as stored on the dot products (g.rounded_once): both sides' rows
  // (dx_bf: GRU's input side), for dh, dX and both weight gradients.
  const bool round_once = g.rounded_once;
  const bool round_dg = (bf16 && w_hh_b.packed()) || round_once;
  const int64_t ld_dg = (GH + 1) / 2 * 2;
  const auto rounded_buffer = [&](bool wanted) {
    return wanted ? buffer_empty({chunk_rows, ld_dg}, opts.dtype(at::kBFloat16)) : at::Tensor();
  };
  const at::Tensor dg_bf = rounded_buffer(round_dg);
  const at::Tensor dx_bf = Cell::kSplitGrads ? rounded_buffer(round_once) : dg_bf;
  auto* const dg_bf_p = round_dg ? dg_bf.data_ptr<at::BFloat16>() : nullptr;
  auto* const dx_bf_p = dx_bf.defined() ? dx_bf.data_ptr<at::BFloat16>() : nullptr;
  // Rows [i0, i1) of the step whose first row is `local` in the chunk's buffers, rounded.
  const auto round_rows = [&](int64_t local, int64_t i0, int64_t i1) {
    if constexpr (std::is_same_v<T, float>) {
      const int64_t r = local + i0;
      bf16_round_rows(i1 - i0, GH, dhg_raw_p + r * GH, GH, dg_bf_p + r * ld_dg, ld_dg);
      if (round_once && Cell::kSplitGrads)
        bf16_round_rows(i1 - i0, GH, dxg_p + r * GH, GH, dx_bf_p + r * ld_dg, ld_dg);
    }
  };
  // One row of a LayerNorm cell's step: the cell's backward over the whole row, then the
  // hidden side's normalisation backward into dhg_raw. local: the step's first row in the
  // chunk's buffers.
  const auto ln_backward_row = [&](int64_t i, int64_t r0, int64_t local) {
    const int64_t lr = local + i;
    const T* saved_row = saved_p + (r0 + i) * SW;
    const T* gout_row = gout_p != nullptr ? gout_p + (r0 + i) * Hout : nullptr;
    const T* keep_row = keep_p == nullptr ? nullptr : keep_p + (r0 + i) * Hout;
    if constexpr (Cell::kCellState) {
      ln_lstm_backward_row<T>(dh_p + i * Hout, gout_row, keep_row, dc_p + i * H, saved_row,
                              ln_p + 2 * GH, ln_p + 2 * GH + H, dxg_p + lr * GH,
                              dcell_p + lr * 2 * H, dh_p + i * Hout, H);
    } else {
      BackwardRow<T> row{
          dh_p + i * Hout, gout_row,        nullptr,         saved_row, hprev_p + (r0 + i) * Hout,
          dxg_p + lr * GH, dhg_p + lr * GH, dh_p + i * Hout, keep_row};
      backward_row<CellT, T>(row, H, 0, H);
    }
    const T* v = saved_row + raw + GH;
    h_stats[lr] = row_stats(v, GH);
    normalize_row_backward(v, dhg_p + lr * GH, dhg_raw_p + lr * GH, GH, ln_p + GH, h_stats[lr]);
  };

  // An element-wise recurrence's steps: its units on separate threads, as in the forward.
  const auto unit_steps = [&](const Chunk& ch) {
    const T* u = w_hh.data_ptr<T>();
    const bool accumulate = Cell::kUsesPrevH || p.zoneout;
    with_team(unit_threads(p, ch.rows), [&](const Team& team) {
      const auto [u0, u1] = units_of(team, H);
      for (int64_t s = ch.s_end - 1; s >= ch.s_begin; --s) {
        const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
        const int64_t local = r0 - ch.row_begin;
        for (int64_t i = 0; i < n; ++i) {
          T* dh = dh_p + i * Hout;
          const T* dhg = dhg_raw_p + (local + i) * GH;
          const BackwardRow<T> row{dh,
                                   gout_p != nullptr ? gout_p + (r0 + i) * Hout : nullptr,
                                   nullptr,
                                   saved_p + (r0 + i) * SW,
                                   hprev_p + (r0 + i) * Hout,
                                   dxg_p + (local + i) * GH,
                                   dhg_p + (local + i) * GH,
                                   dh,
                                   keep_p == nullptr ? nullptr : keep_p + (r0 + i) * Hout};
          backward_row<CellT, T>(row, H, u0, u1);
          for (int64_t j = u0; j < u1; ++j)
            dh[j] = accumulate ? dh[j] + dhg[j] * u[j] : dhg[j] * u[j];
        }
      }
    });
  };

  // A step of many rows in one region (step_in_one_region): by blocks of rows through the
  // cell's backward, dh_{t-1} and dX, with weights in the engine's dtype.
  const bool rows_in_one_region = step_in_one_region(p) && !ln && !bf16 && !w_ih_as_stored &&
                                  w_hh.scalar_type() == saved.scalar_type();
  for (auto ch = chunks.rbegin(); ch != chunks.rend(); ++ch) {
    bool chunk_rounded = round_dg;  // every step's rows in dg_bf (written by thread 0)
    if (p.elementwise) {
      unit_steps(*ch);
    } else {
      // A step whose products read its weights as stored splits each over the threads.
      with_team(packs ? step_threads(p) : 1, [&](const Team& team) {
        for (int64_t s = ch->s_end - 1; s >= ch->s_begin; --s) {
          const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
          const int64_t local = r0 - ch->row_begin;  // first row of the step in chunk buffers
          if (p.proj) {
            // dL/dr_t = grad_output_t + dL/dr_t carried from the next step; then through W_hr.
            T* dr_rows = dr_p + local * Hout;
            if (team.id == 0) {
              for (int64_t e = 0; e < n * Hout; ++e)
                dr_rows[e] = dh_p[e] + (gout_p != nullptr ? gout_p[r0 * Hout + e] : T(0));
            }
            team.barrier();
            w_hr_b->product(team, n, dr_rows, Hout, dh_step_p, H, false);
            team.barrier();
          }
          const auto backward_rows = [&](int64_t i0, int64_t i1, int64_t u0, int64_t u1) {
            for (int64_t i = i0; i < i1; ++i) {
              BackwardRow<T> row{p.proj ? dh_step_p + i * H : dh_p + i * Hout,
                                 !p.proj && gout_p != nullptr ? gout_p + (r0 + i) * Hout : nullptr,
                                 dc_p == nullptr ? nullptr : dc_p + i * H,
                                 saved_p + (r0 + i) * SW,
                                 hprev_p + (r0 + i) * Hout,
                                 dxg_p + (local + i) * GH,
                                 dhg_p + (local + i) * GH,
                                 dh_p + i * Hout,
                                 keep_p == nullptr ? nullptr : keep_p + (r0 + i) * Hout};
              backward_row<CellT, T>(row, H, u0, u1);
            }
          };
          const bool accumulate = Cell::kUsesPrevH || p.zoneout;
          if (rows_in_one_region) {
            for_row_blocks(n, [&](int64_t i0, int64_t rows) {
              backward_rows(i0, i0 + rows, 0, H);
              if (a.mask.state)
                w_hh_b.product_here(rows, dhg_p + (local + i0) * GH, GH, dh_p + i0 * Hout, Hout,
                                    accumulate);
              if (a.mask.input)
                blas_product_here<T>(false, false, rows, I, GH, dxg_p + (local + i0) * GH, GH,
                                     w_ih.data_ptr<T>(), I, gin_p + (r0 + i0) * I, I, false);
            });
            continue;
          }
          // As in the forward: a small problem's many rows over the threads (and a step's
          // whose weights are read as stored, the rows of each thread rounded by it).
          const bool split_rows =
              !packs && !ln && cell_rows_over_threads(n, H, [&](int64_t i0, int64_t i1) {
                backward_rows(i0, i1, 0, H);
                if (round_dg) round_rows(local, i0, i1);
              });
          // With a row for every thread, each takes whole rows: a row's saved values stream
          // in order from memory, where tiles of 64 units read them in pieces a gate apart
          // (GRU T=100 B=64 H=512 bf16 forward and backward 1.42 -> 1.63x torch.nn, float32
          // 1.36 -> 1.42x, LSTM T=200 B=16 H=128 float32 1.01 -> 1.04x; Intel Xeon with AMX).
          const bool by_rows = !ln && !split_rows && n >= team.size;
          if (by_rows) backward_rows(team.begin(n), team.end(n), 0, H);
          const int64_t tiles = ln || split_rows || by_rows ? 0 : tile_count(n, H);
          for (int64_t i = team.begin(n); ln && i < team.end(n); ++i) {
            ln_backward_row(i, r0, local);
          }
          for (int64_t k_tile = team.begin(tiles); k_tile < team.end(tiles); ++k_tile) {
            const Tile tl = tile_at(k_tile, n, H);
            backward_rows(tl.i0, tl.i0 + tl.rows, tl.u0, tl.u1);
          }
          // This thread's rows are whole (by rows, or a LayerNorm cell's): rounded now (split
          // over the threads, each block was).
          const bool rounded = round_dg && (by_rows || ln || split_rows);
          if (rounded && !split_rows) round_rows(local, team.begin(n), team.end(n));
          team.barrier();
          // dL/dh_{t-1} = (hidden-side gate gradients) W_hh [+ the direct part the cell wrote].
          // The first step's is the initial state's gradient only: skipped when not asked
          // for (one read of W_hh: LSTMCell(256) at batch 1, forward and backward, 734 and
          // 654 us a call against 782 and 691 before; Intel Xeon with AMX).
          if (s == 0 && !a.mask.state) break;
          if (rounded) {
            if constexpr (std::is_same_v<T, float>)
              w_hh_b.product(team, n, dg_bf_p + local * ld_dg, ld_dg, dh_p, Hout, accumulate);
          } else {
            w_hh_b.product(team, n, dhg_raw_p + local * GH, GH, dh_p, Hout, accumulate);
            if (team.id == 0) chunk_rounded = false;
          }
          team.barrier();
        }
      });
    }
    // The chunk's share of dX and of the weight and bias gradients (W += dG^T A, or its
    // transpose: see blas_weight_grads); the first chunk processed writes the gradients, the
    // others add to them. The bias (and gain) sums come first: they read the normalised
    // sides' gradients, which a LayerNorm cell's input side then overwrites.
    const int64_t rb = ch->row_begin, rows = ch->rows;
    const bool add = ch != chunks.rbegin();
    if (ln) {
      layer_norm_chunk<Cell, T>(rows, H, GH, saved_p + rb * SW + raw, SW, h_stats.data(), ln_p,
                                dxg_p, dhg_p, dcell_p, g, a.mask.weights, add);
    } else if (a.mask.weights) {
      column_sums<T>(rows, GH, dxg_p, GH, g.grad_b_ih.data_ptr<T>(), add);
      if (Cell::kSplitGrads) column_sums<T>(rows, GH, dhg_p, GH, g.grad_b_hh.data_ptr<T>(), add);
    }
    // dxg is the hidden side's gradients too (LSTM, RNN without LayerNorm): rounded already.
    const bool dx_rounded =
        chunk_rounded && (round_once || (!Cell::kSplitGrads && !ln && GH % 2 == 0));
    const at::Tensor dg_rows =
        chunk_rounded ? dg_bf.narrow(0, 0, rows).narrow(1, 0, GH) : at::Tensor();
    if (rows_in_one_region) {
      // dX came with the rows.
    } else if (w_ih_b.has_value()) {
      if constexpr (std::is_same_v<T, float>) {
        if (dx_rounded) w_ih_b->product(rows, dx_bf_p, ld_dg, gin_p + rb * I, I, false);
      }
      if (!dx_rounded) w_ih_b->product(rows, dxg_p, GH, gin_p + rb * I, I, false);
    } else if (a.mask.input) {
      matmul<T>(rows, I, GH, dxg_p, GH, w_ih.data_ptr<T>(), I, gin_p + rb * I, I, false);
    }
    if (!a.mask.weights) continue;
    if (g.bf16_grads) {
      // In bfloat16; each side's G^T once from its rounded rows where they are (both weights
      // read the same but GRU's).
      if constexpr (std::is_same_v<T, float>) {
        TORCH_INTERNAL_ASSERT(!add);
        const T* x_rows = x2d.data_ptr<T>() + rb * I;
        if (!round_once) {
          bf16_weight_product(GH, I, rows, dxg_p, GH, x_rows, I,
                              g.grad_w_ih.data_ptr<at::BFloat16>());
          bf16_weight_product(GH, Hout, rows, dhg_raw_p, GH, hprev_p + rb * Hout, Hout,
                              g.grad_w_hh.data_ptr<at::BFloat16>());
          continue;
        }
        TORCH_INTERNAL_ASSERT(chunk_rounded);
        const at::Tensor dx_t = bf16_transposed(rows, GH, dx_bf_p, ld_dg);
        const at::Tensor dh_t =
            Cell::kSplitGrads ? bf16_transposed(rows, GH, dg_bf_p, ld_dg) : dx_t;
        bf16_weight_product(GH, I, rows, dx_t.data_ptr<at::BFloat16>(), dx_t.size(1), x_rows, I,
                            g.grad_w_ih.data_ptr<at::BFloat16>());
        bf16_weight_product(GH, Hout, rows, dh_t.data_ptr<at::BFloat16>(), dh_t.size(1),
                            hprev_p + rb * Hout, Hout, g.grad_w_hh.data_ptr<at::BFloat16>());
      }
      continue;
    }
    // Gate gradients packed once per chunk (dhg is dxg itself but for GRU).
    const int64_t dxg_readers = Cell::kSplitGrads || p.elementwise || ln ? I : I + Hout;
    const Panels dxg_panels = blas_grads   ? Panels{}
                              : dx_rounded ? pack_panels(dg_rows, 0, true)
                                           : rows_as_panels<T>(dxg, rows, bf16, dxg_readers);
    if (blas_grads) {
      const T* x_rows = x2d.data_ptr<T>() + rb * I;
      weight_product<T>(small, bf16_dots, GH, I, rows, dxg_p, GH, x_rows, I,
                        g.grad_w_ih.data_ptr<T>(), add);
    } else {
      transposed_times_rows<T>(x2d.narrow(0, rb, rows), dxg, dxg_panels, g.grad_w_ih.data_ptr<T>(),
                               GH, add);
    }
    if (p.elementwise) {
      // du: the column sums of dhg * h_prev (u multiplies each unit by its own h only).
      // Each unit's sum in row order whatever the threads (blocks of units split).
      T* du = g.grad_w_hh.data_ptr<T>();
      if (!add) std::fill(du, du + H, T(0));
      const int64_t blocks = (H + kUnitBlock - 1) / kUnitBlock;
      const int64_t block_work = kUnitBlock * std::max<int64_t>(rows, 1);
      at::parallel_for(0, blocks, 1 + kParallelStepWork / block_work, [&](int64_t b0, int64_t b1) {
        const int64_t j0 = b0 * kUnitBlock, j1 = std::min(H, b1 * kUnitBlock);
        for (int64_t i = 0; i < rows; ++i) {
          const T* dhg_row = dhg_p + i * GH;
          const T* h_row = hprev_p + (rb + i) * Hout;
          for (int64_t j = j0; j < j1; ++j) du[j] += dhg_row[j] * h_row[j];
        }
      });
    } else if (blas_grads) {
      weight_product<T>(small, bf16_dots, GH, Hout, rows, dhg_raw_p, GH, hprev_p + rb * Hout, Hout,
                        g.grad_w_hh.data_ptr<T>(), add);
    } else {
      const Panels dhg_panels = !Cell::kSplitGrads && !ln ? dxg_panels
                                : chunk_rounded ? pack_panels(dg_rows, 0, true)
                                                : rows_as_panels<T>(dhg_raw, rows, bf16, Hout);
      transposed_times_rows<T>(h_prev_all.narrow(0, rb, rows), dhg_raw, dhg_panels,
                               g.grad_w_hh.data_ptr<T>(), GH, add);
    }
    if (p.proj && blas_grads) {
      weight_product<T>(small, bf16_dots, Hout, H, rows, dr_p, Hout, saved_p + rb * SW + h_block,
                        SW, g.grad_w_hr.data_ptr<T>(), add);
    } else if (p.proj) {
      transposed_times_rows<T>(saved.narrow(1, h_block, H).narrow(0, rb, rows), dr,
                               rows_as_panels<T>(dr, rows, bf16, H), g.grad_w_hr.data_ptr<T>(),
                               Hout, add);
    }
  }
  if (!Cell::kSplitGrads && a.mask.weights) {
    std::memcpy(g.grad_b_hh.data_ptr<T>(), g.grad_b_ih.data_ptr<T>(), sizeof(T) * GH);
  }
}

// `only_asked`: the gradients that a's mask does not ask for, and a cell state's where the
// cell has none, come back undefined (backward_without_dispatcher) rather than empty, as the
// operator's schema has them.
BackwardResult backward_native(const Problem& p, const BackwardArgs& a, bool bf16,
                               bool only_asked) {
  const at::Tensor& input = a.layer.input;
  // A bfloat16 input is read as it is by the float32 engine's products (backward_wanting).
  const at::ScalarType dtype =
      input.scalar_type() == at::kBFloat16 ? at::kFloat : input.scalar_type();
  const auto opts = input.options().dtype(dtype);
  const int64_t GH = p.gate_width();
  // A new one each: the operator's outputs never alias.
  const auto none = [&] { return only_asked ? at::Tensor() : cpu_empty({0}, opts); };

  BackwardBuffers g;
  g.grad_input = buffer_empty(a.mask.input ? input.sizes() : at::IntArrayRef{0}, opts);
  g.dh_state = a.grad_h_n.has_value() ? converted_copy(*a.grad_h_n, dtype)
                                      : buffer_zeros({p.batch, p.out_size}, opts);
  g.dc_state = p.kind != CellKind::LSTM ? none()
               : a.grad_c_n.has_value() ? converted_copy(*a.grad_c_n, dtype)
                                        : buffer_zeros({p.batch, p.hidden}, opts);
  const bool weights = a.mask.weights;
  const bool blas_grads = g.blas_grads = blas_weight_grads(p, bf16, dtype);
  const bool bf16_grads = g.bf16_grads = bf16_weight_grads(p, a);
  g.rounded_once = rounds_gate_grads_once(p, a);
  const auto weight_grad = [&](int64_t rows, int64_t cols) {
    return !weights     ? cpu_empty({0}, opts)
           : bf16_grads ? buffer_empty({rows, cols}, opts.dtype(at::kBFloat16))
           : blas_grads ? buffer_empty({rows, cols}, opts)
                        : buffer_empty({cols, rows}, opts);
  };
  g.grad_w_ih = weight_grad(GH, p.input_size);
  g.grad_w_hh = !p.elementwise ? weight_grad(GH, p.out_size) : cpu_empty({weights ? GH : 0}, opts);
  g.grad_b_ih = cpu_empty({weights ? GH : 0}, opts);  // written by the first chunk
  g.grad_b_hh = cpu_empty({weights ? GH : 0}, opts);
  g.grad_w_hr = p.proj ? weight_grad(p.out_size, p.hidden) : at::Tensor();
  g.grad_layer_norm =
      weights && p.layer_norm ? cpu_empty({a.layer.layer_norm->numel()}, opts) : none();

  AT_DISPATCH_FLOATING_TYPES(dtype, "rnn_fused_backward_cpu", [&] {
    dispatch_cell(p.kind, [&](auto tag) {
      using Tag = decltype(tag);
      run_backward<Tag::template Cell, scalar_t>(p, bf16, a, g);
    });
  });
  // Transposed back (in the cache's memory: fresh memory faulted on each page at every call).
  const auto as_weight = [&](const at::Tensor& t) {
    return blas_grads || bf16_grads || !weights || t.dim() == 1 ? t : transposed(t);
  };
  return {g.grad_input,
          a.mask.state ? g.dh_state : none(),
          a.mask.state ? g.dc_state : none(),
          as_weight(g.grad_w_ih),
          as_weight(g.grad_w_hh),
          g.grad_b_ih,
          g.grad_b_hh,
          p.proj ? as_weight(g.grad_w_hr) : none(),
          g.grad_layer_norm};
}

// Half types: float16 and bfloat16 calls run the float32 engine on float32 copies of their
// tensors (each weight converted once per call, or read as stored: weights_as_stored,
// bf16_products) and round its results to their dtype: sums, cell state and gate math in
// float32, and the workspace kept in float32. bfloat16 products run on bfloat16 dot products
// where the CPU has them (RNN_FUSED_BF16_DOT=0 turns that off), float16 ones in float32 (no
// CPU of the project's has float16 dot products). Except for the forward's state products in
// ReLU RNNs of more than one step: rounding a step's state to bfloat16 for the next step's
// products flips the sign of pre-activations near zero, where ReLU's derivative jumps (in 6
// of 25 random layers of the half-type tests a gradient came out more than twice as far off
// as torch.nn's). Their other products run on the dot products (bf16_input_products).

// Small problems (small_problem) of half-type calls but for element-wise recurrences keep
// their weights as stored: their products read them in their dtype (StepWeight). A float32
// copy of each weight per call cost more than the call's own work: LSTMCell(256) in
// bfloat16 at batch 1 took 1144 us a step against torch.nn's 236, then 76 (Intel Xeon).
bool weights_as_stored(const Problem& p) { return small_problem(p) && !p.elementwise; }

// Whether bfloat16 dot products may run: the CPU has them and RNN_FUSED_BF16_DOT is not "0".
bool bf16_dots_allowed() {
  const char* env = std::getenv("RNN_FUSED_BF16_DOT");
  return has_bf16_dot() && (env == nullptr || std::strcmp(env, "0") != 0);
}

// Whether a bfloat16 call's products run on them: not for ReLU RNNs of more than one step
// (above: a single step's h_0 is given in bfloat16, so its products round nothing; in
// float32, RNNCell(1024) with ReLU at batch 256 took 0.37x torch.nn's bfloat16 time under
// no_grad, AMD EPYC) nor element-wise recurrences (their products with u are element-wise, in
// float32).
bool bf16_dot_products(const Problem& p) {
  const bool relu_steps = p.kind == CellKind::RNN_RELU && p.steps > 1;
  return p.bfloat16 && !relu_steps && !p.elementwise && bf16_dots_allowed();
}

// Those ReLU RNNs of more than one step, where they pack their weights, run their forward's
// input projection alone on the dot products (x and W_ih come in bfloat16: its products round
// nothing), and every product of their backward (bf16_backward_products). In float32,
// RNN(512, 512, nonlinearity='relu') in bfloat16 at T=100 B=64 took 0.69x torch.nn's
// bfloat16 time under no_grad and 0.77x forward and backward (AMD EPYC). Errors against
// float64, 30 seeds of five layer shapes: 0.29x torch.nn's (geometric mean) against 0.26x all
// in float32; in both, the same one of 1440 outputs and gradients over twice torch.nn's.
bool bf16_input_products(const Problem& p) {
  return p.bfloat16 && p.kind == CellKind::RNN_RELU && !p.elementwise && !small_problem(p) &&
         bf16_dots_allowed();
}

// Only calls that pack their weights (not small_problem) run the dot products; their weights
// stay in bfloat16 until packed (bf16 in LayerArgs::to).
bool bf16_products(const Problem& p) { return bf16_dot_products(p) && !small_problem(p); }

// The backward's: those of bf16_products and ReLU RNNs' of more than one step too, whose
// backward rounds gate gradients and states but reads ReLU's derivatives from the forward's
// float32 workspace (no sign flips).
bool bf16_backward_products(const Problem& p) {
  return p.bfloat16 && !p.elementwise && !small_problem(p) && bf16_dots_allowed();
}

// The backward of a bfloat16 call of one step on the dot products (a cell's step) writes its
// weight gradients in bfloat16 (the bits of the float32 sums rounded afterwards): in float32,
// then converted after the call, they took more than the rest of LSTMCell(1024)'s forward and
// backward at batch 1 (0.63x torch.nn's time; AMD EPYC).
bool bf16_weight_grads(const Problem& p, const BackwardArgs& a) {
  return bf16_dot_products(p) && p.steps == 1 && !p.layer_norm && !p.proj &&
         a.layer.w_ih.scalar_type() == at::kBFloat16 && a.layer.w_hh.scalar_type() == at::kBFloat16;
}

// Such a step of more than kHalfWeightRows rows reads its bfloat16 weights as stored and
// rounds each side's gate gradients once, on the threads that computed them, for dh, dX and
// both weight gradients. Rounded for each product apart, by one thread from rows the other
// had written, and the weight gradients converted after the call, LSTMCell(512) at batch 64
// took 0.80-0.86x torch.nn's time forward and backward; with its weights packed at batch 128
// (each read by one product) and its weight gradients transposed back, 0.75-0.77x (AMD EPYC).
bool rounds_gate_grads_once(const Problem& p, const BackwardArgs& a) {
  return bf16_weight_grads(p, a) && p.batch > kHalfWeightRows;
}

// t in dtype (t itself if it has it or is undefined), for a half-type call's float32 copies and
// its results.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : converted_copy(t, dtype);
}

template <class Result>
Result rounded(Result r, at::ScalarType dtype) {
  std::apply([&](auto&... t) { ((t = converted(t, dtype)), ...); }, r);
  return r;
}

// The forward's results rounded, but its workspace kept in float32 (workspace_dtype).
ForwardResult rounded_forward(ForwardResult r, at::ScalarType dtype) {
  for (at::Tensor* t : {&std::get<0>(r), &std::get<1>(r), &std::get<2>(r)})
    *t = converted(*t, dtype);
  return r;
}

ForwardResult forward_wanting(const Problem& p, const LayerArgs& a, bool train,
                              ForwardWants wants) {
  const at::ScalarType dtype = a.input.scalar_type();
  if (!half_type(dtype)) return forward_native(p, a, train, Bf16Dots::kNone, wants);
  const Bf16Dots dots = bf16_products(p)         ? Bf16Dots::kAll
                        : bf16_input_products(p) ? Bf16Dots::kInput
                                                 : Bf16Dots::kNone;
  wants.half_output = dtype;
  // bf16 products leave the weights they read in bfloat16 until packed, and the input when
  // its rows split into pairs (even I), for the input projection to read as it is: its
  // float32 copy and rounding back cost 6-10% of an LSTM's forward at T=100 B=64 H=512 (AMD
  // EPYC).
  const bool input_as_is = dots != Bf16Dots::kNone && p.input_size % 2 == 0;
  // The states are left out: forward_native converts them as it copies them.
  LayerArgs f = a;
  f.hx.reset();
  f.cx.reset();
  const bool convert_weights = dots == Bf16Dots::kNone && !weights_as_stored(p);
  f = f.to(at::kFloat, convert_weights, /*input_too=*/!input_as_is, converted);
  if (dots == Bf16Dots::kInput) f.w_hh = converted(a.w_hh, at::kFloat);  // no w_hr: not LSTM
  f.hx = a.hx;
  f.cx = a.cx;
  return rounded_forward(forward_native(p, f, train, dots, wants), dtype);
}

// The `forward` operator's engine.
ForwardResult forward_cpu(const Problem& p, const LayerArgs& a, bool train) {
  return forward_wanting(p, a, train, {});
}

BackwardResult backward_wanting(const Problem& p, const BackwardArgs& a, bool only_asked) {
  const at::ScalarType dtype = a.layer.input.scalar_type();
  if (!half_type(dtype)) return backward_native(p, a, false, only_asked);
  const bool bf16 = bf16_backward_products(p);
  // Left out: the gradients of h_n and c_n, which backward_native converts as it copies them,
  // and the initial states, which the backward does not read.
  BackwardArgs f = a;
  f.grad_h_n.reset();
  f.grad_c_n.reset();
  f.layer.hx.reset();
  f.layer.cx.reset();
  // bf16 products read a bfloat16 input only in W_ih's gradient, transposed and in bfloat16
  // (transposed_times_rows): as it is, not through a float32 copy rounded back (the same
  // bits). LSTM T=100 B=64 I=H=512 forward and backward: the conversions' and transposes'
  // share of perf's samples 5.4% -> 4.4% (Intel Xeon with AMX).
  const bool input_as_is = bf16 && dtype == at::kBFloat16 && !bf16_weight_grads(p, a);
  if (input_as_is) f.layer.input = at::Tensor();
  f = f.to(at::kFloat, !bf16 && !weights_as_stored(p), converted);
  if (input_as_is) f.layer.input = a.layer.input;
  f.grad_h_n = a.grad_h_n;
  f.grad_c_n = a.grad_c_n;
  f.layer.hx = a.layer.hx;
  f.layer.cx = a.layer.cx;
  return rounded(backward_native(p, f, bf16, only_asked), dtype);
}

// The `backward` operator's engine.
BackwardResult backward_cpu(const Problem& p, const BackwardArgs& a) {
  return backward_wanting(p, a, /*only_asked=*/false);
}

}  // namespace

LayerResult layer_without_graph(const LayerArgs& a, bool output_wanted) {
  const Problem p = make_problem(a);
  const ForwardWants wants{/*workspace=*/false, output_wanted};
  auto [output, h_n, c_n, saved, h_prev] = a.is_contiguous()
                                               ? forward_wanting(p, a, false, wants)
                                               : forward_wanting(p, a.contiguous(), false, wants);
  return {output, h_n, c_n};
}

BackwardResult backward_without_dispatcher(const BackwardArgs& a) {
  const Problem p = make_problem(a);
  return a.is_contiguous() ? backward_wanting(p, a, /*only_asked=*/true)
                           : backward_wanting(p, a.contiguous(buffer_empty), /*only_asked=*/true);
}

TORCH_LIBRARY_IMPL(rnn_fused, CPU, m) {
  m.impl("forward", &forward_adapter<forward_cpu>);
  // A non-contiguous grad_output (the expanded ones of `out.sum().backward()`) copied into the
  // buffer cache: fresh memory faulted on each page at every call.
  m.impl("backward", &backward_adapter<backward_cpu, buffer_empty>);
}

}  // namespace rnn_fused::cpu

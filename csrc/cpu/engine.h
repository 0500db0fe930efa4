// The CPU engine's parts that its forward (forward_cpu.cpp), its backward (backward_cpu.cpp)
// and its entries (recurrence_cpu.cpp, where the picture of the engine is) share: which path
// a call takes (small problems without packing or threads, bfloat16 products), how a step's
// work splits over the threads, how a sequence splits into chunks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../op_adapters.h"
#include "../problem.h"
#include "amx_gates.h"
#include "bf16_dot.h"
#include "gemm.h"
#include "team.h"

namespace rnn_fused::cpu {

// Steps with fewer multiply-adds than this run on one thread: below it a barrier between
// threads costs more than the work it splits.
constexpr int64_t kParallelStepWork = 32768;

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
inline bool packs_bf16_step(const Problem& p) {
  return p.rows >= kBf16PackedStepRows || (p.batch >= kTilePackedStepRows && bf16_tiles_allowed());
}
// Under no_grad (Problem::inference), with AMX tiles (the kind measured: the other keeps the
// rule above until measured), they pack sooner still, with no backward to pay for: from
// 3 rows, and rows times the bytes of the bfloat16 weights of at least 2.5 MiB; weights over
// 1.5 MiB (packed beyond L2) from 6 rows. bfloat16 forward at B=1, read as stored -> packed,
// in us (Intel Xeon with AMX): LSTM H=256 T=3 48 -> 46, T=4 61 -> 48, T=8 111 -> 61, T=16 213
// -> 90; GRU H=256 T=4 50 -> 40, T=16 168 -> 69; RNN H=256 T=8 48 -> 45, T=16 85 -> 54-73,
// T=4 28 -> 41 (so not there); LSTM H=128 T=8 50 -> 52, T=16 90 -> 62; LSTM H=512 T=4 197
// -> 260-288, T=6 290 -> 277, T=16 728 -> 368-484; GRU H=512 T=6 211 -> 194-203; B=2 LSTM
// H=256 T=3 85 -> 47. In training read as stored stays faster up to 16 rows (forward and
// backward, LSTM H=256 T=8 510-521 -> 645, T=16 707-721 -> 713-714; RNN T=16 270 -> 321-326).
// The bytes of a call's weights in bfloat16 (W_ih, W_hh and a projection's W_hr).
inline int64_t bf16_weight_bytes(const Problem& p) {
  return 2 * (p.gate_width() * (p.input_size + p.out_size) + (p.proj ? p.out_size * p.hidden : 0));
}
constexpr int64_t kSmallBf16InferenceRows = 2;
constexpr int64_t kPackedInferenceBytes = 5 << 19;  // 2.5 MiB
constexpr int64_t kL2PackedWeightBytes = 3 << 19;   // 1.5 MiB
constexpr int64_t kLargeWeightInferenceRows = 6;
inline bool small_bf16_inference(const Problem& p) {
  const int64_t weight_bytes = bf16_weight_bytes(p);
  return p.rows <= kSmallBf16InferenceRows || p.rows * weight_bytes < kPackedInferenceBytes ||
         (weight_bytes > kL2PackedWeightBytes && p.rows < kLargeWeightInferenceRows);
}
// A bfloat16 call of up to kStoredTilesMaxSteps steps on AMX tiles reads its weights as stored
// (stored_rows_for_tiles), the tiles taking W's rows as they are: no packing, which made it pay
// from few rows. Its shapes: K of both products a multiple of 32, the hidden size of 16; no
// projection, LayerNorm or element-wise recurrence. (run_forward checks the weights too:
// bfloat16, contiguous.) Longer calls repay the packing: bf16 forward, packed -> as stored
// (us, Intel Xeon with AMX): LSTM H=256 B=1 T=3 47-48 -> 29, T=8 64-66 -> 51, T=16 89-91 ->
// 86, T=32 138-140 -> 155-161, T=100 392-395 -> 514-538; B=64 T=8 465-471 -> 419, T=32
// 1505-1515 -> 1538-1592; LSTM H=512 B=8 T=32 986-1036 -> 1381-1407.
constexpr int64_t kStoredTilesMaxSteps = 8;
inline bool stored_tiles_fit(const Problem& p) {
  return p.steps <= kStoredTilesMaxSteps && p.input_size % 32 == 0 && p.out_size % 32 == 0 &&
         p.hidden % 16 == 0 && !p.proj && !p.layer_norm && !p.elementwise &&
         amx_stored_rows_usable();
}
// Such a call's forward takes the tiles from 2 rows once rows times its weights' bytes reach
// 512 KiB (before small_bf16_inference's rule), in training too, where its backward reads the
// weights as stored (a backward's Problem is not `forward`). Cells under no_grad, read as stored on
// the dot products -> on the tiles, us a call (Intel Xeon with AMX): LSTMCell(256) B=2
// 33.4-33.9 -> 19.7-19.8, B=4 55.6-56.0 -> 21.0-21.9, B=16 105-106 -> 32.7-35.2; GRUCell(256)
// B=4 44 -> 18, B=16 83-85 -> 27-29; RNNCell(256) B=2 16.1 -> 13.9, B=16 40-41 -> 18.5;
// LSTMCell(512) B=2 105-117 -> 73-75, B=16 367 -> 99-101; LSTMCell(64) B=8 17.3-17.5 ->
// 14.1-14.2, B=16 26-27 -> 16; slower: B=1 LSTMCell(512) 64-67 -> 69-73, RNNCell(256) 11.8 ->
// 13.7, LSTMCell(64) B=2 10.4 -> 13.0, LSTMCell(32) B=8 10.6 -> 11.9. Sequences (from the dot
// products as stored, or packed): RNN H=256 T=8 B=1 45 -> 27, GRU T=3 39 -> 24, LSTM T=3 B=4
// 150 -> 32-36, LSTM H=512 T=6 B=1 295 -> 186-190. Forward and backward, the forward on the
// dot products -> on the tiles: LSTMCell(256) B=4 384-394 -> 345-357, B=16 472-496 -> 411-429;
// GRUCell(256) B=16 396-407 -> 341-343; LSTMCell(512) B=16 1330-1352 -> 1058-1065; LSTM T=4
// B=4 H=256 661-670 -> 498-505; LSTMCell(64) B=16 107 -> 96-99; as fast: LSTMCell(256) B=2
// 341-353 -> 328-341, LSTM T=2 B=1 368-379 -> 368-370.
constexpr int64_t kStoredTilesMinRows = 2;
constexpr int64_t kStoredTilesMinBytes = 512 << 10;
inline bool stored_tiles_step(const Problem& p) {
  return p.forward && p.rows >= kStoredTilesMinRows &&
         p.rows * bf16_weight_bytes(p) >= kStoredTilesMinBytes && stored_tiles_fit(p);
}
inline bool bf16_dot_products(const Problem& p);  // below, with the other half-type choices
inline bool small_problem(const Problem& p) {
  if (bf16_dot_products(p)) {
    if (stored_tiles_step(p)) return false;
    if (p.steps <= kSmallProblemSteps)
      return p.rows <= kSmallBf16ProblemRows || !packs_bf16_step(p);
    return p.inference && bf16_tiles_allowed() ? small_bf16_inference(p)
                                               : p.rows <= kSmallBf16ProblemRows;
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
inline bool cell_rows_over_threads(int64_t n, int64_t H, const F& rows) {
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
inline bool step_in_one_region(const Problem& p) {
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

inline int step_threads(const Problem& p) {
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
inline UnitRange units_of(const Team& team, int64_t H) {
  const int64_t blocks = (H + kUnitBlock - 1) / kUnitBlock;
  return {std::min(H, team.begin(blocks) * kUnitBlock), std::min(H, team.end(blocks) * kUnitBlock)};
}
inline int unit_threads(const Problem& p, int64_t rows) {
  return rows * p.hidden < kParallelUnitRows ? 1 : at::get_num_threads();
}

// Consecutive processing steps [s_begin, s_end) whose rows are [row_begin, row_begin + rows).
struct Chunk {
  int64_t s_begin, s_end, row_begin, rows;
};

inline std::vector<Chunk> make_chunks(const Problem& p, int64_t elem_size, int64_t chunk_bytes) {
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

inline int64_t max_rows(const std::vector<Chunk>& chunks) {
  int64_t m = 0;
  for (const Chunk& c : chunks) m = std::max(m, c.rows);
  return m;
}

// A buffer's size rounded up to a multiple of 16 values (whole 64-byte lines), so that
// buffers carved out of one allocation start on cache lines of their own.
inline int64_t padded(int64_t elements) { return (elements + 15) / 16 * 16; }

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
inline bool weights_as_stored(const Problem& p) { return small_problem(p) && !p.elementwise; }

// Whether bfloat16 dot products may run: the CPU has them and RNN_FUSED_BF16_DOT is not "0".
inline bool bf16_dots_allowed() {
  const char* env = std::getenv("RNN_FUSED_BF16_DOT");
  return has_bf16_dot() && (env == nullptr || std::strcmp(env, "0") != 0);
}

// Whether a bfloat16 call's products run on them: not for ReLU RNNs of more than one step
// (above: a single step's h_0 is given in bfloat16, so its products round nothing; in
// float32, RNNCell(1024) with ReLU at batch 256 took 0.37x torch.nn's bfloat16 time under
// no_grad, AMD EPYC) nor element-wise recurrences (their products with u are element-wise, in
// float32).
inline bool bf16_dot_products(const Problem& p) {
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
inline bool bf16_input_products(const Problem& p) {
  return p.bfloat16 && p.kind == CellKind::RNN_RELU && !p.elementwise && !small_problem(p) &&
         bf16_dots_allowed();
}

// Only calls that pack their weights (not small_problem) run the dot products; their weights
// stay in bfloat16 until packed (bf16 in LayerArgs::to).
inline bool bf16_products(const Problem& p) { return bf16_dot_products(p) && !small_problem(p); }

// The backward's: those of bf16_products and ReLU RNNs' of more than one step too, whose
// backward rounds gate gradients and states but reads ReLU's derivatives from the forward's
// float32 workspace (no sign flips).
inline bool bf16_backward_products(const Problem& p) {
  return p.bfloat16 && !p.elementwise && !small_problem(p) && bf16_dots_allowed();
}

// The backward of a bfloat16 call of one step on the dot products (a cell's step) writes its
// weight gradients in bfloat16 (the bits of the float32 sums rounded afterwards): in float32,
// then converted after the call, they took more than the rest of LSTMCell(1024)'s forward and
// backward at batch 1 (0.63x torch.nn's time; AMD EPYC).
inline bool bf16_weight_grads(const Problem& p, const BackwardArgs& a) {
  return bf16_dot_products(p) && p.steps == 1 && !p.layer_norm && !p.proj &&
         a.layer.w_ih.scalar_type() == at::kBFloat16 && a.layer.w_hh.scalar_type() == at::kBFloat16;
}

// Such a step of more than kHalfWeightRows rows reads its bfloat16 weights as stored and
// rounds each side's gate gradients once, on the threads that computed them, for dh, dX and
// both weight gradients. Rounded for each product apart, by one thread from rows the other
// had written, and the weight gradients converted after the call, LSTMCell(512) at batch 64
// took 0.80-0.86x torch.nn's time forward and backward; with its weights packed at batch 128
// (each read by one product) and its weight gradients transposed back, 0.75-0.77x (AMD EPYC).
// With AMX tiles, from kTilePackedBackwardRows rows on, the backward packs its weights instead
// and runs dh and dX on the tiles (its gate gradients rounded to bfloat16 the same): bfloat16
// cells at H=256 forward and backward, read as stored -> packed (three alternations):
// LSTMCell batch 64 745-765 -> 647-665 us, 128 1101-1128 -> 899-910, 32 560 -> 528-554,
// GRUCell batch 64 603-604 -> 526-543, LSTMCell(512) at batch 128 3.56-3.63 -> 2.11-2.30 ms;
// at batch 17 the packing cost more than the tiles saved (473-485 -> 483-503; Intel Xeon
// with AMX).
constexpr int64_t kTilePackedBackwardRows = 32;
inline bool rounds_gate_grads_once(const Problem& p, const BackwardArgs& a) {
  return bf16_weight_grads(p, a) && p.batch > kHalfWeightRows &&
         !(p.batch >= kTilePackedBackwardRows && bf16_tiles_allowed());
}

// Which products of a forward run on bfloat16 dot products (float32 tensors then, and the
// input perhaps in bfloat16): none, the input projection alone (bf16_input_products), or all
// of those of packed weights (bf16_products).
enum class Bf16Dots { kNone, kInput, kAll };

// What a forward's caller reads besides h_n and c_n (forward_native).
struct ForwardWants {
  bool workspace = true;  // saved and h_prev, even when empty
  bool output = true;     // an output tensor of its own
  // The output in this half type (a half type's call), where the cell math writes it whole (no
  // projection, no LayerNorm, a matrix recurrence): torch's conversion pass after the engine
  // took 2% of an LSTM's bf16 forward (perf, Intel Xeon with AMX).
  at::ScalarType half_output = at::ScalarType::Undefined;
};

// forward_native and backward_native run float32 and float64 calls in their own dtype. bf16
// (the backward's), Bf16Dots::kAll (the forward's): the products of packed weights (and the
// backward's weight gradients) round their operands to bfloat16 and run on bfloat16 dot
// products, for bfloat16 calls (float32 tensors then).
// `wants` drops what a caller past the operator does not read (see layer_without_graph):
// the empty workspace of an inference call, and a cell's output apart from its h_n.
ForwardResult forward_native(const Problem& p, const LayerArgs& a, bool train, Bf16Dots dots,
                             ForwardWants wants = {});

// `only_asked`: the gradients that a's mask does not ask for, and a cell state's where the
// cell has none, come back undefined (backward_without_dispatcher) rather than empty, as the
// operator's schema has them.
BackwardResult backward_native(const Problem& p, const BackwardArgs& a, bool bf16, bool only_asked);

}  // namespace rnn_fused::cpu

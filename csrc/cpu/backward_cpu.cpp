// The CPU engine's backward: per step, the cell's derivative and the product dG W_hh; per
// chunk, dX = dG W_ih and the weight and bias gradients (the picture: recurrence_cpu.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../op_adapters.h"
#include "../problem.h"
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

constexpr int64_t kBackwardChunkBytes = int64_t(8) << 20;

// Rows a pairwise sum adds in order before it pairs (column_sums), and the levels of its
// pairs: 2^kPairLevels leaves of rows, far above any call's rows.
constexpr int64_t kLeafRows = 8;
constexpr int kPairLevels = 48;

// Sums over rows [0, rows) of value(i, j) for columns j < cols into sum, or added to it: the
// bias gradients of a chunk (column_sums), IndRNN's du, in our own loops (a reduction op per
// chunk costs more than the sums of a short call's few rows). Pairwise: leaves of kLeafRows
// rows in order, each added to the one before it of its size as a binary counter carries, so
// that a sum of n rows rounds about log2(n) times where one in row order rounded n times (the
// bias gradients of a GRU at T=100 B=64 H=256 had 10.9x torch.nn's float32 error, relative
// norm against float64, whose sums run per step; 0.5-0.9x now). Threads take blocks of columns,
// so the bits do not depend on their number.
template <class T, class Value>
void pairwise_column_sums(int64_t rows, int64_t cols, const Value& value, T* sum, bool add) {
  constexpr int64_t kColumns = 64;
  const int64_t blocks = (cols + kColumns - 1) / kColumns;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(rows, 1) / kColumns);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    T level[kPairLevels][kColumns];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t j0 = blk * kColumns, n = std::min(kColumns, cols - j0);
      uint64_t filled = 0;  // bit l: level l holds a sum of 2^l leaves
      T leaf[kColumns];
      for (int64_t i0 = 0; i0 < rows; i0 += kLeafRows) {
        std::fill(leaf, leaf + n, T(0));
        for (int64_t i = i0; i < std::min(rows, i0 + kLeafRows); ++i) {
          for (int64_t j = 0; j < n; ++j) leaf[j] += value(i, j0 + j);
        }
        int l = 0;
        for (; filled >> l & 1; ++l) {
          for (int64_t j = 0; j < n; ++j) leaf[j] = level[l][j] + leaf[j];
        }
        filled = (filled >> l | 1) << l;  // levels below l emptied into leaf, l filled
        std::copy(leaf, leaf + n, level[l]);
      }
      // The levels left, smallest first, then what was there.
      std::fill(leaf, leaf + n, T(0));
      for (int l = 0; l < kPairLevels; ++l) {
        if (filled >> l & 1)
          for (int64_t j = 0; j < n; ++j) leaf[j] += level[l][j];
      }
      for (int64_t j = 0; j < n; ++j) sum[j0 + j] = add ? sum[j0 + j] + leaf[j] : leaf[j];
    }
  });
}

// The column sums of rows [0, rows) of m (rows ld apart), pairwise.
template <class T>
void column_sums(int64_t rows, int64_t cols, const T* m, int64_t ld, T* sum, bool add) {
  pairwise_column_sums(rows, cols, [&](int64_t i, int64_t j) { return m[i * ld + j]; }, sum, add);
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
    return matmul<T>(M, a_t.data_ptr<T>(), rows, b_panels, C, ldc, accumulate, kGradientChain);
  const int64_t N = b.size(1);
  matmul<T>(M, N, rows, a_t.data_ptr<T>(), rows, b.data_ptr<T>(), N, C, ldc, accumulate,
            kGradientChain);
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
          // 654 us a call against 782 and 691 before; Intel Xeon with AMX). Rows the tiles
          // computed are rounded then for the chunk's products, which read every step's rows
          // rounded while chunk_rounded holds (they read stale ones before: a reversed packed
          // call's last step of one row on two threads).
          if (s == 0 && !a.mask.state) {
            if (round_dg && !rounded && team.id == 0) round_rows(local, 0, n);
            break;
          }
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
      // In bfloat16; each side's G^T once (both weights read the same but GRU's), from its
      // rows rounded at the step (round_once) or rounded here, on the threads either way.
      if constexpr (std::is_same_v<T, float>) {
        TORCH_INTERNAL_ASSERT(!add && (chunk_rounded || !round_once));
        const T* x_rows = x2d.data_ptr<T>() + rb * I;
        const auto transposed_side = [&](const at::BFloat16* rounded, const T* side) {
          return round_once ? bf16_transposed(rows, GH, rounded, ld_dg)
                            : bf16_transposed(rows, GH, side, GH);
        };
        const at::Tensor dx_t = transposed_side(dx_bf_p, dxg_p);
        const at::Tensor dh_t = Cell::kSplitGrads ? transposed_side(dg_bf_p, dhg_raw_p) : dx_t;
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
      // du: the column sums of dhg * h_prev (u multiplies each unit by its own h only),
      // pairwise (in row order: 6x reference.py's float32 error at T=100 B=64 H=256).
      const T* h_rows = hprev_p + rb * Hout;
      pairwise_column_sums(
          rows, H, [&](int64_t i, int64_t j) { return dhg_p[i * GH + j] * h_rows[i * Hout + j]; },
          g.grad_w_hh.data_ptr<T>(), add);
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

}  // namespace

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

}  // namespace rnn_fused::cpu

// The per-unit step math of the CUDA recurrence (the cell math of cell_math.h in the
// accumulation type A, float for half types) and the standard path's pointwise kernels.
#pragma once

#include <cstdint>

#include "../cell_math.h"

namespace rnn_fused::cuda {

constexpr int kThreads = 256;

inline int blocks_for(int64_t elements) {
  return static_cast<int>((elements + kThreads - 1) / kThreads);
}

// One step's rows of the forward: xg the input-side pre-activations without bias,
// [n, gates*H]; c the cell state [n, H], c_{t-1} in, c_t out; saved (nullable) the step's
// rows of the backward's values; h where h_t goes (output rows, or the unprojected h). h_state
// (nullable) and the first n_next rows of h_next (the next step's starting rows) receive h_t as
// well; all three share the row stride ld_state. h_prev may be h_state: each thread reads its
// element before writing it. keep (nullable, [n, H] at row stride ld_state): zoneout's
// weights of h_{t-1} (LayerArgs::zoneout).
template <class T, class A>
struct ForwardStep {
  int64_t n, H;
  const A* xg;
  const T* b_ih;
  const T* b_hh;
  const T* h_prev;
  int64_t ld_h_prev;
  A* c;
  T* saved;
  int64_t ld_saved;
  T* h;
  int64_t ld_h;
  T* h_state;
  T* h_next;
  int64_t n_next, ld_state;
  const T* keep;
};

// One step's rows of the backward: dh the carried gradient [n, H] (dL/dh_t in, the part of
// dL/dh_{t-1} that bypasses W_hh out), grad_out (nullable) the step's output gradient; dc
// dL/dc_t in, dL/dc_{t-1} out; dx / dhh the gate gradients (dhh for kSplitGrads), in A:
// for half types unrounded, since the next step's product reads them; keep as the
// forward's, at row stride ld_grad_out. dg_rounded (nullable, [n, gates*H]): the hidden-side
// gate gradients once more, rounded to T, for a product on tensor cores (half types).
template <class T, class A>
struct BackwardStep {
  int64_t n, H;
  A* dh;
  int64_t ld_dh;
  const T* grad_out;
  int64_t ld_grad_out;
  A* dc;
  const T* saved;
  int64_t ld_saved;
  const T* h_prev;
  int64_t ld_h_prev;
  A* dx;
  A* dhh;
  const T* keep;
  T* dg_rounded;
};

// A backward step as the fused and persistent kernels take it (fused_step.cuh,
// persistent_step.cuh): the step's rows, plus the product dg_next W_hh over rows_gemm rows
// (the hidden-side gate gradients of the step processed before). A record with step.n == 0
// only finishes the product: the gradients of the initial states.
template <class T, class A>
struct FusedBackwardStep {
  BackwardStep<T, A> step;
  const A* dg_next;
  int64_t rows_gemm;
  // The rows the record touches: its step's, and those of the product.
  RF_HD int64_t rows() const { return step.n > rows_gemm ? step.n : rows_gemm; }
};

// h_t at row i, unit j, rounded to T once: to the output (or the unprojected h), the state
// and the next step's h_prev rows. Returns it as stored.
template <class T, class A>
__device__ __forceinline__ T store_h(const ForwardStep<T, A>& s, int64_t i, int64_t j, A h) {
  const T h_out = static_cast<T>(h);
  s.h[i * s.ld_h + j] = h_out;
  if (s.h_state != nullptr) s.h_state[i * s.ld_state + j] = h_out;
  if (i < s.n_next) s.h_next[i * s.ld_state + j] = h_out;
  return h_out;
}

// What the cell's forward at row i, hidden unit j reads besides the hidden-side product:
// the fused and persistent kernels load it before the product, so that these loads are in
// flight while the product is computed.
template <class Cell, class A>
struct UnitInputs {
  A x[Cell::kGates], b_hh[Cell::kGates];  // input side with b_ih; b_hh (0 without biases)
  A h_prev, c_prev, keep;                 // those the cell and zoneout read, else 0
};

template <class Cell, class T, class A>
__device__ __forceinline__ UnitInputs<Cell, A> load_unit(const ForwardStep<T, A>& s, int64_t i,
                                                         int64_t j) {
  const int64_t H = s.H, GH = Cell::kGates * H;
  UnitInputs<Cell, A> in;
#pragma unroll
  for (int k = 0; k < Cell::kGates; ++k) {
    in.x[k] = s.xg[i * GH + k * H + j];
    in.b_hh[k] = A(0);
    if (s.b_ih != nullptr) {
      in.x[k] += static_cast<A>(s.b_ih[k * H + j]);
      in.b_hh[k] = static_cast<A>(s.b_hh[k * H + j]);
    }
  }
  const bool zoneout = s.keep != nullptr;
  in.h_prev = Cell::kUsesPrevH || zoneout ? static_cast<A>(s.h_prev[i * s.ld_h_prev + j]) : A(0);
  in.c_prev = Cell::kCellState ? s.c[i * H + j] : A(0);
  in.keep = zoneout ? static_cast<A>(s.keep[i * s.ld_state + j]) : A(0);
  return in;
}

// The cell's forward at row i, hidden unit j, from its inputs and its hidden-side products
// hh (no bias). Returns h_t as stored.
template <class Cell, class T, class A>
__device__ __forceinline__ T finish_unit(const ForwardStep<T, A>& s, int64_t i, int64_t j,
                                         const UnitInputs<Cell, A>& in, A (&hh)[Cell::kGates]) {
  const int64_t H = s.H;
  A kept[Cell::kSaved];
#pragma unroll
  for (int k = 0; k < Cell::kGates; ++k) hh[k] += in.b_hh[k];
  A h_new(0), c_new(0);
  Cell::forward(in.x, hh, in.h_prev, in.c_prev, h_new, c_new, kept);
  // keep h_prev + (1 - keep) h: a kept unit (keep 1) keeps h_prev's bits.
  if (s.keep != nullptr) h_new = in.keep * in.h_prev + (A(1) - in.keep) * h_new;
  if (s.saved != nullptr) {
#pragma unroll
    for (int k = 0; k < Cell::kSaved; ++k)
      s.saved[i * s.ld_saved + k * H + j] = static_cast<T>(kept[k]);
  }
  if constexpr (Cell::kCellState) s.c[i * H + j] = c_new;
  return store_h(s, i, j, h_new);
}

// The cell's forward at row i, hidden unit j, given its hidden-side products hh (no bias).
template <class Cell, class T, class A>
__device__ __forceinline__ void forward_unit(const ForwardStep<T, A>& s, int64_t i, int64_t j,
                                             A (&hh)[Cell::kGates]) {
  finish_unit<Cell>(s, i, j, load_unit<Cell>(s, i, j), hh);
}

// What the cell's backward at row i, hidden unit j reads besides dL/dh_t: the saved values,
// the output gradient, zoneout's weight, h_{t-1} and dL/dc_t where the cell reads them (else
// 0). The persistent kernel loads the next step's before the barrier between steps.
template <class Cell, class A>
struct BackwardInputs {
  A kept[Cell::kSaved];
  A grad_out, keep, h_prev, dc;
};

template <class Cell, class T, class A>
__device__ __forceinline__ BackwardInputs<Cell, A> load_backward_unit(const BackwardStep<T, A>& s,
                                                                      int64_t i, int64_t j) {
  const int64_t H = s.H;
  BackwardInputs<Cell, A> in;
#pragma unroll
  for (int k = 0; k < Cell::kSaved; ++k)
    in.kept[k] = static_cast<A>(s.saved[i * s.ld_saved + k * H + j]);
  in.grad_out = s.grad_out != nullptr ? static_cast<A>(s.grad_out[i * s.ld_grad_out + j]) : A(0);
  in.keep = s.keep != nullptr ? static_cast<A>(s.keep[i * s.ld_grad_out + j]) : A(0);
  in.h_prev = Cell::kUsesPrevH ? static_cast<A>(s.h_prev[i * s.ld_h_prev + j]) : A(0);
  in.dc = Cell::kCellState ? s.dc[i * H + j] : A(0);
  return in;
}

// The cell's backward at row i, hidden unit j, from its inputs and dL/dh_t without the output
// gradient; dg receives the hidden-side gate gradients as written (the next step's product
// reads them).
template <class Cell, class T, class A>
__device__ __forceinline__ void finish_backward_unit(const BackwardStep<T, A>& s, int64_t i,
                                                     int64_t j, const BackwardInputs<Cell, A>& in,
                                                     A g, A (&dg)[Cell::kGates]) {
  const int64_t H = s.H, GH = Cell::kGates * H;
  A gx[Cell::kGates], gh[Cell::kGates];
  if (s.grad_out != nullptr) g += in.grad_out;
  // Zoneout: the kept share of dh goes straight to h_{t-1}, the rest through the cell.
  A dh_kept(0);
  if (s.keep != nullptr) {
    dh_kept = in.keep * g;
    g -= dh_kept;
  }
  A dh_prev(0), dc_prev(0);
  Cell::backward(g, in.dc, in.kept, in.h_prev, gx, gh, dh_prev, dc_prev);
#pragma unroll
  for (int k = 0; k < Cell::kGates; ++k) {
    s.dx[i * GH + k * H + j] = gx[k];
    if constexpr (Cell::kSplitGrads) s.dhh[i * GH + k * H + j] = gh[k];
    dg[k] = Cell::kSplitGrads ? gh[k] : gx[k];
    if (s.dg_rounded != nullptr) s.dg_rounded[i * GH + k * H + j] = static_cast<T>(dg[k]);
  }
  if constexpr (Cell::kCellState) s.dc[i * H + j] = dc_prev;
  s.dh[i * s.ld_dh + j] = dh_prev + dh_kept;
}

// The cell's backward at row i, hidden unit j, given dL/dh_t without the output gradient.
template <class Cell, class T, class A>
__device__ __forceinline__ void backward_unit(const BackwardStep<T, A>& s, int64_t i, int64_t j,
                                              A g) {
  A dg[Cell::kGates];
  finish_backward_unit<Cell>(s, i, j, load_backward_unit<Cell>(s, i, j), g, dg);
}

// The standard path's pointwise kernels, one thread per (row, hidden unit) of a step; hg
// holds the step's hidden-side products [n, gates*H] from cuBLAS.
template <class Cell, class T, class A>
__global__ void forward_step_kernel(ForwardStep<T, A> s, const A* __restrict__ hg) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= s.n * s.H) return;
  const int64_t i = idx / s.H, j = idx % s.H, GH = Cell::kGates * s.H;
  A hh[Cell::kGates];
#pragma unroll
  for (int k = 0; k < Cell::kGates; ++k) hh[k] = hg[i * GH + k * s.H + j];
  forward_unit<Cell>(s, i, j, hh);
}

template <class Cell, class T, class A>
__global__ void backward_step_kernel(BackwardStep<T, A> s) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= s.n * s.H) return;
  const int64_t i = idx / s.H, j = idx % s.H;
  backward_unit<Cell>(s, i, j, s.dh[i * s.ld_dh + j]);
}

// out[e] = state[e] (+ grad_out[e] when given), over the count elements of a step's rows.
template <class T, class A>
__global__ void add_rows_kernel(int64_t count, const T* __restrict__ grad_out,
                                const A* __restrict__ state, T* __restrict__ out) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= count) return;
  A v = state[idx];
  if (grad_out != nullptr) v += static_cast<A>(grad_out[idx]);
  out[idx] = static_cast<T>(v);
}

}  // namespace rnn_fused::cuda

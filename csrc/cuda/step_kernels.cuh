// The fused pointwise kernels of the CUDA recurrence: one thread per (row, hidden unit) of a
// step, the cell math of cell_math.h in the accumulation type A (float for half types).
#pragma once

#include <cstdint>

#include "../cell_math.h"

namespace rnn_fused::cuda {

constexpr int kThreads = 256;

inline int blocks_for(int64_t elements) {
  return static_cast<int>((elements + kThreads - 1) / kThreads);
}

// Forward of one step over rows [0, n). xg / hg: input- and hidden-side pre-activations of
// the step's rows (without bias), [n, gates*H]. c: the cell state [n, H], c_{t-1} in, c_t
// out. saved (nullable): the step's rows of the backward's values. h: where h_t goes
// (output rows, or the unprojected h). h_state (nullable) and the first n_next rows of
// h_next (the next step's starting rows in training) receive h_t as well; all three share
// the row stride ld_state. h_prev may be h_state: each thread reads its element first.
template <class Cell, class T, class A>
__global__ void forward_step_kernel(int64_t n, int64_t H, const A* __restrict__ xg,
                                    const A* __restrict__ hg, const T* __restrict__ b_ih,
                                    const T* __restrict__ b_hh, const T* h_prev, int64_t ld_h_prev,
                                    A* __restrict__ c, T* __restrict__ saved, int64_t ld_saved,
                                    T* __restrict__ h, int64_t ld_h, T* h_state,
                                    T* __restrict__ h_next, int64_t n_next, int64_t ld_state) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= n * H) return;
  const int64_t i = idx / H, j = idx % H, GH = Cell::kGates * H;
  A x[Cell::kGates], hh[Cell::kGates], kept[Cell::kSaved];
#pragma unroll
  for (int k = 0; k < Cell::kGates; ++k) {
    x[k] = xg[i * GH + k * H + j];
    hh[k] = hg[i * GH + k * H + j];
    if (b_ih != nullptr) {
      x[k] += static_cast<A>(b_ih[k * H + j]);
      hh[k] += static_cast<A>(b_hh[k * H + j]);
    }
  }
  A hp(0), cp(0), h_new(0), c_new(0);
  if constexpr (Cell::kUsesPrevH) hp = static_cast<A>(h_prev[i * ld_h_prev + j]);
  if constexpr (Cell::kCellState) cp = c[i * H + j];
  Cell::forward(x, hh, hp, cp, h_new, c_new, kept);
  if (saved != nullptr) {
#pragma unroll
    for (int k = 0; k < Cell::kSaved; ++k)
      saved[i * ld_saved + k * H + j] = static_cast<T>(kept[k]);
  }
  if constexpr (Cell::kCellState) c[i * H + j] = c_new;
  const T h_out = static_cast<T>(h_new);
  h[i * ld_h + j] = h_out;
  if (h_state != nullptr) h_state[i * ld_state + j] = h_out;
  if (i < n_next) h_next[i * ld_state + j] = h_out;
}

// Backward of one step over rows [0, n). dh (+ grad_out when given) is dL/dh_t;
// dc: dL/dc_t in, dL/dc_{t-1} out; dx / dhh: gate gradients out (dhh for kSplitGrads);
// dh then receives the part of dL/dh_{t-1} that bypasses W_hh (kUsesPrevH).
template <class Cell, class T, class A>
__global__ void backward_step_kernel(int64_t n, int64_t H, A* __restrict__ dh, int64_t ld_dh,
                                     const T* __restrict__ grad_out, int64_t ld_grad_out,
                                     A* __restrict__ dc, const T* __restrict__ saved,
                                     int64_t ld_saved, const T* __restrict__ h_prev,
                                     int64_t ld_h_prev, T* __restrict__ dx, T* __restrict__ dhh) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= n * H) return;
  const int64_t i = idx / H, j = idx % H, GH = Cell::kGates * H;
  A kept[Cell::kSaved], gx[Cell::kGates], gh[Cell::kGates];
#pragma unroll
  for (int k = 0; k < Cell::kSaved; ++k) kept[k] = static_cast<A>(saved[i * ld_saved + k * H + j]);
  A g = dh[i * ld_dh + j];
  if (grad_out != nullptr) g += static_cast<A>(grad_out[i * ld_grad_out + j]);
  A hp(0), dct(0), dh_prev(0), dc_prev(0);
  if constexpr (Cell::kUsesPrevH) hp = static_cast<A>(h_prev[i * ld_h_prev + j]);
  if constexpr (Cell::kCellState) dct = dc[i * H + j];
  Cell::backward(g, dct, kept, hp, gx, gh, dh_prev, dc_prev);
#pragma unroll
  for (int k = 0; k < Cell::kGates; ++k) {
    dx[i * GH + k * H + j] = static_cast<T>(gx[k]);
    if constexpr (Cell::kSplitGrads) dhh[i * GH + k * H + j] = static_cast<T>(gh[k]);
  }
  if constexpr (Cell::kCellState) dc[i * H + j] = dc_prev;
  if constexpr (Cell::kUsesPrevH) dh[i * ld_dh + j] = dh_prev;
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

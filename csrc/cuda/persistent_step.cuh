// Persistent kernels: one launch runs every step of a layer's recurrence, forward or
// backward, so that a step costs a grid barrier (about 1 us) instead of a launch (3-4 us).
//
// Block b owns hidden units [8 b, 8 b + 8) for the whole sequence and keeps the rows of W_hh
// it multiplies with in shared memory, converted to A once at the start ("resident"):
//   forward  Y[c][k] = W_hh[(gate c / 8) * H + unit c % 8][k], K = H (the gates of 8 units);
//   backward Y[c][k] = W_hh[k][unit c],                         K = gates * H (8 columns).
// Each step, the block walks the step's rows in tiles of kRows, stages the tile's X (h_{t-1},
// or the gate gradients of the step processed before) in chunks of K as the fused kernels do
// (fused_step.cuh: same lane layout, same fixed-order warp reduction, no atomics), and
// applies the cell to its units. A step's X is written by every block during the step
// before, so steps are separated by a grid barrier: the launch is cooperative (all blocks
// co-resident, which the device checks before choosing this path).
//
// The steps' arguments (pointers into the workspaces, row counts) are the same ForwardStep /
// BackwardStep records the other paths launch with, built by the engine's host loop and
// passed as one array.
//
// Written in the subset of CUDA that tests/emulation runs on the CPU: dynamic shared memory
// and the grid barrier come from persistent::shared_memory and persistent::grid_barrier,
// which the emulation provides for itself.
#pragma once

#include <cstdint>

#include "fused_step.cuh"

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

namespace rnn_fused::cuda {

namespace persistent {

constexpr int kUnits = 8;  // hidden units per block: LC lanes of the block shape

#if defined(__CUDACC__)
template <class A>
__device__ __forceinline__ A* shared_memory() {
  extern __shared__ __align__(16) unsigned char persistent_shared[];
  return reinterpret_cast<A*>(persistent_shared);
}
__device__ __forceinline__ void grid_barrier() { cooperative_groups::this_grid().sync(); }
#endif

// Block shapes: fused::ForwardShape's lanes (4 rows x 8 units) with kGates gates per unit
// (forward) or one column per unit (backward), kRows rows per tile.
template <int kGates, int kRows>
using Shape = fused::ForwardShape<kGates, kRows>;
template <class A>
using Chunk = fused::Chunk<A, 16>;

// The shared memory of a block, in values of A: a staging area for X's chunks (reused by
// the warp reduction), then the resident Y, rows of stride resident_stride(K) (K rounded up
// to whole chunks, zero past K, plus 4 to shift rows across banks).
template <class A>
RF_HD int64_t resident_stride(int64_t K) {
  using C = Chunk<A>;
  return (K + C::kLen - 1) / C::kLen * C::kLen + 4;
}
template <class A, class S>
RF_HD constexpr int64_t staging_values() {
  constexpr int64_t stage = S::BM * Chunk<A>::kStride;
  constexpr int64_t reduce = fused::kWarps / 2 * 32 * S::TM * S::TC;
  return stage > reduce ? stage : reduce;
}
template <class A, class S>
inline int64_t shared_bytes(int64_t K) {
  return (staging_values<A, S>() + S::BC * resident_stride<A>(K)) * int64_t(sizeof(A));
}
// Blocks of a launch: one per 8 hidden units.
inline int64_t blocks(int64_t H) { return (H + kUnits - 1) / kUnits; }

// Fills the resident Y ([BC][stride], value(c, k), 0 from K on) with the block's threads.
template <class A, class S, class Value>
__device__ __forceinline__ void load_resident(A* ys, int64_t stride, int64_t K,
                                              const Value& value) {
  for (int64_t e = threadIdx.x; e < S::BC * stride; e += fused::kBlock) {
    const int c = static_cast<int>(e / stride);
    const int64_t k = e % stride;
    ys[e] = k < K ? value(c, k) : A(0);
  }
}

// The block's tile of X Y^T over [0, K) with Y resident, summed over the warps into stage
// as [TM * TC][32 lanes] (fused::reduce_warps). x_at(m, k): X's element (0 past the edges).
template <class A, class S, class XAt>
__device__ __forceinline__ void resident_product(int64_t K, const XAt& x_at, const A* ys,
                                                 int64_t ys_stride, A* stage) {
  using C = Chunk<A>;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  A acc[S::TM][S::TC] = {};
  fused::Stager<A, C, S::BM, false> x_stage;
  const auto fetch = [&](int64_t k0) {
    x_stage.fetch(tid, [&](int m, int kk) { return x_at(m, k0 + kk); });
  };
  if (K > 0) fetch(0);
  for (int64_t k0 = 0; k0 < K; k0 += C::kLen) {
    __syncthreads();  // the previous chunk (or the previous tile's sums) is no longer read
    x_stage.store(tid, stage);
    __syncthreads();
    if (k0 + C::kLen < K) fetch(k0 + C::kLen);
    fused::accumulate<A, C, S::TM, S::TC, S::LM, S::LC>(stage, ys + k0, static_cast<int>(ys_stride),
                                                        lane / S::LC, lane % S::LC, warp * C::kSub,
                                                        acc);
  }
  fused::reduce_warps<A, S::TM, S::TC>(stage, warp, lane, acc);
}

}  // namespace persistent

// Every forward step of a layer (steps[0, count), in processing order) over one launch of
// persistent::blocks(H) blocks of fused::kBlock threads, cooperative, with
// shared_bytes<A, Shape<gates, kRows>>(H) of dynamic shared memory. kRows: 8 or 32, as
// fused::with_forward_rows chooses for the largest step.
template <class Cell, class T, class A, int kRows>
__global__ void __launch_bounds__(fused::kBlock)
    persistent_forward_kernel(const ForwardStep<T, A>* __restrict__ steps, int64_t count,
                              const T* __restrict__ w_hh, int64_t H) {
  using S = persistent::Shape<Cell::kGates, kRows>;
  A* stage = persistent::shared_memory<A>();
  A* ys = stage + persistent::staging_values<A, S>();
  const int64_t stride = persistent::resident_stride<A>(H);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t u0 = int64_t(blockIdx.x) * S::BU;
  persistent::load_resident<A, S>(ys, stride, H, [&](int c, int64_t k) {
    const int64_t u = u0 + c % S::BU;
    return u < H ? static_cast<A>(w_hh[((c / S::BU) * H + u) * H + k]) : A(0);
  });
  for (int64_t q = 0; q < count; ++q) {
    const ForwardStep<T, A> s = steps[q];
    for (int64_t row0 = 0; row0 < s.n; row0 += S::BM) {
      persistent::resident_product<A, S>(
          H,
          [&](int m, int64_t k) {
            const int64_t i = row0 + m;
            return i < s.n && k < H ? static_cast<A>(s.h_prev[i * s.ld_h_prev + k]) : A(0);
          },
          ys, stride, stage);
      // Thread (warp r < TM, lane): row r * LM + lm and unit lc of the tile, every gate.
      const int64_t i = row0 + warp * S::LM + lane / S::LC, j = u0 + lane % S::LC;
      if (warp < S::TM && i < s.n && j < H) {
        A hh[Cell::kGates];
#pragma unroll
        for (int g = 0; g < Cell::kGates; ++g) hh[g] = stage[(warp * S::TC + g) * 32 + lane];
        forward_unit<Cell>(s, i, j, hh);
      }
    }
    persistent::grid_barrier();  // step q's h_t, which every block reads next, is written
  }
}

// Every backward step of a layer (steps[0, count): the fused path's steps in processing
// order, then the record that finishes the last product) over one cooperative launch of
// persistent::blocks(H) blocks, shared_bytes<A, Shape<1, kRows>>(gates * H) bytes each.
template <class Cell, class T, class A, int kRows>
__global__ void __launch_bounds__(fused::kBlock)
    persistent_backward_kernel(const FusedBackwardStep<T, A>* __restrict__ steps, int64_t count,
                               const T* __restrict__ w_hh, int64_t H) {
  using S = persistent::Shape<1, kRows>;
  const int64_t K = Cell::kGates * H;
  A* stage = persistent::shared_memory<A>();
  A* ys = stage + persistent::staging_values<A, S>();
  const int64_t stride = persistent::resident_stride<A>(K);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t u0 = int64_t(blockIdx.x) * S::BU;
  persistent::load_resident<A, S>(ys, stride, K, [&](int c, int64_t k) {
    const int64_t u = u0 + c;
    return u < H ? static_cast<A>(w_hh[k * H + u]) : A(0);
  });
  for (int64_t q = 0; q < count; ++q) {
    const FusedBackwardStep<T, A> rec = steps[q];
    const BackwardStep<T, A>& s = rec.step;
    const int64_t rows = s.n > rec.rows_gemm ? s.n : rec.rows_gemm;
    for (int64_t row0 = 0; row0 < rows; row0 += S::BM) {
      persistent::resident_product<A, S>(
          row0 < rec.rows_gemm ? K : 0,
          [&](int m, int64_t k) {
            const int64_t i = row0 + m;
            return i < rec.rows_gemm && k < K ? rec.dg_next[i * K + k] : A(0);
          },
          ys, stride, stage);
      // Thread (warp r < TM, lane): row r * LM + lm and unit lc of the tile.
      const int64_t i = row0 + warp * S::LM + lane / S::LC, j = u0 + lane % S::LC;
      if (warp < S::TM && i < rows && j < H) {
        const A total = stage[warp * 32 + lane] + s.dh[i * s.ld_dh + j];
        if (i < s.n) {
          backward_unit<Cell>(s, i, j, total);
        } else {  // a row with no step here: its sum is final
          s.dh[i * s.ld_dh + j] = total;
        }
      }
    }
    persistent::grid_barrier();  // step q's gate gradients, the next product's X, are written
  }
}

}  // namespace rnn_fused::cuda

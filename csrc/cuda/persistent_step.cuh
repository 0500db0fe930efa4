// Persistent kernels: one launch runs every step of a layer's recurrence, forward or
// backward, so that a step costs a barrier (about 1 us for a grid, 0.5 us for a cluster)
// instead of a launch (3-4 us).
//
// Block b owns hidden units [8 b, 8 b + 8) for the whole sequence and keeps the rows of W_hh
// it multiplies with in shared memory, converted to A once at the start ("resident"):
//   forward  Y[c][k] = W_hh[(gate c / 8) * H + unit c % 8][k], K = H (the gates of 8 units);
//   backward Y[c][k] = W_hh[k][unit c],                         K = gates * H (8 columns).
// Each step, the block walks the step's rows in tiles of kRows and applies the cell to its
// units; the product's lane layout and fixed-order warp reduction are the fused kernels'
// (fused_step.cuh; no atomics). A step's X (h_{t-1}, or the hidden-side gate gradients of
// the step processed before) is written by every block during the step before, so steps
// are separated by a barrier over all blocks, in one of two variants:
//   grid     (cooperative launch: all blocks co-resident): X is read from global memory,
//            staged in chunks of K as the fused kernels do; a grid barrier between steps.
//   cluster  (the layer's blocks form one thread-block cluster, sm_90): every block keeps
//            all of X in its shared memory, two buffers used in turn; a block writes its
//            units' part of the next X into every block's buffer (distributed shared
//            memory), and a cluster barrier separates the steps. No global round trip.
//
// The steps' arguments (pointers into the workspaces, row counts) are the ForwardStep /
// FusedBackwardStep records the fused path launches with, built by the engine's host loop
// and passed as one array.
//
// Written in the subset of CUDA that tests/emulation runs on the CPU: dynamic shared memory,
// another block's shared memory and the barriers come from persistent::shared_memory,
// shared_memory_of, grid_barrier and cluster_barrier, which the emulation provides itself.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fused_step.cuh"

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#endif

namespace rnn_fused::cuda {

namespace persistent {

constexpr int kUnits = 8;            // hidden units per block: LC lanes of the block shape
constexpr int64_t kMaxCluster = 16;  // blocks of the largest (non-portable) cluster on sm_90

#if defined(__CUDACC__)
template <class A>
__device__ __forceinline__ A* shared_memory() {
  extern __shared__ __align__(16) unsigned char persistent_shared[];
  return reinterpret_cast<A*>(persistent_shared);
}
__device__ __forceinline__ void grid_barrier() { cooperative_groups::this_grid().sync(); }
// The cluster's block `rank`'s dynamic shared memory, and the cluster barrier (sm_90 on;
// the host launches the cluster variant only on such devices).
template <class A>
__device__ __forceinline__ A* shared_memory_of(int rank) {
#if __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(shared_memory<A>(), rank);
#else
  __trap();
  return nullptr;
#endif
}
__device__ __forceinline__ void cluster_barrier() {
#if __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}
#endif

// Block shapes: fused::ForwardShape's lanes (4 rows x 8 units) with kGates gates per unit
// (forward) or one column per unit (backward), kRows rows per tile.
template <int kGates, int kRows>
using Shape = fused::ForwardShape<kGates, kRows>;
template <class A>
using Chunk = fused::Chunk<A, 16>;

// A block's shared memory, in values of A: a staging area for X's chunks (grid variant) and
// the warp reduction; the resident Y, rows of `stride` values (K rounded up to whole chunks,
// zero past K, plus 4 to shift rows across banks); the cluster variant's two X buffers of
// x_rows rows (the largest step's rows, rounded up to a tile) at the same stride.
template <class A, class S>
struct Layout {
  int64_t stride, resident, exchange, x_rows, total;
  RF_HD Layout(int64_t K, int64_t rows, bool cluster) {
    using C = Chunk<A>;
    constexpr int64_t stage = S::BM * C::kStride, reduce = fused::kWarps / 2 * 32 * S::TM * S::TC;
    stride = (K + C::kLen - 1) / C::kLen * C::kLen + 4;
    resident = stage > reduce ? stage : reduce;
    exchange = resident + S::BC * stride;
    x_rows = cluster ? (rows + S::BM - 1) / S::BM * S::BM : 0;
    total = exchange + 2 * x_rows * stride;
  }
  RF_HD A* x_buffer(A* smem, int64_t q) const { return smem + exchange + q % 2 * x_rows * stride; }
};
// Blocks of a launch: one per 8 hidden units.
RF_HD int64_t blocks(int64_t H) { return (H + kUnits - 1) / kUnits; }

// Fills count values from `at` with the block's threads: value(e).
template <class A, class Value>
__device__ __forceinline__ void fill(A* at, int64_t count, const Value& value) {
  for (int64_t e = threadIdx.x; e < count; e += fused::kBlock) at[e] = value(e);
}

// The block's tile of X Y^T over [0, K) with Y resident, summed over the warps into stage
// as [TM * TC][32 lanes] (fused::reduce_warps). Grid variant: x_at(m, k) gives X's element
// (0 past the edges), staged chunk by chunk.
template <class A, class S, class XAt>
__device__ __forceinline__ void staged_product(int64_t K, const XAt& x_at, const A* ys,
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
    fused::accumulate<A, C, S::TM, S::TC, S::LM, S::LC>(stage, C::kStride, ys + k0,
                                                        static_cast<int>(ys_stride), lane / S::LC,
                                                        lane % S::LC, warp * C::kSub, acc);
  }
  fused::reduce_warps<A, S::TM, S::TC>(stage, warp, lane, acc);
}

// The same with X's tile in shared memory already (cluster variant): xs [BM][stride], zero
// past K.
template <class A, class S>
__device__ __forceinline__ void local_product(int64_t K, const A* xs, const A* ys, int64_t stride,
                                              A* stage) {
  using C = Chunk<A>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A acc[S::TM][S::TC] = {};
  __syncthreads();  // rows this block wrote into xs are complete
  for (int64_t k0 = 0; k0 < K; k0 += C::kLen) {
    fused::accumulate<A, C, S::TM, S::TC, S::LM, S::LC>(xs + k0, static_cast<int>(stride), ys + k0,
                                                        static_cast<int>(stride), lane / S::LC,
                                                        lane % S::LC, warp * C::kSub, acc);
  }
  fused::reduce_warps<A, S::TM, S::TC>(stage, warp, lane, acc);
}

// The block's start after loading its resident Y. Cluster variant: X's buffers zeroed (so
// that their padding past K reads as zero), then a cluster barrier, so that every block runs
// and has cleared its buffers before any block writes into them.
template <bool kCluster, class A, class S>
__device__ __forceinline__ void start_block(A* smem, const Layout<A, S>& L) {
  if constexpr (kCluster) {
    fill(L.x_buffer(smem, 0), 2 * L.x_rows * L.stride, [](int64_t) { return A(0); });
    cluster_barrier();
  }
}

// Brings a step's record into the SM's L1 before the barrier that precedes the step, so that
// reading it after the barrier does not wait for L2 (no-op in the emulation).
template <class Step>
__device__ __forceinline__ void prefetch(const Step* record) {
#if defined(__CUDA_ARCH__)
  const size_t at = threadIdx.x * size_t(32);  // a 32-byte sector per thread of the first warp
  if (at < sizeof(Step)) {
    asm volatile("prefetch.global.L1 [%0];" ::"l"(reinterpret_cast<const char*>(record) + at));
  }
#endif
}

template <bool kCluster>
__device__ __forceinline__ void step_barrier() {
  if constexpr (kCluster) {
    cluster_barrier();
  } else {
    grid_barrier();
  }
}

}  // namespace persistent

// Every forward step of a layer (steps[0, count), in processing order) over one launch of
// persistent::blocks(H) blocks of fused::kBlock threads, with Layout(H, rows,
// kCluster).total values of A of dynamic shared memory: cooperative (kCluster false), or as
// one cluster. kRows: 4, 8 or 32, as fused::with_forward_rows chooses for rows, the
// largest step's.
template <class Cell, class T, class A, int kRows, bool kCluster>
__global__ void __launch_bounds__(fused::kBlock)
    persistent_forward_kernel(const ForwardStep<T, A>* __restrict__ steps, int64_t count,
                              const T* __restrict__ w_hh, int64_t H, int64_t rows) {
  using S = persistent::Shape<Cell::kGates, kRows>;
  const persistent::Layout<A, S> L(H, rows, kCluster);
  A* smem = persistent::shared_memory<A>();
  A* const stage = smem;
  A* const ys = smem + L.resident;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t u0 = int64_t(blockIdx.x) * S::BU, blocks = persistent::blocks(H);
  persistent::fill(ys, S::BC * L.stride, [&](int64_t e) {
    const int c = static_cast<int>(e / L.stride);
    const int64_t k = e % L.stride, u = u0 + c % S::BU;
    return u < H && k < H ? static_cast<A>(w_hh[((c / S::BU) * H + u) * H + k]) : A(0);
  });
  persistent::start_block<kCluster>(smem, L);
  // What a step reads besides X does not wait for the other blocks: its record, and the unit
  // inputs of its first tile (the thread's own c and h elements, which the thread itself
  // wrote in the step before), are loaded before the barrier that precedes the step.
  const int64_t i_first = warp * S::LM + lane / S::LC, j = u0 + lane % S::LC;
  UnitInputs<Cell, A> first{};
  const auto load_first = [&](const ForwardStep<T, A>& s) {
    if (warp < S::TM && i_first < s.n && j < H) first = load_unit<Cell>(s, i_first, j);
  };
  if (count > 0) load_first(steps[0]);
  int64_t written = 0;  // cluster: the leading rows of this step's X that the step before wrote
  for (int64_t q = 0; q < count; ++q) {
    const ForwardStep<T, A> s = steps[q];
    A* const x = L.x_buffer(smem, q);
    if constexpr (kCluster) {  // rows that start at the state: from the workspace
      if (written < s.n) {
        __syncthreads();  // the block's reads of the rows it replaces are done
        persistent::fill(x + written * L.stride, (s.n - written) * L.stride, [&](int64_t e) {
          const int64_t i = written + e / L.stride, k = e % L.stride;
          return k < H ? static_cast<A>(s.h_prev[i * s.ld_h_prev + k]) : A(0);
        });
      }
    }
    for (int64_t row0 = 0; row0 < s.n; row0 += S::BM) {
      // Thread (warp r < TM, lane): row r * LM + lm and unit lc of the tile, every gate; its
      // inputs besides the product are loaded first, to arrive while the product runs.
      const int64_t i = row0 + i_first;
      const bool applies = warp < S::TM && i < s.n && j < H;
      UnitInputs<Cell, A> in = first;
      if (applies && row0 > 0) in = load_unit<Cell>(s, i, j);
      if constexpr (kCluster) {
        persistent::local_product<A, S>(H, x + row0 * L.stride, ys, L.stride, stage);
      } else {
        persistent::staged_product<A, S>(
            H,
            [&](int m, int64_t k) {
              const int64_t i = row0 + m;
              return i < s.n && k < H ? static_cast<A>(s.h_prev[i * s.ld_h_prev + k]) : A(0);
            },
            ys, L.stride, stage);
      }
      if (applies) {
        A hh[Cell::kGates];
#pragma unroll
        for (int g = 0; g < Cell::kGates; ++g) hh[g] = stage[(warp * S::TC + g) * 32 + lane];
        [[maybe_unused]] const A h = static_cast<A>(finish_unit<Cell>(s, i, j, in, hh));
        if constexpr (kCluster) {  // h_t into every block's next X
          const int64_t at = L.x_buffer(smem, q + 1) - smem + i * L.stride + j;
          for (int r = 0; r < blocks; ++r) persistent::shared_memory_of<A>(r)[at] = h;
        }
      }
    }
    if (q + 1 < count) {
      persistent::prefetch(steps + q + 1);
      load_first(steps[q + 1]);
    }
    written = s.n;
    persistent::step_barrier<kCluster>();  // step q's h_t, which every block reads next, is written
  }
}

// Every backward step of a layer (steps[0, count): the fused path's steps in processing
// order, then the record that finishes the last product) over one launch of
// persistent::blocks(H) blocks with Layout(gates * H, rows, kCluster).total values of A of
// dynamic shared memory, cooperative or as one cluster; rows: the largest of the records'
// step.n and rows_gemm.
template <class Cell, class T, class A, int kRows, bool kCluster>
__global__ void __launch_bounds__(fused::kBlock)
    persistent_backward_kernel(const FusedBackwardStep<T, A>* __restrict__ steps, int64_t count,
                               const T* __restrict__ w_hh, int64_t H, int64_t rows_max) {
  using S = persistent::Shape<1, kRows>;
  const int64_t K = Cell::kGates * H;
  const persistent::Layout<A, S> L(K, rows_max, kCluster);
  A* smem = persistent::shared_memory<A>();
  A* const stage = smem;
  A* const ys = smem + L.resident;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t u0 = int64_t(blockIdx.x) * S::BU, blocks = persistent::blocks(H);
  persistent::fill(ys, S::BC * L.stride, [&](int64_t e) {
    const int64_t c = e / L.stride, k = e % L.stride, u = u0 + c;
    return u < H && k < K ? static_cast<A>(w_hh[k * H + u]) : A(0);
  });
  persistent::start_block<kCluster>(smem, L);
  // As in the forward: the next record, and the first tile's carried dh and unit inputs (the
  // thread's own elements), are loaded before the barrier between steps.
  const int64_t i_first = warp * S::LM + lane / S::LC, j = u0 + lane % S::LC;
  A first_dh(0);
  BackwardInputs<Cell, A> first{};
  const auto load_first = [&](const FusedBackwardStep<T, A>& r) {
    if (warp >= S::TM || j >= H) return;
    if (i_first < r.rows()) first_dh = r.step.dh[i_first * r.step.ld_dh + j];
    if (i_first < r.step.n) first = load_backward_unit<Cell>(r.step, i_first, j);
  };
  if (count > 0) load_first(steps[0]);
  for (int64_t q = 0; q < count; ++q) {
    const FusedBackwardStep<T, A> rec = steps[q];
    const BackwardStep<T, A>& s = rec.step;
    const int64_t rows = rec.rows();
    for (int64_t row0 = 0; row0 < rows; row0 += S::BM) {
      const int64_t k_len = row0 < rec.rows_gemm ? K : 0;
      if constexpr (kCluster) {
        persistent::local_product<A, S>(k_len, L.x_buffer(smem, q) + row0 * L.stride, ys, L.stride,
                                        stage);
      } else {
        persistent::staged_product<A, S>(
            k_len,
            [&](int m, int64_t k) {
              const int64_t i = row0 + m;
              return i < rec.rows_gemm && k < K ? rec.dg_next[i * K + k] : A(0);
            },
            ys, L.stride, stage);
      }
      // Thread (warp r < TM, lane): row r * LM + lm and unit lc of the tile.
      const int64_t i = row0 + i_first;
      if (warp < S::TM && i < rows && j < H) {
        // Rows past rows_gemm have no product (the cluster's buffer rows there are stale).
        const A product = i < rec.rows_gemm ? stage[warp * 32 + lane] : A(0);
        const A total = product + (row0 == 0 ? first_dh : s.dh[i * s.ld_dh + j]);
        if (i < s.n) {
          A dg[Cell::kGates];
          finish_backward_unit<Cell>(s, i, j, row0 == 0 ? first : load_backward_unit<Cell>(s, i, j),
                                     total, dg);
          if constexpr (kCluster) {  // the hidden-side gate gradients, into every next X
            const int64_t at = L.x_buffer(smem, q + 1) - smem + i * L.stride + j;
            for (int g = 0; g < Cell::kGates; ++g) {
              for (int r = 0; r < blocks; ++r) {
                persistent::shared_memory_of<A>(r)[at + g * H] = dg[g];
              }
            }
          }
        } else {  // a row with no step here: its sum is final
          s.dh[i * s.ld_dh + j] = total;
        }
      }
    }
    if (q + 1 < count) {
      persistent::prefetch(steps + q + 1);
      load_first(steps[q + 1]);
    }
    persistent::step_barrier<kCluster>();  // step q's gate gradients, the next X, are written
  }
}

// A persistent launch as both devices (recurrence_cuda.cu, the emulation) make it: the
// kernel for the records' cell, types, rows and variant, its blocks and shared memory.
template <class Step, class T>
struct PersistentLaunch {
  void (*kernel)(const Step*, int64_t, const T*, int64_t, int64_t);
  int64_t blocks, shared_bytes, rows;
  bool cluster;  // launch as one cluster; else cooperative
};

// The forward's launch over steps; as a cluster if asked and the blocks fit one.
template <class Cell, class T, class A>
PersistentLaunch<ForwardStep<T, A>, T> persistent_forward_launch(
    const std::vector<ForwardStep<T, A>>& steps, int64_t H, bool cluster) {
  PersistentLaunch<ForwardStep<T, A>, T> l{nullptr, persistent::blocks(H), 0, 0, false};
  for (const auto& s : steps) l.rows = std::max(l.rows, s.n);
  l.cluster = cluster && l.blocks <= persistent::kMaxCluster;
  fused::with_forward_rows(l.rows, [&](auto r) {
    constexpr int kRows = decltype(r)::value;
    using S = persistent::Shape<Cell::kGates, kRows>;
    l.kernel = l.cluster ? persistent_forward_kernel<Cell, T, A, kRows, true>
                         : persistent_forward_kernel<Cell, T, A, kRows, false>;
    l.shared_bytes = persistent::Layout<A, S>(H, l.rows, l.cluster).total * int64_t(sizeof(A));
  });
  return l;
}

// The backward's launch over steps (the records of the fused path, its last product too).
template <class Cell, class T, class A>
PersistentLaunch<FusedBackwardStep<T, A>, T> persistent_backward_launch(
    const std::vector<FusedBackwardStep<T, A>>& steps, int64_t H, bool cluster) {
  PersistentLaunch<FusedBackwardStep<T, A>, T> l{nullptr, persistent::blocks(H), 0, 0, false};
  for (const auto& r : steps) l.rows = std::max(l.rows, r.rows());
  l.cluster = cluster && l.blocks <= persistent::kMaxCluster;
  fused::with_forward_rows(l.rows, [&](auto r) {
    constexpr int kRows = decltype(r)::value;
    using S = persistent::Shape<1, kRows>;
    l.kernel = l.cluster ? persistent_backward_kernel<Cell, T, A, kRows, true>
                         : persistent_backward_kernel<Cell, T, A, kRows, false>;
    l.shared_bytes =
        persistent::Layout<A, S>(Cell::kGates * H, l.rows, l.cluster).total * int64_t(sizeof(A));
  });
  return l;
}

}  // namespace rnn_fused::cuda

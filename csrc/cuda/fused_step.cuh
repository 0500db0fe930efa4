// Fused step kernels: a step's recurrent product and its cell math in one kernel, so that a
// step of a small batch costs one launch instead of a GEMM launch plus a pointwise launch.
//
// A block owns BM rows x BC columns of the step's product C = X Y^T, with X [rows, K] (the
// previous state, or the previous step's gate gradients) and Y [columns, K] (the matching
// rows of W_hh, or of its transpose), both staged in shared memory in chunks of K. The 8
// warps split every chunk's K range; each lane keeps a TM x TC tile of C in registers. The
// warps' partial tiles are then summed in a fixed order (no atomics: bitwise reproducible)
// and each of the 256 threads applies the cell to one (row, hidden unit) of the block.
//
// Forward: C = h_{t-1} W_hh^T; a block's columns are the G gates of BU hidden units, so a
// unit's gates meet in one lane. Backward: C = dG_{t+1} W_hh (the part of dL/dh_t that goes
// through W_hh); the block's columns are hidden units, and the cell's derivative follows.
//
// Written in the subset of CUDA that tests/emulation runs on the CPU: no warp intrinsics.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "step_kernels.cuh"

namespace rnn_fused::cuda {

namespace fused {

constexpr int kWarps = 8;
constexpr int kBlock = kWarps * 32;

// K per warp per staged chunk (kFloatSub for 4-byte values, half that for doubles, so that
// the staged tiles take the same bytes); a chunk covers kWarps of those. Rows of the staged
// tiles are kStride apart: a multiple of 4 values (16-byte loads stay aligned) that is 4
// banks off 32, so that the lanes' rows and columns fall into different banks.
template <class A, int kFloatSub>
struct Chunk {
  static constexpr int kSub = sizeof(A) == 8 ? kFloatSub / 2 : kFloatSub;
  static constexpr int kLen = kWarps * kSub;
  static constexpr int kStride = kLen + 4;
};

// The block shapes. Lanes: LM along rows x LC along columns; lane (lm, lc) holds rows
// r * LM + lm (r < TM) and columns c * LC + lc (c < TC). Forward blocks take 8 hidden units
// and 32 rows, or 16, 8 or 4 rows for steps of at most that many (less work on rows that
// are not there: at batch 1, 3 rows of 4 instead of 7 of 8; at batch 16, none of 32's 16;
// the persistent kernels at B=16 spent most of a step issuing the product's instructions,
// by the first GPU run's ncu profile).
template <int kGates, int kRows>
struct ForwardShape {
  static constexpr int LM = 4, LC = 8, TM = kRows / LM, TC = kGates, kFloatSub = 16;
  static constexpr int BM = LM * TM, BU = LC, BC = TC * LC;
  static_assert(TM <= kWarps, "one epilogue row per warp of threads");
};
// Calls f with std::integral_constant<int, rows>: the forward block's rows for a step of n.
template <class F>
void with_forward_rows(int64_t n, F&& f) {
  if (n <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (n <= 8) {
    f(std::integral_constant<int, 8>{});
  } else if (n <= 16) {
    f(std::integral_constant<int, 16>{});
  } else {
    f(std::integral_constant<int, 32>{});
  }
}

// Backward blocks: 8 rows x 32 units over K = gates * H, with longer chunks of K (each
// chunk's compute is short here, so fewer round trips to global memory pay).
struct BackwardShape {
  static constexpr int LM = 4, LC = 8, TM = 2, TC = 4, kFloatSub = 32;
  static constexpr int BM = LM * TM, BC = TC * LC;  // 8 rows, 32 units
};

// The launch geometry of the fused kernels, computed here only: the GPU's launches and the
// emulation's (tests/emulation) both ask for it, so the tests run the grid that runs.
struct Grid {
  int64_t x, y;  // blocks along hidden units, along rows; kBlock threads each
};
inline int64_t blocks_of(int64_t count, int64_t per_block) {
  return (count + per_block - 1) / per_block;
}
// A forward step of n rows: kRows as with_forward_rows chooses for n.
template <int kGates, int kRows>
Grid forward_grid(int64_t n, int64_t H) {
  using Shape = ForwardShape<kGates, kRows>;
  return {blocks_of(H, Shape::BU), blocks_of(n, Shape::BM)};
}
// A backward step of n rows whose kernel also takes the product over rows_gemm rows.
inline Grid backward_grid(int64_t n, int64_t rows_gemm, int64_t H) {
  return {blocks_of(H, BackwardShape::BC), blocks_of(std::max(n, rows_gemm), BackwardShape::BM)};
}

// Four consecutive values of a staged row: one 16-byte shared-memory load per 16 bytes.
template <class A>
__device__ __forceinline__ void load4(const A* p, A (&v)[4]) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(A) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const double2 a = *reinterpret_cast<const double2*>(p);
    const double2 b = *reinterpret_cast<const double2*>(p + 2);
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  }
#else
  for (int q = 0; q < 4; ++q) v[q] = p[q];
#endif
}

// acc += X Y^T over this warp's share [k0, k0 + kSub) of a chunk. xs: [BM][xs_stride],
// ys: [BC][ys_stride], both indexed from the chunk's first K (strides kStride for staged
// chunks; the persistent kernels keep longer rows in shared memory).
template <class A, class C, int TM, int TC, int LM, int LC>
__device__ __forceinline__ void accumulate(const A* xs, int xs_stride, const A* ys, int ys_stride,
                                           int lm, int lc, int k0, A (&acc)[TM][TC]) {
  for (int k = k0; k < k0 + C::kSub; k += 4) {
    A xv[TM][4], yv[TC][4];
#pragma unroll
    for (int r = 0; r < TM; ++r) load4(xs + (r * LM + lm) * xs_stride + k, xv[r]);
#pragma unroll
    for (int c = 0; c < TC; ++c) load4(ys + (c * LC + lc) * ys_stride + k, yv[c]);
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int c = 0; c < TC; ++c) acc[r][c] += xv[r][q] * yv[c][q];
  }
}

// One thread's share of a staged [Rows][kLen] tile, fetched from global memory a chunk ahead
// (into registers, so that chunk c + 1's loads are in flight while chunk c is computed) and
// then stored to shared memory. Consecutive threads take consecutive K (kRowsFast false), or
// (true: for sources whose rows are adjacent in memory, like W_hh's columns) a warp takes 8
// consecutive rows at 4 consecutive K: its loads are 4 runs of 8 adjacent values (the 32-byte
// sectors of one run of 32), and its 4-byte stores fall in 32 different banks, since rows
// kStride apart are 4 banks apart (32 rows at one K would hit 8 banks 4 times each).
template <class A, class C, int Rows, bool kRowsFast>
struct Stager {
  static constexpr int kLen = C::kLen, kPer = Rows * kLen / kBlock;
  static_assert(Rows * kLen % kBlock == 0, "a tile splits evenly over the block");
  static_assert(!kRowsFast || (Rows % 8 == 0 && kLen % 4 == 0), "8 x 4 patches per warp");
  A v[kPer];

  __device__ __forceinline__ static void coords(int e, int& r, int& kk) {
    if constexpr (kRowsFast) {  // patch p = e / 32 of 8 rows x 4 K, lane e % 32 within it
      constexpr int kRowPatches = Rows / 8;
      const int p = e / 32, lane = e % 32;
      r = p % kRowPatches * 8 + lane % 8;
      kk = p / kRowPatches * 4 + lane / 8;
    } else {
      r = e / kLen;
      kk = e % kLen;
    }
  }
  // value(r, kk): the element at row r and K offset kk of the chunk (0 past the edges).
  template <class Value>
  __device__ __forceinline__ void fetch(int tid, const Value& value) {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      int r, kk;
      coords(tid + q * kBlock, r, kk);
      v[q] = value(r, kk);
    }
  }
  __device__ __forceinline__ void store(int tid, A* tile) const {
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      int r, kk;
      coords(tid + q * kBlock, r, kk);
      tile[r * C::kStride + kk] = v[q];
    }
  }
};

// Sums the warps' tiles into smem as [TM * TC][32 lanes], warp 1's tile added to warp 0's,
// after warps 4..7 into 0..3 and 2..3 into 0..1: the same order in every run.
template <class A, int TM, int TC>
__device__ __forceinline__ void reduce_warps(A* smem, int warp, int lane, A (&acc)[TM][TC]) {
  constexpr int kTile = TM * TC;
  for (int width = kWarps / 2; width >= 1; width /= 2) {  // warps w + width into w
    __syncthreads();
    if (warp >= width && warp < 2 * width) {
#pragma unroll
      for (int e = 0; e < kTile; ++e)
        smem[(e * width + (warp - width)) * 32 + lane] = acc[e / TC][e % TC];
    }
    __syncthreads();
    if (warp < width) {
#pragma unroll
      for (int e = 0; e < kTile; ++e) acc[e / TC][e % TC] += smem[(e * width + warp) * 32 + lane];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int e = 0; e < kTile; ++e) smem[e * 32 + lane] = acc[e / TC][e % TC];
  }
  __syncthreads();
}

// The block's tile of X Y^T over [0, K), summed over the warps into smem as
// [TM * TC][32 lanes] (reduce_warps). x_at(m, k) and y_at(c, k) give the block's elements
// (0 past the edges); smem holds (BM + BC) * kStride values.
template <class A, class Shape, bool kYRowsFast, class XAt, class YAt>
__device__ __forceinline__ void block_product(int64_t K, const XAt& x_at, const YAt& y_at,
                                              A* smem) {
  using C = Chunk<A, Shape::kFloatSub>;
  static_assert(kWarps / 2 * 32 * Shape::TM * Shape::TC <= (Shape::BM + Shape::BC) * C::kStride,
                "the warps' partial tiles fit in the staging space");
  A* xs = smem;
  A* ys = smem + Shape::BM * C::kStride;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  A acc[Shape::TM][Shape::TC] = {};
  Stager<A, C, Shape::BM, false> x_stage;
  Stager<A, C, Shape::BC, kYRowsFast> y_stage;
  const auto fetch = [&](int64_t k0) {
    x_stage.fetch(tid, [&](int m, int kk) { return x_at(m, k0 + kk); });
    y_stage.fetch(tid, [&](int c, int kk) { return y_at(c, k0 + kk); });
  };
  if (K > 0) fetch(0);
  for (int64_t k0 = 0; k0 < K; k0 += C::kLen) {
    __syncthreads();  // the previous chunk is no longer read
    x_stage.store(tid, xs);
    y_stage.store(tid, ys);
    __syncthreads();
    if (k0 + C::kLen < K) fetch(k0 + C::kLen);
    accumulate<A, C, Shape::TM, Shape::TC, Shape::LM, Shape::LC>(
        xs, C::kStride, ys, C::kStride, lane / Shape::LC, lane % Shape::LC, warp * C::kSub, acc);
  }
  reduce_warps<A, Shape::TM, Shape::TC>(smem, warp, lane, acc);
}

}  // namespace fused

// Forward of one step over rows [0, s.n), the hidden-side product included: the block
// (blockIdx.x, blockIdx.y) computes units [8 x, 8 x + 8) of rows [kRows y, kRows (y + 1)).
// s.h_prev ([n, H], row stride s.ld_h_prev) is the product's X; w_hh [G*H, H].
template <class Cell, class T, class A, int kRows>
__global__ void __launch_bounds__(fused::kBlock)
    fused_forward_step_kernel(ForwardStep<T, A> s, const T* __restrict__ w_hh) {
  using Shape = fused::ForwardShape<Cell::kGates, kRows>;
  using C = fused::Chunk<A, Shape::kFloatSub>;
  constexpr int BM = Shape::BM, BU = Shape::BU, BC = Shape::BC;
  __shared__ __align__(16) A smem[(BM + BC) * C::kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, lm = lane / Shape::LC,
            lc = lane % Shape::LC;
  const int64_t H = s.H, K = s.H, row0 = int64_t(blockIdx.y) * BM, u0 = int64_t(blockIdx.x) * BU;
  // Thread (warp r < TM, lane): row r * LM + lm and unit lc of the block, every gate; its
  // inputs besides the product are loaded first, to arrive while the product runs.
  const int64_t i = row0 + warp * Shape::LM + lm, j = u0 + lc;
  const bool applies = warp < Shape::TM && i < s.n && j < H;
  UnitInputs<Cell, A> in{};
  if (applies) in = load_unit<Cell>(s, i, j);
  fused::block_product<A, Shape, false>(
      K,
      [&](int m, int64_t k) {
        const int64_t i = row0 + m;
        return i < s.n && k < K ? static_cast<A>(s.h_prev[i * s.ld_h_prev + k]) : A(0);
      },
      [&](int c, int64_t k) {  // column c: gate c / BU of unit u0 + c % BU
        const int64_t u = u0 + c % BU;
        return u < H && k < K ? static_cast<A>(w_hh[((c / BU) * H + u) * K + k]) : A(0);
      },
      smem);

  if (!applies) return;
  A hh[Cell::kGates];
#pragma unroll
  for (int g = 0; g < Cell::kGates; ++g) hh[g] = smem[(warp * Shape::TC + g) * 32 + lane];
  finish_unit<Cell>(s, i, j, in, hh);
}

// Backward of one step (rows [0, s.n)) together with the product of the step processed
// before it: dh_t = dG_{t+1} W_hh over rows [0, rows_gemm) (dg_next [rows_gemm, G*H], the
// previous step's hidden-side gate gradients), plus what s.dh carries (grad_h_n, or the
// part of dL/dh_t that bypasses W_hh). Rows in [s.n, rows_gemm) have no step here: their
// sum is final (the gradient of a sequence's initial state) and goes to s.dh. The block
// (x, y) covers units [32 x, 32 x + 32) of rows [8 y, 8 y + 8) of max(s.n, rows_gemm).
template <class Cell, class T, class A>
__global__ void __launch_bounds__(fused::kBlock)
    fused_backward_step_kernel(BackwardStep<T, A> s, const A* __restrict__ dg_next,
                               int64_t rows_gemm, const T* __restrict__ w_hh) {
  using Shape = fused::BackwardShape;
  using C = fused::Chunk<A, Shape::kFloatSub>;
  constexpr int BM = Shape::BM, BC = Shape::BC;
  static_assert(Shape::TM * Shape::TC == fused::kWarps, "one epilogue value per thread");
  __shared__ __align__(16) A smem[(BM + BC) * C::kStride];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, lm = lane / Shape::LC,
            lc = lane % Shape::LC;
  const int64_t H = s.H, K = Cell::kGates * s.H;
  const int64_t row0 = int64_t(blockIdx.y) * BM, u0 = int64_t(blockIdx.x) * BC;
  // Blocks whose rows all lie past rows_gemm skip the product (uniform per block).
  fused::block_product<A, Shape, true>(
      row0 < rows_gemm ? K : 0,
      [&](int m, int64_t k) {
        const int64_t i = row0 + m;
        return i < rows_gemm && k < K ? dg_next[i * K + k] : A(0);
      },
      [&](int c, int64_t k) {  // column c: unit u0 + c, a column of W_hh
        const int64_t u = u0 + c;
        return u < H && k < K ? static_cast<A>(w_hh[k * H + u]) : A(0);
      },
      smem);

  // Thread (warp = r * TC + c, lane): row r * LM + lm and unit c * LC + lc of the block.
  const int r = warp / Shape::TC, c = warp % Shape::TC;
  const int64_t i = row0 + r * Shape::LM + lm, j = u0 + c * Shape::LC + lc;
  if (j >= H || i >= (s.n > rows_gemm ? s.n : rows_gemm)) return;
  const A total = smem[warp * 32 + lane] + s.dh[i * s.ld_dh + j];
  if (i < s.n) {
    backward_unit<Cell>(s, i, j, total);
  } else {
    s.dh[i * s.ld_dh + j] = total;
  }
}

}  // namespace rnn_fused::cuda

// The LayerNorm cells' steps on CUDA (LayerArgs::layer_norm; reference.py's cell_step has
// the equations, cpu/layer_norm_rows.h the CPU's rows): one block per row of a step, since a
// normalisation reads its whole row (G*H pre-activations, or LSTM's H cell states). They
// follow the standard path's product (cuBLAS); the fused and persistent kernels, which split
// a row's units over blocks, are not used for these cells. Reductions over a row go through
// shared memory in a fixed order: bitwise reproducible.
#pragma once

#include <cmath>
#include <cstdint>

#include "step_kernels.cuh"

namespace rnn_fused::cuda {

// The backward's LayerNorm buffers at a step's first row: the gradients of the raw sides
// (what the products with W_ih and W_hh take; the gate gradients of the step record those of
// the normalised sides, which the biases take), and each row's gradients of the gains (2 G*H)
// and of LSTM's cell-state gain and bias (2 H).
template <class T, class A>
struct LayerNormBackward {
  const T* gains;  // LayerArgs::layer_norm
  int64_t raw_offset;
  A* dx_raw;
  A* dh_raw;
  A* dgain;
  A* dcell;
};

namespace layer_norm {

constexpr double kEps = 1e-5;  // reference.py's LAYER_NORM_EPS

template <class A>
struct Stats {
  A mean, rstd;  // rstd = 1 / sqrt(variance + eps), the biased variance
};

// a and b summed over the block's threads in a fixed order, returned to every thread. Starts
// with a barrier, so that what the threads wrote before is visible to all after.
template <class A>
__device__ __forceinline__ void block_sums(A& a, A& b) {
  __shared__ A sa[kThreads], sb[kThreads];
  const int t = threadIdx.x;
  __syncthreads();
  sa[t] = a;
  sb[t] = b;
  for (int width = kThreads / 2; width >= 1; width /= 2) {
    __syncthreads();
    if (t < width) {
      sa[t] += sa[t + width];
      sb[t] += sb[t + width];
    }
  }
  __syncthreads();
  a = sa[0];
  b = sb[0];
}

template <class A>
__device__ __forceinline__ A rsqrt_eps(A variance) {
  return A(1) / static_cast<A>(::sqrt(static_cast<double>(variance + A(kEps))));
}

// The statistics of rows u and v of n values each (two passes, as the CPU's row_stats).
template <class A, class U, class V>
__device__ __forceinline__ void row_stats2(const U* u, const V* v, int64_t n, Stats<A>& su,
                                           Stats<A>& sv) {
  __syncthreads();  // the rows may have just been written by other threads
  A a(0), b(0);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    a += static_cast<A>(u[k]);
    b += static_cast<A>(v[k]);
  }
  block_sums(a, b);
  su.mean = a / A(n);
  sv.mean = b / A(n);
  a = b = A(0);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const A du = static_cast<A>(u[k]) - su.mean, dv = static_cast<A>(v[k]) - sv.mean;
    a += du * du;
    b += dv * dv;
  }
  block_sums(a, b);
  su.rstd = rsqrt_eps(a / A(n));
  sv.rstd = rsqrt_eps(b / A(n));
}
template <class A, class U>
__device__ __forceinline__ Stats<A> row_stats(const U* u, int64_t n) {
  Stats<A> s, unused;
  row_stats2(u, u, n, s, unused);
  return s;
}

// The backward of y = gain (v - mean) rstd over a row of n for the incoming dy: dv = rstd (g -
// mean(g) - v^ mean(g v^)) with g = dy gain and v^ = (v - mean) rstd; dgain = dy v^.
template <class T, class A>
__device__ __forceinline__ void normalize_backward(const T* v, const A* dy, A* dv, A* dgain,
                                                   const T* gain, int64_t n) {
  const Stats<A> s = row_stats<A>(v, n);
  A sum_g(0), sum_gv(0);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const A vh = (static_cast<A>(v[k]) - s.mean) * s.rstd, d = dy[k];
    const A g = d * static_cast<A>(gain[k]);
    dgain[k] = d * vh;
    sum_g += g;
    sum_gv += g * vh;
  }
  block_sums(sum_g, sum_gv);
  const A mean_g = sum_g / A(n), mean_gv = sum_gv / A(n);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const A vh = (static_cast<A>(v[k]) - s.mean) * s.rstd;
    dv[k] = s.rstd * (dy[k] * static_cast<A>(gain[k]) - mean_g - vh * mean_gv);
  }
}

// The LayerNorm LSTM's row i after its sides are normalised (s.xg's row and hh): the gates,
// c = f c + i g kept unnormalised, then h = o tanh(gain_c (c - mean) rstd + bias_c), with
// zoneout as forward_unit applies it.
// c_t = f c_{t-1} + i g, one fused multiply-add in every place that computes it (the forward
// and the backward's two passes): why, at the CPU engine's cell_state (layer_norm_rows.h).
__device__ __forceinline__ float cell_state(float f, float c_prev, float i, float g) {
  return ::fmaf(f, c_prev, i * g);
}
__device__ __forceinline__ double cell_state(double f, double c_prev, double i, double g) {
  return ::fma(f, c_prev, i * g);
}

template <class T, class A>
__device__ __forceinline__ void lstm_forward_row(const ForwardStep<T, A>& s, int64_t i, const A* hh,
                                                 const T* gain_c) {
  using M = MathOps<A>;
  const int64_t H = s.H;
  const A* x = s.xg + i * 4 * H;
  const auto pre = [&](int k, int64_t j) {
    A a = x[k * H + j] + hh[k * H + j];
    if (s.b_ih != nullptr) {
      a = a + static_cast<A>(s.b_ih[k * H + j]) + static_cast<A>(s.b_hh[k * H + j]);
    }
    return a;
  };
  A* c = s.c + i * H;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const A in = M::sigmoid(pre(0, j)), f = M::sigmoid(pre(1, j)), g = M::tanh(pre(2, j));
    const A c_prev = c[j];
    if (s.saved != nullptr) {
      T* saved = s.saved + i * s.ld_saved;
      saved[j] = static_cast<T>(in);
      saved[H + j] = static_cast<T>(f);
      saved[2 * H + j] = static_cast<T>(g);
      saved[3 * H + j] = static_cast<T>(M::sigmoid(pre(3, j)));
      saved[4 * H + j] = static_cast<T>(c_prev);
    }
    c[j] = cell_state(f, c_prev, in, g);
  }
  const Stats<A> sc = row_stats<A>(c, H);
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const A cn =
        (c[j] - sc.mean) * sc.rstd * static_cast<A>(gain_c[j]) + static_cast<A>(gain_c[H + j]);
    A h = M::sigmoid(pre(3, j)) * M::tanh(cn);
    if (s.keep != nullptr) {
      const A hp = static_cast<A>(s.h_prev[i * s.ld_h_prev + j]);
      const A keep = static_cast<A>(s.keep[i * s.ld_state + j]);
      h = keep * hp + (A(1) - keep) * h;  // a kept unit keeps h_prev's bits
    }
    store_h(s, i, j, h);
  }
}

// The LayerNorm LSTM's backward at row i from its saved gates: the gradients of the
// normalised pre-activations into s.dx's row, dc carried back, the cell-state gain's and
// bias's row gradients into dcell; dh keeps zoneout's share (0 without zoneout).
template <class T, class A>
__device__ __forceinline__ void lstm_backward_row(const BackwardStep<T, A>& s, int64_t i,
                                                  const T* gain_c, A* dcell) {
  using M = MathOps<A>;
  const int64_t H = s.H;
  const T* saved = s.saved + i * s.ld_saved;
  const auto gate = [&](int k, int64_t j) { return static_cast<A>(saved[k * H + j]); };
  const auto cell = [&](int64_t j) {
    return cell_state(gate(1, j), gate(4, j), gate(0, j), gate(2, j));
  };
  A* da = s.dx + i * 4 * H;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) da[j] = cell(j);  // c_t, for its stats
  const Stats<A> sc = row_stats<A>(da, H);
  A sum_g(0), sum_gc(0);
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const A ch = (cell(j) - sc.mean) * sc.rstd;
    const A tcn = M::tanh(ch * static_cast<A>(gain_c[j]) + static_cast<A>(gain_c[H + j]));
    A d = s.dh[i * s.ld_dh + j], kept(0);
    if (s.grad_out != nullptr) d += static_cast<A>(s.grad_out[i * s.ld_grad_out + j]);
    if (s.keep != nullptr) {
      kept = static_cast<A>(s.keep[i * s.ld_grad_out + j]) * d;
      d -= kept;
    }
    s.dh[i * s.ld_dh + j] = kept;
    const A o = gate(3, j);
    da[3 * H + j] = d * tcn * o * (A(1) - o);
    const A dcn = d * o * (A(1) - tcn * tcn);
    dcell[i * 2 * H + j] = dcn * ch;
    dcell[i * 2 * H + H + j] = dcn;
    const A g = dcn * static_cast<A>(gain_c[j]);
    da[j] = g;  // read back below by this thread
    sum_g += g;
    sum_gc += g * ch;
  }
  block_sums(sum_g, sum_gc);
  const A mean_g = sum_g / A(H), mean_gc = sum_gc / A(H);
  for (int64_t j = threadIdx.x; j < H; j += kThreads) {
    const A ch = (cell(j) - sc.mean) * sc.rstd;
    const A dct = s.dc[i * H + j] + sc.rstd * (da[j] - mean_g - ch * mean_gc);
    const A in = gate(0, j), f = gate(1, j), g = gate(2, j), c_prev = gate(4, j);
    da[j] = dct * g * in * (A(1) - in);
    da[H + j] = dct * c_prev * f * (A(1) - f);
    da[2 * H + j] = dct * in * (A(1) - g * g);
    s.dc[i * H + j] = dct * f;
  }
}

}  // namespace layer_norm

// Forward of a LayerNorm cell's step, block i = row i of the step: xg (the step's rows of
// W_ih x, s.xg) and hg (of W_hh h) normalised in place with their gains (gains: LayerArgs::
// layer_norm), the raw values first kept in s.saved at raw_offset (training), then the cell.
template <class Cell, class T, class A>
__global__ void layer_norm_forward_step_kernel(ForwardStep<T, A> s, A* __restrict__ xg,
                                               A* __restrict__ hg, const T* __restrict__ gains,
                                               int64_t raw_offset) {
  const int64_t i = blockIdx.x, H = s.H, GH = Cell::kGates * H;
  A* x = xg + i * GH;
  A* hh = hg + i * GH;
  layer_norm::Stats<A> sx, sh;
  layer_norm::row_stats2(x, hh, GH, sx, sh);
  for (int64_t k = threadIdx.x; k < GH; k += kThreads) {
    if (s.saved != nullptr) {
      T* raw = s.saved + i * s.ld_saved + raw_offset;
      raw[k] = static_cast<T>(x[k]);
      raw[GH + k] = static_cast<T>(hh[k]);
    }
    x[k] = (x[k] - sx.mean) * sx.rstd * static_cast<A>(gains[k]);
    hh[k] = (hh[k] - sh.mean) * sh.rstd * static_cast<A>(gains[GH + k]);
  }
  __syncthreads();
  if constexpr (Cell::kCellState) {
    layer_norm::lstm_forward_row(s, i, hh, gains + 2 * GH);
  } else {
    for (int64_t j = threadIdx.x; j < H; j += kThreads) {
      A h_side[Cell::kGates];
#pragma unroll
      for (int k = 0; k < Cell::kGates; ++k) h_side[k] = hh[k * H + j];
      forward_unit<Cell>(s, i, j, h_side);
    }
  }
}

// Backward of a LayerNorm cell's step, block i = row i: the cell's backward over the row
// (gradients of the normalised sides into s.dx / s.dhh), then each side's normalisation
// backward from the raw values the forward kept.
template <class Cell, class T, class A>
__global__ void layer_norm_backward_step_kernel(BackwardStep<T, A> s, LayerNormBackward<T, A> b) {
  const int64_t i = blockIdx.x, H = s.H, GH = Cell::kGates * H;
  if constexpr (Cell::kCellState) {
    layer_norm::lstm_backward_row(s, i, b.gains + 2 * GH, b.dcell);
  } else {
    for (int64_t j = threadIdx.x; j < H; j += kThreads) {
      backward_unit<Cell>(s, i, j, s.dh[i * s.ld_dh + j]);
    }
  }
  const T* raw = s.saved + i * s.ld_saved + b.raw_offset;
  const A* dh_side = Cell::kSplitGrads ? s.dhh : s.dx;
  layer_norm::normalize_backward(raw, s.dx + i * GH, b.dx_raw + i * GH, b.dgain + i * 2 * GH,
                                 b.gains, GH);
  layer_norm::normalize_backward(raw + GH, dh_side + i * GH, b.dh_raw + i * GH,
                                 b.dgain + i * 2 * GH + GH, b.gains + GH, GH);
}

}  // namespace rnn_fused::cuda

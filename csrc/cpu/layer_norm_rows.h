// Rows of the LayerNorm cells (LayerArgs::layer_norm; reference.py's cell_step has the
// equations): a row's statistics, its normalisation and the normalisation's backward, and
// the LayerNorm LSTM's cell math, whose cell state is normalised over the row before its
// tanh. Rows are read in SIMD vectors, the last one partial, as in pointwise.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace rnn_fused::cpu {

constexpr double kLayerNormEps = 1e-5;  // reference.py's LAYER_NORM_EPS

// fn(j, width) for the vectors of a row of n values: width is the vector's size but for
// the last one.
template <class T, class Fn>
inline void over_vectors(int64_t n, Fn&& fn) {
  using V = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + V::size() <= n; j += V::size()) fn(j, static_cast<int>(V::size()));
  if (j < n) fn(j, static_cast<int>(n - j));
}

template <class T>
inline T lane_sum(const at::vec::Vectorized<T>& v) {
  T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T sum = 0;
  for (const T x : lanes) sum += x;
  return sum;
}

template <class T>
struct RowStats {
  T mean, rstd;  // rstd = 1 / sqrt(variance + eps), the biased variance
};

// The sum of term(j, width) over a row's vectors (term: zeros past the row), in four chains
// of adds: in one, each add waited on the one before (4 cycles a vector where L1 serves two a
// cycle), and row_stats took 4.5% of a LayerNorm LSTM's forward and backward (perf, T=100
// B=32 H=256, Intel Xeon with AMX).
template <class T, class Term>
inline at::vec::Vectorized<T> vector_sum(int64_t n, Term&& term) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t L = V::size();
  V s[4] = {V(T(0)), V(T(0)), V(T(0)), V(T(0))};
  int64_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L) {
    for (int k = 0; k < 4; ++k) s[k] = s[k] + term(j + k * L, static_cast<int>(L));
  }
  for (int k = 0; j < n; j += L, ++k) s[k] = s[k] + term(j, static_cast<int>(std::min(L, n - j)));
  return (s[0] + s[1]) + (s[2] + s[3]);
}

template <class T>
RowStats<T> row_stats(const T* v, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const T mean =
      lane_sum(vector_sum<T>(n, [&](int64_t j, int w) { return V::loadu(v + j, w); })) / T(n);
  const V squares = vector_sum<T>(n, [&](int64_t j, int w) {
    const V d = V::set(V(T(0)), V::loadu(v + j, w) - V(mean), w);  // unused lanes: 0
    return d * d;
  });
  return {mean, T(1) / std::sqrt(lane_sum(squares) / T(n) + T(kLayerNormEps))};
}

// out = gain * (v - mean) * rstd; out may be v.
template <class T>
void normalize_row(const T* v, T* out, int64_t n, const T* gain, RowStats<T> s) {
  using V = at::vec::Vectorized<T>;
  over_vectors<T>(n, [&](int64_t j, int w) {
    const V y = (V::loadu(v + j, w) - V(s.mean)) * V(s.rstd) * V::loadu(gain + j, w);
    y.store(out + j, w);
  });
}

// The backward of normalize_row for the incoming dy: dv (may be dy) = rstd (g - mean(g) -
// v^ mean(g v^)) with g = dy * gain and v^ = (v - mean) rstd. The gain's gradient, the sum
// over rows of dy * v^, is left to the caller (a column reduction over a chunk's rows).
template <class T>
void normalize_row_backward(const T* v, const T* dy, T* dv, int64_t n, const T* gain,
                            RowStats<T> s) {
  using V = at::vec::Vectorized<T>;
  const auto normalized = [&](int64_t j, int w) {
    return V::set(V(T(0)), (V::loadu(v + j, w) - V(s.mean)) * V(s.rstd), w);
  };
  V sum_g(T(0)), sum_gv(T(0));
  over_vectors<T>(n, [&](int64_t j, int w) {
    const V g = V::loadu(dy + j, w) * V::loadu(gain + j, w);
    sum_g = sum_g + g;
    sum_gv = sum_gv + g * normalized(j, w);
  });
  const V mean_g(lane_sum(sum_g) / T(n)), mean_gv(lane_sum(sum_gv) / T(n));
  over_vectors<T>(n, [&](int64_t j, int w) {
    const V g = V::loadu(dy + j, w) * V::loadu(gain + j, w);
    (V(s.rstd) * (g - mean_g - normalized(j, w) * mean_gv)).store(dv + j, w);
  });
}

// sum += v over a row of n values.
template <class T>
void add_row(const T* v, T* sum, int64_t n) {
  using V = at::vec::Vectorized<T>;
  over_vectors<T>(
      n, [&](int64_t j, int w) { (V::loadu(sum + j, w) + V::loadu(v + j, w)).store(sum + j, w); });
}

// sum += dy * v^ over a row (v^ = (v - mean) rstd, normalize_row's): the row's term of its
// gain's gradient.
template <class T>
void add_gain_row(const T* v, const T* dy, RowStats<T> s, T* sum, int64_t n) {
  using V = at::vec::Vectorized<T>;
  over_vectors<T>(n, [&](int64_t j, int w) {
    const V vh = (V::loadu(v + j, w) - V(s.mean)) * V(s.rstd);
    (V::loadu(sum + j, w) + V::loadu(dy + j, w) * vh).store(sum + j, w);
  });
}

// c_t = f c_{t-1} + i g with its rounding spelled out: the backward recomputes c_t twice and
// normalises it by statistics of one of them, and a compiler free to fuse the products into
// its adds differently in each place leaves c_t - mean an ulp, not 0, times 1/sqrt(eps) where
// the row's values are equal (H = 1, say).
template <class V>
inline V cell_state(const V& f, const V& c_prev, const V& i, const V& g) {
  return at::vec::fmadd(f, c_prev, i * g);
}

// One row of the LayerNorm LSTM's forward, after its pre-activations are normalised: x and
// hh (4 H each, gates i, f, g, o) get their biases added; c = f c + i g is kept in `c` (the
// state stays unnormalised) and h = o tanh(gain_c (c - mean) rstd + bias_c), with zoneout's
// keep (nullable) applied as in pointwise.h. saved (nullable): i, f, g, o, c_{t-1}.
template <class T>
void ln_lstm_forward_row(const T* x, const T* hh, const T* b_ih, const T* b_hh, T* c, T* saved,
                         const T* gain_c, const T* bias_c, const T* h_prev, const T* keep, T* h,
                         T* h_copy, int64_t H) {
  using V = at::vec::Vectorized<T>;
  using M = MathOps<V>;
  const auto pre = [&](int k, int64_t j, int w) {
    V a = V::loadu(x + k * H + j, w) + V::loadu(hh + k * H + j, w);
    if (b_ih != nullptr) a = a + V::loadu(b_ih + k * H + j, w) + V::loadu(b_hh + k * H + j, w);
    return a;
  };
  over_vectors<T>(H, [&](int64_t j, int w) {
    const V i = M::sigmoid(pre(0, j, w)), f = M::sigmoid(pre(1, j, w));
    const V g = M::tanh(pre(2, j, w)), c_prev = V::loadu(c + j, w);
    if (saved != nullptr) {
      i.store(saved + j, w);
      f.store(saved + H + j, w);
      g.store(saved + 2 * H + j, w);
      M::sigmoid(pre(3, j, w)).store(saved + 3 * H + j, w);
      c_prev.store(saved + 4 * H + j, w);
    }
    cell_state(f, c_prev, i, g).store(c + j, w);
  });
  const RowStats<T> s = row_stats(c, H);
  over_vectors<T>(H, [&](int64_t j, int w) {
    const V cn = (V::loadu(c + j, w) - V(s.mean)) * V(s.rstd) * V::loadu(gain_c + j, w) +
                 V::loadu(bias_c + j, w);
    V out = M::sigmoid(pre(3, j, w)) * M::tanh(cn);
    if (keep != nullptr) {
      const V k = V::loadu(keep + j, w);  // as pointwise.h's forward_row
      out = k * V::loadu(h_prev + j, w) + (V(T(1)) - k) * out;
    }
    out.store(h + j, w);
    if (h_copy != nullptr) out.store(h_copy + j, w);
  });
}

// One row of the LayerNorm LSTM's backward from its saved gates: dh (plus dh_extra, nullable)
// reaches h_t, dc (in: dL/dc_t, out: dL/dc_{t-1}); writes the gates' pre-activation
// gradients da (4 H) and this row's gradients of gain_c and bias_c (dcell, 2 H). With keep,
// its share of dh goes to dh_prev (written) instead of through the cell.
template <class T>
void ln_lstm_backward_row(const T* dh, const T* dh_extra, const T* keep, T* dc, const T* saved,
                          const T* gain_c, const T* bias_c, T* da, T* dcell, T* dh_prev,
                          int64_t H) {
  using V = at::vec::Vectorized<T>;
  using M = MathOps<V>;
  const V one(T(1));
  const auto gate = [&](int k, int64_t j, int w) { return V::loadu(saved + k * H + j, w); };
  const auto cell = [&](int64_t j, int w) {  // c_t, 0 past the row
    return cell_state(gate(1, j, w), gate(4, j, w), gate(0, j, w), gate(2, j, w));
  };
  // The statistics of c_t, recomputed (da's first block holds c_t meanwhile).
  over_vectors<T>(H, [&](int64_t j, int w) { cell(j, w).store(da + j, w); });
  const RowStats<T> s = row_stats(da, H);
  V sum_g(T(0)), sum_gc(T(0));
  over_vectors<T>(H, [&](int64_t j, int w) {
    const V ch = V::set(V(T(0)), (cell(j, w) - V(s.mean)) * V(s.rstd), w);
    const V tcn = M::tanh(ch * V::loadu(gain_c + j, w) + V::loadu(bias_c + j, w));
    V d = V::loadu(dh + j, w);
    if (dh_extra != nullptr) d = d + V::loadu(dh_extra + j, w);
    if (keep != nullptr) {
      const V kept = V::loadu(keep + j, w) * d;
      kept.store(dh_prev + j, w);
      d = d - kept;
    }
    const V o = gate(3, j, w);
    (d * tcn * o * (one - o)).store(da + 3 * H + j, w);
    const V dcn = d * o * (one - tcn * tcn);
    (dcn * ch).store(dcell + j, w);
    dcn.store(dcell + H + j, w);
    const V g = dcn * V::loadu(gain_c + j, w);
    g.store(da + j, w);  // kept for the next pass
    sum_g = sum_g + g;
    sum_gc = sum_gc + g * ch;
  });
  const V mean_g(lane_sum(sum_g) / T(H)), mean_gc(lane_sum(sum_gc) / T(H));
  over_vectors<T>(H, [&](int64_t j, int w) {
    const V ch = (cell(j, w) - V(s.mean)) * V(s.rstd);
    const V dct = V::loadu(dc + j, w) + V(s.rstd) * (V::loadu(da + j, w) - mean_g - ch * mean_gc);
    const V i = gate(0, j, w), f = gate(1, j, w), g = gate(2, j, w), c_prev = gate(4, j, w);
    (dct * g * i * (one - i)).store(da + j, w);
    (dct * c_prev * f * (one - f)).store(da + H + j, w);
    (dct * i * (one - g * g)).store(da + 2 * H + j, w);
    (dct * f).store(dc + j, w);
  });
}

}  // namespace rnn_fused::cpu

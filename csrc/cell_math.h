// Gate math of every cell, written once for the CPU (scalar and SIMD) and the GPU.
//
// A cell is a struct template over a value type V: a scalar (float, double) or, on the CPU,
// an at::vec::Vectorized<T>. It works on one hidden unit (or one SIMD lane group of units)
// of one batch row. The recurrence engines load the pre-activations, call the cell and
// store what it returns; they never know which cell they run.
//
// Pre-activations arrive split in two halves, the input side x = W_ih x_t + b_ih and the
// hidden side hh = W_hh h_{t-1} + b_hh, because GRU's candidate gate needs them apart:
// n = tanh(x_n + r * hh_n). Gate order is torch.nn's: LSTM i, f, g, o; GRU r, z, n.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RF_HD __host__ __device__ __forceinline__
#else
#define RF_HD inline
#endif

namespace rnn_fused {

enum class CellKind { LSTM, GRU, RNN_TANH, RNN_RELU };

// Activations per value type. Specialised for scalars here and for SIMD vectors in
// cpu/vec_math.h; a class template (not overloads) so that the specialisation can be
// declared after the cells that use it.
template <class V>
struct MathOps;

template <>
struct MathOps<float> {
  RF_HD static float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
  RF_HD static float tanh(float x) { return ::tanhf(x); }
  // NaN stays NaN, as in torch.relu.
  RF_HD static float relu(float x) { return x <= 0.0f ? 0.0f : x; }
  // The gradient g through relu, read from its output y: 0 where y <= 0, else g. Chosen, not
  // multiplied by the derivative, as torch's relu backward does: an infinite g stays 0 at a
  // unit that is off (0 * inf is NaN), and g passes through a NaN unit.
  RF_HD static float relu_gradient(float y, float g) { return y <= 0.0f ? 0.0f : g; }
};

template <>
struct MathOps<double> {
  RF_HD static double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
  RF_HD static double tanh(double x) { return ::tanh(x); }
  RF_HD static double relu(double x) { return x <= 0.0 ? 0.0 : x; }
  RF_HD static double relu_gradient(double y, double g) { return y <= 0.0 ? 0.0 : g; }
};

// Every cell declares:
//   kGates         gate blocks of width H in a row of pre-activations
//   kSaved         blocks of width H the forward keeps for the backward
//   kCellState     whether there is a cell state c (LSTM)
//   kUsesPrevH     whether the pointwise math reads h_{t-1} itself (GRU)
//   kSplitGrads    whether the hidden-side gate gradients differ from the input side (GRU)
// and two functions on one unit:
//   forward(x, hh, h_prev, c_prev, h, c, saved)
//   backward(dh, dc, saved, h_prev, dx, dhh, dh_prev, dc_prev)
// where dh, dc are the gradients reaching h_t and c_t, dx / dhh those of the input-side and
// hidden-side pre-activations, dh_prev the part of dL/dh_{t-1} that does not go through
// W_hh, and dc_prev dL/dc_{t-1}.

template <class V>
struct LstmCell {
  static constexpr int kGates = 4;  // i, f, g, o
  static constexpr int kSaved = 5;  // i, f, g, o, c_{t-1} (the backward recomputes tanh(c_t))
  static constexpr bool kCellState = true;
  static constexpr bool kUsesPrevH = false;
  static constexpr bool kSplitGrads = false;

  RF_HD static void forward(const V* x, const V* hh, V /*h_prev*/, V c_prev, V& h, V& c, V* saved) {
    using M = MathOps<V>;
    const V i = M::sigmoid(x[0] + hh[0]);
    const V f = M::sigmoid(x[1] + hh[1]);
    const V g = M::tanh(x[2] + hh[2]);
    const V o = M::sigmoid(x[3] + hh[3]);
    c = f * c_prev + i * g;
    const V tc = M::tanh(c);
    h = o * tc;
    saved[0] = i;
    saved[1] = f;
    saved[2] = g;
    saved[3] = o;
    saved[4] = c_prev;
  }

  RF_HD static void backward(V dh, V dc, const V* saved, V /*h_prev*/, V* dx, V* /*dhh*/,
                             V& dh_prev, V& dc_prev) {
    using M = MathOps<V>;
    const V one(1);
    const V i = saved[0], f = saved[1], g = saved[2], o = saved[3];
    const V c_prev = saved[4];
    const V tc = M::tanh(f * c_prev + i * g);
    const V dct = dc + dh * o * (one - tc * tc);
    dx[0] = dct * g * i * (one - i);
    dx[1] = dct * c_prev * f * (one - f);
    dx[2] = dct * i * (one - g * g);
    dx[3] = dh * tc * o * (one - o);
    dh_prev = V(0);
    dc_prev = dct * f;
  }
};

template <class V>
struct GruCell {
  static constexpr int kGates = 3;  // r, z, n
  static constexpr int kSaved = 4;  // r, z, n, hh_n (= W_hn h + b_hn, before the reset gate)
  static constexpr bool kCellState = false;
  static constexpr bool kUsesPrevH = true;
  static constexpr bool kSplitGrads = true;

  RF_HD static void forward(const V* x, const V* hh, V h_prev, V /*c_prev*/, V& h, V& /*c*/,
                            V* saved) {
    using M = MathOps<V>;
    const V r = M::sigmoid(x[0] + hh[0]);
    const V z = M::sigmoid(x[1] + hh[1]);
    const V n = M::tanh(x[2] + r * hh[2]);
    h = n + z * (h_prev - n);
    saved[0] = r;
    saved[1] = z;
    saved[2] = n;
    saved[3] = hh[2];
  }

  RF_HD static void backward(V dh, V /*dc*/, const V* saved, V h_prev, V* dx, V* dhh, V& dh_prev,
                             V& /*dc_prev*/) {
    const V one(1);
    const V r = saved[0], z = saved[1], n = saved[2], hh_n = saved[3];
    const V dn = dh * (one - z) * (one - n * n);
    const V dr = dn * hh_n * r * (one - r);
    const V dz = dh * (h_prev - n) * z * (one - z);
    dx[0] = dr;
    dx[1] = dz;
    dx[2] = dn;
    dhh[0] = dr;
    dhh[1] = dz;
    dhh[2] = dn * r;
    dh_prev = dh * z;
  }
};

template <class V, bool kRelu>
struct RnnCell {
  static constexpr int kGates = 1;
  static constexpr int kSaved = 1;  // h_t
  static constexpr bool kCellState = false;
  static constexpr bool kUsesPrevH = false;
  static constexpr bool kSplitGrads = false;

  RF_HD static void forward(const V* x, const V* hh, V /*h_prev*/, V /*c_prev*/, V& h, V& /*c*/,
                            V* saved) {
    using M = MathOps<V>;
    h = kRelu ? M::relu(x[0] + hh[0]) : M::tanh(x[0] + hh[0]);
    saved[0] = h;
  }

  RF_HD static void backward(V dh, V /*dc*/, const V* saved, V /*h_prev*/, V* dx, V* /*dhh*/,
                             V& dh_prev, V& /*dc_prev*/) {
    using M = MathOps<V>;
    const V h = saved[0];
    dx[0] = kRelu ? M::relu_gradient(h, dh) : dh * (V(1) - h * h);
    dh_prev = V(0);
  }
};

template <class V>
using RnnTanhCell = RnnCell<V, false>;
template <class V>
using RnnReluCell = RnnCell<V, true>;

// Calls fn with a tag whose member template `Cell<V>` is the cell of `kind`, so that one
// engine template serves every cell: dispatch_cell(kind, [&](auto tag) { ... }).
template <template <class> class C>
struct CellTag {
  template <class V>
  using Cell = C<V>;
};

template <class Fn>
decltype(auto) dispatch_cell(CellKind kind, Fn&& fn) {
  switch (kind) {
    case CellKind::LSTM:
      return fn(CellTag<LstmCell>{});
    case CellKind::GRU:
      return fn(CellTag<GruCell>{});
    case CellKind::RNN_TANH:
      return fn(CellTag<RnnTanhCell>{});
    case CellKind::RNN_RELU:
    default:
      return fn(CellTag<RnnReluCell>{});
  }
}

}  // namespace rnn_fused

// The CPU recurrence: forward and backward of one layer and one direction over all steps.
//
// Forward:  xg = X W_ih^T for all rows (one GEMM); then per step one GEMM hg = h W_hh^T and
//           one fused, vectorised pass of the cell math, keeping what the backward needs.
// Backward: per step one fused pass of the cell derivative and one GEMM dh = dg W_hh; after
//           the loop dX, dW_ih, dW_hh (and dW_hr) and the bias gradients over all steps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "../problem.h"
#include "blas.h"
#include "vec_math.h"

namespace rnn_fused::cpu {
namespace {

// A pointwise pass stays on one thread below this many elements: waking the other
// threads costs more than the math.
constexpr int64_t kParallelGrain = 16384;

template <class F>
void for_each_row(int64_t n, int64_t width, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(width, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Pointers into one row of the forward's buffers.
template <class T>
struct ForwardRow {
  const T* x;       // input-side pre-activations, without bias [gates*H]
  const T* hh;      // hidden-side pre-activations, without bias [gates*H]
  const T* b_ih;    // or nullptr
  const T* b_hh;    // or nullptr
  const T* h_prev;  // [H], read by cells with kUsesPrevH
  T* c;             // cell state [H]: c_{t-1} in, c_t out (LSTM)
  T* saved;         // [saved_blocks*H]
  T* h;             // h_t out [H]
  T* h_copy;        // a second destination of h_t, or nullptr
};

// The cell on units j .. j + lanes of one row; V is a SIMD vector or a scalar (the tail).
template <class Cell, class V, class T>
inline void forward_units(const ForwardRow<T>& r, int64_t H, int64_t j) {
  using L = Lanes<V>;
  V x[Cell::kGates], hh[Cell::kGates], saved[Cell::kSaved];
  for (int k = 0; k < Cell::kGates; ++k) {
    x[k] = L::load(r.x + k * H + j);
    hh[k] = L::load(r.hh + k * H + j);
    if (r.b_ih != nullptr) {
      x[k] = x[k] + L::load(r.b_ih + k * H + j);
      hh[k] = hh[k] + L::load(r.b_hh + k * H + j);
    }
  }
  V h_prev(T(0)), c_prev(T(0)), h(T(0)), c(T(0));
  if constexpr (Cell::kUsesPrevH) h_prev = L::load(r.h_prev + j);
  if constexpr (Cell::kCellState) c_prev = L::load(r.c + j);
  Cell::forward(x, hh, h_prev, c_prev, h, c, saved);
  for (int k = 0; k < Cell::kSaved; ++k) L::store(saved[k], r.saved + k * H + j);
  if constexpr (Cell::kCellState) L::store(c, r.c + j);
  L::store(h, r.h + j);
  if (r.h_copy != nullptr) L::store(h, r.h_copy + j);
}

template <template <class> class CellT, class T>
void forward_row(const ForwardRow<T>& r, int64_t H) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) forward_units<CellT<Vec>, Vec>(r, H, j);
  for (; j < H; ++j) forward_units<CellT<T>, T>(r, H, j);
}

// Pointers into one row of the backward's buffers.
template <class T>
struct BackwardRow {
  const T* dh;      // dL/dh_t: the sum of dh and dh_extra
  const T* dh_extra;  // or nullptr
  T* dc;            // dL/dc_t in, dL/dc_{t-1} out (LSTM)
  const T* saved;
  const T* h_prev;
  T* dx;            // input-side pre-activation gradients out [gates*H]
  T* dhh;           // hidden-side ones out (cells with kSplitGrads)
  T* dh_prev;       // the part of dL/dh_{t-1} not through W_hh (cells with kUsesPrevH)
};

template <class Cell, class V, class T>
inline void backward_units(const BackwardRow<T>& r, int64_t H, int64_t j) {
  using L = Lanes<V>;
  V saved[Cell::kSaved], dx[Cell::kGates], dhh[Cell::kGates];
  for (int k = 0; k < Cell::kSaved; ++k) saved[k] = L::load(r.saved + k * H + j);
  V dh = L::load(r.dh + j);
  if (r.dh_extra != nullptr) dh = dh + L::load(r.dh_extra + j);
  V h_prev(T(0)), dc(T(0)), dh_prev(T(0)), dc_prev(T(0));
  if constexpr (Cell::kUsesPrevH) h_prev = L::load(r.h_prev + j);
  if constexpr (Cell::kCellState) dc = L::load(r.dc + j);
  Cell::backward(dh, dc, saved, h_prev, dx, dhh, dh_prev, dc_prev);
  for (int k = 0; k < Cell::kGates; ++k) {
    L::store(dx[k], r.dx + k * H + j);
    if constexpr (Cell::kSplitGrads) L::store(dhh[k], r.dhh + k * H + j);
  }
  if constexpr (Cell::kCellState) L::store(dc_prev, r.dc + j);
  if constexpr (Cell::kUsesPrevH) L::store(dh_prev, r.dh_prev + j);
}

template <template <class> class CellT, class T>
void backward_row(const BackwardRow<T>& r, int64_t H) {
  using Vec = at::vec::Vectorized<T>;
  int64_t j = 0;
  for (; j + Vec::size() <= H; j += Vec::size()) backward_units<CellT<Vec>, Vec>(r, H, j);
  for (; j < H; ++j) backward_units<CellT<T>, T>(r, H, j);
}

template <class T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <template <class> class CellT, class T>
void run_forward(const Problem& p, const at::Tensor& input, const at::Tensor& w_ih,
                 const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                 const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
                 at::Tensor& output, at::Tensor& h_state, at::Tensor& c_state, at::Tensor& saved,
                 at::Tensor& h_prev_all) {
  using Cell = CellT<T>;
  const int64_t H = p.hidden, Hout = p.out_size, GH = p.gate_width(), SW = p.saved_width();
  const at::Tensor xg = at::mm(input.reshape({p.rows, p.input_size}), w_ih.t());
  at::Tensor hg = at::empty({p.batch, GH}, input.options());

  const T* xg_p = xg.data_ptr<T>();
  T* hg_p = hg.data_ptr<T>();
  const T* w_hh_p = w_hh.data_ptr<T>();
  const T* w_hr_p = ptr_or_null<T>(w_hr);
  const T* b_ih_p = ptr_or_null<T>(b_ih);
  const T* b_hh_p = ptr_or_null<T>(b_hh);
  T* out_p = output.data_ptr<T>();
  T* h_p = h_state.data_ptr<T>();
  T* c_p = Cell::kCellState ? c_state.data_ptr<T>() : nullptr;
  T* saved_p = saved.data_ptr<T>();
  T* hprev_p = h_prev_all.data_ptr<T>();

  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
    T* hprev_rows = hprev_p + r0 * Hout;
    std::memcpy(hprev_rows, h_p, sizeof(T) * n * Hout);
    gemm<T>(false, true, n, GH, Hout, T(1), hprev_rows, Hout, w_hh_p, Hout, T(0), hg_p, GH);
    for_each_row(n, GH, [&](int64_t i) {
      T* saved_row = saved_p + (r0 + i) * SW;
      ForwardRow<T> row{xg_p + (r0 + i) * GH,
                        hg_p + i * GH,
                        b_ih_p,
                        b_hh_p,
                        hprev_rows + i * Hout,
                        c_p == nullptr ? nullptr : c_p + i * H,
                        saved_row,
                        // With a projection h_t is kept unprojected in the last saved block.
                        p.proj ? saved_row + Cell::kSaved * H : out_p + (r0 + i) * Hout,
                        p.proj ? nullptr : h_p + i * Hout};
      forward_row<CellT, T>(row, H);
    });
    if (p.proj) {
      T* out_rows = out_p + r0 * Hout;
      gemm<T>(false, true, n, Hout, H, T(1), saved_p + r0 * SW + Cell::kSaved * H, SW, w_hr_p, H,
              T(0), out_rows, Hout);
      std::memcpy(h_p, out_rows, sizeof(T) * n * Hout);
    }
  }
}

ForwardResult forward_cpu(c10::string_view mode, const at::Tensor& input_,
                          const std::optional<at::Tensor>& hx,
                          const std::optional<at::Tensor>& cx, const at::Tensor& w_ih_,
                          const at::Tensor& w_hh_, const std::optional<at::Tensor>& b_ih_,
                          const std::optional<at::Tensor>& b_hh_,
                          const std::optional<at::Tensor>& w_hr_,
                          const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const Problem p = make_problem(std::string(mode.data(), mode.size()), input_, hx, cx, w_ih_,
                                 w_hh_, b_ih_, b_hh_, w_hr_, batch_sizes, reverse);
  const at::Tensor input = input_.contiguous(), w_ih = w_ih_.contiguous(),
                   w_hh = w_hh_.contiguous();
  const auto b_ih = contiguous(b_ih_), b_hh = contiguous(b_hh_), w_hr = contiguous(w_hr_);
  const auto opts = input.options();

  at::Tensor output = p.packed ? at::empty({p.rows, p.out_size}, opts)
                               : at::empty({p.steps, p.batch, p.out_size}, opts);
  at::Tensor h_state = hx.has_value() ? hx->contiguous().clone()
                                      : at::zeros({p.batch, p.out_size}, opts);
  at::Tensor c_state = p.kind != CellKind::LSTM ? at::empty({0}, opts)
                       : cx.has_value()         ? cx->contiguous().clone()
                                                : at::zeros({p.batch, p.hidden}, opts);
  at::Tensor saved = at::empty({p.rows, p.saved_width()}, opts);
  at::Tensor h_prev_all = at::empty({p.rows, p.out_size}, opts);

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_fused_forward_cpu", [&] {
    dispatch_cell(p.kind, [&](auto tag) {
      using Tag = decltype(tag);
      run_forward<Tag::template Cell, scalar_t>(p, input, w_ih, w_hh, b_ih, b_hh, w_hr, output,
                                                h_state, c_state, saved, h_prev_all);
    });
  });
  return {output, h_state, c_state, saved, h_prev_all};
}

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

template <template <class> class CellT, class T>
void run_backward(const Problem& p, const std::optional<at::Tensor>& grad_output,
                  const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                  const at::Tensor& saved, const at::Tensor& h_prev_all, at::Tensor& dh_state,
                  at::Tensor& dc_state, at::Tensor& dxg, at::Tensor& dhg, at::Tensor& dr_all) {
  using Cell = CellT<T>;
  const int64_t H = p.hidden, Hout = p.out_size, GH = p.gate_width(), SW = p.saved_width();
  const auto opts = saved.options();
  // dL/dh_t of the current step: with a projection dL/dr_t W_hr, else read in place.
  at::Tensor dh_step = p.proj ? at::empty({p.batch, H}, opts) : at::Tensor();

  const T* gout_p = ptr_or_null<T>(grad_output);
  const T* w_hh_p = w_hh.data_ptr<T>();
  const T* w_hr_p = ptr_or_null<T>(w_hr);
  const T* saved_p = saved.data_ptr<T>();
  const T* hprev_p = h_prev_all.data_ptr<T>();
  T* dh_p = dh_state.data_ptr<T>();
  T* dc_p = Cell::kCellState ? dc_state.data_ptr<T>() : nullptr;
  T* dxg_p = dxg.data_ptr<T>();
  T* dhg_p = dhg.data_ptr<T>();
  T* dr_p = p.proj ? dr_all.data_ptr<T>() : nullptr;
  T* dh_step_p = p.proj ? dh_step.data_ptr<T>() : nullptr;

  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
    if (p.proj) {
      // dL/dr_t = grad_output_t + (dL/dh_{t} carried from the next step), then through W_hr.
      T* dr_rows = dr_p + r0 * Hout;
      for (int64_t e = 0; e < n * Hout; ++e)
        dr_rows[e] = dh_p[e] + (gout_p != nullptr ? gout_p[r0 * Hout + e] : T(0));
      gemm<T>(false, false, n, H, Hout, T(1), dr_rows, Hout, w_hr_p, H, T(0), dh_step_p, H);
    }
    for_each_row(n, GH, [&](int64_t i) {
      const bool direct = !p.proj;
      BackwardRow<T> row{
          direct ? dh_p + i * Hout : dh_step_p + i * H,
          direct && gout_p != nullptr ? gout_p + (r0 + i) * Hout : nullptr,
          dc_p == nullptr ? nullptr : dc_p + i * H,
          saved_p + (r0 + i) * SW,
          hprev_p + (r0 + i) * Hout,
          dxg_p + (r0 + i) * GH,
          dhg_p + (r0 + i) * GH,
          dh_p + i * Hout};
      backward_row<CellT, T>(row, H);
    });
    // dL/dh_{t-1} = (hidden-side gate gradients) W_hh [+ the direct part the cell wrote].
    gemm<T>(false, false, n, Hout, GH, T(1), dhg_p + r0 * GH, GH, w_hh_p, Hout,
            Cell::kUsesPrevH ? T(1) : T(0), dh_p, Hout);
  }
}

BackwardResult backward_cpu(c10::string_view mode, const std::optional<at::Tensor>& grad_output_,
                            const std::optional<at::Tensor>& grad_h_n,
                            const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input_,
                            const std::optional<at::Tensor>& hx, const at::Tensor& w_ih_,
                            const at::Tensor& w_hh_, const std::optional<at::Tensor>& w_hr_,
                            const std::optional<at::Tensor>& batch_sizes, bool reverse,
                            const at::Tensor& saved_, const at::Tensor& h_prev_) {
  const Problem p =
      make_problem(std::string(mode.data(), mode.size()), input_, hx, std::nullopt, w_ih_, w_hh_,
                   std::nullopt, std::nullopt, w_hr_, batch_sizes, reverse);
  check_backward_args(p, grad_output_, grad_h_n, grad_c_n, saved_, h_prev_);
  const at::Tensor input = input_.contiguous(), w_ih = w_ih_.contiguous(),
                   w_hh = w_hh_.contiguous(), saved = saved_.contiguous(),
                   h_prev_all = h_prev_.contiguous();
  const auto w_hr = contiguous(w_hr_), grad_output = contiguous(grad_output_);
  const auto opts = input.options();
  const bool lstm = p.kind == CellKind::LSTM;

  at::Tensor dh_state = grad_h_n.has_value() ? grad_h_n->contiguous().clone()
                                             : at::zeros({p.batch, p.out_size}, opts);
  at::Tensor dc_state = !lstm                  ? at::empty({0}, opts)
                        : grad_c_n.has_value() ? grad_c_n->contiguous().clone()
                                               : at::zeros({p.batch, p.hidden}, opts);
  at::Tensor dxg = at::empty({p.rows, p.gate_width()}, opts);
  const bool split = p.kind == CellKind::GRU;
  at::Tensor dhg = split ? at::empty({p.rows, p.gate_width()}, opts) : dxg;
  at::Tensor dr_all = p.proj ? at::empty({p.rows, p.out_size}, opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_fused_backward_cpu", [&] {
    dispatch_cell(p.kind, [&](auto tag) {
      using Tag = decltype(tag);
      run_backward<Tag::template Cell, scalar_t>(p, grad_output, w_hh, w_hr, saved, h_prev_all,
                                                 dh_state, dc_state, dxg, dhg, dr_all);
    });
  });

  const at::Tensor x2d = input.reshape({p.rows, p.input_size});
  at::Tensor grad_input = at::mm(dxg, w_ih).view(input.sizes());
  at::Tensor grad_w_ih = at::mm(dxg.t(), x2d);
  at::Tensor grad_w_hh = at::mm(dhg.t(), h_prev_all);
  at::Tensor grad_b_ih = dxg.sum(0);
  at::Tensor grad_b_hh = split ? dhg.sum(0) : grad_b_ih.clone();
  at::Tensor grad_w_hr = at::empty({0}, opts);
  if (p.proj) {
    const int64_t h_block = saved_blocks_of(p.kind, false) * p.hidden;
    grad_w_hr = at::mm(dr_all.t(), saved.narrow(1, h_block, p.hidden));
  }
  return {grad_input, dh_state, dc_state, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace rnn_fused::cpu

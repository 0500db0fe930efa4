// The CUDA recurrence's host side, written once over a device Dev that runs its GEMMs,
// copies and kernels: recurrence_cuda.cu gives it cuBLAS and CUDA launches on the current
// stream; tests/emulation gives it plain loops and an emulation of CUDA blocks, so that the
// whole engine runs on machines without a GPU.
//
// Three paths (use_fused_path, use_persistent_path). Standard: the input projection of all
// rows as one GEMM; per step one GEMM h W_hh^T and one pointwise kernel; backward per step
// one pointwise kernel and one GEMM dG W_hh. Fused (small batches): per step one kernel
// that computes the recurrent product and applies the cell (fused_step.cuh). Persistent
// (small batches, many steps): the fused path's steps, recorded by the same host loop, run
// by one launch (a thread-block cluster, or a cooperative grid) that keeps W_hh in shared
// memory (persistent_step.cuh); where the device cannot run it, the recorded steps run as
// fused launches. The LayerNorm cells take the standard path (layer_norm_step.cuh). All then take
// dX and the weight and bias gradients over all rows. No allocation, synchronisation or atomics
// inside the loops, so runs are bitwise reproducible; the standard and fused paths are
// capturable in a CUDA graph, and the device refuses the persistent launch while capturing.
//
// Half types: products accumulate in float and write float pre-activations; the cell state,
// the carried gradients and the gate gradients (which the next step's product reads) stay in
// float (A = at::opmath_type<T>), so that no rounding compounds over the steps.
//
// Dev provides:
//   gemm<T, CT>(trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate)
//       row-major C[M, N] (+)= A[M, K] @ (trans_b ? B^T : B), C of type CT
//   copy(dst, src, bytes)
//   forward_pointwise<Cell>(step, hg), backward_pointwise<Cell>(step),
//   layer_norm_forward<Cell>(step, xg, hg, gains, raw_offset),
//   layer_norm_backward<Cell>(step, LayerNormBackward): the LayerNorm cells' step kernels
//       (layer_norm_step.cuh), on the standard path,
//   add_rows(count, grad_out, state, out): the standard path's kernels (step_kernels.cuh)
//   fused_forward<Cell>(step, w_hh), fused_backward<Cell>(FusedBackwardStep, w_hh)
//   persistent_forward<Cell>(steps, w_hh, H, cluster), persistent_backward<Cell>(same):
//       one launch over all recorded steps, as a cluster where allowed and possible;
//       false (nothing run) where it cannot launch
//   tf32(): whether its float32 GEMMs use TF32 tensor cores
// and is called only with work to do (no empty launches).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "../problem.h"
#include "layer_norm_step.cuh"
#include "step_kernels.cuh"

namespace rnn_fused::cuda {

// Batches up to this size take the fused path (use_fused_path); it can take at most
// kFusedMaxRows (its grids have at most 65535 blocks of 8 rows).
constexpr int64_t kFusedMaxBatch = 64;
constexpr int64_t kFusedMaxRows = 65535 * 8;
// With tensor cores, steps whose product has more multiply-adds than this go to cuBLAS:
// TF32, and half types (lower: at T=100 B=64 H=512, 2^26 multiply-adds a step, LSTM and GRU
// ran 1.8-2.0x faster forward and 1.4-1.6x forward and backward on cuBLAS than fused in
// bfloat16 on an H100; RNN's 2^24 stay fused: there forward and backward took 2.43 ms fused
// against 2.75, the forward alone 1.15 against 0.91).
constexpr int64_t kFusedMaxTensorCoreMacs = int64_t(1) << 27;
constexpr int64_t kFusedMaxHalfMacs = int64_t(1) << 25;

// Whether a call runs the fused path (one kernel per step, the recurrent product inside
// it, on CUDA cores: for small batches, where a step is a few microseconds of work) or the
// standard one (a cuBLAS GEMM and a pointwise kernel per step). Where cuBLAS has tensor
// cores (half types, or float32 with TF32 allowed: tf32, which the device reads from its
// GEMM setup) it wins once a step's product is large. RNN_FUSED_CUDA_PATH=fused or
// =standard forces one, for tests and measurements.
inline bool forced_path(const char* path) {
  const char* forced = std::getenv("RNN_FUSED_CUDA_PATH");
  return forced != nullptr && std::strcmp(forced, path) == 0;
}
inline bool use_fused_path(const Problem& p, at::ScalarType dtype, bool tf32) {
  if (p.proj || p.layer_norm || p.batch > kFusedMaxRows) return false;
  if (forced_path("standard")) return false;
  if (forced_path("fused") || forced_path("persistent") || forced_path("persistent-grid")) {
    return true;
  }
  if (p.batch > kFusedMaxBatch) return false;
  const int64_t macs = p.batch * p.gate_width() * p.out_size;
  if (dtype == at::kHalf || dtype == at::kBFloat16) return macs <= kFusedMaxHalfMacs;
  return !(dtype == at::kFloat && tf32) || macs <= kFusedMaxTensorCoreMacs;
}

// Whether a call on the fused path runs its steps as one persistent launch: for batches up
// to kPersistentMaxBatch over at least kPersistentMinSteps steps, where a step's work is
// small next to a launch (the device may still decline: occupancy, shared memory, graph
// capture). RNN_FUSED_CUDA_PATH=persistent forces it wherever the device can run it, and
// =persistent-grid its grid-barrier variant (the device otherwise takes the cluster variant
// where the layer's blocks fit one cluster: persistent_step.cuh).
constexpr int64_t kPersistentMaxBatch = 16;
constexpr int64_t kPersistentMinSteps = 8;
inline bool use_persistent_path(const Problem& p) {
  if (forced_path("persistent") || forced_path("persistent-grid")) return true;
  if (forced_path("fused") || forced_path("standard")) return false;
  return p.batch <= kPersistentMaxBatch && p.steps >= kPersistentMinSteps;
}

// What the forward writes: the operator's results, its state, and the per-call workspaces
// (hg: the standard path's per-step product; h_ping: the fused path's two inference
// states; h_scratch: the unprojected h of an inference step).
struct ForwardBuffers {
  at::Tensor output, h_state, c_state, saved, h_prev, xg, hg, h_scratch, h_ping;
};

template <template <class> class CellT, class T, class Dev>
void run_forward(Dev& dev, const Problem& p, bool train, bool fused, bool persistent,
                 const at::Tensor& input, const at::Tensor& w_ih, const at::Tensor& w_hh,
                 const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                 const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& zoneout,
                 const std::optional<at::Tensor>& layer_norm, ForwardBuffers& f) {
  using A = at::opmath_type<T>;
  using Cell = CellT<A>;
  const int64_t H = p.hidden, Hout = p.out_size, GH = p.gate_width(), SW = p.saved_width();
  const T* w_hh_p = w_hh.data_ptr<T>();
  const T* w_hr_p = ptr_or_null<T>(w_hr);
  A* xg = f.xg.data_ptr<A>();
  T* out = f.output.data_ptr<T>();
  T* h_state = f.h_state.data_ptr<T>();
  T* saved = train ? f.saved.data_ptr<T>() : nullptr;
  A* const hg = fused ? nullptr : f.hg.data_ptr<A>();
  T* const h_scratch = p.proj && !train ? f.h_scratch.data_ptr<T>() : nullptr;
  const T* const keep = ptr_or_null<T>(zoneout);

  dev.template gemm<T, A>(true, p.rows, GH, p.input_size, input.data_ptr<T>(), p.input_size,
                          w_ih.data_ptr<T>(), p.input_size, xg, GH, false);

  ForwardStep<T, A> step{};
  step.H = H;
  step.b_ih = ptr_or_null<T>(b_ih);
  step.b_hh = ptr_or_null<T>(b_hh);
  step.ld_h_prev = Hout;
  step.c = Cell::kCellState ? f.c_state.data_ptr<A>() : nullptr;
  step.ld_saved = SW;
  step.ld_state = Hout;
  // In training each step starts from its rows of h_prev, which the backward reads again.
  // The kernel of a step also writes the rows the next step continues with, so a copy from
  // the state is needed only for rows that start there: all rows of the first step, and the
  // rows a growing packed batch (reverse direction) adds. Without training the standard
  // path's GEMM reads h_state itself (GRU's kernel reads, then writes, its own element of
  // it); the fused path's blocks read whole rows that other blocks write, so it alternates
  // two copies of the state (both start as h0, for the rows a packed batch adds).
  T* const h_prev_all = train ? f.h_prev.data_ptr<T>() : nullptr;
  T* const ping[2] = {fused && !train ? f.h_ping[0].data_ptr<T>() : nullptr,
                      fused && !train ? f.h_ping[1].data_ptr<T>() : nullptr};
  // The persistent path records the fused steps and launches them at the end. The copies
  // above then all run before the first step: a copy's rows start at the state there (rows
  // a growing batch adds have not been written by any step before), so they read h0 alike.
  std::vector<ForwardStep<T, A>> recorded;
  int64_t ready = 0;  // leading rows of this step's h_prev written by the previous kernel
  for (int64_t s = 0; s < p.steps; ++s) {
    const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
    T* h_prev = h_state;
    if (train) {
      h_prev = h_prev_all + r0 * Hout;
      if (n > ready) {
        dev.copy(h_prev + ready * Hout, h_state + ready * Hout, sizeof(T) * (n - ready) * Hout);
      }
    } else if (fused) {
      h_prev = ping[s % 2];
    }
    step.h_next = nullptr;
    step.n_next = 0;
    if (train && !p.proj && s + 1 < p.steps) {
      const int64_t t1 = p.step_at(s + 1);
      step.h_next = h_prev_all + p.offsets[t1] * Hout;
      step.n_next = std::min(n, p.batch_sizes[t1]);
    } else if (!train && fused) {
      step.h_next = ping[(s + 1) % 2];
      step.n_next = n;
    }
    ready = train ? step.n_next : 0;
    step.n = n;
    step.xg = xg + r0 * GH;
    step.h_prev = h_prev;
    step.saved = train ? saved + r0 * SW : nullptr;
    step.keep = keep == nullptr ? nullptr : keep + r0 * Hout;
    if (fused) {
      step.h = out + r0 * Hout;
      step.ld_h = Hout;
      step.h_state = h_state;
      if (n * H == 0) continue;
      if (persistent) {
        recorded.push_back(step);
      } else {
        dev.template fused_forward<Cell>(step, w_hh_p);
      }
      continue;
    }
    dev.template gemm<T, A>(true, n, GH, Hout, h_prev, Hout, w_hh_p, Hout, hg, GH, false);
    // With a projection the cell's h is unprojected: kept in the last saved block.
    T* h_unproj = !p.proj ? nullptr
                  : train ? saved + r0 * SW + p.layout.unprojected_offset()
                          : h_scratch;
    const int64_t ld_unproj = train ? SW : H;
    step.h = p.proj ? h_unproj : out + r0 * Hout;
    step.ld_h = p.proj ? ld_unproj : Hout;
    step.h_state = p.proj ? nullptr : h_state;
    if (n * H > 0 && p.layer_norm) {
      dev.template layer_norm_forward<Cell>(step, xg + r0 * GH, hg, layer_norm->data_ptr<T>(),
                                            p.layout.raw_offset());
    } else if (n * H > 0) {
      dev.template forward_pointwise<Cell>(step, hg);
    }
    if (p.proj) {
      dev.template gemm<T, T>(true, n, Hout, H, h_unproj, ld_unproj, w_hr_p, H, out + r0 * Hout,
                              Hout, false);
      if (n > 0) dev.copy(h_state, out + r0 * Hout, sizeof(T) * n * Hout);
    }
  }
  if (!recorded.empty() && !dev.template persistent_forward<Cell>(
                               recorded, w_hh_p, H, !forced_path("persistent-grid"))) {
    for (const ForwardStep<T, A>& step_s : recorded)
      dev.template fused_forward<Cell>(step_s, w_hh_p);
  }
}

// The forward operator (ops.cpp's schema) on a device: buffers, then the loop of one path.
// IndRNN's element-wise w_hh (Problem::elementwise) runs as the product with diag(u) here:
// exact (every other term is an exact zero), with an [H, H] product per step where u * h
// needs H multiplies; the kernels have no element-wise path yet.
inline LayerArgs with_diagonal_w_hh(const LayerArgs& a) {
  LayerArgs d = a;
  d.w_hh = at::diag(a.w_hh);
  return d;
}

// Half-type parameters with a float32 input are the CPU engine's alone: make_problem refuses
// them on a device, and the emulation of the tests runs this engine on CPU tensors.
inline void check_params_in_input_dtype(const LayerArgs& a) {
  TORCH_CHECK(a.w_ih.scalar_type() == a.input.scalar_type(),
              "rnn_fused: the CUDA engine needs parameters of the input's dtype (",
              a.input.scalar_type(), "), got w_ih of ", a.w_ih.scalar_type());
}

template <class Dev>
ForwardResult forward_engine(Dev& dev, const Problem& p, const LayerArgs& a, bool train) {
  check_params_in_input_dtype(a);
  if (p.elementwise) {
    const LayerArgs d = with_diagonal_w_hh(a);
    return forward_engine(dev, make_problem(d), d, train);
  }
  const at::Tensor &input = a.input, &w_ih = a.w_ih, &w_hh = a.w_hh;
  const OptTensor &hx = a.hx, &cx = a.cx, &b_ih = a.b_ih, &b_hh = a.b_hh, &w_hr = a.w_hr;
  const auto opts = input.options();
  const auto acc = opts.dtype(at::toOpMathType(input.scalar_type()));
  const bool lstm = p.kind == CellKind::LSTM;
  const int64_t kept_rows = train ? p.rows : 0;
  const bool fused = use_fused_path(p, input.scalar_type(), dev.tf32());

  ForwardBuffers f;
  f.output = p.packed ? at::empty({p.rows, p.out_size}, opts)
                      : at::empty({p.steps, p.batch, p.out_size}, opts);
  f.h_state = hx.has_value() ? hx->clone() : at::zeros({p.batch, p.out_size}, opts);
  f.c_state = !lstm            ? at::empty({0}, acc)
              : cx.has_value() ? cx->to(acc.dtype(), /*non_blocking=*/false, /*copy=*/true)
                               : at::zeros({p.batch, p.hidden}, acc);
  f.saved = at::empty({kept_rows, p.saved_width()}, opts);
  f.h_prev = at::empty({kept_rows, p.out_size}, opts);
  f.xg = at::empty({p.rows, p.gate_width()}, acc);
  f.hg = at::empty({fused ? 0 : p.batch, p.gate_width()}, acc);
  f.h_ping = fused && !train ? f.h_state.unsqueeze(0).repeat({2, 1, 1}) : at::Tensor();
  f.h_scratch = at::empty({p.proj && !train ? p.batch : 0, p.hidden}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "rnn_fused_forward", [&] {
        dispatch_cell(p.kind, [&](auto tag) {
          using Tag = decltype(tag);
          run_forward<Tag::template Cell, scalar_t>(
              dev, p, train, fused, fused && use_persistent_path(p), input, w_ih, w_hh, b_ih, b_hh,
              w_hr, a.zoneout, a.layer_norm, f);
        });
      });
  at::Tensor c_n = lstm ? f.c_state.to(input.scalar_type()) : at::empty({0}, opts);
  return {f.output, f.h_state, c_n, f.saved, f.h_prev};
}

// The backward's carried gradients (dh, dc), the gate gradients of all rows (dhg: GRU's
// hidden side, else dxg itself), all in A, and the projection's dL/dr rows and per-step
// dL/dh. LayerNorm cells: dxg and dhg are the gradients of the normalised sides (what the
// biases take); the products take those of the raw sides, dxg_raw and dhg_raw; dgain and
// dcell hold each row's gradients of the gains (LayerNormBackward). dhg_rounded (half types
// on the standard path, not LayerNorm): dhg rounded to T, which the per-step products take.
struct BackwardBuffers {
  at::Tensor dh_state, dc_state, dxg, dhg, dr, dh_step, dxg_raw, dhg_raw, dgain, dcell, dhg_rounded;
};

// w_hh_acc: W_hh in A, for the standard path's products with gate gradients in A (undefined
// where none runs).
// state_grad: whether dL/dh_0 is wanted; the last product (of the first step's gate
// gradients with W_hh) gives nothing else, and is skipped without it.
template <template <class> class CellT, class T, class Dev>
void run_backward(Dev& dev, const Problem& p, bool fused, bool persistent, bool state_grad,
                  const std::optional<at::Tensor>& grad_output, const at::Tensor& w_hh,
                  const at::Tensor& w_hh_acc, const std::optional<at::Tensor>& w_hr,
                  const std::optional<at::Tensor>& zoneout,
                  const std::optional<at::Tensor>& layer_norm, const at::Tensor& saved,
                  const at::Tensor& h_prev_all, BackwardBuffers& g) {
  using A = at::opmath_type<T>;
  using Cell = CellT<A>;
  const int64_t H = p.hidden, Hout = p.out_size, GH = p.gate_width(), SW = p.saved_width();
  const T* gout = ptr_or_null<T>(grad_output);
  const T* w_hh_p = w_hh.data_ptr<T>();
  const A* w_hh_acc_p = w_hh_acc.defined() ? w_hh_acc.data_ptr<A>() : nullptr;
  const T* w_hr_p = ptr_or_null<T>(w_hr);
  A* dh_state = g.dh_state.data_ptr<A>();
  A* dhg = g.dhg.data_ptr<A>();
  A* dxg = g.dxg.data_ptr<A>();
  T* const dhg_rounded = g.dhg_rounded.defined() ? g.dhg_rounded.data_ptr<T>() : nullptr;
  const T* saved_p = saved.data_ptr<T>();
  const T* h_prev_p = h_prev_all.data_ptr<T>();
  T* dr = p.proj ? g.dr.data_ptr<T>() : nullptr;
  A* dh_step = p.proj ? g.dh_step.data_ptr<A>() : nullptr;
  const T* const keep = ptr_or_null<T>(zoneout);

  BackwardStep<T, A> step{};
  step.H = H;
  step.dh = p.proj ? dh_step : dh_state;
  step.ld_dh = p.proj ? H : Hout;
  step.ld_grad_out = Hout;
  step.dc = Cell::kCellState ? g.dc_state.data_ptr<A>() : nullptr;
  step.ld_saved = SW;
  step.ld_h_prev = Hout;
  // Fused: the kernel of a step first adds the product of the step processed before it
  // (dg_next W_hh over its rows_gemm rows) to what dh carries. Persistent: the same steps,
  // recorded, then one launch.
  const A* dg_next = nullptr;
  int64_t rows_gemm = 0;
  std::vector<FusedBackwardStep<T, A>> recorded;
  const auto fused_step = [&](const BackwardStep<T, A>& s) {
    const FusedBackwardStep<T, A> r{s, dg_next, rows_gemm};
    if (r.rows() * H == 0) return;
    if (persistent) {
      recorded.push_back(r);
    } else {
      dev.template fused_backward<Cell>(r, w_hh_p);
    }
  };
  for (int64_t s = p.steps - 1; s >= 0; --s) {
    const int64_t t = p.step_at(s), n = p.batch_sizes[t], r0 = p.offsets[t];
    step.n = n;
    step.grad_out = !p.proj && gout != nullptr ? gout + r0 * Hout : nullptr;
    step.saved = saved_p + r0 * SW;
    step.h_prev = h_prev_p + r0 * Hout;
    step.dx = dxg + r0 * GH;
    step.dhh = dhg + r0 * GH;
    step.keep = keep == nullptr ? nullptr : keep + r0 * Hout;
    step.dg_rounded = dhg_rounded == nullptr ? nullptr : dhg_rounded + r0 * GH;
    if (fused) {
      fused_step(step);
      dg_next = dhg + r0 * GH;
      rows_gemm = n;
      continue;
    }
    if (p.proj && n * Hout > 0) {
      // dL/dr_t = grad_output_t + dL/dr_t carried from the next step; then through W_hr.
      dev.add_rows(n * Hout, gout == nullptr ? nullptr : gout + r0 * Hout, dh_state,
                   dr + r0 * Hout);
      dev.template gemm<T, A>(false, n, H, Hout, dr + r0 * Hout, Hout, w_hr_p, H, dh_step, H,
                              false);
    }
    if (n * H > 0 && p.layer_norm) {
      const LayerNormBackward<T, A> ln{
          layer_norm->data_ptr<T>(),
          p.layout.raw_offset(),
          g.dxg_raw.data_ptr<A>() + r0 * GH,
          g.dhg_raw.data_ptr<A>() + r0 * GH,
          g.dgain.data_ptr<A>() + r0 * 2 * GH,
          Cell::kCellState ? g.dcell.data_ptr<A>() + r0 * 2 * H : nullptr};
      dev.template layer_norm_backward<Cell>(step, ln);
    } else if (n * H > 0) {
      dev.template backward_pointwise<Cell>(step);
    }
    // dL/dh_{t-1} = (hidden-side gate gradients) W_hh [+ the direct part the kernel wrote].
    if (s == 0 && !state_grad) break;
    const bool add = Cell::kUsesPrevH || p.zoneout;
    if (dhg_rounded != nullptr) {  // half types: on tensor cores, as the products over all rows
      dev.template gemm<T, A>(false, n, Hout, GH, dhg_rounded + r0 * GH, GH, w_hh_p, Hout, dh_state,
                              Hout, add);
    } else {
      const A* dh_side = p.layer_norm ? g.dhg_raw.data_ptr<A>() : dhg;
      dev.template gemm<A, A>(false, n, Hout, GH, dh_side + r0 * GH, GH, w_hh_acc_p, Hout, dh_state,
                              Hout, add);
    }
  }
  if (fused && state_grad) {    // the product of the last step processed: dL/dh_0
    BackwardStep<T, A> tail{};  // no rows of a step: only the product's rows of dh
    tail.H = H;
    tail.dh = step.dh;
    tail.ld_dh = step.ld_dh;
    fused_step(tail);
  }
  if (!recorded.empty() && !dev.template persistent_backward<Cell>(
                               recorded, w_hh_p, H, !forced_path("persistent-grid"))) {
    for (const FusedBackwardStep<T, A>& r : recorded) dev.template fused_backward<Cell>(r, w_hh_p);
  }
}

// The backward operator on a device: the loop of one path, then the gradients of the
// input, the weights and the biases (as a.mask asks) as products and sums over all rows.
template <class Dev>
BackwardResult backward_engine(Dev& dev, const Problem& p, const BackwardArgs& a) {
  check_params_in_input_dtype(a.layer);
  if (p.elementwise) {
    BackwardArgs d = a;
    d.layer = with_diagonal_w_hh(a.layer);
    BackwardResult r = backward_engine(dev, make_problem(d), d);
    if (a.mask.weights) std::get<4>(r) = std::get<4>(r).diagonal().contiguous();  // du
    return r;
  }
  const at::Tensor &input = a.layer.input, &w_ih = a.layer.w_ih, &w_hh = a.layer.w_hh;
  const at::Tensor &saved = a.saved, &h_prev_all = a.h_prev;
  const OptTensor &w_hr = a.layer.w_hr, &grad_output = a.grad_output;
  const OptTensor &grad_h_n = a.grad_h_n, &grad_c_n = a.grad_c_n;
  const auto opts = input.options();
  const auto acc = opts.dtype(at::toOpMathType(input.scalar_type()));
  const bool lstm = p.kind == CellKind::LSTM, split = p.kind == CellKind::GRU;

  BackwardBuffers g;
  const auto copy_as_acc = [&](const at::Tensor& t) {
    return t.to(acc.dtype(), /*non_blocking=*/false, /*copy=*/true);
  };
  g.dh_state =
      grad_h_n.has_value() ? copy_as_acc(*grad_h_n) : at::zeros({p.batch, p.out_size}, acc);
  g.dc_state = !lstm                  ? at::empty({0}, acc)
               : grad_c_n.has_value() ? copy_as_acc(*grad_c_n)
                                      : at::zeros({p.batch, p.hidden}, acc);
  g.dxg = at::empty({p.rows, p.gate_width()}, acc);
  g.dhg = split ? at::empty({p.rows, p.gate_width()}, acc) : g.dxg;
  g.dr = p.proj ? at::empty({p.rows, p.out_size}, opts) : at::Tensor();
  g.dh_step = p.proj ? at::empty({p.batch, p.hidden}, acc) : at::Tensor();
  // Half types on the standard path: the per-step products take the gate gradients rounded
  // to the dtype, on tensor cores, as cuDNN's do (in A, with W_hh in A, they ran on CUDA
  // cores: bfloat16 LSTM T=50 B=256 H=1024, backward 2.4x cuDNN's on an H100).
  const at::ScalarType dtype = input.scalar_type();
  const bool fused = use_fused_path(p, dtype, dev.tf32());
  if (!fused && !p.layer_norm && (dtype == at::kHalf || dtype == at::kBFloat16)) {
    g.dhg_rounded = at::empty({p.rows, p.gate_width()}, opts);
  }
  if (p.layer_norm) {
    g.dxg_raw = at::empty({p.rows, p.gate_width()}, acc);
    g.dhg_raw = at::empty({p.rows, p.gate_width()}, acc);
    g.dgain = at::empty({p.rows, 2 * p.gate_width()}, acc);
    g.dcell = lstm ? at::empty({p.rows, 2 * p.hidden}, acc) : at::Tensor();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "rnn_fused_backward", [&] {
        dispatch_cell(p.kind, [&](auto tag) {
          using Tag = decltype(tag);
          const bool acc_products = !fused && !g.dhg_rounded.defined();
          run_backward<Tag::template Cell, scalar_t>(
              dev, p, fused, fused && use_persistent_path(p), a.mask.state, grad_output, w_hh,
              acc_products ? w_hh.to(acc.dtype()) : at::Tensor(), w_hr, a.layer.zoneout,
              a.layer.layer_norm, saved, h_prev_all, g);
        });
      });

  const auto none = [&] { return at::empty({0}, opts); };  // a new one each: outputs never alias
  at::Tensor grad_input = none(), grad_w_ih = none(), grad_w_hh = none(), grad_b_ih = none(),
             grad_b_hh = none(), grad_w_hr = none(), grad_layer_norm = none();
  // The products over all rows take the gate gradients rounded once to the dtype (tensor
  // cores for half types); the bias gradients sum them unrounded.
  // LayerNorm cells: the products take the raw sides' gradients (the biases the others).
  // dhg_rounded, where the loop wrote it, is dhg so rounded (and dxg, but for GRU).
  const bool rounded = g.dhg_rounded.defined();
  const at::Tensor dxg = p.layer_norm        ? g.dxg_raw.to(dtype)
                         : rounded && !split ? g.dhg_rounded
                                             : g.dxg.to(dtype);
  const at::Tensor dhg = p.layer_norm ? g.dhg_raw.to(dtype)
                         : !split     ? dxg
                         : rounded    ? g.dhg_rounded
                                      : g.dhg.to(dtype);
  if (a.mask.input) grad_input = at::mm(dxg, w_ih).view(input.sizes());
  if (a.mask.weights) {
    grad_w_ih = at::mm(dxg.t(), input.reshape({p.rows, p.input_size}));
    grad_w_hh = at::mm(dhg.t(), h_prev_all);
    grad_b_ih = g.dxg.sum(0).to(dtype);
    grad_b_hh = split ? g.dhg.sum(0).to(dtype) : grad_b_ih.clone();
    if (p.proj) {
      grad_w_hr = at::mm(g.dr.t(), saved.narrow(1, p.layout.unprojected_offset(), p.hidden));
    }
    if (p.layer_norm) {  // the gains' (and LSTM's cell-state gain's and bias's) row sums
      const at::Tensor gains = g.dgain.sum(0);
      grad_layer_norm = (lstm ? at::cat({gains, g.dcell.sum(0)}) : gains).to(dtype);
    }
  }
  return {grad_input,
          a.mask.state ? g.dh_state.to(input.scalar_type()) : none(),
          lstm && a.mask.state ? g.dc_state.to(input.scalar_type()) : none(),
          grad_w_ih,
          grad_w_hh,
          grad_b_ih,
          grad_b_hh,
          grad_w_hr,
          grad_layer_norm};
}

}  // namespace rnn_fused::cuda

// One recurrence call (one layer, one direction): its arguments by name, checked once on the
// host into a Problem, and the layout of the workspace the forward keeps for the backward.
// Shared by the CPU and CUDA engines, the CUDA emulation and the autograd kernel.
//
// Rows: the input is either padded [T, B, I] or packed [N, I] with per-step batch sizes
// (non-increasing, as torch.nn.utils.rnn.pack_padded_sequence makes them), or one step
// [B, I] (a cell's call: as packed with batch sizes [B]). All are seen
// as rows: step t owns rows offsets[t] .. offsets[t] + batch_sizes[t] of every per-row
// buffer (input, output, saved values), and the first batch_sizes[t] rows of the state.
//
// Packed rows: a state row whose sequence has ended (row >= batch_sizes[t]) is not touched
// by step t, so it carries its last value forward to h_n / c_n, and in the backward its
// incoming dL/dh_n waits in the carried gradient until the step where the sequence ends
// (one buffer serves as dh and dh_prev). In reverse order the batch grows instead: rows
// added at a step start from the initial state. The CUDA engine picks its path per call,
// so a forward and its backward may take different paths (use_fused_path reads the
// problem, the dtype and TF32, which the backward sees as the forward did, except where
// the user changes TF32 in between); both paths keep this same workspace.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>
#include <c10/util/strides.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "cell_math.h"

namespace rnn_fused {

using OptTensor = std::optional<at::Tensor>;

// The arguments of a layer call (the `forward` operator's, ops.cpp), by name.
struct LayerArgs {
  std::string_view mode;  // LSTM, GRU, RNN_TANH, RNN_RELU
  at::Tensor input;       // [T, B, I], packed rows [N, I] with batch_sizes, or one step [B, I]
  OptTensor hx, cx;       // initial states [B, H_out] and [B, H] (LSTM); zeros when absent
  at::Tensor w_ih, w_hh;  // torch.nn's weights of the layer, gates stacked in its order
  OptTensor b_ih, b_hh;   // given together or not at all
  OptTensor w_hr;         // LSTM projection [H_out, H]
  // The parameters (weights and biases) have the input's dtype, or on the CPU all one half
  // type with a float32 input: what torch.nn's layers run under CPU autocast. The products then
  // round their operands to that type (as the half type's own calls do), and the rest, the
  // results and the gradients of input and states are float32; the parameters' gradients come
  // in their type.
  // (w_hh may be a vector [H] for the RNN modes: IndRNN's element-wise weight, Problem::
  // elementwise.)
  OptTensor batch_sizes;  // int64 CPU [T] for packed input
  bool reverse = false;
  // Zoneout: per output row and unit, the weight w of the state kept from the step before,
  // h_t = h~_t + w (h_{t-1} - h~_t) where h~_t is the cell's: a 0/1 mask in training, the
  // probability in eval. Shaped like the output; no projection.
  OptTensor zoneout;
  // LayerNorm LSTM and GRU (reference.py's cell_step): the gains of the normalisations of
  // W_ih x and of W_hh h, then for LSTM the gain and bias of the one of c_t, concatenated:
  // [2 G H] (GRU) or [2 G H + 2 H] (LSTM). Differentiated.
  OptTensor layer_norm;

  // The same call with every tensor dense (is_dense: what the engines read through
  // pointers and strides).
  LayerArgs dense() const;
  bool is_dense() const;
  // The same call with every floating-point tensor converted to dtype (but the weights w_ih,
  // w_hh and w_hr only if `weights`, and the input only if `input_too`), by `convert` when
  // given (an engine's own conversion), else by Tensor::to.
  using ConvertFn = at::Tensor (*)(const at::Tensor&, at::ScalarType);
  LayerArgs to(at::ScalarType dtype, bool weights = true, bool input_too = true,
               ConvertFn convert = nullptr) const;
};

// Which gradients a backward computes: of the input, of the initial states, of the
// weights and biases (autograd's needs_input_grad, grouped).
struct GradMask {
  bool input = true, state = true, weights = true;
};

// The arguments of the `backward` operator: the forward's call less what the backward
// never reads (states, biases), the incoming gradients, and the forward's workspace.
struct BackwardArgs {
  LayerArgs layer;                            // hx, cx, b_ih, b_hh absent
  OptTensor grad_output, grad_h_n, grad_c_n;  // absent: zeros
  at::Tensor saved, h_prev;
  c10::SymInt batch = 0;  // rows of the states (h_n's); symbolic only while tracing
  GradMask mask;

  // `empty` (when given) allocates the copy of a non-contiguous gradient of the outputs: an
  // engine's own memory for the largest of the copies (the CPU's buffer cache).
  using EmptyFn = at::Tensor (*)(at::IntArrayRef, const at::TensorOptions&);
  BackwardArgs dense(EmptyFn empty = nullptr) const;
  bool is_dense() const;
  BackwardArgs to(at::ScalarType dtype, bool weights = true,
                  LayerArgs::ConvertFn convert = nullptr) const;
};

// The forward's workspace for the backward, in one place. `saved` [rows, width()] holds per
// row the cell's kSaved blocks of width H (cell_math.h names them), then, for a projected
// LSTM, the unprojected h (at unprojected_offset()), which the gradient of W_hr needs, or,
// with layer_norm, the pre-activations before their normalisations, W_ih x and W_hh h (G
// blocks each, at raw_offset()), from which the backward recomputes the statistics;
// `h_prev` [rows, H_out] holds the state each row started from. Inference keeps 0 rows.
struct SavedLayout {
  int64_t cell_blocks = 0;  // the cell's kSaved
  bool proj = false;
  int64_t hidden = 0;
  int64_t raw_blocks = 0;  // 2 G with layer_norm, else 0

  int64_t blocks() const { return cell_blocks + (proj ? 1 : 0) + raw_blocks; }
  int64_t width() const { return blocks() * hidden; }
  int64_t unprojected_offset() const { return cell_blocks * hidden; }
  int64_t raw_offset() const { return cell_blocks * hidden; }
};
SavedLayout saved_layout(CellKind kind, bool proj, int64_t hidden, bool layer_norm = false);

// The dtype of the workspace (saved, h_prev) of a call whose input has `dtype`: float32 for
// float16 and bfloat16 on the CPU, whose engine runs those calls in float32 (rounding the
// workspace would cost a conversion pass over it each way, and accuracy); else `dtype`.
at::ScalarType workspace_dtype(c10::DeviceType device, at::ScalarType dtype);

struct Problem {
  CellKind kind;
  int64_t gates;       // gate blocks per row (4 LSTM, 3 GRU, 1 RNN)
  SavedLayout layout;  // what the forward keeps per row
  int64_t steps;       // T
  int64_t batch;       // B: rows of the state (the largest per-step batch)
  int64_t rows;        // N: rows of input and output over all steps
  int64_t input_size;  // I
  int64_t hidden;      // H
  int64_t out_size;    // H_out: proj_size for a projected LSTM, else H
  bool packed;         // rows [N, .] in and out: packed input, or one step given as [B, I]
  bool reverse;
  bool proj;
  bool has_bias;
  // IndRNN: w_hh is a vector u [H] (an RNN mode only), the recurrence's element-wise weight:
  // the hidden-side pre-activation is u * h, where the other cells have h W_hh^T.
  bool elementwise;
  bool zoneout;     // LayerArgs::zoneout given
  bool layer_norm;  // LayerArgs::layer_norm given
  bool bfloat16;    // the products are bfloat16's: the parameters' dtype (LayerArgs)
  // A forward that keeps nothing for a backward (set by the forward's adapters): the CPU
  // engine may choose its path differently (small_problem).
  bool inference = false;
  // The forward's call (set by the forward's adapters; a backward's problem leaves it false):
  // the CPU engine's forward may take a path its backward does not (stored_tiles_step).
  bool forward = false;
  // Inline for a few steps: a cell's call allocates nothing here.
  c10::SmallVector<int64_t, 4> batch_sizes;  // per step
  c10::SmallVector<int64_t, 4> offsets;      // first row of each step

  int64_t gate_width() const { return gates * hidden; }
  int64_t saved_width() const { return layout.width(); }
  // Time index of the s-th step processed by the forward.
  int64_t step_at(int64_t s) const { return reverse ? steps - 1 - s : s; }
};

// A mode's CellKind, and back (the name lives in static storage).
CellKind parse_mode(std::string_view mode);
std::string_view mode_name(CellKind kind);
int64_t gates_of(CellKind kind);

// Validates a layer call and describes it. Every error names the argument, the expected and
// the actual value. Every engine runs float32, float64, float16 and bfloat16; half-type
// parameters with a float32 input, the CPU engine only.
Problem make_problem(const LayerArgs& a);
// Validates the backward's arguments against the problem of its forward.
Problem make_problem(const BackwardArgs& a);

// What the operators return (ops.cpp has the schemas).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Argument helpers of the engines.
template <class T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Whether t is contiguous with the strides of a fresh tensor of its sizes. is_contiguous()
// also holds where a dimension of size 1 has another stride (an input [T, B, 1] made by a
// transpose), which the kernels that read strides would take for a step between values.
inline bool is_dense(const at::Tensor& t) {
  return t.is_contiguous() && (t.numel() == 0 ||  // nothing is read
                               t.strides() == at::IntArrayRef(c10::contiguous_strides(t.sizes())));
}

// t contiguous with those strides: a view of t.contiguous() where only strides of size-1
// dimensions differ.
inline at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return is_dense(c) ? c : c.as_strided(c.sizes(), c10::contiguous_strides(c.sizes()));
}

inline bool is_dense(const OptTensor& t) { return !t.has_value() || is_dense(*t); }

inline OptTensor dense(const OptTensor& t) {
  return t.has_value() ? OptTensor(dense(*t)) : std::nullopt;
}

inline at::Tensor to(const at::Tensor& t, at::ScalarType dtype, LayerArgs::ConvertFn convert) {
  return convert != nullptr ? convert(t, dtype) : t.to(dtype);
}
inline OptTensor to(const OptTensor& t, at::ScalarType dtype, LayerArgs::ConvertFn convert) {
  return t.has_value() ? OptTensor(to(*t, dtype, convert)) : std::nullopt;
}

}  // namespace rnn_fused

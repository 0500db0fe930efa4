// The shape of one recurrence call (one layer, one direction), checked once on the host
// and shared by the CPU and CUDA engines.
//
// Rows: the input is either padded [T, B, I] or packed [N, I] with per-step batch sizes
// (non-increasing, as torch.nn.utils.rnn.pack_padded_sequence makes them). Both are seen
// as rows: step t owns rows offsets[t] .. offsets[t] + batch_sizes[t] of every per-row
// buffer (input, output, saved values), and the first batch_sizes[t] rows of the state.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cell_math.h"

namespace rnn_fused {

struct Problem {
  CellKind kind;
  int64_t gates;         // gate blocks per row (4 LSTM, 3 GRU, 1 RNN)
  int64_t saved_blocks;  // blocks of width `hidden` saved per row for the backward
  int64_t steps;         // T
  int64_t batch;         // B: rows of the state (the largest per-step batch)
  int64_t rows;          // N: rows of input and output over all steps
  int64_t input_size;    // I
  int64_t hidden;        // H
  int64_t out_size;      // H_out: proj_size for a projected LSTM, else H
  bool packed;
  bool reverse;
  bool proj;
  bool has_bias;
  std::vector<int64_t> batch_sizes;  // per step
  std::vector<int64_t> offsets;      // first row of each step

  int64_t gate_width() const { return gates * hidden; }
  int64_t saved_width() const { return saved_blocks * hidden; }
  // Time index of the s-th step processed by the forward.
  int64_t step_at(int64_t s) const { return reverse ? steps - 1 - s : s; }
};

CellKind parse_mode(const std::string& mode);
int64_t gates_of(CellKind kind);
// Width in units of H of the per-row values the forward saves (LSTM with projection also
// keeps the unprojected h for the gradient of W_hr).
int64_t saved_blocks_of(CellKind kind, bool proj);

// Validates the forward operator's arguments and describes the call. Every error names
// the argument, the expected and the actual value. half_types: whether the calling engine
// runs float16 and bfloat16 (the CUDA one) besides float32 and float64.
Problem make_problem(bool half_types, const std::string& mode, const at::Tensor& input,
                     const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                     const std::optional<at::Tensor>& w_hr,
                     const std::optional<at::Tensor>& batch_sizes, bool reverse);

// Validates the backward operator's arguments against the problem of its forward.
Problem make_backward_problem(bool half_types, c10::string_view mode,
                              const std::optional<at::Tensor>& grad_output,
                              const std::optional<at::Tensor>& grad_h_n,
                              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                              const std::optional<at::Tensor>& hx, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& batch_sizes, bool reverse,
                              const at::Tensor& saved, const at::Tensor& h_prev);

// What the operators return (ops.cpp has the schemas).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

// Argument helpers of the engines.
template <class T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

}  // namespace rnn_fused

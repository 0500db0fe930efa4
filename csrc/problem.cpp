#include "problem.h"

#include <sstream>

namespace rnn_fused {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

void check_shape(const at::Tensor& t, const char* name, std::vector<int64_t> expected) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "rnn_fused: ", name, " must have shape ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "rnn_fused: ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "rnn_fused: ", name,
              " must be on the device of input (", input.device(), "), got ", t.device());
}

}  // namespace

CellKind parse_mode(const std::string& mode) {
  if (mode == "LSTM") return CellKind::LSTM;
  if (mode == "GRU") return CellKind::GRU;
  if (mode == "RNN_TANH") return CellKind::RNN_TANH;
  if (mode == "RNN_RELU") return CellKind::RNN_RELU;
  TORCH_CHECK(false, "rnn_fused: mode must be one of LSTM, GRU, RNN_TANH, RNN_RELU, got '", mode,
              "'");
}

int64_t gates_of(CellKind kind) {
  return dispatch_cell(
      kind, [](auto tag) -> int64_t { return decltype(tag)::template Cell<float>::kGates; });
}

int64_t saved_blocks_of(CellKind kind, bool proj) {
  const int64_t base = dispatch_cell(
      kind, [](auto tag) -> int64_t { return decltype(tag)::template Cell<float>::kSaved; });
  return base + (proj ? 1 : 0);
}

Problem make_problem(bool half_types, const std::string& mode, const at::Tensor& input,
                     const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                     const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                     const std::optional<at::Tensor>& w_hr,
                     const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  Problem p;
  p.kind = parse_mode(mode);
  p.gates = gates_of(p.kind);
  p.packed = batch_sizes.has_value();
  p.reverse = reverse;
  p.proj = w_hr.has_value();
  p.has_bias = b_ih.has_value();
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "rnn_fused: b_ih and b_hh must be given together, got b_ih ",
              b_ih.has_value() ? "given" : "None", " and b_hh ",
              b_hh.has_value() ? "given" : "None");
  TORCH_CHECK(!p.proj || p.kind == CellKind::LSTM,
              "rnn_fused: w_hr (projection) is only supported for mode LSTM, got mode ", mode);
  TORCH_CHECK(!cx.has_value() || p.kind == CellKind::LSTM,
              "rnn_fused: cx is only used by mode LSTM, got a cx for mode ", mode);
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
                  (half_types &&
                   (input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16)),
              "rnn_fused: input dtype must be float32 or float64 (or float16/bfloat16 on "
              "CUDA), got ",
              input.scalar_type(), " on ", input.device());

  TORCH_CHECK(w_ih.dim() == 2, "rnn_fused: w_ih must be 2-D [gates*hidden, input_size], got ",
              w_ih.dim(), "-D");
  TORCH_CHECK(w_ih.size(0) % p.gates == 0, "rnn_fused: w_ih.size(0) must be a multiple of ",
              p.gates, " for mode ", mode, ", got ", w_ih.size(0));
  p.hidden = w_ih.size(0) / p.gates;
  p.input_size = w_ih.size(1);
  p.out_size = p.hidden;
  if (p.proj) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == p.hidden,
                "rnn_fused: w_hr must have shape [proj_size, ", p.hidden, "], got ",
                shape_str(w_hr->sizes()));
    p.out_size = w_hr->size(0);
    check_like(*w_hr, "w_hr", input);
  }
  check_like(w_ih, "w_ih", input);
  check_like(w_hh, "w_hh", input);
  check_shape(w_hh, "w_hh", {p.gate_width(), p.out_size});
  if (p.has_bias) {
    check_like(*b_ih, "b_ih", input);
    check_like(*b_hh, "b_hh", input);
    check_shape(*b_ih, "b_ih", {p.gate_width()});
    check_shape(*b_hh, "b_hh", {p.gate_width()});
  }

  if (p.packed) {
    const at::Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "rnn_fused: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(), "-D ",
                bs.scalar_type(), " on ", bs.device());
    TORCH_CHECK(input.dim() == 2, "rnn_fused: packed input must be 2-D [rows, input_size], got ",
                input.dim(), "-D");
    TORCH_CHECK(hx.has_value(), "rnn_fused: hx is required with packed input (batch_sizes)");
    auto bsc = bs.contiguous();
    const int64_t* v = bsc.data_ptr<int64_t>();
    p.steps = bs.numel();
    p.batch = hx->dim() == 2 ? hx->size(0) : -1;
    int64_t row = 0;
    for (int64_t t = 0; t < p.steps; ++t) {
      TORCH_CHECK(v[t] > 0 && v[t] <= p.batch && (t == 0 || v[t] <= v[t - 1]),
                  "rnn_fused: batch_sizes must be positive, non-increasing and at most the "
                  "batch of hx (",
                  p.batch, "); got ", v[t], " at step ", t);
      p.batch_sizes.push_back(v[t]);
      p.offsets.push_back(row);
      row += v[t];
    }
    p.rows = row;
    TORCH_CHECK(input.size(0) == p.rows,
                "rnn_fused: packed input must have sum(batch_sizes) = ", p.rows, " rows, got ",
                input.size(0));
    TORCH_CHECK(p.steps == 0 || p.batch_sizes[0] == p.batch,
                "rnn_fused: batch_sizes[0] must equal the batch of hx (", p.batch, "), got ",
                p.steps ? p.batch_sizes[0] : 0);
  } else {
    TORCH_CHECK(input.dim() == 3, "rnn_fused: input must be 3-D [seq_len, batch, input_size], got ",
                input.dim(), "-D");
    p.steps = input.size(0);
    p.batch = input.size(1);
    p.rows = p.steps * p.batch;
    for (int64_t t = 0; t < p.steps; ++t) {
      p.batch_sizes.push_back(p.batch);
      p.offsets.push_back(t * p.batch);
    }
  }
  TORCH_CHECK(p.steps > 0, "rnn_fused: the sequence length must be at least 1, got ", p.steps);
  TORCH_CHECK(input.size(-1) == p.input_size, "rnn_fused: input.size(-1) must equal w_ih.size(1) (",
              p.input_size, "), got ", input.size(-1));
  if (hx.has_value()) {
    check_like(*hx, "hx", input);
    check_shape(*hx, "hx", {p.batch, p.out_size});
  }
  if (cx.has_value()) {
    check_like(*cx, "cx", input);
    check_shape(*cx, "cx", {p.batch, p.hidden});
  }
  p.saved_blocks = saved_blocks_of(p.kind, p.proj);
  return p;
}

Problem make_backward_problem(bool half_types, c10::string_view mode,
                              const std::optional<at::Tensor>& grad_output,
                              const std::optional<at::Tensor>& grad_h_n,
                              const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                              const std::optional<at::Tensor>& hx, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                              const std::optional<at::Tensor>& batch_sizes, bool reverse,
                              const at::Tensor& saved, const at::Tensor& h_prev) {
  const Problem p =
      make_problem(half_types, std::string(mode.data(), mode.size()), input, hx, std::nullopt, w_ih,
                   w_hh, std::nullopt, std::nullopt, w_hr, batch_sizes, reverse);
  if (grad_output.has_value()) {
    TORCH_CHECK(grad_output->numel() == p.rows * p.out_size, "rnn_fused: grad_output must have ",
                p.rows * p.out_size, " elements, got ", grad_output->numel());
  }
  if (grad_h_n.has_value()) check_shape(*grad_h_n, "grad_h_n", {p.batch, p.out_size});
  if (grad_c_n.has_value()) {
    TORCH_CHECK(p.kind == CellKind::LSTM, "rnn_fused: grad_c_n is only used by mode LSTM");
    check_shape(*grad_c_n, "grad_c_n", {p.batch, p.hidden});
  }
  check_shape(saved, "saved", {p.rows, p.saved_width()});
  check_shape(h_prev, "h_prev", {p.rows, p.out_size});
  return p;
}

}  // namespace rnn_fused

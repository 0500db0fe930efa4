#include "problem.h"

#include <algorithm>
#include <cstdint>
#include <sstream>

namespace rnn_fused {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// expected: a braced list (no allocation: a short call checks five shapes).
void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "rnn_fused: ", name, " must have shape ", shape_str(expected),
              ", got ", shape_str(t.sizes()));
}

// t in the dtype of `like` (named like_name) and on the input's device.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& input,
                const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rnn_fused: ", name,
              " must have the dtype of ", like_name, " (", like.scalar_type(), "), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "rnn_fused: ", name,
              " must be on the device of input (", input.device(), "), got ", t.device());
}
void check_like(const at::Tensor& t, const char* name, const at::Tensor& input) {
  check_like(t, name, input, input, "input");
}

// w_ih's dtype, which the other parameters share: the input's, or a half type with a float32
// input on the CPU (LayerArgs).
void check_params_dtype(const at::Tensor& w_ih, const at::Tensor& input) {
  const at::ScalarType w = w_ih.scalar_type(), x = input.scalar_type();
  const bool half_params = x == at::kFloat && (w == at::kBFloat16 || w == at::kHalf);
  TORCH_CHECK(w == x || (half_params && input.is_cpu()), "rnn_fused: w_ih must have the dtype of ",
              "input (", x, ") or, with a float32 input on the CPU, bfloat16 or float16, got ", w,
              " with a ", x, " input on ", input.device());
  TORCH_CHECK(w_ih.device() == input.device(), "rnn_fused: w_ih must be on the device of input (",
              input.device(), "), got ", w_ih.device());
}

// The workspace in workspace_dtype, or in the input's dtype (the CUDA engine's, which the
// tests also run on the CPU under emulation; the CPU engine reads either).
void check_workspace(const at::Tensor& t, const char* name, const at::Tensor& input) {
  const at::ScalarType dtype = workspace_dtype(input.device().type(), input.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype || t.scalar_type() == input.scalar_type(),
              "rnn_fused: ", name, " must have dtype ", dtype, " or ", input.scalar_type(),
              " (the workspace of a ", input.scalar_type(), " input on ", input.device().type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "rnn_fused: ", name,
              " must be on the device of input (", input.device(), "), got ", t.device());
}

// Whether every value of t is its first: a CPU tensor with a size of 1 or a stride of 0 in
// every dimension (the gradient of `out.sum()` or `out.mean()`: one value expanded).
bool one_value(const at::Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) != 1 && t.stride(d) != 0) return false;
  }
  return t.is_cpu() && t.numel() > 0;
}

template <class Bits>
void fill_bits(at::Tensor& t, const at::Tensor& from) {
  std::fill_n(static_cast<Bits*>(t.data_ptr()), t.numel(),
              *static_cast<const Bits*>(from.data_ptr()));
}

// t (contiguous, of from's dtype) filled with from's first value, bit for bit; false for a
// dtype of another size.
bool fill_with_first(at::Tensor& t, const at::Tensor& from) {
  switch (from.element_size()) {
    case 2:
      fill_bits<uint16_t>(t, from);
      return true;
    case 4:
      fill_bits<uint32_t>(t, from);
      return true;
    case 8:
      fill_bits<uint64_t>(t, from);
      return true;
    default:
      return false;
  }
}

}  // namespace

LayerArgs LayerArgs::dense() const {
  LayerArgs c = *this;
  c.input = rnn_fused::dense(input);
  c.w_ih = rnn_fused::dense(w_ih);
  c.w_hh = rnn_fused::dense(w_hh);
  c.hx = rnn_fused::dense(hx);
  c.cx = rnn_fused::dense(cx);
  c.b_ih = rnn_fused::dense(b_ih);
  c.b_hh = rnn_fused::dense(b_hh);
  c.w_hr = rnn_fused::dense(w_hr);
  c.zoneout = rnn_fused::dense(zoneout);
  c.layer_norm = rnn_fused::dense(layer_norm);
  return c;
}

bool LayerArgs::is_dense() const {
  return rnn_fused::is_dense(input) && rnn_fused::is_dense(w_ih) && rnn_fused::is_dense(w_hh) &&
         rnn_fused::is_dense(hx) && rnn_fused::is_dense(cx) && rnn_fused::is_dense(b_ih) &&
         rnn_fused::is_dense(b_hh) && rnn_fused::is_dense(w_hr) && rnn_fused::is_dense(zoneout) &&
         rnn_fused::is_dense(layer_norm);
}

LayerArgs LayerArgs::to(at::ScalarType dtype, bool weights, bool input_too,
                        ConvertFn convert) const {
  LayerArgs c = *this;
  if (input_too) c.input = rnn_fused::to(input, dtype, convert);
  c.hx = rnn_fused::to(hx, dtype, convert);
  c.cx = rnn_fused::to(cx, dtype, convert);
  c.b_ih = rnn_fused::to(b_ih, dtype, convert);
  c.b_hh = rnn_fused::to(b_hh, dtype, convert);
  c.zoneout = rnn_fused::to(zoneout, dtype, convert);
  c.layer_norm = rnn_fused::to(layer_norm, dtype, convert);
  if (weights) {
    c.w_ih = rnn_fused::to(w_ih, dtype, convert);
    c.w_hh = rnn_fused::to(w_hh, dtype, convert);
    c.w_hr = rnn_fused::to(w_hr, dtype, convert);
  }
  return c;
}

BackwardArgs BackwardArgs::to(at::ScalarType dtype, bool weights,
                              LayerArgs::ConvertFn convert) const {
  BackwardArgs c = *this;
  c.layer = layer.to(dtype, weights, /*input_too=*/true, convert);
  c.grad_output = rnn_fused::to(grad_output, dtype, convert);
  c.grad_h_n = rnn_fused::to(grad_h_n, dtype, convert);
  c.grad_c_n = rnn_fused::to(grad_c_n, dtype, convert);
  c.saved = rnn_fused::to(saved, dtype, convert);
  c.h_prev = rnn_fused::to(h_prev, dtype, convert);
  return c;
}

BackwardArgs BackwardArgs::dense(EmptyFn empty) const {
  BackwardArgs c = *this;
  c.layer = layer.dense();
  // A non-contiguous gradient (the expanded ones of `out.sum().backward()`, or a cell's
  // `h.sum().backward()`) copied into memory from `empty` where given, not by Tensor::contiguous:
  // LSTMCell(32)'s forward and backward 101.6 -> 99.2 us a call (AMD EPYC). One value expanded
  // is written out without TensorIterator's copy, which took about 2 us more.
  const auto copied = [&](const OptTensor& g) -> OptTensor {
    if (empty == nullptr || !g.has_value() || g->is_contiguous()) return rnn_fused::dense(g);
    at::Tensor t = empty(g->sizes(), g->options());
    if (!one_value(*g) || !fill_with_first(t, *g)) t.copy_(*g);
    return t;
  };
  c.grad_output = copied(grad_output);
  c.grad_h_n = copied(grad_h_n);
  c.grad_c_n = copied(grad_c_n);
  c.saved = rnn_fused::dense(saved);
  c.h_prev = rnn_fused::dense(h_prev);
  return c;
}

bool BackwardArgs::is_dense() const {
  return layer.is_dense() && rnn_fused::is_dense(grad_output) && rnn_fused::is_dense(grad_h_n) &&
         rnn_fused::is_dense(grad_c_n) && rnn_fused::is_dense(saved) && rnn_fused::is_dense(h_prev);
}

namespace {
// The modes' names, in CellKind's order.
constexpr std::array<std::string_view, 4> kModeNames{"LSTM", "GRU", "RNN_TANH", "RNN_RELU"};
}  // namespace

CellKind parse_mode(std::string_view mode) {
  for (size_t k = 0; k < kModeNames.size(); ++k) {
    if (mode == kModeNames[k]) return CellKind(k);
  }
  TORCH_CHECK(false, "rnn_fused: mode must be one of LSTM, GRU, RNN_TANH, RNN_RELU, got '", mode,
              "'");
}

std::string_view mode_name(CellKind kind) { return kModeNames.at(size_t(kind)); }

int64_t gates_of(CellKind kind) {
  return dispatch_cell(
      kind, [](auto tag) -> int64_t { return decltype(tag)::template Cell<float>::kGates; });
}

at::ScalarType workspace_dtype(c10::DeviceType device, at::ScalarType dtype) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  return device == c10::DeviceType::CPU && half ? at::kFloat : dtype;
}

SavedLayout saved_layout(CellKind kind, bool proj, int64_t hidden, bool layer_norm) {
  const int64_t blocks = dispatch_cell(
      kind, [](auto tag) -> int64_t { return decltype(tag)::template Cell<float>::kSaved; });
  return SavedLayout{blocks, proj, hidden, layer_norm ? 2 * gates_of(kind) : 0};
}

Problem make_problem(const LayerArgs& a) {
  const auto& [mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, zoneout,
               layer_norm] = a;
  Problem p;
  p.kind = parse_mode(mode);
  p.gates = gates_of(p.kind);
  p.packed = batch_sizes.has_value();
  p.reverse = reverse;
  p.proj = w_hr.has_value();
  p.has_bias = b_ih.has_value();
  p.bfloat16 = w_ih.scalar_type() == at::kBFloat16;
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "rnn_fused: b_ih and b_hh must be given together, got b_ih ",
              b_ih.has_value() ? "given" : "None", " and b_hh ",
              b_hh.has_value() ? "given" : "None");
  TORCH_CHECK(!p.proj || p.kind == CellKind::LSTM,
              "rnn_fused: w_hr (projection) is only supported for mode LSTM, got mode ", mode);
  TORCH_CHECK(!cx.has_value() || p.kind == CellKind::LSTM,
              "rnn_fused: cx is only used by mode LSTM, got a cx for mode ", mode);
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "rnn_fused: input dtype must be float32, float64, float16 or bfloat16, got ", dtype);

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
  }
  check_params_dtype(w_ih, input);
  if (p.proj) check_like(*w_hr, "w_hr", input, w_ih, "w_ih");
  check_like(w_hh, "w_hh", input, w_ih, "w_ih");
  p.elementwise = w_hh.dim() == 1;
  if (p.elementwise) {
    TORCH_CHECK(p.kind == CellKind::RNN_TANH || p.kind == CellKind::RNN_RELU,
                "rnn_fused: an element-wise w_hh (1-D, IndRNN) needs mode RNN_TANH or RNN_RELU, "
                "got mode ",
                mode);
    check_shape(w_hh, "w_hh", {p.hidden});
  } else {
    check_shape(w_hh, "w_hh", {p.gate_width(), p.out_size});
  }
  if (p.has_bias) {
    check_like(*b_ih, "b_ih", input, w_ih, "w_ih");
    check_like(*b_hh, "b_hh", input, w_ih, "w_ih");
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
    auto bsc = bs.contiguous();
    const int64_t* v = bsc.data_ptr<int64_t>();
    p.steps = bs.numel();
    TORCH_CHECK(p.steps > 0, "rnn_fused: the sequence length must be at least 1, got 0");
    // The batch is hx's when given, else the first step's.
    p.batch = !hx.has_value() ? v[0] : hx->dim() == 2 ? hx->size(0) : -1;
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
    TORCH_CHECK(p.batch_sizes[0] == p.batch,
                "rnn_fused: batch_sizes[0] must equal the batch of hx (", p.batch, "), got ",
                p.batch_sizes[0]);
  } else if (input.dim() == 2) {
    // One step [B, I] (a cell's call): rows as packed with batch_sizes [B], which saves the
    // caller a view (about a microsecond, the tenth of such a call).
    p.packed = true;
    p.steps = 1;
    p.batch = p.rows = input.size(0);
    p.batch_sizes = {p.batch};
    p.offsets = {0};
  } else {
    TORCH_CHECK(input.dim() == 3,
                "rnn_fused: input must be 3-D [seq_len, batch, input_size] (or 2-D [batch, "
                "input_size]: one step), got ",
                input.dim(), "-D");
    p.steps = input.size(0);
    p.batch = input.size(1);
    p.rows = p.steps * p.batch;
    p.batch_sizes.assign(p.steps, p.batch);
    p.offsets.resize(p.steps);
    for (int64_t t = 0; t < p.steps; ++t) p.offsets[t] = t * p.batch;
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
  p.zoneout = zoneout.has_value();
  if (p.zoneout) {
    TORCH_CHECK(!p.proj,
                "rnn_fused: zoneout needs a layer without projection (w_hr None), got w_hr ",
                "of shape ", shape_str(w_hr->sizes()));
    check_like(*zoneout, "zoneout", input);
    check_shape(*zoneout, "zoneout",
                p.packed ? std::vector<int64_t>{p.rows, p.out_size}
                         : std::vector<int64_t>{p.steps, p.batch, p.out_size});
  }
  p.layer_norm = layer_norm.has_value();
  if (p.layer_norm) {
    TORCH_CHECK(p.kind == CellKind::LSTM || p.kind == CellKind::GRU,
                "rnn_fused: layer_norm is for modes LSTM and GRU, got mode ", mode);
    TORCH_CHECK(!p.proj, "rnn_fused: layer_norm needs a layer without projection (w_hr None)");
    check_like(*layer_norm, "layer_norm", input);
    const int64_t cell = p.kind == CellKind::LSTM ? 2 * p.hidden : 0;
    check_shape(*layer_norm, "layer_norm", {2 * p.gate_width() + cell});
  }
  p.layout = saved_layout(p.kind, p.proj, p.hidden, p.layer_norm);
  return p;
}

Problem make_problem(const BackwardArgs& a) {
  TORCH_CHECK(!a.layer.hx && !a.layer.cx && !a.layer.b_ih && !a.layer.b_hh,
              "rnn_fused: the backward takes no states or biases");
  const Problem p = make_problem(a.layer);
  const at::Tensor& input = a.layer.input;
  if (a.grad_output.has_value()) {
    const std::vector<int64_t> shape = p.packed
                                           ? std::vector<int64_t>{p.rows, p.out_size}
                                           : std::vector<int64_t>{p.steps, p.batch, p.out_size};
    check_shape(*a.grad_output, "grad_output", shape);
    check_like(*a.grad_output, "grad_output", input);
  }
  if (a.grad_h_n.has_value()) {
    check_shape(*a.grad_h_n, "grad_h_n", {p.batch, p.out_size});
    check_like(*a.grad_h_n, "grad_h_n", input);
  }
  if (a.grad_c_n.has_value()) {
    TORCH_CHECK(p.kind == CellKind::LSTM, "rnn_fused: grad_c_n is only used by mode LSTM");
    check_shape(*a.grad_c_n, "grad_c_n", {p.batch, p.hidden});
    check_like(*a.grad_c_n, "grad_c_n", input);
  }
  TORCH_CHECK(a.batch.expect_int() == p.batch,
              "rnn_fused: batch must equal the batch of the forward (", p.batch, "), got ",
              a.batch);
  check_shape(a.saved, "saved", {p.rows, p.saved_width()});
  check_workspace(a.saved, "saved", input);
  check_shape(a.h_prev, "h_prev", {p.rows, p.out_size});
  check_workspace(a.h_prev, "h_prev", input);
  return p;
}

}  // namespace rnn_fused

// The CPU recurrence: forward and backward of one layer and one direction over all steps
// (forward_cpu.cpp, backward_cpu.cpp; engine.h: the choices they share). This file: half-type
// calls on the float32 engine, the entries, and the operator's CPU kernels.
//
// Steps run in chunks of consecutive steps (their rows are contiguous) sized so that a
// chunk's gate buffer stays in cache:
//   forward:  per chunk, the input projection X W_ih^T of all its rows as one product;
//             per step and tile of rows and hidden units, the product h W_hh^T for the
//             tile's units in every gate, then the cell math of those units, keeping what
//             the backward needs (in training).
//   backward: per step, one fused pass of the cell derivative and one product dG W_hh;
//             per chunk, dX = dG W_ih and the weight and bias gradients accumulated.
// Chunking keeps the large per-row gate matrices out of memory: only the per-row values
// the backward needs are stored for the whole sequence.
#include "recurrence_cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "../op_adapters.h"
#include "../problem.h"
#include "engine.h"
#include "workspace.h"

namespace rnn_fused::cpu {
namespace {

// t in dtype (t itself if it has it or is undefined), for a half-type call's float32 copies and
// its results.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  return !t.defined() || t.scalar_type() == dtype ? t : converted_copy(t, dtype);
}

// The forward's results rounded, but its workspace kept in float32 (workspace_dtype).
ForwardResult rounded_forward(ForwardResult r, at::ScalarType dtype) {
  for (at::Tensor* t : {&std::get<0>(r), &std::get<1>(r), &std::get<2>(r)})
    *t = converted(*t, dtype);
  return r;
}

// The gradients rounded to the dtypes of what they are of: the input's and the states' (and the
// LayerNorm gains') to `dtype`, the parameters' to `params`.
BackwardResult rounded_backward(BackwardResult r, at::ScalarType dtype, at::ScalarType params) {
  auto& [input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, layer_norm] = r;
  for (at::Tensor* t : {&input, &hx, &cx, &layer_norm}) *t = converted(*t, dtype);
  for (at::Tensor* t : {&w_ih, &w_hh, &b_ih, &b_hh, &w_hr}) *t = converted(*t, params);
  return r;
}

// Half-type products: a half-type call's, or a float32 call's with half-type parameters
// (LayerArgs), whose results stay float32.
ForwardResult forward_wanting(const Problem& p, const LayerArgs& a, bool train,
                              ForwardWants wants) {
  const at::ScalarType dtype = a.input.scalar_type();
  if (!half_type(a.w_ih.scalar_type())) return forward_native(p, a, train, Bf16Dots::kNone, wants);
  const Bf16Dots dots = bf16_products(p)         ? Bf16Dots::kAll
                        : bf16_input_products(p) ? Bf16Dots::kInput
                                                 : Bf16Dots::kNone;
  if (half_type(dtype)) wants.half_output = dtype;
  // bf16 products leave the weights they read in bfloat16 until packed, and the input when
  // its rows split into pairs (even I), for the input projection to read as it is: its
  // float32 copy and rounding back cost 6-10% of an LSTM's forward at T=100 B=64 H=512 (AMD
  // EPYC).
  const bool input_as_is = dots != Bf16Dots::kNone && p.input_size % 2 == 0;
  // The states are left out: forward_native converts them as it copies them.
  LayerArgs f = a;
  f.hx.reset();
  f.cx.reset();
  const bool convert_weights = dots == Bf16Dots::kNone && !weights_as_stored(p);
  f = f.to(at::kFloat, convert_weights, /*input_too=*/!input_as_is, converted);
  if (dots == Bf16Dots::kInput) f.w_hh = converted(a.w_hh, at::kFloat);  // no w_hr: not LSTM
  f.hx = a.hx;
  f.cx = a.cx;
  return rounded_forward(forward_native(p, f, train, dots, wants), dtype);
}

// The `forward` operator's engine.
ForwardResult forward_cpu(const Problem& p, const LayerArgs& a, bool train) {
  return forward_wanting(p, a, train, {});
}

BackwardResult backward_wanting(const Problem& p, const BackwardArgs& a, bool only_asked) {
  const at::ScalarType dtype = a.layer.input.scalar_type(), params = a.layer.w_ih.scalar_type();
  if (!half_type(params)) return backward_native(p, a, false, only_asked);
  const bool bf16 = bf16_backward_products(p);
  // Left out: the gradients of h_n and c_n, which backward_native converts as it copies them,
  // and the initial states, which the backward does not read.
  BackwardArgs f = a;
  f.grad_h_n.reset();
  f.grad_c_n.reset();
  f.layer.hx.reset();
  f.layer.cx.reset();
  // bf16 products read a bfloat16 input only in W_ih's gradient, transposed and in bfloat16
  // (transposed_times_rows): as it is, not through a float32 copy rounded back (the same
  // bits). LSTM T=100 B=64 I=H=512 forward and backward: the conversions' and transposes'
  // share of perf's samples 5.4% -> 4.4% (Intel Xeon with AMX).
  const bool input_as_is = bf16 && dtype == at::kBFloat16 && !bf16_weight_grads(p, a);
  if (input_as_is) f.layer.input = at::Tensor();
  f = f.to(at::kFloat, !bf16 && !weights_as_stored(p), converted);
  if (input_as_is) f.layer.input = a.layer.input;
  f.grad_h_n = a.grad_h_n;
  f.grad_c_n = a.grad_c_n;
  f.layer.hx = a.layer.hx;
  f.layer.cx = a.layer.cx;
  return rounded_backward(backward_native(p, f, bf16, only_asked), dtype, params);
}

// The `backward` operator's engine.
BackwardResult backward_cpu(const Problem& p, const BackwardArgs& a) {
  return backward_wanting(p, a, /*only_asked=*/false);
}

}  // namespace

LayerResult layer_without_graph(const LayerArgs& a, bool output_wanted) {
  Problem p = make_problem(a);
  p.inference = true;
  p.forward = true;
  const ForwardWants wants{/*workspace=*/false, output_wanted};
  auto [output, h_n, c_n, saved, h_prev] = a.is_dense()
                                               ? forward_wanting(p, a, false, wants)
                                               : forward_wanting(p, a.dense(), false, wants);
  return {output, h_n, c_n};
}

BackwardResult backward_without_dispatcher(const BackwardArgs& a) {
  const Problem p = make_problem(a);
  return a.is_dense() ? backward_wanting(p, a, /*only_asked=*/true)
                      : backward_wanting(p, a.dense(buffer_empty), /*only_asked=*/true);
}

TORCH_LIBRARY_IMPL(rnn_fused, CPU, m) {
  m.impl("forward", &forward_adapter<forward_cpu>);
  // A non-contiguous grad_output (the expanded ones of `out.sum().backward()`) copied into the
  // buffer cache: fresh memory faulted on each page at every call.
  m.impl("backward", &backward_adapter<backward_cpu, buffer_empty>);
}

}  // namespace rnn_fused::cpu

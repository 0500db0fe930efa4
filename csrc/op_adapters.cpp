#include "op_adapters.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/forward_grad.h>

#include "cpu/recurrence_cpu.h"

namespace rnn_fused {
namespace {

using ForwardSig = ForwardResult(std::string_view, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, bool, bool, const OptTensor&, const OptTensor&);
using BackwardSig = BackwardResult(std::string_view, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, const OptTensor&, bool,
                                   const at::Tensor&, const at::Tensor&, c10::SymInt,
                                   std::array<bool, 3>, const OptTensor&, const OptTensor&);
using LayerSig = LayerResult(std::string_view, const at::Tensor&, const OptTensor&,
                             const OptTensor&, const at::Tensor&, const at::Tensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                             bool, const OptTensor&, const OptTensor&);

using GradsSig = std::vector<at::Tensor>(std::string_view, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, const at::Tensor&, const at::Tensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&,
                                         const OptTensor&, bool, const OptTensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, const OptTensor&);

// Each caller keeps the handle in a static of its own: a lookup by name costs more than a
// small call.
template <class Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

}  // namespace

ForwardResult call_forward(const LayerArgs& a, bool train) {
  static const auto op = find<ForwardSig>("rnn_fused::forward");
  return op.call(a.mode, a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.batch_sizes,
                 a.reverse, train, a.zoneout, a.layer_norm);
}

namespace {

// Calls f on every tensor of a that the operator differentiates (autograd.cpp's slots), then,
// with `all`, on batch_sizes and zoneout too. By reference: a copy costs two atomic
// reference-count updates, in every short call.
template <class F>
void visit_tensors(const LayerArgs& a, bool all, const F& f) {
  for (const at::Tensor* t : {&a.input, &a.w_ih, &a.w_hh}) f(*t);
  for (const OptTensor* t : {&a.hx, &a.cx, &a.b_ih, &a.b_hh, &a.w_hr, &a.layer_norm}) {
    if (t->has_value()) f(**t);
  }
  if (!all) return;
  for (const OptTensor* t : {&a.batch_sizes, &a.zoneout}) {
    if (t->has_value()) f(**t);
  }
}

// Grad mode on and a differentiated tensor that requires grad.
bool records_graph(const LayerArgs& a) {
  if (!at::GradMode::is_enabled()) return false;
  bool requires_grad = false;
  visit_tensors(a, false,
                [&](const at::Tensor& t) { requires_grad = requires_grad || t.requires_grad(); });
  return requires_grad;
}

// Refuses dual tensors: the operator has no forward-mode formula, and outputs without
// tangents would read as zero tangents. No tensor has a tangent while no forward-AD level
// exists (one lock, not one a tensor).
void refuse_dual_tensors(const LayerArgs& a) {
  if (!forward_ad_level_exists()) return;
  visit_tensors(a, false, [](const at::Tensor& t) {
    TORCH_CHECK_NOT_IMPLEMENTED(!t._fw_grad(/*level=*/0).defined(),
                                "rnn_fused: forward-mode AD (torch.func.jvp, "
                                "torch.autograd.forward_ad) is not supported by the operator "
                                "rnn_fused::layer; rnn_fused.rnn_layer and the modules run it "
                                "through reference.py. Got a dual tensor among the inputs");
  });
}

// Whether the dispatcher would take a call on tensors of these keys straight to the CPU
// engine with nothing on the way: CPU tensors, no key above autograd's (no Python mode or
// subclass, functionalization, vmap, autocast, tracing), and no RecordFunction callback (the
// profiler) to see the operators.
bool cpu_engine_next(c10::DispatchKeySet keys) {
  if (at::getStepCallbacksUnlessEmpty(at::RecordScope::FUNCTION)) return false;
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  // Autograd's keys lead to layer_autograd, which runs a call without a graph below them;
  // BackendSelect (always in the included set) passes every call of these operators through.
  keys = ((keys | local.included_) - local.excluded_) -
         (c10::autograd_dispatch_keyset_with_ADInplaceOrView |
          c10::DispatchKeySet(c10::DispatchKey::BackendSelect));
  return keys.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

// Whether a's call of rnn_fused::layer goes straight to the CPU engine's forward: no graph
// to record, and cpu_engine_next.
bool plain_cpu_call(const LayerArgs& a) {
  if (records_graph(a)) return false;
  c10::DispatchKeySet keys;
  visit_tensors(a, true, [&](const at::Tensor& t) { keys = keys | t.key_set(); });
  return cpu_engine_next(keys);
}

// Whether a's call of rnn_fused::backward goes straight to the CPU engine (cpu_engine_next);
// no graph to ask about: a node's backward (autograd.cpp) calls it with grad mode off only.
bool plain_cpu_backward(const BackwardArgs& a) {
  c10::DispatchKeySet keys = a.saved.key_set() | a.h_prev.key_set();
  visit_tensors(a.layer, true, [&](const at::Tensor& t) { keys = keys | t.key_set(); });
  for (const OptTensor* t : {&a.grad_output, &a.grad_h_n, &a.grad_c_n}) {
    if (t->has_value()) keys = keys | (*t)->key_set();
  }
  return cpu_engine_next(keys);
}

}  // namespace

BackwardResult call_backward(const BackwardArgs& a) {
  if (plain_cpu_backward(a)) return cpu::backward_without_dispatcher(a);
  const LayerArgs& l = a.layer;
  static const auto op = find<BackwardSig>("rnn_fused::backward");
  return op.call(l.mode, a.grad_output, a.grad_h_n, a.grad_c_n, l.input, l.w_ih, l.w_hh, l.w_hr,
                 l.batch_sizes, l.reverse, a.saved, a.h_prev, a.batch,
                 {a.mask.input, a.mask.state, a.mask.weights}, l.zoneout, l.layer_norm);
}

// Levels are made and released in order from index 0 (ForwardADLevel::has_any_level is newer
// than some of the torch releases this project builds with: 2.11 on the GPU machines).
bool forward_ad_level_exists() {
  return torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr;
}

bool layer_needs_graph(const LayerArgs& a) {
  refuse_dual_tensors(a);
  return records_graph(a);
}

namespace {

// A state of an unbatched step ([H]) as a batch of one's.
OptTensor as_row(const OptTensor& state, const char* name) {
  if (!state) return std::nullopt;
  TORCH_CHECK(state->dim() == 1, "rnn_fused::layer: an unbatched step (input [input_size]) needs ",
              name, " of 1 dimension ([hidden_size]), got ", state->dim());
  return state->unsqueeze(0);
}

}  // namespace

LayerArgs as_batch_of_one(LayerArgs a) {
  a.input = a.input.unsqueeze(0);
  a.hx = as_row(a.hx, "hx");
  a.cx = as_row(a.cx, "cx");
  a.zoneout = as_row(a.zoneout, "zoneout");
  return a;
}

LayerResult as_unbatched(LayerResult r) {
  auto& [output, h_n, c_n] = r;
  output = output.squeeze(0);
  h_n = h_n.squeeze(0);
  c_n = c_n.squeeze(0);  // a GRU's or an RNN's is empty ([0]), and stays so
  return r;
}

LayerResult call_layer(const LayerArgs& a, bool output_wanted) {
  // A call with a graph goes on to layer_autograd, which checks it for dual tensors once.
  if (plain_cpu_call(a)) {
    refuse_dual_tensors(a);
    if (unbatched_step(a)) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // plain views
      return as_unbatched(cpu::layer_without_graph(as_batch_of_one(a), output_wanted));
    }
    return cpu::layer_without_graph(a, output_wanted);
  }
  static const auto op = find<LayerSig>("rnn_fused::layer");
  return op.call(a.mode, a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.batch_sizes,
                 a.reverse, a.zoneout, a.layer_norm);
}

std::vector<at::Tensor> call_reference_grads(const LayerArgs& a, const OptTensor& grad_output,
                                             const OptTensor& grad_h_n, const OptTensor& grad_c_n) {
  static const auto op = find<GradsSig>("rnn_fused::reference_grads");
  return op.call(a.mode, a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.batch_sizes,
                 a.reverse, grad_output, grad_h_n, grad_c_n, a.zoneout, a.layer_norm);
}

}  // namespace rnn_fused

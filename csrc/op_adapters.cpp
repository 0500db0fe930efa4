#include "op_adapters.h"

#include <ATen/core/dispatch/Dispatcher.h>

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

BackwardResult call_backward(const BackwardArgs& a) {
  const LayerArgs& l = a.layer;
  static const auto op = find<BackwardSig>("rnn_fused::backward");
  return op.call(l.mode, a.grad_output, a.grad_h_n, a.grad_c_n, l.input, l.w_ih, l.w_hh, l.w_hr,
                 l.batch_sizes, l.reverse, a.saved, a.h_prev, a.batch,
                 {a.mask.input, a.mask.state, a.mask.weights}, l.zoneout, l.layer_norm);
}

LayerResult call_layer(const LayerArgs& a) {
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

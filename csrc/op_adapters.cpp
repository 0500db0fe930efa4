#include "op_adapters.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace rnn_fused {
namespace {

using ForwardSig = ForwardResult(std::string_view, const at::Tensor&, const OptTensor&,
                                 const OptTensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&,
                                 const OptTensor&, bool, bool);
using BackwardSig = BackwardResult(std::string_view, const OptTensor&, const OptTensor&,
                                   const OptTensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const OptTensor&, const OptTensor&, bool,
                                   const at::Tensor&, const at::Tensor&, c10::SymInt,
                                   std::array<bool, 3>);
using LayerSig = LayerResult(std::string_view, const at::Tensor&, const OptTensor&,
                             const OptTensor&, const at::Tensor&, const at::Tensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                             bool);

template <class Sig>
const c10::TypedOperatorHandle<Sig>& handle(const char* name) {
  // Looked up once per operator: a lookup by name costs more than a small call.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  return op;
}

}  // namespace

ForwardResult call_forward(const LayerArgs& a, bool train) {
  return handle<ForwardSig>("rnn_fused::forward")
      .call(a.mode, a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.batch_sizes,
            a.reverse, train);
}

BackwardResult call_backward(const BackwardArgs& a) {
  const LayerArgs& l = a.layer;
  return handle<BackwardSig>("rnn_fused::backward")
      .call(l.mode, a.grad_output, a.grad_h_n, a.grad_c_n, l.input, l.w_ih, l.w_hh, l.w_hr,
            l.batch_sizes, l.reverse, a.saved, a.h_prev, a.batch,
            {a.mask.input, a.mask.state, a.mask.weights});
}

LayerResult call_layer(const LayerArgs& a) {
  return handle<LayerSig>("rnn_fused::layer")
      .call(a.mode, a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.batch_sizes,
            a.reverse);
}

}  // namespace rnn_fused

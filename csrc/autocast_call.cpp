#include "autocast_call.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace rnn_fused {

bool autocast_pending(const LayerArgs& a) {
  // A device without autocast (meta) would raise in is_autocast_enabled.
  const c10::DeviceType device = a.input.device().type();
  return at::autocast::is_autocast_available(device) && at::autocast::is_autocast_enabled(device) &&
         (a.input.scalar_type() == at::kFloat || a.w_ih.scalar_type() == at::kFloat);
}

OptTensor autocast_param(const OptTensor& t, at::ScalarType dtype) {
  if (!t) return std::nullopt;
  const at::Tensor cast = at::autocast::cached_cast(dtype, *t, t->device().type());
  return cast.scalar_type() == dtype ? cast : cast.to(dtype);
}

namespace {

// Whether a packed input's steps all have the first step's batch (no sequence ends early).
// Batch sizes of another kind are refused later, by make_problem.
bool all_full(const at::Tensor& batch_sizes) {
  if (!batch_sizes.is_cpu() || batch_sizes.scalar_type() != at::kLong || batch_sizes.dim() != 1 ||
      batch_sizes.numel() == 0) {
    return false;
  }
  const auto b = batch_sizes.accessor<int64_t, 1>();
  return b[0] == b[b.size(0) - 1];
}

}  // namespace

std::pair<bool, bool> autocast_results(const LayerArgs& a, bool cell) {
  if (!a.input.is_cpu()) return {true, true};
  switch (parse_mode(a.mode)) {
    case CellKind::GRU:
      return {false, false};  // h = n + z (h_prev - n), with the float32 h_prev
    case CellKind::LSTM:
      // A padded layer without projection runs oneDNN's LSTM whole (so does a packed one
      // whose sequences all have the first one's length); otherwise c = f c_prev + i g with
      // the float32 c_prev, h = o tanh(c): float32, and a projection of h is a product again.
      if (!cell && !a.w_hr && (!a.batch_sizes || all_full(*a.batch_sizes))) return {true, true};
      return {a.w_hr.has_value(), false};
    default:
      return {true, true};  // h = act(x W + h W): products only
  }
}

LayerResult layer_under_autocast(LayerArgs a, bool cell, bool output_wanted) {
  const at::ScalarType low = at::autocast::get_autocast_dtype(a.input.device().type());
  const auto [low_h, low_c] = autocast_results(a, cell);
  a.w_ih = *autocast_param(a.w_ih, low);
  a.w_hh = *autocast_param(a.w_hh, low);
  for (OptTensor* w : {&a.b_ih, &a.b_hh, &a.w_hr}) *w = autocast_param(*w, low);
  const at::ScalarType activations = low_h && low_c ? low : at::kFloat;
  a.input = low_h && low_c ? a.input.to(low) : a.input.to(low).to(at::kFloat);
  for (OptTensor* t : {&a.hx, &a.cx, &a.zoneout, &a.layer_norm}) {
    if (*t) *t = (*t)->to(activations);
  }
  LayerResult r;
  {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    r = call_layer(a, output_wanted);
  }
  if (low_h && !low_c) {
    auto& [output, h_n, c_n] = r;
    output = output.to(low);
    h_n = h_n.to(low);
  }
  return r;
}

}  // namespace rnn_fused

// Autograd of rnn_fused::layer, in C++ so that a call costs no Python: a layer call that
// needs gradients runs `forward` keeping its workspace and records a node whose backward
// runs the `backward` operator for the gradients autograd asks for; any other call runs
// `forward` keeping nothing.
//
// Saved for the backward, with autograd's check that none was changed in place: what the
// backward operator reads for the gradients that may be asked for (backward_reads), as
// torch.nn's graph saves what its backward reads. The rest of the input, weights, states and
// biases is read only by a double backward (create_graph=True), which differentiates the
// plain time loop of reference.py (rnn_fused::reference_grads, in Python): kept aside with
// their versions, and only that path checks them. (The backward operator takes the aside
// input and weights too, for their shapes: their values go only into gradients nobody asked
// for.)
#include <torch/autograd.h>
#include <torch/library.h>
#include <torch/version.h>

#include <array>
#include <string>
#include <tuple>

#include "op_adapters.h"

namespace rnn_fused {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The differentiable inputs of a layer call in the operator's order, which is also the
// order of the gradients the node's backward returns (after one for the LayerArgs).
enum Slot { kInput, kHx, kCx, kWIh, kWHh, kBIh, kBHh, kWHr, kLayerNorm, kSlots };
// The slots a single backward may not read (the states and biases never), and their names in
// saved_data (the tensor's, and its version's), where they are kept when it does not.
constexpr std::array<Slot, 8> kAsideSlots{kInput, kWIh, kWHh, kWHr, kHx, kCx, kBIh, kBHh};
constexpr std::array<const char*, 8> kAsideNames{"input", "w_ih", "w_hh", "w_hr",
                                                 "hx",    "cx",   "b_ih", "b_hh"};
constexpr std::array<const char*, 8> kAsideVersions{"input_version", "w_ih_version", "w_hh_version",
                                                    "w_hr_version",  "hx_version",   "cx_version",
                                                    "b_ih_version",  "b_hh_version"};
// saved_data["flags"]: a bit per present slot, this one for reverse, and the mode (its
// CellKind) from kModeShift on: a string there cost an allocation at every call.
constexpr int64_t kReverseFlag = int64_t(1) << 16;
constexpr int kModeShift = 17;

std::array<OptTensor, kSlots> slots_of(const LayerArgs& a) {
  return {a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr, a.layer_norm};
}

// Whether the call is one step: a packed batch of one, a [B, I] or [I] input (a cell's
// step), or a [1, B, I] one.
bool one_step(const LayerArgs& a) {
  if (a.batch_sizes.has_value()) return a.batch_sizes->sym_size(0) == 1;
  return a.input.dim() <= 2 || a.input.sym_size(0) == 1;
}

bool wants_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

// Whether the call is one step in which only W_hr wants a gradient: then c_n depends on
// nothing that does (torch.nn's c_n needs no gradient), and W_hr's gradient reads h, not W_hr.
bool only_projection_wanted(const LayerArgs& a) {
  if (!wants_grad(a.w_hr) || !one_step(a)) return false;
  const auto slots = slots_of(a);
  for (int k = 0; k < kSlots; ++k) {
    if (k != kWHr && wants_grad(slots[k])) return false;
  }
  return true;
}

// Which of the input and weights a single backward of a's call reads for a gradient that may
// be asked for (false for the other slots): the input for W_ih's gradient, W_ih for the
// input's, W_hh to carry a gradient back a step (over one step, only to h_0: c_0's does not
// read it), W_hr unless only_projection_wanted (projection_only). What requires no gradient
// at the forward never gets one.
std::array<bool, kSlots> backward_reads(const LayerArgs& a, bool projection_only) {
  std::array<bool, kSlots> read{};
  read[kInput] = a.w_ih.requires_grad();
  read[kWIh] = a.input.requires_grad();
  read[kWHh] = !one_step(a) || wants_grad(a.hx);
  read[kWHr] = a.w_hr.has_value() && !projection_only;
  return read;
}

struct LayerFunction : public torch::autograd::Function<LayerFunction> {
  // The tensors after `a` are a's own, passed again so that autograd records them as inputs.
  template <class... Tensors>
  static variable_list forward(AutogradContext* ctx, const LayerArgs& a, const Tensors&...) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    // An unbatched step runs as a batch of one; the node sees and saves the caller's tensors.
    // (Two calls, not a conditional argument: that would copy `a` in the common case too.)
    const bool unbatched = unbatched_step(a);
    auto [output, h_n, c_n, saved, h_prev] = unbatched
                                                 ? call_forward(as_batch_of_one(a), /*train=*/true)
                                                 : call_forward(a, /*train=*/true);
    const auto slots = slots_of(a);
    const bool projection_only = only_projection_wanted(a);
    const std::array<bool, kSlots> read = backward_reads(a, projection_only);
    const auto if_read = [&](int k) { return read[k] ? slots[k].value() : at::Tensor(); };
    ctx->save_for_backward({if_read(kInput), if_read(kWIh), if_read(kWHh), if_read(kWHr), saved,
                            h_prev, a.zoneout.value_or(at::Tensor()),
                            a.layer_norm.value_or(at::Tensor())});
    // Few entries: each costs a string key and a hash-map node at every call (room for all
    // made at once). The batch is kept for packed input only; else it is the input's (batch_of).
    auto& data = ctx->saved_data;
    data.reserve(3 + 2 * kAsideSlots.size());
    if (a.batch_sizes.has_value()) {
      data["batch_sizes"] = *a.batch_sizes;
      data["batch"] = h_n.sym_size(0);
    }
    int64_t flags = int64_t(parse_mode(a.mode)) << kModeShift;
    if (a.reverse) flags |= kReverseFlag;  // with a bit per present slot
    for (int k = 0; k < kSlots; ++k) flags |= int64_t(slots[k].has_value()) << k;
    data["flags"] = flags;
    // Each present aside slot in entries of its own, not in lists: compiled autograd swaps
    // saved_data's tensors for its proxies only at the top level (a tensor in a list reached
    // its graph as itself, an error), and lifts top-level integers as inputs where a list's
    // would key its cache (a bias's version moves at every optimizer step).
    for (size_t k = 0; k < kAsideSlots.size(); ++k) {
      const Slot slot = kAsideSlots[k];
      if (read[slot]) continue;  // saved above
      if (const OptTensor& t = slots[slot]) {
        data[kAsideNames[k]] = *t;
        data[kAsideVersions[k]] = int64_t(t->_version());
      }
    }
    ctx->set_materialize_grads(false);  // unused outputs' gradients stay undefined, unfilled
    if (unbatched) std::tie(output, h_n, c_n) = as_unbatched({output, h_n, c_n});
    if (projection_only) ctx->mark_non_differentiable({c_n});
    return {output, h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    auto& data = ctx->saved_data;
    const int64_t flags = data["flags"].toInt();
    const std::string_view mode = mode_name(CellKind(flags >> kModeShift));
    LayerArgs a;
    a.mode = mode;
    // Saved, or kept aside (not read for a gradient asked for: see the forward).
    const auto saved_or_aside = [&](int k, const char* name) -> OptTensor {
      if (s[k].defined()) return s[k];
      const auto kept = data.find(name);
      return kept != data.end() ? OptTensor(kept->second.toTensor()) : std::nullopt;
    };
    a.input = *saved_or_aside(0, "input");
    a.w_ih = *saved_or_aside(1, "w_ih");
    a.w_hh = *saved_or_aside(2, "w_hh");
    a.w_hr = saved_or_aside(3, "w_hr");  // none without a projection
    a.zoneout = s[6].defined() ? OptTensor(s[6]) : std::nullopt;
    a.layer_norm = s[7].defined() ? OptTensor(s[7]) : std::nullopt;
    const auto packed = data.find("batch_sizes");
    if (packed != data.end()) a.batch_sizes = packed->second.toTensor();
    a.reverse = (flags & kReverseFlag) != 0;
    // An unbatched step's gradients come and go as [H] and [I], a batch of one's in between.
    const bool unbatched = unbatched_step(a);
    const auto grad = [&](int k) -> OptTensor {
      if (!grads[k].defined()) return std::nullopt;
      return unbatched ? grads[k].unsqueeze(0) : grads[k];
    };
    const OptTensor grad_output = grad(0), grad_h_n = grad(1);
    const OptTensor grad_c_n = mode == "LSTM" ? grad(2) : std::nullopt;

    std::array<at::Tensor, kSlots> found;
    if (at::GradMode::is_enabled()) {
      found = reference_grads(ctx, a, grad_output, grad_h_n, grad_c_n);
    } else {
      // The node's edges are the present slots, in order.
      std::array<bool, kSlots> need{};
      for (int k = 0, edge = 0; k < kSlots; ++k) {
        if (flags >> k & 1) need[k] = ctx->needs_input_grad(edge++);
      }
      BackwardArgs b;
      b.layer = unbatched ? as_batch_of_one(a) : a;
      b.grad_output = grad_output;
      b.grad_h_n = grad_h_n;
      b.grad_c_n = grad_c_n;
      b.saved = s[4];
      b.h_prev = s[5];
      b.batch = a.batch_sizes.has_value() ? data["batch"].toSymInt() : batch_of(a.input);
      b.mask = GradMask{
          need[kInput], need[kHx] || need[kCx],
          need[kWIh] || need[kWHh] || need[kBIh] || need[kBHh] || need[kWHr] || need[kLayerNorm]};
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the kernel has none
      const auto r = call_backward(b);
      found = {std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
               std::get<5>(r), std::get<6>(r), std::get<7>(r), std::get<8>(r)};
      for (int k = 0; k < kSlots; ++k) {
        if (!need[k]) found[k] = at::Tensor();
      }
    }
    if (unbatched) {
      for (Slot k : {kInput, kHx, kCx}) {
        if (found[k].defined()) found[k] = found[k].squeeze(0);
      }
    }
    // W_hr reaches c_n only through a later step's h: with one step and neither the output
    // nor h_n differentiated, torch.nn's graph has no path to it, and its gradient is None
    // (an optimizer skips it), not zeros.
    if ((flags >> kWHr & 1) && !grads[0].defined() && !grads[1].defined() && one_step(a))
      found[kWHr] = at::Tensor();
    variable_list result(1 + kSlots);  // the first for the LayerArgs argument
    for (int k = 0; k < kSlots; ++k) {
      if (flags >> k & 1) result[1 + k] = found[k];
    }
    return result;
  }

  // The batch of an input that is not packed: [T, B, I], a step [B, I], or unbatched [I].
  static c10::SymInt batch_of(const at::Tensor& input) {
    return input.dim() == 3 ? input.sym_size(1) : input.dim() == 2 ? input.sym_size(0) : 1;
  }

  // Differentiable gradients of every slot from reference.py's loop.
  static std::array<at::Tensor, kSlots> reference_grads(AutogradContext* ctx, LayerArgs a,
                                                        const OptTensor& grad_output,
                                                        const OptTensor& grad_h_n,
                                                        const OptTensor& grad_c_n) {
    auto& data = ctx->saved_data;
    std::array<OptTensor, kAsideSlots.size()> aside;
    for (size_t k = 0; k < kAsideSlots.size(); ++k) {
      const auto kept = data.find(kAsideNames[k]);
      if (kept == data.end()) continue;
      aside[k] = kept->second.toTensor();
      TORCH_CHECK(aside[k]->_version() == data[kAsideVersions[k]].toInt(),
                  "rnn_fused: ", kAsideNames[k],
                  " was modified by an inplace operation between the forward and a double "
                  "backward (create_graph=True), which reads it again");
    }
    // The input and weights are a's already (saved or aside); the states and biases come
    // from aside only.
    std::tie(a.hx, a.cx, a.b_ih, a.b_hh) = std::tie(aside[4], aside[5], aside[6], aside[7]);
    // An unbatched step as a batch of one on views that autograd records: the gradients are
    // differentiable through them to the caller's tensors.
    if (unbatched_step(a)) a = as_batch_of_one(a);
    const std::vector<at::Tensor> g = call_reference_grads(a, grad_output, grad_h_n, grad_c_n);
    TORCH_CHECK(g.size() == kSlots, "rnn_fused: reference_grads returned ", g.size(),
                " gradients, expected ", int(kSlots));
    return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]};
  }
};

}  // namespace
}  // namespace rnn_fused

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14)
// The node's apply as torch's CppNode<T>::apply (torch/csrc/autograd/custom_function.h of
// 2.14, which this follows), with the name for its error messages spelled once: torch's asks
// Node::name() at every call, a demangling of typeid's name (RNNCell(32) at batch 1, forward
// and backward: 87.5-88.9 -> 83.3-84.2 us, AMD EPYC). Older torch keeps its own.
template <>
torch::autograd::variable_list torch::autograd::CppNode<rnn_fused::LayerFunction>::apply(
    variable_list&& inputs) {
  static const std::string kName = "rnn_fused::LayerFunction";
  const std::lock_guard<std::mutex> lock(mutex_);
  return CppNode_apply_functional<rnn_fused::LayerFunction>(
      std::move(inputs), ctx_, is_variable_input_, output_info_, kName);
}
#endif

namespace rnn_fused {
namespace {

// Without gradients to record (or below autograd): forward keeping no workspace.
LayerResult layer_without_graph(const LayerArgs& a) {
  if (unbatched_step(a)) return as_unbatched(layer_without_graph(as_batch_of_one(a)));
  auto [output, h_n, c_n, saved, h_prev] = call_forward(a, /*train=*/false);
  return {output, h_n, c_n};
}

LayerResult layer_autograd(const LayerArgs& a) {
  if (!layer_needs_graph(a)) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return layer_without_graph(a);
  }
  const variable_list out = LayerFunction::apply(a, a.input, a.hx, a.cx, a.w_ih, a.w_hh, a.b_ih,
                                                 a.b_hh, a.w_hr, a.layer_norm);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnn_fused, Autograd, m) { m.impl("layer", &layer_adapter<layer_autograd>); }

TORCH_LIBRARY_IMPL(rnn_fused, CompositeExplicitAutograd, m) {
  m.impl("layer", &layer_adapter<layer_without_graph>);
}

}  // namespace rnn_fused

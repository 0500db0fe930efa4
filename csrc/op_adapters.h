// The operators' positional signatures (ops.cpp's schemas) in C++, written once: adapters
// that bundle an operator's arguments into LayerArgs / BackwardArgs, check them into a
// Problem and hand both to an engine (CPU, CUDA, or the CUDA emulation of the tests), and
// typed handles that call the operators through the dispatcher from bundled arguments.
#pragma once

#include <array>
#include <string_view>
#include <vector>

#include "problem.h"

namespace rnn_fused {

// An engine runs one checked call; its tensors are dense (is_dense in problem.h).
using ForwardEngine = ForwardResult (*)(const Problem&, const LayerArgs&, bool train);
using BackwardEngine = BackwardResult (*)(const Problem&, const BackwardArgs&);

// rnn_fused::forward on an engine.
template <ForwardEngine Engine>
ForwardResult forward_adapter(std::string_view mode, const at::Tensor& input, const OptTensor& hx,
                              const OptTensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                              const OptTensor& batch_sizes, bool reverse, bool train,
                              const OptTensor& zoneout, const OptTensor& layer_norm) {
  const LayerArgs a{mode, input, hx,          cx,      w_ih,    w_hh,      b_ih,
                    b_hh, w_hr,  batch_sizes, reverse, zoneout, layer_norm};
  Problem p = make_problem(a);
  p.inference = !train;
  p.forward = true;
  // Copying the arguments costs a short call a quarter of a microsecond: only when needed.
  return a.is_dense() ? Engine(p, a, train) : Engine(p, a.dense(), train);
}

// rnn_fused::backward on an engine; Empty: see BackwardArgs::dense.
template <BackwardEngine Engine, BackwardArgs::EmptyFn Empty = nullptr>
BackwardResult backward_adapter(std::string_view mode, const OptTensor& grad_output,
                                const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                                const at::Tensor& input, const at::Tensor& w_ih,
                                const at::Tensor& w_hh, const OptTensor& w_hr,
                                const OptTensor& batch_sizes, bool reverse, const at::Tensor& saved,
                                const at::Tensor& h_prev, int64_t batch,
                                std::array<bool, 3> output_mask, const OptTensor& zoneout,
                                const OptTensor& layer_norm) {
  BackwardArgs a;
  a.layer =
      LayerArgs{mode,         input, std::nullopt, std::nullopt, w_ih,    w_hh,      std::nullopt,
                std::nullopt, w_hr,  batch_sizes,  reverse,      zoneout, layer_norm};
  a.grad_output = grad_output;
  a.grad_h_n = grad_h_n;
  a.grad_c_n = grad_c_n;
  a.saved = saved;
  a.h_prev = h_prev;
  a.batch = batch;
  a.mask = GradMask{output_mask[0], output_mask[1], output_mask[2]};
  const Problem p = make_problem(a);
  return a.is_dense() ? Engine(p, a) : Engine(p, a.dense(Empty));
}

// rnn_fused::layer, the public operator: one layer call's (output, h_n, c_n), with autograd.
using LayerResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using LayerImpl = LayerResult (*)(const LayerArgs&);

template <LayerImpl Impl>
LayerResult layer_adapter(std::string_view mode, const at::Tensor& input, const OptTensor& hx,
                          const OptTensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr,
                          const OptTensor& batch_sizes, bool reverse, const OptTensor& zoneout,
                          const OptTensor& layer_norm) {
  return Impl(LayerArgs{mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse,
                        zoneout, layer_norm});
}

// An unbatched cell step: input [I], states [H] (and zoneout [H]). rnn_fused::layer runs it as
// a batch of one on views made where autograd does not see them, and returns output, h_n and
// c_n of [H]. (Views made for autograd cost an unbatched LSTMCell(32)'s forward and backward
// three view nodes and about a sixth of its time, AMD EPYC.)
inline bool unbatched_step(const LayerArgs& a) { return a.input.dim() == 1; }
// a's unbatched step as [1, I] and states [1, H]; a RuntimeError for a state that is not 1-D.
LayerArgs as_batch_of_one(LayerArgs a);
// A batch of one's results ([1, H]) as an unbatched step's ([H]).
LayerResult as_unbatched(LayerResult r);

// The operators called through the dispatcher (so every dispatch key applies: autograd,
// fake tensors, functionalization, tracing) from bundled arguments. call_backward runs a call
// that the dispatcher would take straight to the CPU engine there directly (a node's backward
// at batch 1: the dispatcher's call and five empty results less); the gradients that a's mask
// does not ask for are then undefined.
ForwardResult call_forward(const LayerArgs& a, bool train);
BackwardResult call_backward(const BackwardArgs& a);
// call_layer runs a call that the dispatcher would take straight to the CPU engine there
// directly (two dispatcher calls and the empty workspace less); without `output_wanted` a
// one-step call's output may be its h_n (cpu::layer_without_graph).
LayerResult call_layer(const LayerArgs& a, bool output_wanted = true);
// Whether a call of rnn_fused::layer records a node: grad mode on and an input that requires
// grad. Refuses dual tensors: the operator has no forward-mode formula, and outputs without
// tangents would read as zero tangents (rnn_fused.rnn_layer runs such calls through
// reference.py instead).
bool layer_needs_graph(const LayerArgs& a);
// Whether a forward-mode AD level exists (torch.autograd.forward_ad.dual_level, torch.func.jvp).
bool forward_ad_level_exists();
// rnn_fused::reference_grads: the gradients of a's tensor inputs (empty for absent ones),
// differentiable again, for a double backward.
std::vector<at::Tensor> call_reference_grads(const LayerArgs& a, const OptTensor& grad_output,
                                             const OptTensor& grad_h_n, const OptTensor& grad_c_n);

}  // namespace rnn_fused

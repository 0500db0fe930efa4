// The CPU engine's entries besides its operator kernels: a call that records no graph and a
// node's backward, run on the engine without the dispatcher.
#pragma once

#include "../op_adapters.h"

namespace rnn_fused::cpu {

// rnn_fused::layer's (output, h_n, c_n) of a call on CPU tensors that records no graph, as
// the `forward` operator computes them without keeping a workspace. Without
// `output_wanted`, the output of a one-step call [B, I] is h_n itself (the same tensor).
LayerResult layer_without_graph(const LayerArgs& a, bool output_wanted);

// rnn_fused::backward's gradients on CPU tensors (a node's, autograd.cpp) without the
// dispatcher (op_adapters.cpp, call_backward, decides when that is the same as the
// dispatcher's path): those that a's mask does not ask for are undefined.
BackwardResult backward_without_dispatcher(const BackwardArgs& a);

}  // namespace rnn_fused::cpu

// The CPU engine's one entry besides its operator kernels: a call that records no graph, run
// on the engine without the dispatcher (op_adapters.cpp, call_layer, decides when that is
// the same as the dispatcher's path).
#pragma once

#include "../op_adapters.h"

namespace rnn_fused::cpu {

// rnn_fused::layer's (output, h_n, c_n) of a call on CPU tensors that records no graph, as
// the `forward` operator computes them without keeping a workspace. Without
// `output_wanted`, the output of a one-step call [B, I] is h_n itself (the same tensor).
LayerResult layer_without_graph(const LayerArgs& a, bool output_wanted);

}  // namespace rnn_fused::cpu

// A float32 call under autocast, as torch.nn's recurrent layers run it: the eager doors'
// (python_doors.cpp). ops.py's _under_autocast runs the same rule for the calls that Python
// serves (torch.compile, torch.func transforms, forward-mode AD); tests/test_half_types.py
// holds both to torch.nn's dtypes and accuracy, tests/test_module_compile.py the compiled
// calls to the eager ones.
#pragma once

#include <utility>

#include "op_adapters.h"

namespace rnn_fused {

// Whether autocast is on for the call's device (false on a device without autocast: meta)
// and the call has a float32 input or w_ih to cast.
bool autocast_pending(const LayerArgs& a);

// A parameter in dtype as autocast casts an operator's arguments (at::autocast::cached_cast):
// a float32 leaf that requires grad once per autocast region, in torch's cache; any other
// floating-point tensor by Tensor::to.
OptTensor autocast_param(const OptTensor& t, at::ScalarType dtype);

// Whether (output and h_n, c_n) come out of torch.nn's layer (or, with `cell`, its cell) in the
// autocast dtype. On a GPU, always; on the CPU its products run in the autocast dtype and the
// rest follows type promotion with the float32 states, except in oneDNN's padded LSTM.
std::pair<bool, bool> autocast_results(const LayerArgs& a, bool cell);

// The call of a under autocast on its device: its parameters in the autocast dtype, and its
// input and states in that dtype where the results are (autocast_results), else in float32
// with the input rounded to the autocast dtype (the operator's half-type parameters: products
// in their dtype, the rest in float32). Runs with autocast off: the engines' own products
// (at::mm where there is no brgemm) are not the call's to cast.
LayerResult layer_under_autocast(LayerArgs a, bool cell, bool output_wanted);

}  // namespace rnn_fused

// The operator schemas. One family for every cell: `mode` is LSTM, GRU, RNN_TANH or
// RNN_RELU. Kernels live in cpu/ and cuda/, autograd in autograd.cpp, fake kernels in
// rnn_fused/ops.py; op_adapters.h holds the C++ side of these signatures.
#include <torch/library.h>

TORCH_LIBRARY(rnn_fused, m) {
  // One layer, one direction, all steps, with autograd: what rnn_fused.rnn_layer runs.
  // input is [T, B, I], or packed [N, I] with batch_sizes [T], or one step: [B, I], or [I]
  // unbatched (states [H]; results [H], run as a batch of one). Returns output ([T, B, H_out]
  // or [N, H_out]), h_n [B, H_out] and c_n [B, H] (LSTM; an empty tensor otherwise).
  // zoneout, shaped like output: the weight of the state kept from the step before
  // (LayerArgs::zoneout in problem.h); not differentiated.
  m.def(
      "layer(str mode, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "Tensor? zoneout=None, Tensor? layer_norm=None) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // The kernels under `layer`. forward also returns the workspace for the backward (its
  // layout: SavedLayout in problem.h): saved [N, k*H] and h_prev [N, H_out]; with train false
  // nothing is kept and both have 0 rows.
  m.def(
      "forward(str mode, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool train, "
      "Tensor? zoneout=None, Tensor? layer_norm=None) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor saved, Tensor h_prev)");
  // Gradients of forward for the input, the initial states and the weights and biases, as
  // output_mask asks (input, states, weights: layer_norm's gains among them); the others,
  // grad_cx without LSTM, grad_w_hr without a projection and grad_layer_norm without
  // layer_norm are empty tensors. A missing incoming gradient counts as
  // zeros. batch: the rows of the states (h_n's).
  m.def(
      "backward(str mode, Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "Tensor saved, Tensor h_prev, SymInt batch, bool[3] output_mask, Tensor? zoneout=None, "
      "Tensor? layer_norm=None) -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, Tensor grad_b_hh, Tensor grad_w_hr, "
      "Tensor grad_layer_norm)");
  // The gradients of layer's tensor inputs (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr; an
  // empty tensor for an absent one) computed differentiably, for double backward: implemented
  // in Python (rnn_fused/ops.py) over reference.py's time loop.
  m.def(
      "reference_grads(str mode, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, "
      "Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor? zoneout=None, "
      "Tensor? layer_norm=None) -> Tensor[]");
  // Zoneout's training mask on the CPU (cpu/zoneout_mask.cpp): a float mask of `size`, each
  // element 1 with probability p, from a counter-based generator started at seed (int64 [1]).
  m.def("zoneout_mask(Tensor seed, SymInt[] size, float p, ScalarType dtype) -> Tensor");
}

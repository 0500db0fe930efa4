// The operator schemas. One family for every cell: `mode` is LSTM, GRU, RNN_TANH or
// RNN_RELU. Kernels live in cpu/ and cuda/; fake kernels and autograd in rnn_fused/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(rnn_fused, m) {
  // One layer, one direction, all steps. input is [T, B, I], or packed [N, I] with
  // batch_sizes [T] (then hx is required). Returns output ([T, B, H_out] or [N, H_out]),
  // h_n [B, H_out], c_n [B, H] (LSTM; an empty tensor otherwise), and two workspaces for
  // the backward: saved [N, k*H] (per-row gate values) and h_prev [N, H_out] (the state each
  // row started from). With train false nothing is kept: both have 0 rows.
  m.def(
      "forward(str mode, Tensor input, Tensor? hx, Tensor? cx, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, Tensor? batch_sizes, bool reverse, bool train) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor saved, Tensor h_prev)");
  // Gradients of forward for every tensor input; grad_cx and grad_w_hr are empty tensors
  // when the forward had no cx / w_hr. A missing incoming gradient counts as zeros.
  m.def(
      "backward(str mode, Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor? hx, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "bool reverse, Tensor saved, Tensor h_prev) -> (Tensor grad_input, Tensor grad_hx, "
      "Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh, Tensor grad_w_hr)");
}

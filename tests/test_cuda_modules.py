"""CUDA variants of the module contract; they run where a GPU and the CUDA kernels exist."""

from __future__ import annotations

import pytest
import torch
from half_cases import HALF_CONFIGS, half_layer_errors
from tolerances import HALF_SLACK, assert_close
from torch import nn

import rnn_fused

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rnn_fused::forward", "CUDA"
)
pytestmark = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and rnn_fused's CUDA kernels"
)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_cuda_module_matches_torch_nn(cls):
    theirs = cls(3, 5, num_layers=2, bidirectional=True).cuda().double()
    ours = rnn_fused.replace_rnns(cls(3, 5, num_layers=2, bidirectional=True)).cuda().double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 2, 3, device="cuda", dtype=torch.float64)
    out_o, out_t = ours(x), theirs(x)
    flat_o = [out_o[0], *(out_o[1] if isinstance(out_o[1], tuple) else (out_o[1],))]
    flat_t = [out_t[0], *(out_t[1] if isinstance(out_t[1], tuple) else (out_t[1],))]
    for a, b in zip(flat_o, flat_t):
        assert_close(a, b, "output or state")
    g_o = torch.autograd.grad(sum(t.sum() for t in flat_o), list(ours.parameters()))
    g_t = torch.autograd.grad(sum(t.sum() for t in flat_t), list(theirs.parameters()))
    for a, b in zip(g_o, g_t):
        assert_close(a, b, "grad")


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_autocast_runs_in_autocast_dtype(cls):
    ours = rnn_fused.replace_rnns(cls(3, 5)).cuda()
    theirs = cls(3, 5).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        assert ours(x)[0].dtype == theirs(x)[0].dtype == torch.float16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cell", "kw"), HALF_CONFIGS, ids=[c for c, _ in HALF_CONFIGS])
def test_cuda_half_types_no_worse_than_twice_torch_nn(cell, kw, dtype):
    """Outputs, states and all gradients against torch.nn in float64 with the same (rounded)
    weights: our error is at most twice torch.nn's own error in the same dtype."""
    torch.manual_seed(7)
    errors = half_layer_errors(cell, kw, dtype, "cuda")
    for i, (ours_err, theirs_err) in enumerate(errors):
        message = f"tensor {i}: {ours_err:.2e} vs {theirs_err:.2e}"
        assert ours_err <= 2 * theirs_err + HALF_SLACK, message

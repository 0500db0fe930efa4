"""CUDA variants of the module contract; they run where a GPU and the CUDA kernels exist."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close
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
    assert_close(ours(x)[0], theirs(x)[0], "output")


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_autocast_runs_in_autocast_dtype(cls):
    ours = rnn_fused.replace_rnns(cls(3, 5)).cuda()
    theirs = cls(3, 5).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert ours(x)[0].dtype == theirs(x)[0].dtype == torch.bfloat16

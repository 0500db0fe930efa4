"""LSTMCell, GRUCell and RNNCell against torch.nn's with the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, as_list, seed
from tolerances import assert_close
from torch import nn

import rnn_fused

CELLS = {
    "LSTMCell": (nn.LSTMCell, rnn_fused.LSTMCell, {}),
    "GRUCell": (nn.GRUCell, rnn_fused.GRUCell, {}),
    "RNNCell-tanh": (nn.RNNCell, rnn_fused.RNNCell, {"nonlinearity": "tanh"}),
    "RNNCell-relu": (nn.RNNCell, rnn_fused.RNNCell, {"nonlinearity": "relu"}),
}


def _pair(name, hidden=5, bias=True, dtype=torch.float64, device="cpu"):
    theirs_cls, ours_cls, kw = CELLS[name]
    theirs = theirs_cls(3, hidden, bias=bias, dtype=dtype, device=device, **kw)
    ours = ours_cls(3, hidden, bias=bias, dtype=dtype, device=device, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("form", ["batched", "unbatched", "no-hx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_matches_torch_nn(name, bias, form, dtype, device):
    seed(name, bias, form, dtype)
    theirs, ours = _pair(name, bias=bias, dtype=dtype, device=device)
    shape = (3,) if form == "unbatched" else (4, 3)
    state_shape = (5,) if form == "unbatched" else (4, 5)
    x = torch.randn(*shape, dtype=dtype, device=device)
    h = torch.randn(*state_shape, dtype=dtype, device=device)
    c = torch.randn(*state_shape, dtype=dtype, device=device)

    def run(module):
        xi = x.clone().requires_grad_()
        leaves = [xi]
        if form == "no-hx":
            out = module(xi)
        elif name == "LSTMCell":
            hx = (h.clone().requires_grad_(), c.clone().requires_grad_())
            leaves += list(hx)
            out = module(xi, hx)
        else:
            hi = h.clone().requires_grad_()
            leaves.append(hi)
            out = module(xi, hi)
        outs = as_list(out)
        weights = [torch.ones_like(o) * (i + 1.5) for i, o in enumerate(outs)]
        loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
        return outs, torch.autograd.grad(loss, leaves + list(module.parameters()))

    (out_o, g_o), (out_t, g_t) = run(ours), run(theirs)
    for a, b in zip(out_o, out_t, strict=True):
        assert_close(a, b, "output")
    for i, (a, b) in enumerate(zip(g_o, g_t, strict=True)):
        assert_close(a, b, f"grad {i}")


@pytest.mark.parametrize("name", list(CELLS))
def test_cell_hidden_size_zero(name):
    theirs, ours = _pair(name, hidden=0)
    x = torch.randn(2, 3, dtype=torch.float64)
    for a, b in zip(as_list(ours(x)), as_list(theirs(x)), strict=True):
        assert a.shape == b.shape == (2, 0)


def test_lstm_cell_backward_through_one_output():
    theirs, ours = _pair("LSTMCell")
    x = torch.randn(2, 3, dtype=torch.float64)
    for pick in (0, 1):
        g_o = torch.autograd.grad(ours(x)[pick].sum(), list(ours.parameters()))
        g_t = torch.autograd.grad(theirs(x)[pick].sum(), list(theirs.parameters()))
        for a, b in zip(g_o, g_t, strict=True):
            assert_close(a, b, f"grad through output {pick}")


def test_cell_repr_matches():
    for name in CELLS:
        theirs, ours = _pair(name, bias=False)
        assert repr(theirs) == repr(ours)

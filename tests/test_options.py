"""The options torch.nn lacks (forget_bias, dropconnect): their defaults are torch.nn's
behaviour, and each does what its docstring says, against reference.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import rnn_fused
from rnn_fused import reference

KEEP_GATE = {"LSTM": 1, "GRU": 1}  # the forget gate (LSTM) and the update gate (GRU)


@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_forget_bias_sets_the_keep_gate_only(name: str):
    torch.manual_seed(0)
    ours = getattr(rnn_fused, name)(3, 5, num_layers=2, bidirectional=True, forget_bias=2.5)
    torch.manual_seed(0)
    theirs = getattr(nn, name)(3, 5, num_layers=2, bidirectional=True)
    keep = slice(5, 10)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        if key.startswith("bias_"):
            want = torch.full((5,), 2.5 if key.startswith("bias_ih") else 0.0)
            assert torch.equal(a[keep], want), key
            a, b = torch.cat([a[:5], a[10:]]), torch.cat([b[:5], b[10:]])
        assert torch.equal(a, b), f"{key}: the rest is torch.nn's initialisation"
    with torch.no_grad():
        ours.bias_ih_l1[keep] = 0
    ours.reset_parameters()
    assert torch.equal(ours.bias_ih_l1[keep], torch.full((5,), 2.5)), "reset applies it again"


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_forget_bias_on_cells(name: str):
    cell = getattr(rnn_fused, name)(4, 3, forget_bias=-1.0)
    assert torch.equal(cell.bias_ih[3:6], torch.full((3,), -1.0))
    assert torch.equal(cell.bias_hh[3:6], torch.zeros(3))
    assert "forget_bias=-1.0" in repr(cell)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ValueError, match="forget_bias is for LSTM and GRU only"):
        rnn_fused.RNN(3, 4, forget_bias=1.0)
    with pytest.raises(ValueError, match="forget_bias needs bias=True"):
        rnn_fused.LSTM(3, 4, bias=False, forget_bias=1.0)
    with pytest.raises(TypeError, match="forget_bias must be a number, got str"):
        rnn_fused.GRUCell(3, 4, forget_bias="1")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="forget_bias must be a finite number, got"):
            rnn_fused.LSTM(3, 4, forget_bias=bad)
    for bad in (-0.1, 1.0, True, "0.5"):
        with pytest.raises(ValueError, match=r"dropconnect must be a number in \[0, 1\)"):
            rnn_fused.LSTM(3, 4, dropconnect=bad)
    with pytest.raises(ValueError, match=r"torch\.nn has no dropconnect"):
        rnn_fused.GRU(3, 4, dropconnect=0.5).to_torch()


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_defaults_are_torch_nn(name: str):
    torch.manual_seed(1)
    theirs = getattr(nn, name)(3, 6, num_layers=2).double()
    ours = getattr(rnn_fused, name).from_torch(theirs)
    assert ours.forget_bias is None and ours.dropconnect == 0.0
    x = torch.randn(7, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-12, atol=1e-12)


def _masked_reference(m: nn.Module, x: torch.Tensor, p: float) -> torch.Tensor:
    """reference.py's layers with W_hh masks drawn in the module's order (layer, direction)."""
    directions = 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            w = {k: getattr(m, k + suffix) for k in names}
            w_hh = reference.dropconnect_weight(w["weight_hh"], p)
            out, _, _ = reference.rnn_layer(
                m.mode, x, w["weight_ih"], w_hh, w["bias_ih"], w["bias_hh"], reverse=d == 1
            )
            outputs.append(out)
        x = torch.cat(outputs, dim=-1)
    return x


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_dropconnect_masks_w_hh_once_per_forward(name: str):
    p = 0.4
    torch.manual_seed(2)
    m = getattr(rnn_fused, name)(3, 7, num_layers=2, bidirectional=True, dropconnect=p).double()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    torch.manual_seed(5)
    ours = m(x)[0]
    torch.manual_seed(5)
    want = _masked_reference(m, x, p)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    torch.manual_seed(5)
    assert torch.equal(m(x)[0], ours), "a seed gives the same masks"
    assert not torch.allclose(m(x)[0], ours), "the next forward draws new masks"
    m.eval()
    plain = getattr(rnn_fused, name)(3, 7, num_layers=2, bidirectional=True).double()
    plain.load_state_dict(m.state_dict())
    assert torch.equal(m(x)[0], plain(x)[0]), "eval uses W_hh as it is"


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
def test_dropconnect_on_cells(name: str):
    p = 0.3
    torch.manual_seed(3)
    cell = getattr(rnn_fused, name)(4, 5, dropconnect=p).double()
    x, h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    c = torch.randn(3, 5, dtype=torch.float64)
    state = (h, c) if name == "LSTMCell" else h
    torch.manual_seed(8)
    ours = cell(x, state)
    torch.manual_seed(8)
    w_hh = reference.dropconnect_weight(cell.weight_hh, p)
    mode = name.removesuffix("Cell")
    want, want_c = reference.cell_step(
        mode, x, h, c if mode == "LSTM" else None, cell.weight_ih, w_hh, cell.bias_ih, cell.bias_hh
    )
    got = ours[0] if mode == "LSTM" else ours
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if mode == "LSTM":
        torch.testing.assert_close(ours[1], want_c, rtol=1e-12, atol=1e-12)


def test_dropconnect_gradcheck():
    torch.manual_seed(4)
    m = rnn_fused.GRU(3, 4, dropconnect=0.5, forget_bias=1.0).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    w_hh = m.weight_hh_l0.detach().clone().requires_grad_()

    def f(x, w_hh):
        torch.manual_seed(11)  # the same mask at every evaluation
        return functional_call(m, {"weight_hh_l0": w_hh}, (x,), strict=False)[0]

    assert torch.autograd.gradcheck(f, (x, w_hh))

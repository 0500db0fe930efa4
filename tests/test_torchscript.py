"""TorchScript. torch.jit.script compiles torch.nn's equivalent of our classic layers and
cells in their place (modules.py, __prepare_scriptable__), holding the same Parameter
objects; torch.jit.trace records our operator. Both against the eager module in float64."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch import nn

import rnn_fused


class Model(nn.Module):
    """Every classic layer and cell of ours inside one model, as a user would script it."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = rnn_fused.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=4)
        self.gru = rnn_fused.GRU(8, 5, batch_first=True)
        self.rnn = rnn_fused.RNN(5, 5, nonlinearity="relu", bias=False)
        self.lstm_cell = rnn_fused.LSTMCell(5, 5)
        self.gru_cell = rnn_fused.GRUCell(5, 5)
        self.rnn_cell = rnn_fused.RNNCell(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, _ = self.gru(y.transpose(0, 1))
        y, h = self.rnn(y.transpose(0, 1))
        h1, c1 = self.lstm_cell(y[-1], (h[0], h[0]))
        h2 = self.gru_cell(h1, c1)
        return self.rnn_cell(h2, h2) + y.sum(0)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_script_compiles_torch_nn_equivalents():
    seed("script")
    model = Model().double()
    params = dict(model.named_parameters())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = model(x)
    expected.square().sum().backward()
    expected_grads = _grads(model)
    model.zero_grad()

    scripted = torch.jit.script(model)
    out = scripted(x)
    assert_close(out, expected, "scripted output")
    out.square().sum().backward()
    # The same Parameter objects hold the gradients, so an optimiser made before scripting
    # still steps them.
    assert dict(model.named_parameters()) == params
    for name, grad in expected_grads.items():
        assert_close(params[name].grad, grad, f"grad of {name}")

    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(x), expected, "saved and loaded")


@pytest.mark.parametrize(
    "make",
    [
        lambda: rnn_fused.LayerNormLSTM(3, 4),
        lambda: rnn_fused.IndRNN(3, 4),
        lambda: rnn_fused.LSTM(3, 4, zoneout=0.1),
        lambda: rnn_fused.GRUCell(3, 4, dropconnect=0.2),
    ],
    ids=["LayerNormLSTM", "IndRNN", "zoneout", "dropconnect"],
)
def test_script_without_equivalent_names_the_alternatives(make):
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace, torch\.compile or torch\.export"):
        torch.jit.script(make())


def test_trace_records_the_operator():
    seed("trace")
    lstm = rnn_fused.LSTM(3, 4, num_layers=2, bidirectional=True).double()
    traced = torch.jit.trace(lstm, (torch.randn(5, 2, 3, dtype=torch.float64),))
    assert "rnn_fused::layer" in str(traced.graph)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(7, 3, 3, dtype=torch.float64, requires_grad=True)  # another shape
    out, expected = loaded(x)[0], lstm(x)[0]
    assert_close(out, expected, "traced output")
    weights = torch.randn_like(out)
    (got,) = torch.autograd.grad((out * weights).sum(), x)
    (want,) = torch.autograd.grad((expected * weights).sum(), x)
    assert_close(got, want, "traced input gradient")

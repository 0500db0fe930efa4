"""ONNX export: models with rnn_fused layers and cells export with both of torch.onnx's
exporters to ONNX's own LSTM, GRU and RNN operators, and ONNX Runtime (without rnn_fused)
gives our outputs."""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor, nn

import rnn_fused
import rnn_fused.onnx

EXPORTERS = ["dynamo", "torchscript"]


def _export(model: nn.Module, args: tuple, exporter: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if exporter == "dynamo":
            return rnn_fused.onnx.export(model, args, dynamo=True).model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def _leaves(x) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, Tensor)]


def _check_runs_in_onnxruntime(model: nn.Module, args: tuple, exporter: str) -> list[str]:
    """Exports, runs in ONNX Runtime and compares with our outputs; the graph's operators."""
    model.eval()
    proto = _export(model, args, exporter)
    ops = [node.op_type for node in proto.graph.node]
    session = onnxruntime.InferenceSession(proto.SerializeToString())
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _leaves(args), strict=True)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = _leaves(model(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)
    return ops


class _WithHead(nn.Module):
    """A recurrent layer and a linear read-out of its outputs, as a user's model would be."""

    def __init__(self, rnn: nn.Module, width: int) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(width, 3)

    def forward(self, x: Tensor, *state):
        out, h = self.rnn(x, *state)
        return self.head(out), h


LAYERS = {
    "LSTM batch_first": lambda: rnn_fused.LSTM(8, 16, batch_first=True),
    "LSTM 2 layers bi": lambda: rnn_fused.LSTM(5, 7, num_layers=2, bidirectional=True),
    "GRU bi": lambda: rnn_fused.GRU(5, 9, bidirectional=True),
    "GRU no bias": lambda: rnn_fused.GRU(5, 9, bias=False, batch_first=True),
    "RNN tanh 2 layers": lambda: rnn_fused.RNN(5, 6, num_layers=2),
    "RNN relu bi": lambda: rnn_fused.RNN(5, 6, nonlinearity="relu", bidirectional=True),
    "IndRNN 2 layers bi": lambda: rnn_fused.IndRNN(5, 6, num_layers=2, bidirectional=True),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_exports_to_onnx_operators(name: str, exporter: str):
    torch.manual_seed(zlib.crc32(name.encode()))
    rnn = LAYERS[name]()
    model = _WithHead(rnn, rnn.hidden_size * (2 if rnn.bidirectional else 1))
    x = torch.randn(3, 7, rnn.input_size) if rnn.batch_first else torch.randn(7, 3, rnn.input_size)
    ops = _check_runs_in_onnxruntime(model, (x,), exporter)
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    operator = {"IndRNN": "RNN"}.get(name.split()[0], name.split()[0])  # IndRNN: R = diag(u)
    assert ops.count(operator) == layers, ops


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_bidirectional_layer_exports_under_no_grad(exporter: str):
    """Where the two directions would run on two threads (ops.both_directions), which the
    TorchScript exporter's tracer cannot follow (once a segmentation fault)."""
    torch.manual_seed(11)
    rnn = rnn_fused.GRU(32, 48, bidirectional=True)
    with torch.no_grad():
        ops = _check_runs_in_onnxruntime(_WithHead(rnn, 96), (torch.randn(7, 3, 32),), exporter)
    assert ops.count("GRU") == 2, ops


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_given_initial_states_are_inputs(mode: str, exporter: str):
    torch.manual_seed(3)
    rnn = getattr(rnn_fused, mode)(4, 5, num_layers=2, bidirectional=True)
    x, h0 = torch.randn(6, 3, 4), torch.randn(4, 3, 5)
    state = (h0, torch.randn(4, 3, 5)) if mode == "LSTM" else h0
    _check_runs_in_onnxruntime(rnn, (x, state), exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("batch", [3, None], ids=["batched", "unbatched"])
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_export(cell: str, batch: int | None, exporter: str):
    torch.manual_seed(4)
    m = getattr(rnn_fused, cell)(6, 5)
    rows = () if batch is None else (batch,)
    h = torch.randn(*rows, 5)
    state = (h, torch.randn(*rows, 5)) if cell == "LSTMCell" else h
    ops = _check_runs_in_onnxruntime(m, (torch.randn(*rows, 6), state), exporter)
    assert cell.removesuffix("Cell") in ops


def test_gate_orders_are_onnx_own():
    """Each gate block lands where ONNX expects it: a mistake would swap gates with equal
    shapes and still run, so compare against torch.nn's own export too."""
    torch.manual_seed(5)
    for ours in (rnn_fused.LSTM(4, 6), rnn_fused.GRU(4, 6)):
        theirs = ours.to_torch().eval()
        x = torch.randn(5, 2, 4)
        session = onnxruntime.InferenceSession(
            _export(ours.eval(), (x,), "dynamo").SerializeToString()
        )
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, theirs(x)[0].detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_projection_is_refused_by_name(exporter: str):
    model = rnn_fused.LSTM(4, 6, proj_size=3)
    with pytest.raises(Exception) as info:
        _export(model, (torch.randn(5, 2, 4),), exporter)
    assert "rnn_fused ONNX export: LSTM with proj_size" in _messages(info.value)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_zoneout_is_refused_by_name(exporter: str):
    model = rnn_fused.GRU(4, 6, zoneout=0.2).eval()
    with pytest.raises(Exception) as info:
        _export(model, (torch.randn(5, 2, 4),), exporter)
    assert "rnn_fused ONNX export: a layer with zoneout" in _messages(info.value)


def test_packed_input_is_refused_by_name():
    class Packs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn_fused.GRU(4, 6)

        def forward(self, x: Tensor) -> Tensor:
            packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3], enforce_sorted=True)
            return self.rnn(packed)[1]

    with pytest.raises(Exception) as info:
        _export(Packs(), (torch.randn(5, 2, 4),), "torchscript")
    assert "rnn_fused ONNX export: PackedSequence" in _messages(info.value)


def _messages(err: BaseException) -> str:
    """The messages of an exception and its causes (the exporters wrap ours)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)

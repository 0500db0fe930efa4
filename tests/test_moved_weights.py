"""Weights that torch.nn.utils moves out of a module's parameters: parametrizations
(weight_norm, orthogonal), pruning, the hook-based spectral_norm, and a plain tensor set in a
weight's place before each forward (as weight-dropping wrappers do). torch.nn's layers and
cells read such a weight from its attribute; ours must too, with the same outputs and the
same gradients for the parameters that remain, in float64 against torch.nn."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch import nn
from torch.nn.utils import parametrizations, prune

import rnn_fused

LAYERS = ["LSTM", "GRU", "RNN"]
CELLS = ["LSTMCell", "GRUCell", "RNNCell"]


def _weight_norm(m: nn.Module, name: str) -> None:
    parametrizations.weight_norm(m, name)


def _orthogonal(m: nn.Module, name: str) -> None:
    parametrizations.orthogonal(m, name)


def _prune(m: nn.Module, name: str) -> None:
    prune.l1_unstructured(m, name, amount=0.3)


def _spectral_norm(m: nn.Module, name: str) -> None:
    nn.utils.spectral_norm(m, name)
    m.eval()  # in training, each forward steps the power iteration from torch's generator


MOVES: dict[str, Callable[[nn.Module, str], None]] = {
    "weight_norm": _weight_norm,
    "orthogonal": _orthogonal,
    "prune": _prune,
    "spectral_norm": _spectral_norm,
}


def _pair(kind: str, make: Callable[[type], nn.Module]) -> tuple[nn.Module, nn.Module]:
    theirs = make(getattr(nn, kind)).double()
    ours = getattr(rnn_fused, kind).from_torch(copy.deepcopy(theirs))  # parameters of its own
    return theirs, ours


def _loss(out) -> torch.Tensor:
    """A loss reading every output: outputs, h_n and c_n (or a cell's h and c)."""
    parts = out if isinstance(out, tuple) else (out,)
    flat = []
    for p in parts:
        flat.extend(p if isinstance(p, tuple) else (p,))
    return sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in flat)


def _check_same(theirs: nn.Module, ours: nn.Module, x: torch.Tensor, state=None) -> None:
    args = (x,) if state is None else (x, state)
    out_t, out_o = theirs(*args), ours(*args)
    assert_close(_loss(out_o), _loss(out_t), "outputs")
    _loss(out_t).backward()
    _loss(out_o).backward()
    named_t, named_o = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert named_o.keys() == named_t.keys()
    for name, p in named_t.items():
        if p.grad is None:
            assert named_o[name].grad is None, name
        else:
            assert_close(named_o[name].grad, p.grad, f"grad of {name}")


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_weights_moved(kind, move):
    seed("moved layer", kind, move)
    theirs, ours = _pair(kind, lambda cls: cls(5, 7, num_layers=2, bidirectional=True))
    for m in (theirs, ours):
        MOVES[move](m, "weight_hh_l0")
        MOVES[move](m, "weight_ih_l1_reverse")
    ours.load_state_dict(theirs.state_dict())
    _check_same(theirs, ours, torch.randn(6, 3, 5, dtype=torch.float64))


@pytest.mark.parametrize("kind", LAYERS)
def test_layer_bias_pruned(kind):
    seed("pruned bias", kind)
    theirs, ours = _pair(kind, lambda cls: cls(4, 5))
    for m in (theirs, ours):
        prune.random_unstructured(m, "bias_hh_l0", amount=0.5)
    ours.load_state_dict(theirs.state_dict())
    _check_same(theirs, ours, torch.randn(3, 2, 4, dtype=torch.float64))


def test_projection_weight_normalised():
    seed("moved w_hr")
    theirs, ours = _pair("LSTM", lambda cls: cls(4, 6, proj_size=3, num_layers=2))
    for m in (theirs, ours):
        _weight_norm(m, "weight_hr_l1")
    ours.load_state_dict(theirs.state_dict())
    _check_same(theirs, ours, torch.randn(5, 2, 4, dtype=torch.float64))


@pytest.mark.parametrize("move", list(MOVES))
@pytest.mark.parametrize("kind", CELLS)
def test_cell_weights_moved(kind, move):
    seed("moved cell", kind, move)
    theirs, ours = _pair(kind, lambda cls: cls(5, 7))
    for m in (theirs, ours):
        MOVES[move](m, "weight_hh")
    ours.load_state_dict(theirs.state_dict())
    h = torch.randn(3, 7, dtype=torch.float64)
    state = (h, torch.randn(3, 7, dtype=torch.float64)) if kind == "LSTMCell" else h
    _check_same(theirs, ours, torch.randn(3, 5, dtype=torch.float64), state)


def _set_dropped_weight(m: nn.Module, name: str, mask: torch.Tensor) -> None:
    """A weight-dropping wrapper's pre-forward step: the parameter lives on as name + "_raw"
    and a plain tensor computed from it stands in its place."""
    setattr(m, name, m._parameters[name + "_raw"] * mask)


@pytest.mark.parametrize("kind", ["LSTM", "LSTMCell"])
def test_plain_tensor_in_a_weights_place(kind):
    seed("weight drop", kind)
    name = "weight_hh_l0" if kind == "LSTM" else "weight_hh"
    theirs, ours = _pair(kind, lambda cls: cls(4, 6))
    mask = (torch.rand_like(theirs._parameters[name]) > 0.4).double()
    for m in (theirs, ours):
        raw = m._parameters.pop(name)
        m.register_parameter(name + "_raw", raw)
        _set_dropped_weight(m, name, mask)
    if kind == "LSTM":
        x, state = torch.randn(5, 2, 4, dtype=torch.float64), None
    else:
        x = torch.randn(2, 4, dtype=torch.float64)
        state = (torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))
    _check_same(theirs, ours, x, state)


@pytest.mark.parametrize("kind", ["LayerNormLSTM", "LayerNormGRU", "IndRNN"])
def test_variant_weights_moved(kind):
    """No torch.nn counterpart: a variant with a weight normalised and pruned against the same
    variant given the weights that those give, as plain parameters."""
    seed("moved variant", kind)
    cls = getattr(rnn_fused, kind)
    moved = cls(5, 6, num_layers=2, dtype=torch.float64)
    plain = cls(5, 6, num_layers=2, dtype=torch.float64)
    plain.load_state_dict(moved.state_dict())
    _weight_norm(moved, "weight_ih_l0")
    _prune(moved, "weight_hh_l1")
    with torch.no_grad():
        plain.weight_ih_l0.copy_(moved.weight_ih_l0)
        plain.weight_hh_l1.copy_(moved.weight_hh_l1)
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert_close(_loss(moved(x)), _loss(plain(x)), "outputs")
    gains = [n for n, _ in moved.named_parameters() if n.startswith("ln_")]
    _loss(moved(x)).backward()
    _loss(plain(x)).backward()
    for name in ["bias_ih_l0", "weight_ih_l1", *gains]:
        assert_close(
            moved.get_parameter(name).grad, plain.get_parameter(name).grad, f"grad of {name}"
        )


def test_weight_norm_compiles_without_graph_break():
    seed("moved compiled")
    theirs, ours = _pair("LSTM", lambda cls: cls(5, 7))
    for m in (theirs, ours):
        _weight_norm(m, "weight_hh_l0")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    compiled = torch.compile(ours, fullgraph=True)
    assert_close(_loss(compiled(x)), _loss(theirs(x)), "compiled outputs")


class _CountedReads(nn.Module):
    """A parametrization that counts its evaluations (a new tensor each, as any but the
    identity gives)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.reads += 1
        return w * 1.0


@pytest.mark.parametrize(
    "names",
    [("weight_hh_l0",), ("weight_ih_l0",), ("weight_hh_l0", "weight_ih_l1_reverse")],
    ids=["hh", "ih", "two"],
)
@pytest.mark.parametrize("layers", [1, 2], ids=["1 layer", "2 bi"])
def test_parametrized_weights_read_as_often_as_torch_nn(names: tuple[str, ...], layers: int):
    """torch.nn's forward evaluates a parametrized weight more than once (the first one
    four times, the others twice): ours as often, so that a parametrization with effects
    (spectral_norm's power iteration in training) steps as far."""
    if layers == 1:
        names = tuple(n for n in names if n.endswith("_l0"))
    counts = []
    for lib in (nn, rnn_fused):
        m = lib.LSTM(3, 4, num_layers=layers, bidirectional=layers == 2)
        counters = [_CountedReads() for _ in names]
        for name, counter in zip(names, counters, strict=True):
            nn.utils.parametrize.register_parametrization(m, name, counter)
        for counter in counters:
            counter.reads = 0
        for _ in range(2):
            m(torch.randn(5, 2, 3))
        counts.append([c.reads for c in counters])
    assert counts[1] == counts[0]


@pytest.mark.parametrize("kind", LAYERS)
def test_spectral_norm_parametrization_in_training(kind: str):
    """spectral_norm as a parametrization, in training: each read steps its power iteration;
    three forwards give torch.nn's outputs, gradients and power-iteration vectors."""
    seed("spectral training", kind)
    theirs, ours = _pair(kind, lambda cls: cls(5, 7, num_layers=2))
    for m in (theirs, ours):
        parametrizations.spectral_norm(m, "weight_hh_l0")
        parametrizations.spectral_norm(m, "weight_ih_l1")
    ours.load_state_dict(theirs.state_dict())
    for _ in range(3):
        _check_same(theirs, ours, torch.randn(6, 3, 5, dtype=torch.float64))
    buffers_t, buffers_o = dict(theirs.named_buffers()), dict(ours.named_buffers())
    assert buffers_o.keys() == buffers_t.keys() and buffers_t
    for name, b in buffers_t.items():
        assert_close(buffers_o[name], b, name)

"""gradcheck in float64 of the forward operator: every cell, bias on/off, h0 given or not,
both directions, at small odd sizes; plus packed input and the LSTM projection; and
gradgradcheck (double backward). A double backward differentiates rnn_fused::reference_grads,
the plain time loop of reference.py (README: where it differs from torch.nn), so
gradgradcheck checks that fallback and the autograd kernel's routing to it, not a fused
second-order kernel (there is none)."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed
from tolerances import GRADCHECK, assert_close

import rnn_fused
from rnn_fused.ops import rnn_layer

# (T, B, I, H). Above 32 rows (T x B) the CPU engine packs its weights; below, it does not.
SHAPES = [(5, 3, 7, 6), (1, 1, 2, 3), (7, 5, 3, 4)]


def _check(mode, x, layer, h0, c0, check=torch.autograd.gradcheck, **kw):
    def fn(x, *params):
        it = iter(params)
        w_ih, w_hh = next(it), next(it)
        b_ih, b_hh = (next(it), next(it)) if layer.b_ih is not None else (None, None)
        w_hr = next(it) if layer.w_hr is not None else None
        h = next(it) if h0 is not None else None
        c = next(it) if c0 is not None else None
        out = rnn_layer(mode, x, w_ih, w_hh, b_ih, b_hh, h, c, w_hr=w_hr, **kw)
        return tuple(o for o in out if o is not None)

    inputs = [x, *layer.tensors(), *(t for t in (h0, c0) if t is not None)]
    assert check(fn, inputs, **GRADCHECK)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "noh0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", CELLS)
def test_gradcheck(mode, bias, with_h0, reverse, shape):
    seed(mode, bias, with_h0, reverse, shape)
    T, B, I, H = shape
    dt = torch.float64
    layer = make_layer(mode, I, H, bias=bias, dtype=dt)
    h0, c0 = make_states(layer, B, dtype=dt) if with_h0 else (None, None)
    _check(mode, rand(T, B, I, dtype=dt), layer, h0, c0, reverse=reverse)


@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "noh0"])
@pytest.mark.parametrize("mode", CELLS)
def test_gradcheck_one_step(mode, with_h0):
    """Input [B, I] without batch_sizes: one step (a cell's call)."""
    seed("one-step", mode, with_h0)
    dt = torch.float64
    layer = make_layer(mode, 7, 5, dtype=dt)
    h0, c0 = make_states(layer, 3, dtype=dt) if with_h0 else (None, None)
    _check(mode, rand(3, 7, dtype=dt), layer, h0, c0)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("mode", CELLS)
def test_gradcheck_packed(mode, reverse):
    torch.manual_seed(7)
    dt = torch.float64
    batch_sizes = torch.tensor([3, 3, 2, 1])
    layer = make_layer(mode, 4, 5, dtype=dt)
    h0, c0 = make_states(layer, 3, dtype=dt)
    x = rand(int(batch_sizes.sum()), 4, dtype=dt)
    _check(mode, x, layer, h0, c0, batch_sizes=batch_sizes, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_gradcheck_lstm_projection(reverse):
    torch.manual_seed(11)
    dt = torch.float64
    layer = make_layer("LSTM", 4, 5, proj=3, dtype=dt)
    h0, c0 = make_states(layer, 2, dtype=dt)
    _check("LSTM", rand(4, 2, 4, dtype=dt), layer, h0, c0, reverse=reverse)


GRADGRAD_CASES = [
    (mode, case)
    for mode in CELLS
    for case in ["padded", "packed-reverse", "one-step", "proj"]
    if case != "proj" or mode == "LSTM"  # the projection exists for LSTM only
]


@pytest.mark.parametrize(("mode", "case"), GRADGRAD_CASES)
def test_gradgradcheck(mode, case):
    seed("gradgrad", mode, case)
    dt = torch.float64
    layer = make_layer(mode, 3, 4, proj=2 if case == "proj" else 0, dtype=dt)
    h0, c0 = make_states(layer, 2, dtype=dt)
    kw = {}
    if case == "packed-reverse":
        kw = dict(batch_sizes=torch.tensor([2, 2, 1]), reverse=True)
        x = rand(5, 3, dtype=dt)
    elif case == "one-step":
        x = rand(2, 3, dtype=dt)
    else:
        x = rand(3, 2, 3, dtype=dt)
    _check(mode, x, layer, h0, c0, check=torch.autograd.gradgradcheck, **kw)


@pytest.mark.parametrize("mode", CELLS)
def test_gradgradcheck_state_carried_between_calls(mode):
    """The second call's initial states are the first call's final ones, so they carry a
    graph of their own: the double backward must not count paths through it twice."""
    seed("gradgrad carried", mode)
    dt = torch.float64
    layer = make_layer(mode, 3, 4, dtype=dt)
    h0, c0 = make_states(layer, 2, dtype=dt)
    x = rand(2, 3, 2, 3, dtype=dt)

    def fn(x, h, *rest):
        c, w = (rest[0], rest[1:]) if c0 is not None else (None, rest)
        for chunk in x:
            output, h, c = rnn_layer(mode, chunk, *w, h, c)
        return (output, h) if c is None else (output, h, c)

    inputs = [x, h0, *([c0] if c0 is not None else []), *layer.tensors()]
    assert torch.autograd.gradgradcheck(fn, inputs, **GRADCHECK)


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell", "LSTM", "GRU"])
def test_double_backward_through_steps_as_torch_nn(name):
    """Second derivatives of the parameters through a cell stepped three times, or a layer
    called twice with its state carried over, beside torch.nn's."""
    seed("double backward steps", name)
    theirs = getattr(torch.nn, name)(3, 4).double()
    ours = getattr(rnn_fused, name)(3, 4).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    if "Cell" not in name:
        x = x.unsqueeze(1).expand(3, 2, 2, 3)
    found = []
    for module in (ours, theirs):
        params = list(module.parameters())
        state = None
        for step in x:
            out = module(step) if state is None else module(step, state)
            state = out if "Cell" in name else out[1]
        h = state[0] if isinstance(state, tuple) else state
        g = torch.autograd.grad(h.sin().sum() + h.pow(2).sum(), params, create_graph=True)
        found.append(torch.autograd.grad(sum(v.pow(2).sum() for v in g), params))
    for got, want in zip(*found):
        assert want.abs().max() > 0
        assert_close(got, want, "second derivative")

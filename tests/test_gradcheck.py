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
from tolerances import GRADCHECK

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

"""Bad constructor arguments and bad inputs raise what torch.nn raises: the same exception
type and the same message, checked by running both."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnn_fused

PAIRS = {
    "LSTM": (nn.LSTM, rnn_fused.LSTM),
    "GRU": (nn.GRU, rnn_fused.GRU),
    "RNN": (nn.RNN, rnn_fused.RNN),
    "LSTMCell": (nn.LSTMCell, rnn_fused.LSTMCell),
    "GRUCell": (nn.GRUCell, rnn_fused.GRUCell),
    "RNNCell": (nn.RNNCell, rnn_fused.RNNCell),
}


def _outcome(fn):
    try:
        fn()
    except Exception as err:
        return type(err), str(err)
    return None


def _same(theirs, ours):
    expected = _outcome(theirs)
    assert expected is not None, "the case must be an error for torch.nn"
    assert _outcome(ours) == expected


CONSTRUCTOR_CASES = [
    ("LSTM", (3, 4), dict(dropout=1.5)),
    ("LSTM", (3, 4), dict(dropout=True)),
    ("GRU", (3, 4), dict(bias=1)),
    ("GRU", (3, 4), dict(batch_first="yes")),
    ("RNN", (3.0, 4), {}),
    ("RNN", (0, 4), {}),
    ("RNN", (3, 4.0), {}),
    ("LSTM", (3, 0), {}),
    ("LSTM", (3, 4), dict(num_layers=0)),
    ("LSTM", (3, 4), dict(proj_size=-1)),
    ("LSTM", (3, 4), dict(proj_size=4)),
    ("GRU", (3, 4), dict(proj_size=2)),
    ("RNN", (3, 4), dict(proj_size=2)),
    ("RNN", (3, 4), dict(nonlinearity="sigmoid")),
]


@pytest.mark.parametrize(("name", "args", "kwargs"), CONSTRUCTOR_CASES)
def test_constructor_errors(name, args, kwargs):
    theirs, ours = PAIRS[name]
    _same(lambda: theirs(*args, **kwargs), lambda: ours(*args, **kwargs))


def test_dropout_warning_with_one_layer():
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        rnn_fused.GRU(3, 4, dropout=0.2)


def _layer_input_cases():
    x = torch.randn(5, 2, 3)
    h_bad = torch.randn(1, 3, 4)
    return [
        ("LSTM", lambda m: m(torch.randn(5, 2, 2, 3))),
        ("GRU", lambda m: m(torch.randn(5))),
        ("RNN", lambda m: m(torch.randn(5, 2, 7))),
        ("RNN", lambda m: m(x.double())),
        ("GRU", lambda m: m(x, h_bad)),
        ("GRU", lambda m: m(x, torch.randn(2, 4))),
        ("RNN", lambda m: m(torch.randn(5, 3), torch.randn(1, 1, 4))),
        ("LSTM", lambda m: m(x, (torch.randn(1, 2, 4), torch.randn(1, 3, 4)))),
        ("LSTM", lambda m: m(x, (torch.randn(1, 3, 4), torch.randn(1, 2, 4)))),
        ("LSTM", lambda m: m(x, (torch.randn(2, 4), torch.randn(2, 4)))),
        ("LSTM", lambda m: m(torch.randn(5, 3), (torch.randn(1, 1, 4), torch.randn(1, 1, 4)))),
        ("LSTM", lambda m: m(torch.randn(0, 2, 3))),
        ("GRU", lambda m: m(torch.randn(0, 2, 3))),
    ]


@pytest.mark.parametrize("case", range(len(_layer_input_cases())))
def test_layer_input_errors(case):
    name, call = _layer_input_cases()[case]
    theirs_cls, ours_cls = PAIRS[name]
    theirs = theirs_cls(3, 4)
    ours = ours_cls(3, 4)
    _same(lambda: call(theirs), lambda: call(ours))


def _cell_input_cases():
    return [
        ("LSTMCell", lambda m: m(torch.randn(2, 3, 3))),
        ("LSTMCell", lambda m: m(torch.randn(2, 5))),
        ("LSTMCell", lambda m: m(torch.randn(2, 3), (torch.randn(3, 4), torch.randn(2, 4)))),
        ("LSTMCell", lambda m: m(torch.randn(2, 3), (torch.randn(2, 4), torch.randn(2, 6)))),
        ("LSTMCell", lambda m: m(torch.randn(2, 3), (torch.randn(1, 2, 4), torch.randn(2, 4)))),
        ("GRUCell", lambda m: m(torch.randn(2, 3), torch.randn(2, 5))),
        ("GRUCell", lambda m: m(torch.randn(2, 3), torch.randn(1, 2, 4))),
        ("GRUCell", lambda m: m(torch.randn(2, 3).double())),
        ("RNNCell", lambda m: m(torch.randn(4, 3), torch.randn(2, 4))),
        ("RNNCell", lambda m: m(torch.randn(1, 1, 3))),
    ]


@pytest.mark.parametrize("case", range(len(_cell_input_cases())))
def test_cell_input_errors(case):
    name, call = _cell_input_cases()[case]
    theirs_cls, ours_cls = PAIRS[name]
    theirs = theirs_cls(3, 4)
    ours = ours_cls(3, 4)
    _same(lambda: call(theirs), lambda: call(ours))


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(PAIRS))
def test_half_type_module_refuses_float32_input(name: str, half: torch.dtype):
    """A module in a half type with a float32 input (outside autocast): torch.nn refuses it,
    in one layer and one direction too, where ours takes its shortest door."""
    theirs_cls, ours_cls = PAIRS[name]
    theirs, ours = theirs_cls(3, 4).to(half), ours_cls(3, 4).to(half)
    x = torch.randn(2, 3) if name.endswith("Cell") else torch.randn(5, 2, 3)
    _same(lambda: theirs(x), lambda: ours(x))


def _meta_cases():
    x = torch.randn(4, 2, 3)
    gru = rnn_fused.GRU(3, 5)
    lstm = rnn_fused.LSTM(3, 5)
    meta = torch.device("meta")
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [4, 2])
    g = rnn_fused.ops.GATES["GRU"]
    w_ih, w_hh, b = torch.randn(g * 5, 3), torch.randn(g * 5, 5), torch.randn(g * 5)
    return {
        "module on meta, input on cpu": lambda: rnn_fused.LSTM(3, 5, device=meta)(x),
        "hx on meta": lambda: gru(x, torch.zeros(1, 2, 5, device=meta)),
        "cx on meta": lambda: lstm(x, (torch.zeros(1, 2, 5), torch.zeros(1, 2, 5, device=meta))),
        "bias on meta": lambda: rnn_fused.rnn_layer("GRU", x, w_ih, w_hh, b.to(meta), b),
        "batch_sizes on meta": lambda: rnn_fused.rnn_layer(
            "GRU", packed.data, w_ih, w_hh, batch_sizes=packed.batch_sizes.to(meta)
        ),
        "cell on meta, input on cpu": lambda: rnn_fused.LSTMCell(3, 5, device=meta)(x[0]),
        "grad_output on meta": lambda: torch.autograd.grad(
            gru(x.requires_grad_())[0], x, torch.ones(4, 2, 5, device=meta)
        ),
    }


@pytest.mark.parametrize("case", list(_meta_cases()))
def test_meta_tensor_among_cpu_ones_raises(case):
    """torch.nn raises for a meta tensor among CPU ones; so do we, rather than return
    uninitialised memory."""
    with pytest.raises((RuntimeError, ValueError)):
        _meta_cases()[case]()

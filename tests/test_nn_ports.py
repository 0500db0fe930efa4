"""The RNN cases of PyTorch's test_nn.py that apply to a drop-in layer, written for our
classes: initial hidden state, batch size zero, variable-length sequences packed against
one by one (sorted and unsorted, with projections)."""

from __future__ import annotations

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_fused

CLASSES = {"LSTM": rnn_fused.LSTM, "GRU": rnn_fused.GRU, "RNN": rnn_fused.RNN}


@pytest.mark.parametrize("name", list(CLASSES))
def test_batch_size_zero(name):
    rnn = CLASSES[name](3, 4)
    out = rnn(torch.zeros(5, 0, 3))[0]
    assert out.shape == (5, 0, 4)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in rnn.parameters())


@pytest.mark.parametrize("name", list(CLASSES))
def test_initial_hidden_state_is_used(name):
    seed("h0", name)
    rnn = CLASSES[name](3, 4, num_layers=2).double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    h0 = torch.zeros(2, 2, 4, dtype=torch.float64)
    hx = (h0, h0.clone()) if name == "LSTM" else h0
    assert_close(rnn(x, hx)[0], rnn(x)[0], "zero state equals no state")
    h1 = torch.randn(2, 2, 4, dtype=torch.float64)
    hx = (h1, h1.clone()) if name == "LSTM" else h1
    assert not torch.allclose(rnn(x, hx)[0], rnn(x)[0])


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("name", [*CLASSES, "LSTM-proj"])
def test_variable_sequences_packed_vs_one_by_one(name, enforce_sorted):
    seed("varseq", name, enforce_sorted)
    dt = torch.float64
    kw = dict(num_layers=2, bidirectional=True, dtype=dt)
    if name == "LSTM-proj":
        kw["proj_size"] = 3
    rnn = CLASSES[name.removesuffix("-proj")](4, 5, **kw)
    lengths = [6, 4, 4, 2, 1] if enforce_sorted else [2, 6, 1, 4, 4]
    x = torch.randn(max(lengths), len(lengths), 4, dtype=dt, requires_grad=True)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    out, hidden = rnn(packed)
    padded, _ = pad_packed_sequence(out)
    h_n = hidden[0] if isinstance(hidden, tuple) else hidden
    grads = torch.autograd.grad(padded.sum() + h_n.sum(), [x, *rnn.parameters()])
    for b, length in enumerate(lengths):
        seq = x[:length, b : b + 1]
        out_b, hidden_b = rnn(seq)
        assert_close(padded[:length, b : b + 1], out_b, f"output of sequence {b}")
        h_b = hidden_b[0] if isinstance(hidden_b, tuple) else hidden_b
        assert_close(h_n[:, b : b + 1], h_b, f"h_n of sequence {b}")
    one_by_one = sum(
        rnn(x[:n, b : b + 1])[0].sum()
        + (lambda h: (h[0] if isinstance(h, tuple) else h).sum())(rnn(x[:n, b : b + 1])[1])
        for b, n in enumerate(lengths)
    )
    for i, (a, e) in enumerate(zip(grads, torch.autograd.grad(one_by_one, [x, *rnn.parameters()]))):
        assert_close(a, e, f"grad {i}")

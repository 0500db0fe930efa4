"""Both directions of a bidirectional layer at once on the CPU (rnn_fused.ops.both_directions,
one thread per direction, where nothing needs a graph): the same bits as the directions one
after the other, and the per-direction path wherever the threads could not honour the call."""

from __future__ import annotations

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch import nn

import rnn_fused
from rnn_fused import modules, ops

CASES = [
    ("LSTM", lambda: nn.LSTM(23, 33, num_layers=2, bidirectional=True)),
    ("LSTM-proj", lambda: nn.LSTM(23, 33, num_layers=2, bidirectional=True, proj_size=13)),
    ("GRU", lambda: nn.GRU(23, 33, num_layers=2, bidirectional=True)),
    ("RNN-relu", lambda: nn.RNN(23, 33, num_layers=2, bidirectional=True, nonlinearity="relu")),
    ("IndRNN", lambda: rnn_fused.IndRNN(23, 33, num_layers=2, bidirectional=True)),
    ("LayerNormLSTM", lambda: rnn_fused.LayerNormLSTM(23, 33, num_layers=2, bidirectional=True)),
    ("LayerNormGRU", lambda: rnn_fused.LayerNormGRU(23, 33, bidirectional=True)),
    ("LSTM-zoneout", lambda: rnn_fused.LSTM(23, 33, bidirectional=True, zoneout=0.2).eval()),
]


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _module(make) -> nn.Module:
    m = make()
    return m if type(m).__module__.startswith("rnn_fused") else rnn_fused.replace_rnns(m)


def _inputs(packed: bool, dtype: torch.dtype):
    T, B = 9, 5  # a direction's products: at least 39 x 33 x 56 multiply-adds, above the bar
    x = torch.randn(T, B, 23, dtype=dtype)
    if not packed:
        return x
    lengths = torch.tensor([9, 8, 6, 9, 7])
    return nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)


def _flat(result) -> list[torch.Tensor]:
    out, state = result
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    return [out, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize(("name", "make"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_same_bits_as_one_direction_at_a_time(two_threads, monkeypatch, name, make, packed, dtype):
    seed("both", name, packed, dtype)
    m = _module(make).to(dtype)
    x = _inputs(packed, dtype)
    taken = []
    real = ops.both_directions

    def spy(*args):
        result = real(*args)
        taken.append(result is not None)
        return result

    with torch.no_grad():
        monkeypatch.setattr(modules, "both_directions", spy)
        together = _flat(m(x))
        monkeypatch.setattr(modules, "both_directions", lambda *args: None)
        apart = _flat(m(x))
    assert taken and all(taken), "the layers did not run their directions together"
    for a, b in zip(together, apart, strict=True):
        assert torch.equal(a, b)


def test_matches_torch_nn_in_float64(two_threads):
    seed("both-nn")
    ref = nn.LSTM(23, 33, num_layers=3, bidirectional=True).double()
    ours = rnn_fused.replace_rnns(nn.LSTM(23, 33, num_layers=3, bidirectional=True).double())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 5, 23, dtype=torch.float64)
    h0 = torch.randn(6, 5, 33, dtype=torch.float64)
    c0 = torch.randn(6, 5, 33, dtype=torch.float64)
    with torch.no_grad():
        for a, b in zip(_flat(ours(x, (h0, c0))), _flat(ref(x, (h0, c0))), strict=True):
            assert_close(a, b, "bidirectional LSTM without a graph")


def test_inference_mode_gives_inference_tensors(two_threads):
    seed("both-inference")
    ref = nn.GRU(23, 33, bidirectional=True)
    ours = rnn_fused.replace_rnns(nn.GRU(23, 33, bidirectional=True))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, 5, 23)
    with torch.inference_mode():
        got, want = _flat(ours(x)), _flat(ref(x))
    for a, b in zip(got, want, strict=True):
        assert a.is_inference() == b.is_inference()
        assert_close(a, b, "bidirectional GRU in inference mode")


def _direction(w: list[torch.Tensor]) -> ops.Direction:
    return ops.Direction(*w, None, None, None, None, None)


def test_declines_what_its_threads_cannot_honour(two_threads):
    seed("both-declines")
    x = torch.randn(50, 20, 8)  # 1000 rows x 24 x 16 multiply-adds
    w = [torch.randn(24, 8), torch.randn(24, 8), torch.randn(24), torch.randn(24)]
    pair = (_direction(w), _direction(w))
    with torch.no_grad():
        assert ops.both_directions("GRU", x, pair, None) is not None
        assert ops.both_directions("GRU", x[:2], pair, None) is None, "too little work"
    x.requires_grad_()
    assert ops.both_directions("GRU", x, pair, None) is None, "a graph is needed"
    with torch.no_grad():
        assert ops.both_directions("GRU", x, pair, None) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ops.both_directions("GRU", x, pair, None) is None, "autocast"
        torch.set_num_threads(1)
        assert ops.both_directions("GRU", x, pair, None) is None, "one thread"


def test_layer_pair_wants_two_of_each():
    x = torch.randn(5, 2, 4)
    w = torch.randn(12, 4)
    with pytest.raises(RuntimeError, match="two of each per-direction argument, got 1"):
        rnn_fused._C.layer_pair(
            "GRU", x, [None], [None, None], [w, w], [w, w], [None, None], [None, None],
            [None, None], None, [None, None], [None, None],
        )  # fmt: skip


def test_traced_under_no_grad_runs_each_direction(two_threads):
    """torch.jit.trace's state stays on the calling thread: both directions there, each
    recorded (once a segmentation fault: the other thread recursed in the tracer)."""
    seed("both-traced")
    gru = rnn_fused.GRU(8, 24, bidirectional=True).requires_grad_(False)
    x = torch.randn(50, 20, 8)
    with torch.no_grad():
        pair = tuple(gru._direction(0, d, x, None, None) for d in (0, 1))
        assert ops.both_directions("GRU", x, pair, None) is not None, "the path under test"
        traced = torch.jit.trace(gru, (x,))
        assert str(traced.graph).count("rnn_fused::layer") == 2
        other = torch.randn(30, 7, 8)
        assert_close(traced(other)[0], gru(other)[0], "traced bidirectional GRU")


def test_layer_pair_refuses_tracing():
    x = torch.randn(5, 2, 4)
    w = torch.randn(12, 4)

    def pair(x):
        return rnn_fused._C.layer_pair(
            "GRU", x, [None, None], [None, None], [w, w], [w, w], [None, None], [None, None],
            [None, None], None, [None, None], [None, None],
        )[0][0]  # fmt: skip

    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace cannot follow"):
        torch.jit.trace(pair, (x,))

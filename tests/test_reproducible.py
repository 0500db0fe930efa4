"""Reproducible bits on the CPU: the same inputs give the same outputs and gradients, bit
for bit, from run to run and with one thread or two (the engine splits work by tiles, not
by reductions whose order would follow the thread count)."""

from __future__ import annotations

import pytest
import torch
from helpers import seed
from torch import nn

import rnn_fused


def _on_threads(threads: int, fn):
    """fn() with torch set to this many threads, then back to its own count."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)


def _run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    xi = x.clone().requires_grad_()
    out, _ = module(xi)
    return [out, *torch.autograd.grad((out * out).sum(), [xi, *module.parameters()])]


@pytest.mark.parametrize(("T", "B", "H"), [(7, 3, 33), (20, 40, 96)])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"]
)
def test_bitwise_equal_across_runs_and_threads(cls, T, B, H, dtype):
    """float64's products go to BLAS, whose own threads would change the order of its sums
    (MKL on AMD EPYC): each call is held to one thread. bfloat16 at B=40: row blocks of their
    own size where the products run on AMX tiles (pointwise.h kOwnRowsTileBlock)."""
    seed("repro", cls.__name__, T, B, H)
    module = rnn_fused.replace_rnns(cls(H, H, num_layers=2, bidirectional=True)).to(dtype)
    x = torch.randn(T, B, H, dtype=dtype)
    first, second = _run(module, x), _run(module, x)
    single, double = (_on_threads(n, lambda: _run(module, x)) for n in (1, 2))
    for a, b, c, d in zip(first, second, single, double):
        assert torch.equal(a, b), "two runs differ"
        assert torch.equal(c, d), "one thread and two threads differ"


@pytest.mark.parametrize(
    "batch, input_size, hidden", [(1, 300, 257), (97, 51, 51)], ids=["batch-1", "batch-97"]
)
@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell], ids=lambda c: c.__name__)
def test_cell_over_threads(cls, batch: int, input_size: int, hidden: int):
    """A cell's step split over the threads: at batch 1, weights large enough to split, by
    hidden units, each thread through both products of its units and their cell math in one
    region (forward_cpu.cpp, one_row_by_units; one thread takes the products one after
    the other, cpu/gemm.cpp, matmul_blas); at batch 97, the cell math split by rows
    (engine.h, kParallelCellUnits). The same bits on one thread and two, and
    torch.nn's values in float64 to float32's rounding."""
    seed("repro-cell", cls.__name__, batch)
    ours = rnn_fused.replace_rnns(cls(input_size, hidden))
    theirs = cls(input_size, hidden).double()
    theirs.load_state_dict(ours.state_dict())
    x, h = torch.randn(batch, input_size), torch.randn(batch, hidden) * 0.5
    state = (h, torch.randn(batch, hidden) * 0.5) if cls is nn.LSTMCell else h
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                out = ours(x, state)
            results.append(out[0] if isinstance(out, tuple) else out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]), "one thread and two threads differ"
    exact_state = tuple(s.double() for s in state) if cls is nn.LSTMCell else h.double()
    with torch.no_grad():
        exact = theirs(x.double(), exact_state)
    exact = exact[0] if isinstance(exact, tuple) else exact
    torch.testing.assert_close(results[0].double(), exact, rtol=1e-5, atol=1e-5)
    # Training runs the same split, keeping what the backward reads.
    xs = [x.clone().requires_grad_(), x.double().requires_grad_()]
    for model, xi, st in ((ours, xs[0], state), (theirs, xs[1], exact_state)):
        out = model(xi, st)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    torch.testing.assert_close(xs[0].grad.double(), xs[1].grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "batch, input_size, hidden",
    [(200, 33, 51), (40, 2100, 520)],
    ids=["row-blocks", "large-weights"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell], ids=lambda c: c.__name__)
def test_cell_row_blocks_over_threads(
    cls, dtype: torch.dtype, batch: int, input_size: int, hidden: int
):
    """A cell's step of 200 rows runs in blocks of rows, each through both products and the
    cell math, forward and backward (forward_cpu.cpp and backward_cpu.cpp,
    rows_in_one_region); one whose weights pass kRegionMaxWeight elements takes each product
    over the threads in blocks of up to 256 columns or of whole rows (cpu/gemm.cpp,
    matmul_blas). The output and every
    gradient keep their bits from one thread to two, and match torch.nn's in float64."""
    seed("repro-cell-blocks", cls.__name__, str(dtype), batch)
    ours = rnn_fused.replace_rnns(cls(input_size, hidden)).to(dtype)
    theirs = cls(input_size, hidden).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(batch, input_size, dtype=dtype)
    states = [torch.randn(batch, hidden, dtype=dtype) * 0.5 for _ in range(2)]
    weights = torch.randn(batch, hidden, dtype=dtype)

    def run(model, dt):
        xi = x.to(dt).requires_grad_()
        st = [s.to(dt).requires_grad_() for s in states]
        out = model(xi, tuple(st) if cls is nn.LSTMCell else st[0])
        h = out[0] if isinstance(out, tuple) else out
        inputs = [xi, *(st if cls is nn.LSTMCell else st[:1]), *model.parameters()]
        return [h.detach(), *torch.autograd.grad((h * weights.to(dt)).sum(), inputs)]

    one, two = (_on_threads(n, lambda: run(ours, dtype)) for n in (1, 2))
    for a, b in zip(one, two):
        assert torch.equal(a, b), "one thread and two threads differ"
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in zip(two, run(theirs, torch.float64)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("proj_size", [0, 48], ids=["no-proj", "proj"])
def test_bfloat16_training_forward_repeats(proj_size: int):
    """bfloat16 products round each step's h once for all threads (forward_cpu.cpp,
    round_h); with a projection, h is copied in after the projection's product, and a
    thread that rounded its rows before the copy was whole gave other bits now and then
    (1 to 10 calls in 40). Many steps and calls give a race many chances to show."""
    seed("repro-bf16", proj_size)
    module = rnn_fused.LSTM(64, 128, proj_size=proj_size).to(torch.bfloat16)
    x = torch.randn(60, 33, 64, dtype=torch.bfloat16)
    first = module(x)[0]
    for call in range(30):
        assert torch.equal(module(x)[0], first), f"call {call + 1} differs from the first"


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_own_rows_of_a_packed_batch(cls, dtype: torch.dtype):
    """Forward steps whose threads each keep their own blocks of rows, with no barrier
    between steps (forward_cpu.cpp, own_rows): a packed batch whose rows end mid-block and
    a reverse direction whose batch grows, the same bits on one thread and two, run after
    run, and torch.nn's values."""
    seed("repro-own-rows", cls.__name__, dtype)
    theirs = cls(21, 37, num_layers=2, bidirectional=True)
    ours = rnn_fused.replace_rnns(cls(21, 37, num_layers=2, bidirectional=True))
    ours.load_state_dict(theirs.state_dict())
    lengths = torch.randint(1, 41, (19,)).sort(descending=True).values
    lengths[0] = 41
    x = torch.randn(41, 19, 21)

    def run(module: nn.Module, dt: torch.dtype) -> list[torch.Tensor]:
        module = module.to(dt)
        xi = x.to(dt).requires_grad_()
        packed = nn.utils.rnn.pack_padded_sequence(xi, lengths)
        out, _ = nn.utils.rnn.pad_packed_sequence(module(packed)[0])
        return [out, *torch.autograd.grad((out.float() ** 2).sum(), [xi])]

    single, double = (_on_threads(n, lambda: run(ours, dtype)) for n in (1, 2))
    again = run(ours, dtype)
    for a, b, c in zip(single, double, again):
        assert torch.equal(a, b), "one thread and two threads differ"
        assert torch.equal(b, c), "two runs differ"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for a, b in zip(double, run(theirs, torch.float64)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_bf16_reverse_step_of_one_row_without_state_gradients(cls):
    """bfloat16 training of a reversed packed call whose last step (the backward's final one)
    has one row, without h_0's gradient: on two threads the tiles compute that row, which
    must be rounded for the chunk's products like the other steps' rows (they read stale
    ones: wrong weight and input gradients, at times inf). Calls of another layer leave
    other values in the buffers between the calls compared, and one thread runs last (its
    rows rounded right would serve a call after it)."""
    seed("repro-bf16-last-row", cls.__name__)
    layer = rnn_fused.replace_rnns(cls(130, 66)).bfloat16()
    other = rnn_fused.replace_rnns(cls(257, 66, bidirectional=True)).bfloat16()
    lengths = torch.randint(1, 63, (15,)).sort(descending=True).values
    # The reverse direction's first step, its last in the backward, of one row; every other
    # step of two or more (a step of one row elsewhere left the chunk's rows unrounded).
    lengths[:2] = torch.tensor([64, 63])
    x, noise = torch.randn(64, 15, 130).bfloat16(), torch.randn(64, 15, 257).bfloat16()
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
    weights = torch.randn(packed.data.shape[0], 66)
    w_ih, w_hh, b_ih, b_hh = (p.detach().requires_grad_() for p in layer.parameters())
    mode = {nn.LSTM: "LSTM", nn.GRU: "GRU", nn.RNN: "RNN_TANH"}[cls]

    def run() -> list[torch.Tensor]:
        with torch.no_grad():
            other(noise)
        xi = packed.data.clone().requires_grad_()
        out = rnn_fused.rnn_layer(
            mode, xi, w_ih, w_hh, b_ih, b_hh, batch_sizes=packed.batch_sizes, reverse=True
        )[0]
        loss = (out.float() * weights).sum()
        return list(torch.autograd.grad(loss, [xi, w_ih, w_hh, b_ih, b_hh]))

    doubles = [_on_threads(2, run) for _ in range(4)]
    single = _on_threads(1, run)  # last: its rounded rows stay in the buffers
    for double in doubles:
        for name, a, b in zip(["input", "w_ih", "w_hh", "b_ih", "b_hh"], single, double):
            assert torch.isfinite(b).all(), f"{name}: non-finite gradient on two threads"
            assert torch.equal(a, b), f"{name}: one thread and two threads differ"

"""torch.compile(fullgraph=True) and torch.export on every module class: no graph break,
the eager outputs and gradients."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_fused

MODULES = {
    "LSTM": lambda: rnn_fused.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2),
    "GRU": lambda: rnn_fused.GRU(3, 5, batch_first=True),
    "RNN": lambda: rnn_fused.RNN(3, 5, nonlinearity="relu", num_layers=2),
    "LSTMCell": lambda: rnn_fused.LSTMCell(3, 5),
    "GRUCell": lambda: rnn_fused.GRUCell(3, 5),
    "RNNCell": lambda: rnn_fused.RNNCell(3, 5),
}


def _input(name):
    return torch.randn(4, 3) if name.endswith("Cell") else torch.randn(4, 2, 3)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, torch.nn.utils.rnn.PackedSequence):
        return [out.data]
    return [t for o in out for t in _tensors(o)]


@pytest.mark.parametrize("name", list(MODULES))
def test_compile_fullgraph(name):
    seed(name)
    torch._dynamo.reset()
    module = MODULES[name]()
    x = _input(name)
    eager = _tensors(module(x))
    g_eager = torch.autograd.grad(sum(o.sum() for o in eager), list(module.parameters()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _tensors(torch.compile(module, fullgraph=True)(x))
    # Nothing of ours for Dynamo to warn about (it did about a functools cache in modules.py).
    ours = [str(w.message) for w in caught if "modules.py" in str(w.message)]
    assert not ours, ours
    g_comp = torch.autograd.grad(sum(o.sum() for o in compiled), list(module.parameters()))
    for a, b in zip(compiled, eager):
        assert_close(a, b, "output")
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, "grad")


@pytest.mark.parametrize("name", list(MODULES))
def test_compile_fullgraph_under_autocast(name):
    """Under CPU autocast the compiled module runs the eager call's casts in its graph: the
    same dtypes, values and parameter gradients, with no graph break."""
    seed(name, "autocast")
    torch._dynamo.reset()
    module = MODULES[name]()
    x = _input(name)

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _tensors(m(x))
        return out, torch.autograd.grad(
            sum(o.float().sum() for o in out), list(module.parameters())
        )

    eager, g_eager = run(module)
    compiled, g_comp = run(torch.compile(module, fullgraph=True))
    assert [o.dtype for o in compiled] == [o.dtype for o in eager]
    for a, b in zip(compiled + list(g_comp), eager + list(g_eager), strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("with_states", [False, True], ids=["no states", "states"])
@pytest.mark.parametrize("name", ["GRU", "LSTM"])
def test_compile_fullgraph_packed(name: str, with_states: bool):
    """A packed input, with given states too (whose batch is checked against the packed
    batch, a value torch.compile only knows when the graph runs)."""
    torch._dynamo.reset()
    module = getattr(rnn_fused, name)(3, 4, bidirectional=True)
    seq = pack_padded_sequence(torch.randn(5, 3, 3), torch.tensor([5, 2, 4]), enforce_sorted=False)
    h0 = torch.randn(2, 3, 4)
    states = (h0, torch.randn_like(h0)) if name == "LSTM" else h0
    args = (seq, states) if with_states else (seq,)
    eager = _tensors(module(*args))
    compiled = _tensors(torch.compile(module, fullgraph=True)(*args))
    for a, b in zip(compiled, eager, strict=True):
        assert_close(a, b, "output")


def test_second_call_of_a_fresh_compiled_module_does_not_recompile():
    """A module compiled before any eager call: its first trace finds the module's names
    cached (made at construction), so that the second call reuses the graph."""
    torch._dynamo.reset()
    rnn_fused.modules._DIRECTION_NAMES.clear()  # as in a fresh process
    module = rnn_fused.GRU(3, 4, num_layers=3, bidirectional=True)
    compiled = torch.compile(module, fullgraph=True)
    x = torch.randn(5, 2, 3)
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        compiled(x)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("name", list(MODULES))
def test_export(name):
    seed("export", name)
    module = MODULES[name]().eval()
    x = _input(name)
    program = torch.export.export(module, (x,))
    nodes = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert any("rnn_fused" in str(t) for t in nodes), nodes
    for a, b in zip(_tensors(program.module()(x)), _tensors(module(x))):
        assert_close(a, b, "output")


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("with_states", [False, True], ids=["no-h0", "h0"])
def test_export_packed(strict, with_states):
    """A PackedSequence through torch.export, both modes (torch.nn's layers export in
    neither): the batch is read with .item(), which non-strict export keeps symbolic."""
    seed("export packed", strict, with_states)
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours = rnn_fused.LSTM.from_torch(theirs)
    lengths = torch.tensor([5, 3, 2])
    x = pack_padded_sequence(torch.randn(5, 3, 3), lengths, enforce_sorted=False)
    states = ((torch.randn(4, 3, 4), torch.randn(4, 3, 4)),) if with_states else ()
    program = torch.export.export(ours, (x, *states), strict=strict)
    got, want = program.module()(x, *states), theirs(x, *states)
    assert_close(got[0].data, want[0].data, "output")
    for a, b in zip(got[1], want[1]):
        assert_close(a, b, "state")


@pytest.mark.parametrize("name", ["LSTM", "GRU", "LSTMCell"])
def test_compiled_autograd_over_optimizer_steps(name):
    """Compiled autograd (torch.compile of the backward) runs the layers' backward: the
    eager gradients, with states given and biases, and one capture while an optimizer
    changes the parameters in place (the biases' versions, kept for a double backward, are
    inputs of its graph, not keys of its cache)."""
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    seed("compiled-autograd", name)
    torch._dynamo.reset()
    counters.clear()
    module = MODULES[name]().double()
    x = _input(name).double()
    shapes = {"LSTM": [(4, 2, 2), (4, 2, 5)], "GRU": [(1, 4, 5)], "LSTMCell": [(4, 5), (4, 5)]}
    states = [torch.randn(shape, dtype=torch.float64) for shape in shapes[name]]
    args = (x, tuple(states) if "LSTM" in name else states[0])
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        outputs = _tensors(module(*args))
        weights = [torch.rand_like(o) for o in outputs]
        want = torch.autograd.grad(
            sum((o * w).sum() for o, w in zip(outputs, weights)), list(module.parameters())
        )
        outputs = _tensors(module(*args))
        with compiled_autograd._enable(torch.compile(backend="eager")):
            sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
        for p, g in zip(module.parameters(), want, strict=True):
            assert_close(p.grad, g, "grad")
        opt.step()
    assert counters["compiled_autograd"]["captures"] == 1

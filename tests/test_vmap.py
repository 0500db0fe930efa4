"""torch.func.vmap through the layers, cells and the operator, against a loop over the
samples (torch.nn's modules have no batching rule: vmap raises there), in float64. Samples
that share their parameters run as one call, folded into the batch (ops.py, _layer_vmap);
stacked parameters (an ensemble) and batched gradients run sample by sample."""

from __future__ import annotations

import pytest
import torch
from helpers import FUNC_LAYER_IDS, FUNC_LAYERS, seed
from tolerances import assert_close
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

import rnn_fused
from rnn_fused import reference

F64 = torch.float64


def _pair(name: str, kw: dict, input_size: int = 3, hidden: int = 5):
    theirs = getattr(nn, name)(input_size, hidden, **kw).double()
    ours = getattr(rnn_fused, name).from_torch(theirs)
    return ours, theirs


def _loop(f, *args):
    """f over the samples of args (dimension 0), results stacked: what vmap must give."""
    each = [f(*sample) for sample in zip(*args)]
    if isinstance(each[0], tuple):
        return tuple(torch.stack(r) for r in zip(*each))
    return torch.stack(each)


def _assert_all_close(got, want, what: str) -> None:
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"{what} result {k}: shape {g.shape} != {w.shape}"
        assert_close(g, w, f"{what} result {k}")


@pytest.mark.parametrize(("name", "kw"), FUNC_LAYERS, ids=FUNC_LAYER_IDS)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_layer_over_inputs_and_states(name, kw, unbatched):
    seed("vmap layer", name, kw, unbatched)
    ours, theirs = _pair(name, kw)
    samples, steps, batch = 4, 6, 3
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    out = kw.get("proj_size") or 5
    if unbatched:
        x_shape = (steps, 3)
    else:
        x_shape = (batch, steps, 3) if kw.get("batch_first") else (steps, batch, 3)
    h_shape = (layers, out) if unbatched else (layers, batch, out)
    xs, h0s = torch.randn(samples, *x_shape, dtype=F64), torch.randn(samples, *h_shape, dtype=F64)

    def states(h0):
        if name != "LSTM":
            return h0
        return h0, torch.ones(*h0.shape[:-1], 5, dtype=F64) * 0.3

    def run(module):
        return lambda x, h0: (lambda o: (o[0], *(o[1] if name == "LSTM" else (o[1],))))(
            module(x, states(h0))
        )

    want = _loop(run(theirs), xs, h0s)
    _assert_all_close(vmap(run(ours))(xs, h0s), want, "inputs and states")
    # Only the input vmapped (every sample from the same h0), and only the states.
    want = _loop(lambda x: run(theirs)(x, h0s[0]), xs)
    _assert_all_close(vmap(lambda x: run(ours)(x, h0s[0]))(xs), want, "inputs")
    want = _loop(lambda h0: run(theirs)(xs[0], h0), h0s)
    _assert_all_close(vmap(lambda h0: run(ours)(xs[0], h0))(h0s), want, "states")


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_cell_over_inputs_and_states(name, unbatched):
    seed("vmap cell", name, unbatched)
    theirs = getattr(nn, name)(3, 5).double()
    ours = getattr(rnn_fused, name).from_torch(theirs)
    shape = () if unbatched else (2,)
    xs, hs = torch.randn(4, *shape, 3, dtype=F64), torch.randn(4, *shape, 5, dtype=F64)

    def run(module):
        if name == "LSTMCell":
            return lambda x, h: module(x, (h, h.flip(-1)))
        return lambda x, h: module(x, h)

    _assert_all_close(vmap(run(ours))(xs, hs), _loop(run(theirs), xs, hs), "cell")
    # The samples along another dimension than the first.
    got = vmap(run(ours), in_dims=(-1, None), out_dims=-1)(xs.movedim(0, -1), hs[0])
    want = _loop(lambda x: run(theirs)(x, hs[0]), xs)
    want = tuple(w.movedim(0, -1) for w in want) if isinstance(want, tuple) else want.movedim(0, -1)
    _assert_all_close(got, want, "cell, samples last")


@pytest.mark.parametrize(("mode", "reverse"), [("LSTM", False), ("GRU", True), ("RNN_TANH", False)])
def test_operator_on_packed_rows(mode, reverse):
    """A packed sequence's rows per sample fold into one packed batch with batch sizes times
    the samples; the initial states too."""
    seed("vmap packed", mode, reverse)
    gates, hidden = rnn_fused.ops.GATES[mode], 5
    batch_sizes = torch.tensor([3, 3, 2, 1])
    rows = int(batch_sizes.sum())
    w_ih = torch.randn(gates * hidden, 3, dtype=F64)
    w_hh = torch.randn(gates * hidden, hidden, dtype=F64)
    b_ih, b_hh = torch.randn(2, gates * hidden, dtype=F64)
    xs, hs = torch.randn(4, rows, 3, dtype=F64), torch.randn(4, 3, hidden, dtype=F64)
    cx = torch.randn(3, hidden, dtype=F64) if mode == "LSTM" else None

    def run(x, h):
        output, h_n, c_n = rnn_fused.rnn_layer(
            mode, x, w_ih, w_hh, b_ih, b_hh, h, cx, batch_sizes=batch_sizes, reverse=reverse
        )
        return (output, h_n) if c_n is None else (output, h_n, c_n)

    _assert_all_close(vmap(run)(xs, hs), _loop(run, xs, hs), "packed")


def test_layer_norm_and_zoneout_variants():
    """The variants' own arguments (LayerNorm gains, zoneout weights in eval) are shared by
    the samples and fold as the classic layers' do."""
    seed("vmap variants")
    xs = torch.randn(3, 5, 2, 4, dtype=F64)
    for module in (
        rnn_fused.LayerNormLSTM(4, 6, num_layers=2).double(),
        rnn_fused.LayerNormGRU(4, 6, bidirectional=True).double(),
        rnn_fused.LSTM(4, 6, zoneout=0.3).double().eval(),
        rnn_fused.IndRNN(4, 6).double(),
    ):
        run = lambda x, m=module: m(x)[0]  # noqa: E731
        _assert_all_close(vmap(run)(xs), _loop(run, xs), type(module).__name__)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_ensemble_of_stacked_parameters(name):
    """torch.func's model ensembling: each sample its own parameters, run one by one."""
    seed("vmap ensemble", name)
    pairs = [_pair(name, dict(num_layers=2)) for _ in range(3)]
    params, buffers = stack_module_state([ours for ours, _ in pairs])
    x = torch.randn(6, 2, 3, dtype=F64)

    def run(p, b):
        return functional_call(pairs[0][0], (p, b), (x,))[0]

    want = torch.stack([theirs(x)[0] for _, theirs in pairs])
    _assert_all_close(vmap(run)(params, buffers), want, "ensemble")


@pytest.mark.parametrize(("name", "kw"), FUNC_LAYERS, ids=FUNC_LAYER_IDS)
def test_gradients_through_vmap(name, kw):
    """A backward through a vmapped call gives the loop's gradients, for the inputs and the
    shared weights (summed over the samples), and batched gradients (is_grads_batched) each
    sample's own."""
    seed("vmap grad", name, kw)
    ours, theirs = _pair(name, kw)
    xs = torch.randn(3, 4, 2, 3, dtype=F64, requires_grad=True)
    width = (kw.get("proj_size") or 5) * (2 if kw.get("bidirectional") else 1)
    g = torch.randn(3, 4, 2, width, dtype=F64)
    out = vmap(lambda a: ours(a)[0])(xs)
    got = torch.autograd.grad(out, [xs, *ours.parameters()], g)
    out = _loop(lambda a: theirs(a)[0], xs)
    want = torch.autograd.grad(out, [xs, *theirs.parameters()], g)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, f"gradient {k}")
    # Two gradients of the outputs at once, each giving its own input gradient.
    both = torch.stack([g, g.flip(0)])
    out = vmap(lambda a: ours(a)[0])(xs)
    got = torch.autograd.grad(out, xs, both, is_grads_batched=True)[0]
    for k in range(2):
        want = torch.autograd.grad(_loop(lambda a: theirs(a)[0], xs), xs, both[k])[0]
        assert_close(got[k], want, f"batched gradient {k}")


def test_nested_vmap():
    seed("vmap nested")
    ours, theirs = _pair("LSTM", dict(num_layers=2))
    xs = torch.randn(2, 3, 4, 2, 3, dtype=F64)
    got = vmap(vmap(lambda a: ours(a)[0]))(xs)
    want = torch.stack([_loop(lambda a: theirs(a)[0], x) for x in xs])
    _assert_all_close(got, want, "nested")


def test_shared_parameters_fold_into_one_call(capfd):
    """Samples with shared parameters make one call of the operator (the outer one, then
    the folded one), and PyTorch's fallback (a loop with a warning per call) is not used."""
    module = rnn_fused.GRU(3, 5).double()
    xs = torch.randn(6, 4, 2, 3, dtype=F64)
    with torch.profiler.profile() as prof:
        vmap(lambda a: module(a)[0])(xs)
    calls = sum(event.name == "rnn_fused::layer" for event in prof.events())
    assert calls == 2, f"rnn_fused::layer called {calls} times, expected 2"
    assert "batching rule" not in capfd.readouterr().err


@pytest.mark.parametrize("shape", [(0, 4, 2, 3), (0, 2, 3), (0, 3)], ids=["layer", "step", "[I]"])
def test_no_samples(shape):
    """vmap over a dimension of size 0: results and gradients with no samples, shaped as
    the samples' would be."""
    module = (rnn_fused.LSTMCell if len(shape) < 4 else rnn_fused.GRU)(3, 5).double()
    xs = torch.randn(*shape, dtype=F64, requires_grad=True)
    out = vmap(lambda a: module(a)[0])(xs)
    one = module(torch.randn(*shape[1:], dtype=F64))[0]
    assert out.shape == (0, *one.shape)
    out.sum().backward()
    assert xs.grad is not None and xs.grad.shape == xs.shape


def test_vmap_under_compile():
    """torch.compile of a vmapped layer, one graph: the loop's results."""
    seed("vmap compile")
    ours, theirs = _pair("LSTM", dict(num_layers=2))
    xs = torch.randn(4, 6, 2, 3, dtype=F64)
    vmapped = vmap(lambda a: ours(a)[0])
    compiled = torch.compile(lambda x: vmapped(x), fullgraph=True, backend="eager")
    _assert_all_close(compiled(xs), _loop(lambda a: theirs(a)[0], xs), "compiled")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_packed_call_without_states_under_compile(mode):
    """The functional API's packed call with hx None, vmapped and compiled as one graph (its
    batch, the first step's, is read from batch_sizes): reference.py's loop's results."""
    seed("vmap compile packed", mode)
    gates = 4 if mode == "LSTM" else 3
    weights = [torch.randn(gates * 5, n, dtype=F64) for n in (3, 5)]
    weights += [torch.randn(gates * 5, dtype=F64) for _ in range(2)]
    batch_sizes = torch.tensor([3, 3, 2, 1])
    xs = torch.randn(4, int(batch_sizes.sum()), 3, dtype=F64)

    def layer(fn):
        return lambda x, sizes: fn(mode, x, *weights, batch_sizes=sizes)[:2]

    vmapped = vmap(layer(rnn_fused.rnn_layer), in_dims=(0, None))
    compiled = torch.compile(vmapped, fullgraph=True, backend="eager")
    want = _loop(lambda x: layer(reference.rnn_layer)(x, batch_sizes), xs)
    _assert_all_close(compiled(xs, batch_sizes), want, "compiled packed")


@pytest.mark.parametrize("name", ["GRU", "LSTMCell"])
def test_gradients_of_a_vmapped_call(name):
    """grad and jacrev of a function that vmaps a module (the differentiating transform
    outside vmap: reference.py's loop runs, as under grad alone)."""
    seed("grad of vmap", name)
    theirs = getattr(nn, name)(3, 5).double()
    ours = getattr(rnn_fused, name).from_torch(theirs)
    xs = torch.randn(2, *((4,) if name == "GRU" else ()), 2, 3, dtype=F64)

    def run(module):
        return lambda a: module(a)[0]

    got = grad(lambda x: vmap(run(ours))(x).square().sum())(xs)
    leaf = xs.clone().requires_grad_()
    want = torch.autograd.grad(_loop(run(theirs), leaf).square().sum(), leaf)[0]
    assert_close(got, want, "grad of vmap")
    got = jacrev(lambda x: vmap(run(ours))(x))(xs)
    want = torch.autograd.functional.jacobian(lambda x: _loop(run(theirs), x), xs)
    assert_close(got, want, "jacrev of vmap")


def test_bad_arguments_raise_the_samples_error():
    """An error names one sample's sizes, as the eager call's, not the folded ones."""
    x = torch.randn(5, 2, 3, dtype=F64)
    w_ih, w_hh = torch.randn(12, 3, dtype=F64), torch.randn(12, 4, dtype=F64)
    hs, zs = torch.rand(3, 3, 4, dtype=F64), torch.rand(2, 4, dtype=F64)
    with pytest.raises(RuntimeError, match=r"hx must have shape \[2, 4\], got \[3, 4\]"):
        vmap(lambda h: rnn_fused.rnn_layer("GRU", x, w_ih, w_hh, hx=h)[0])(hs)
    with pytest.raises(RuntimeError, match=r"zoneout must have shape \[5, 2, 4\], got \[4\]"):
        vmap(lambda z: rnn_fused.rnn_layer("GRU", x, w_ih, w_hh, zoneout=z)[0])(zs)


@pytest.mark.parametrize("name", ["GRU-zoneout", "GRUCell-dropconnect"])
def test_random_masks_under_vmap(name, capfd):
    """Training masks under vmap: "same" draws the eager call's (a seed repeats the run;
    the cell draws its DropConnect mask once), "different" a zoneout mask per sample (a seed
    each), with no fallback warning."""
    if name == "GRU-zoneout":
        module, shape = rnn_fused.GRU(3, 5, zoneout=0.3), (4, 2, 3)
    else:
        module, shape = rnn_fused.GRUCell(3, 5, dropconnect=0.4), (2, 3)
    module = module.double().train()
    xs = torch.randn(3, *shape, dtype=F64)
    h = torch.randn(*shape[:-1], 5, dtype=F64)  # (W_hh's mask acts on a state that is not 0)

    def run(a):
        return module(a, h) if name == "GRUCell-dropconnect" else module(a)[0]

    torch.manual_seed(11)
    same = vmap(run, randomness="same")(xs)
    torch.manual_seed(11)
    assert_close(same[0], run(xs[0]), "the eager call's mask")
    different = vmap(run, randomness="different")(xs[:1].expand_as(xs))
    if name == "GRU-zoneout":  # (DropConnect's mask is dropout's of the shared W_hh)
        assert not torch.equal(different[0], different[1]), "a mask per sample"
    assert "batching rule" not in capfd.readouterr().err

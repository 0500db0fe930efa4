"""torch.func's reverse-mode transforms (grad, vjp, jacrev, and vmap over them: per-sample
gradients) on the fused operators (ops.py, _FusedLayer), against torch.nn with the same
weights in float64; their gradients differentiated again (through reference.py's loop:
_FusedGradients), and forward mode, which runs reference.py's loop, still right."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICES, FUNC_LAYER_IDS, FUNC_LAYERS, seed
from tolerances import assert_close
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves

import rnn_fused
from rnn_fused import ops, reference

F64 = torch.float64


def _pair(name: str, kw: dict, input_size: int = 3, hidden: int = 5):
    theirs = getattr(nn, name)(input_size, hidden, **kw).double()
    ours = getattr(rnn_fused, name)(input_size, hidden, **kw).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


@pytest.fixture
def no_reference_loop(monkeypatch):
    """Fails a test whose calls run reference.py's loop: they must run fused."""

    def refuse(*args, **kwargs):
        raise AssertionError("reference.py's loop ran where the fused operators should")

    monkeypatch.setattr(reference, "rnn_layer", refuse)


def _states(name: str, kw: dict, batch: int) -> tuple[torch.Tensor, ...]:
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    h0 = torch.randn(layers, batch, kw.get("proj_size") or 5, dtype=F64)
    return (h0, torch.randn(layers, batch, 5, dtype=F64)) if name == "LSTM" else (h0,)


@pytest.mark.parametrize(("name", "kw"), FUNC_LAYERS, ids=FUNC_LAYER_IDS)
def test_grad_of_parameters_input_and_states(name, kw, no_reference_loop):
    seed("func fused grad", name, kw)
    ours, theirs = _pair(name, kw)
    x = (
        torch.randn(3, 7, 3, dtype=F64)
        if kw.get("batch_first")
        else torch.randn(7, 3, 3, dtype=F64)
    )
    states = _states(name, kw, 3)

    def loss(p, x, states, module):
        hx = states if name == "LSTM" else states[0]
        output, h_n = functional_call(module, p, (x, hx))
        if name == "LSTM":  # (h_n, c_n)
            return output.sin().sum() + h_n[0].pow(2).sum() + h_n[1].tanh().sum()
        return output.sin().sum() + h_n.pow(2).sum()

    got = grad(loss, argnums=(0, 1, 2))(_params(ours), x, states, ours)
    want = grad(loss, argnums=(0, 1, 2))(_params(theirs), x, states, theirs)
    for k in want[0]:
        assert_close(got[0][k], want[0][k], f"grad of {k}")
    assert_close(got[1], want[1], "grad of the input")
    for g, w in zip(got[2], want[2]):
        assert_close(g, w, "grad of a state")


@pytest.mark.parametrize(("name", "kw"), FUNC_LAYERS, ids=FUNC_LAYER_IDS)
def test_per_sample_gradients(name, kw, no_reference_loop):
    """vmap(grad(...)) over the batch: the forward folds the samples into one call."""
    seed("func fused per-sample", name, kw)
    ours, theirs = _pair(name, kw)
    dim = 0 if kw.get("batch_first") else 1
    x = torch.randn(5, 6, 3, dtype=F64)
    target = torch.randn(x.shape[dim], dtype=F64)

    def loss(p, x, target, module):
        output = functional_call(module, p, (x.unsqueeze(dim),))[0]
        return (output.mean() - target).pow(2)

    got = vmap(grad(loss), in_dims=(None, dim, 0, None))(_params(ours), x, target, ours)
    params = _params(theirs)
    for b in range(x.shape[dim]):
        want = grad(loss)(params, x.select(dim, b), target[b], theirs)
        for k in want:
            assert got[k][b].abs().max() > 0 or want[k].abs().max() == 0
            assert_close(got[k][b], want[k], f"sample {b}'s grad of {k}")


@pytest.fixture
def folded_backward(monkeypatch):
    """Fails a test whose vmapped backward runs sample by sample: it must fold."""

    def refuse(op, *args):
        if op is torch.ops.rnn_fused.backward:
            raise AssertionError("the vmapped backward ran sample by sample")
        return unfolded(op, *args)

    unfolded = ops._sample_by_sample
    monkeypatch.setattr(ops, "_sample_by_sample", refuse)


@pytest.mark.parametrize(("name", "kw"), FUNC_LAYERS, ids=FUNC_LAYER_IDS)
def test_jacobian_of_input_and_states(name, kw, no_reference_loop, folded_backward):
    """jacrev of every output w.r.t. the input and the initial states: one incoming gradient
    a sample and no parameter gradients, so the vmapped backward folds them into one call."""
    seed("func fused jacobian", name, kw)
    ours, theirs = _pair(name, kw)
    x = torch.randn((2, 5, 3) if kw.get("batch_first") else (5, 2, 3), dtype=F64)
    states = _states(name, kw, 2)

    def run(module):
        def f(x, states):
            output, h_n = module(x, states if name == "LSTM" else states[0])
            return (output, *h_n) if name == "LSTM" else (output, h_n)

        return f

    got = jacrev(run(ours), argnums=(0, 1))(x, states)
    want = jacrev(run(theirs), argnums=(0, 1))(x, states)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        for j, (g_, w_) in enumerate(zip(tree_leaves(g), tree_leaves(w), strict=True)):
            assert g_.shape == w_.shape, f"result {k} {j}: {g_.shape} != {w_.shape}"
            assert_close(g_, w_, f"jacobian {k}, {j}")


def test_jacobian_of_the_states_of_a_packed_input(no_reference_loop, folded_backward):
    """The fold of a packed call: its rows in step order, batch sizes times the samples."""
    seed("func fused packed jacobian")
    ours, theirs = _pair("LSTM", dict(num_layers=2, bidirectional=True))
    packed = pack_padded_sequence(
        torch.randn(6, 3, 3, dtype=F64), torch.tensor([2, 6, 5]), enforce_sorted=False
    )
    states = _states("LSTM", dict(num_layers=2, bidirectional=True), 3)

    def run(module):
        def f(h0, c0):
            output, (h_n, c_n) = module(packed, (h0, c0))
            return output.data, h_n, c_n

        return f

    got = jacrev(run(ours), argnums=(0, 1))(*states)
    want = torch.autograd.functional.jacobian(run(theirs), states)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        for j, (g_, w_) in enumerate(zip(g, w, strict=True)):
            assert_close(g_, w_, f"jacobian {k}, {j}")


def test_per_sample_input_gradients(no_reference_loop, folded_backward):
    """vmap(grad(...)) of the input alone: forward and backward each one folded call."""
    seed("func fused per-sample input")
    ours, theirs = _pair("GRU", dict(num_layers=2))
    xs = torch.randn(4, 5, 2, 3, dtype=F64)

    def loss(x, module):
        output, h_n = module(x)
        return output.sin().sum() + h_n.pow(2).sum()

    got = vmap(grad(loss), in_dims=(0, None))(xs, ours)
    want = torch.stack([grad(loss)(x, theirs) for x in xs])
    assert_close(got, want, "per-sample input gradients")


def test_large_fold_runs_sample_by_sample(monkeypatch):
    """Where the fold would copy more than _FOLD_COPY_BYTES (one workspace repeated for each
    sample), the samples run one by one, with the same results."""
    seed("func fused large fold")
    ours, theirs = _pair("LSTM", dict())
    x = torch.randn(4, 2, 3, dtype=F64)
    want = jacrev(lambda x: theirs(x)[0])(x)
    calls = []
    unfolded = ops._sample_by_sample

    def counted(op, *args):
        calls.append(op)
        return unfolded(op, *args)

    monkeypatch.setattr(ops, "_sample_by_sample", counted)
    monkeypatch.setattr(ops, "_FOLD_COPY_BYTES", 0)
    assert_close(jacrev(lambda x: ours(x)[0])(x), want, "jacobian sample by sample")
    assert calls == [torch.ops.rnn_fused.backward]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_grad_as_eager_autograd_on_each_device(name, device, no_reference_loop):
    """grad and per-sample gradients against the same module's eager autograd (the C++
    node, the same kernels) on the CPU and the GPU."""
    seed("func fused device", name, device)
    layer = getattr(rnn_fused, name)(3, 5, num_layers=2).double().to(device)
    x = torch.randn(6, 4, 3, dtype=F64, device=device)

    def loss(p, x):
        return functional_call(layer, p, (x,))[0].sin().sum()

    got = grad(loss)(_params(layer), x)
    per_sample = vmap(grad(loss), in_dims=(None, 1))(_params(layer), x.unsqueeze(2))
    names, params = zip(*layer.named_parameters())
    want = torch.autograd.grad(loss(dict(zip(names, params)), x), params)
    for k, w in zip(names, want):
        assert_close(got[k], w, f"grad of {k}")
        assert_close(per_sample[k].sum(0), w, f"per-sample grads of {k}, summed")
    for b in range(x.shape[1]):
        column = x[:, b : b + 1]
        want = torch.autograd.grad(loss(dict(zip(names, params)), column), params)
        for k, w in zip(names, want):
            assert_close(per_sample[k][b], w, f"sample {b}'s grad of {k}")


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_grad_of_packed_input(enforce_sorted, no_reference_loop):
    """Of the parameters, against torch.nn's eager autograd: torch.nn's layers refuse packed
    input under torch.func, and pack_padded_sequence has no gradient there."""
    seed("func fused packed", enforce_sorted)
    ours, theirs = _pair("LSTM", dict(num_layers=2))
    lengths = torch.tensor([6, 4, 1]) if enforce_sorted else torch.tensor([2, 6, 5])
    packed = pack_padded_sequence(
        torch.randn(6, 3, 3, dtype=F64), lengths, enforce_sorted=enforce_sorted
    )

    def loss(p, module):
        output, (h_n, c_n) = functional_call(module, p, (packed,))
        return output.data.tanh().sum() + (h_n * c_n).sum()

    got = grad(loss)(_params(ours), ours)
    names, params = zip(*theirs.named_parameters())
    want = torch.autograd.grad(loss(dict(zip(names, params)), theirs), params)
    for k, w in zip(names, want):
        assert_close(got[k], w, f"grad of {k}")


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_cells_stepped_in_a_loop(name, batched):
    """One step a call: reference.py's step (cheaper there than functorch's handling of
    _FusedLayer)."""
    seed("func fused cell", name, batched)
    theirs = getattr(nn, name)(3, 4).double()
    ours = getattr(rnn_fused, name)(3, 4).double()
    ours.load_state_dict(theirs.state_dict())
    xs = torch.randn(5, 2, 3, dtype=F64) if batched else torch.randn(5, 3, dtype=F64)

    def loss(p, xs, module):
        state = None
        for x in xs:
            state = functional_call(module, p, (x, state))
        h = state[0] if name == "LSTMCell" else state
        return h.pow(2).sum()

    got = grad(loss, argnums=(0, 1))(_params(ours), xs, ours)
    want = grad(loss, argnums=(0, 1))(_params(theirs), xs, theirs)
    for k in want[0]:
        assert_close(got[0][k], want[0][k], f"grad of {k}")
    assert_close(got[1], want[1], "grad of the inputs")


def test_vjp_and_jacrev_of_the_parameters(no_reference_loop):
    seed("func fused vjp")
    ours, theirs = _pair("GRU", dict(num_layers=2))
    x = torch.randn(4, 2, 3, dtype=F64)

    def last(p, module):
        return functional_call(module, p, (x,))[1]

    h_ours, pull_ours = vjp(lambda p: last(p, ours), _params(ours))
    h_theirs, pull_theirs = vjp(lambda p: last(p, theirs), _params(theirs))
    assert_close(h_ours, h_theirs, "h_n")
    v = torch.randn_like(h_theirs)
    got, want = pull_ours(v)[0], pull_theirs(v)[0]
    for k in want:
        assert_close(got[k], want[k], f"vjp of {k}")
    got = jacrev(lambda p: last(p, ours))(_params(ours))
    want = jacrev(lambda p: last(p, theirs))(_params(theirs))
    for k in want:
        assert got[k].shape == want[k].shape
        assert_close(got[k], want[k], f"jacobian of {k}")


@pytest.mark.parametrize("module", ["LayerNormLSTM", "LayerNormGRU", "zoneout"])
def test_grad_of_the_extensions_as_eager_autograd(module, no_reference_loop):
    """LayerNorm cells and zoneout (in eval: the probability's weights), which torch.nn lacks,
    against the same module's eager autograd (the C++ autograd function)."""
    seed("func fused extensions", module)
    if module == "zoneout":
        layer = rnn_fused.LSTM(3, 5, zoneout=0.3).double().eval()
    else:
        layer = getattr(rnn_fused, module)(3, 5).double()
    x = torch.randn(6, 2, 3, dtype=F64)

    def loss(p, x):
        return functional_call(layer, p, (x,))[0].pow(2).sum()

    got = grad(loss, argnums=(0, 1))(_params(layer), x)
    x_eager = x.clone().requires_grad_()
    loss(dict(layer.named_parameters()), x_eager).backward()
    for k, p in layer.named_parameters():
        assert_close(got[0][k], p.grad, f"grad of {k}")
    assert_close(got[1], x_eager.grad, "grad of the input")


def _count_fused_calls(monkeypatch) -> list[int]:
    """A counter of the calls _FusedLayer serves."""
    calls = [0]
    apply = ops._FusedLayer.apply

    def counted(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(ops._FusedLayer, "apply", counted)
    return calls


def test_gradients_differentiated_again(monkeypatch):
    """The fused gradients differentiated again (their backward: reference.py's loop by
    torch.func.vjp): jacrev of jacrev, parameters requiring grad outside the transform, a
    double backward inside torch.func.grad, and an incoming gradient requiring grad."""
    seed("func fused second")
    calls = _count_fused_calls(monkeypatch)
    ours, theirs = _pair("LSTM", dict(proj_size=2))
    x = torch.randn(3, 2, 3, dtype=F64)

    def f(x, module):
        return functional_call(module, _params(module), (x,))[0].pow(2).sum()

    got, want = (jacrev(jacrev(f))(x, m) for m in (ours, theirs))
    assert got.abs().max() > 0
    assert_close(got, want, "jacrev of jacrev")
    # Parameters that require grad outside the transform: the gradients are differentiable.
    results = []
    for module in (ours, theirs):
        params = dict(module.named_parameters())
        g = grad(lambda p, m: functional_call(m, p, (x,))[0].pow(2).sum())(params, module)
        outer = sum(v.pow(2).sum() for v in g.values())
        results.append(torch.autograd.grad(outer, list(params.values())))
    for g, w in zip(*results):
        assert_close(g, w, "gradient of a gradient's norm")

    # A gradient penalty by autograd inside torch.func.grad.
    def penalty(x, module):
        out = functional_call(module, _params(module), (x,))[0].pow(2).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        return gx.pow(2).sum()

    got, want = (grad(penalty)(x, m) for m in (ours, theirs))
    assert got.abs().max() > 0
    assert_close(got, want, "grad of an autograd.grad inside")
    # An incoming gradient that requires grad outside the transform.
    results = []
    for module in (ours, theirs):
        v = torch.randn(3, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
        v.requires_grad_()
        _, pull = vjp(lambda p, m=module: functional_call(m, p, (x,))[0], _params(module))
        outer = sum(g.pow(2).sum() for g in pull(v)[0].values())
        results.append(torch.autograd.grad(outer, v)[0])
    assert_close(results[0], results[1], "gradient for the incoming gradient")
    assert calls[0] >= 4  # each first differentiation ran fused


def test_forward_mode_runs_the_reference_loop():
    """hessian (jacfwd of jacrev) and jvp: forward mode, reference.py's loop, as torch.nn's."""
    seed("func hessian")
    ours, theirs = _pair("GRU", dict())
    x = torch.randn(3, 1, 3, dtype=F64)

    def f(x, module):
        return functional_call(module, _params(module), (x,))[0].pow(2).sum()

    got, want = (torch.func.hessian(f)(x, m) for m in (ours, theirs))
    assert got.abs().max() > 0
    assert_close(got, want, "hessian")


def test_transforms_under_torch_compile():
    """torch.compile with fullgraph of grad, per-sample gradients, grad of a vmapped call and
    jvp over a layer (the traced call takes reference.py's loop: the operator's C++ autograd
    function refuses functorch's tensors), against the eager transforms; vmap alone, nested
    too, keeps the operator."""
    seed("func compile")
    layer = rnn_fused.LSTM(3, 5, num_layers=2).double()
    p, x = _params(layer), torch.randn(6, 2, 3, dtype=F64)
    graphs: list[str] = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        graphs.append(str(gm.graph))
        return gm.forward

    def loss(p, x):
        return functional_call(layer, p, (x,))[0].sin().sum()

    def per_sample(p, x):
        return vmap(grad(loss), in_dims=(None, 1))(p, x.unsqueeze(2))

    v = torch.randn_like(x)

    def tangent(x):
        return jvp(lambda a: layer(a)[0], (x,), (v,))[1]

    def of_vmapped(xs):
        return grad(lambda a: vmap(lambda b: layer(b)[0])(a).sin().sum())(xs)

    xs = torch.randn(4, 6, 2, 3, dtype=F64)
    for f, args in (
        (lambda p, x: grad(loss)(p, x), (p, x)),
        (per_sample, (p, x)),
        (tangent, (x,)),
        (of_vmapped, (xs,)),
    ):
        got, want = torch.compile(f, fullgraph=True, backend=backend)(*args), f(*args)
        for g, w in zip(*(r.values() if isinstance(r, dict) else [r] for r in (got, want))):
            assert_close(g, w, "compiled transform")
    once = vmap(lambda a: layer(a)[0])
    for f, a in ((once, xs), (vmap(once), xs.unsqueeze(0))):
        got = torch.compile(f, fullgraph=True, backend=backend)(a)
        assert "rnn_fused.layer" in graphs[-1]
        assert_close(got, f(a), "compiled vmap")

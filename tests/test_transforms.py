"""Forward-mode AD and torch.func through the layers and cells, against torch.nn with the same
weights and against finite differences, in float64. Under forward mode the layers run
reference.py's loop, under grad and jacrev the fused operators (ops.py,
_fused_differentiation; tests/test_func_fused.py); vmap keeps the fused operator
(tests/test_vmap.py)."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import seed
from tolerances import assert_close
from torch import nn
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

import rnn_fused

CONFIGS = [
    ("LSTM", dict()),
    ("LSTM", dict(proj_size=2, num_layers=2)),
    ("GRU", dict(bidirectional=True)),
    ("RNN", dict(nonlinearity="tanh")),
    ("RNN", dict(nonlinearity="relu", bias=False)),
]
IDS = ["LSTM", "LSTM-proj", "GRU-bi", "RNN-tanh", "RNN-relu"]


def _pair(name: str, kw: dict):
    theirs = getattr(nn, name)(3, 5, **kw).double()
    ours = rnn_fused.replace_rnns(getattr(nn, name)(3, 5, **kw)).double()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _central_difference(f, x: torch.Tensor, v: torch.Tensor, eps: float = 1e-6):
    with torch.no_grad():
        return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
def test_jvp_matches_torch_nn_and_finite_differences(name, kw):
    seed("jvp", name, kw)
    ours, theirs = _pair(name, kw)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    out, tangent = jvp(lambda a: ours(a)[0], (x,), (v,))
    out_t, tangent_t = jvp(lambda a: theirs(a)[0], (x,), (v,))
    assert tangent.abs().max() > 0
    assert_close(out, out_t, "output")
    assert_close(tangent, tangent_t, "tangent vs torch.nn")
    fd = _central_difference(lambda a: ours(a)[0], x, v)
    assert (tangent - fd).abs().max() < 1e-7 * max(1.0, fd.abs().max().item())


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
def test_forward_ad_dual_input_and_state(name, kw):
    seed("forward_ad", name, kw)
    ours, theirs = _pair(name, kw)
    x, v = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 2, 3, dtype=torch.float64)
    D = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    h0 = torch.randn(D, 2, kw.get("proj_size") or 5, dtype=torch.float64)
    u = torch.randn_like(h0)
    tangents = []
    for module in (ours, theirs):
        with fwAD.dual_level():
            state = fwAD.make_dual(h0, u)
            if name == "LSTM":
                state = (state, torch.zeros(D, 2, 5, dtype=torch.float64))
            out = module(fwAD.make_dual(x, v), state)[0]
            tangents.append(fwAD.unpack_dual(out).tangent)
    assert tangents[0].abs().max() > 0
    assert_close(tangents[0], tangents[1], "forward-mode tangent")


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
def test_grad_jacrev_jacfwd_match_torch_nn(name, kw):
    seed("func", name, kw)
    ours, theirs = _pair(name, kw)
    x = torch.randn(4, 1, 3, dtype=torch.float64)
    for transform in (jacrev, jacfwd):
        got = transform(lambda a: ours(a)[0].sum(0))(x)
        want = transform(lambda a: theirs(a)[0].sum(0))(x)
        assert_close(got, want, transform.__name__)
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def loss(p, module):
        return functional_call(module, p, (x,))[0].pow(2).sum()

    got = grad(loss)(params, ours)
    want = grad(loss)(params, theirs)
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], f"grad of {k}")


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_jvp_matches_torch_nn(name):
    seed("cell jvp", name)
    theirs = getattr(nn, name)(3, 5).double()
    ours = getattr(rnn_fused, name).from_torch(theirs)
    x, v = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)

    def first(module):
        return lambda a: (lambda r: r[0] if isinstance(r, tuple) else r)(module(a))

    _, got = jvp(first(ours), (x,), (v,))
    _, want = jvp(first(theirs), (x,), (v,))
    assert got.abs().max() > 0
    assert_close(got, want, "cell tangent")


@pytest.mark.parametrize("module", ["IndRNN", "LayerNormLSTM", "LayerNormGRU", "zoneout"])
def test_extension_jvp_matches_finite_differences(module):
    """The modules torch.nn lacks under forward mode (their biases, gains, IndRNN's vector
    W_hh and zoneout's weights enter element-wise: ops.py gives them zero tangents)."""
    seed("extension jvp", module)
    if module == "zoneout":
        layer = rnn_fused.GRU(3, 5, zoneout=0.3, bidirectional=True).double().eval()
    else:
        layer = getattr(rnn_fused, module)(3, 5, num_layers=2).double()
    x, v = torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, 2, 3, dtype=torch.float64)
    h0 = torch.randn(
        layer.num_layers * (2 if layer.bidirectional else 1), 2, 5, dtype=torch.float64
    )
    state = (h0, torch.randn_like(h0)) if module == "LayerNormLSTM" else h0

    def f(a):
        return layer(a, state)[0]

    _, tangent = jvp(f, (x,), (v,))
    assert tangent.abs().max() > 0
    fd = _central_difference(f, x, v)
    assert (tangent - fd).abs().max() < 1e-7 * max(1.0, fd.abs().max().item())


@pytest.mark.parametrize("name", ["GRU", "LSTM", "RNNCell"])
@pytest.mark.parametrize("order", ["jvp of vmap", "vmap of jvp"])
def test_jvp_and_vmap_nested_as_a_loop_of_torch_nn(name, order):
    """Forward mode around vmap and inside it, against torch.nn's jvp of each sample (its
    layers raise under vmap)."""
    seed("jvp vmap", name, order)
    theirs = getattr(nn, name)(3, 5).double()
    ours = getattr(rnn_fused, name)(3, 5).double()
    ours.load_state_dict(theirs.state_dict())
    shape = (4, 2, 3) if "Cell" in name else (4, 6, 2, 3)
    xs, vs = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)

    def first(module):
        return lambda a: (lambda r: r[0] if isinstance(r, tuple) else r)(module(a))

    if order == "jvp of vmap":
        _, got = jvp(vmap(first(ours)), (xs,), (vs,))
    else:
        got = vmap(lambda x, v: jvp(first(ours), (x,), (v,))[1])(xs, vs)
    want = torch.stack([jvp(first(theirs), (x,), (v,))[1] for x, v in zip(xs, vs)])
    assert want.abs().max() > 0
    assert_close(got, want, order)

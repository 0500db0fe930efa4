"""The drop-in contract: rnn_fused modules against torch.nn with the same weights, over a
seeded random sweep of configurations, plus construction, state and conversion."""

from __future__ import annotations

import copy
import io
import pickle
import random

import pytest
import torch
from helpers import DEVICES, seed
from tolerances import assert_close, assert_no_worse
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_map

import rnn_fused

LAYERS = {
    "LSTM": (nn.LSTM, rnn_fused.LSTM),
    "GRU": (nn.GRU, rnn_fused.GRU),
    "RNN_TANH": (nn.RNN, rnn_fused.RNN),
    "RNN_RELU": (nn.RNN, rnn_fused.RNN),
}


def _pair(cell: str, dtype=torch.float64, device="cpu", **kw):
    """A torch.nn module and ours with the same weights."""
    theirs_cls, ours_cls = LAYERS[cell]
    if cell.startswith("RNN"):
        kw["nonlinearity"] = cell[4:].lower()
    theirs = theirs_cls(**kw, dtype=dtype, device=device)
    ours = ours_cls(**kw, dtype=dtype, device=device)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _flat(out) -> list[torch.Tensor]:
    """Every tensor in a module output (PackedSequence and tuples flattened)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return [out.data]
    return [t for o in out for t in _flat(o)]


def _values(module, args, weights: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """module's outputs, then the gradients of a random weighting of them with respect to
    every input that requires grad and every parameter (weights made here if not given)."""
    out = _flat(module(*args))
    if weights is None:
        weights = [torch.randn_like(t) for t in out]
    leaves = [t for t in _flat(args) if t.requires_grad] + list(module.parameters())
    loss = sum((o * w.to(o.dtype)).sum() for o, w in zip(out, weights, strict=True))
    return [o.detach() for o in out] + list(torch.autograd.grad(loss, leaves))


def _compare(theirs, ours, make_args, exact=None) -> None:
    """Ours against torch.nn in the same dtype, outputs and gradients; exact: (torch.nn's
    module in float64, make_args in float64), for tolerances.assert_no_worse."""
    weights = [torch.randn_like(t) for t in _flat(theirs(*make_args()))]
    got_t, got_o = _values(theirs, make_args(), weights), _values(ours, make_args(), weights)
    assert len(got_t) == len(got_o)
    names = [f"output {i}" for i in range(len(weights))]
    names += [f"grad {i}" for i in range(len(got_o) - len(weights))]
    if exact is None:
        for what, a, b in zip(names, got_o, got_t, strict=True):
            assert_close(a, b, what)
    else:
        assert_no_worse(got_o, got_t, _values(exact[0], exact[1](), weights), names)


def _sweep_case(index: int):
    rng = random.Random(index)
    cell = rng.choice(list(LAYERS))
    kw = dict(
        input_size=rng.randint(1, 7),
        hidden_size=rng.randint(2, 9),
        num_layers=rng.randint(1, 3),
        bias=rng.random() < 0.8,
        batch_first=rng.random() < 0.5,
        bidirectional=rng.random() < 0.5,
    )
    if cell == "LSTM" and rng.random() < 0.3:
        kw["proj_size"] = rng.randint(1, kw["hidden_size"] - 1)
    form = rng.choice(["batched", "batched", "unbatched", "packed", "packed-unsorted"])
    # Up to 96 rows: both sides of the CPU engine's 32-row switch to packed weights.
    T, B = rng.randint(1, 16), rng.randint(1, 6)
    lengths = sorted((rng.randint(1, T) for _ in range(B)), reverse=True)
    lengths[0] = T
    if form == "packed-unsorted":
        rng.shuffle(lengths)
    return cell, kw, form, T, B, lengths, rng.random() < 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("index", range(200))
def test_sweep_matches_torch_nn(index, dtype, device):
    """Outputs, final states and every gradient; tolerances per dtype (tolerances.py)."""
    cell, kw, form, T, B, lengths, with_hx = _sweep_case(index)
    seed("sweep", index)
    dt = dict(dtype=dtype, device=device)
    theirs, ours = _pair(cell, **dt, **kw)
    D = (2 if kw["bidirectional"] else 1) * kw["num_layers"]
    out_size = kw.get("proj_size") or kw["hidden_size"]
    x = torch.randn(T, B, kw["input_size"], **dt)
    batch = B if form != "unbatched" else None
    h0 = torch.randn(D, *([batch] if batch else []), out_size, **dt)
    c0 = torch.randn(D, *([batch] if batch else []), kw["hidden_size"], **dt)

    def make_args(dtype=dtype):
        xi = x.to(dtype, copy=True).requires_grad_()
        if form == "unbatched":
            inp = xi[:, 0]
        elif form.startswith("packed"):
            inp = pack_padded_sequence(xi, torch.tensor(lengths), enforce_sorted=form == "packed")
        else:
            inp = xi.transpose(0, 1) if kw["batch_first"] else xi
        if not with_hx:
            return (inp,)
        h = h0.to(dtype, copy=True).requires_grad_()
        if cell != "LSTM":
            return (inp, h)
        return (inp, (h, c0.to(dtype, copy=True).requires_grad_()))

    exact = None
    if dtype == torch.float32:
        exact = (copy.deepcopy(theirs).double(), lambda: make_args(torch.float64))
    _compare(theirs, ours, make_args, exact)


@pytest.mark.parametrize("cell", list(LAYERS))
def test_same_parameters_and_init_as_torch_nn(cell):
    kw = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    if cell.startswith("RNN"):
        kw["nonlinearity"] = cell[4:].lower()
    torch.manual_seed(3)
    theirs = LAYERS[cell][0](**kw)
    torch.manual_seed(3)
    ours = LAYERS[cell][1](**kw)
    assert [(n, p.shape) for n, p in theirs.named_parameters()] == [
        (n, p.shape) for n, p in ours.named_parameters()
    ]
    for (n, a), b in zip(theirs.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), n
    assert repr(theirs) == repr(ours)
    assert [[p.shape for p in ws] for ws in theirs.all_weights] == [
        [p.shape for p in ws] for ws in ours.all_weights
    ]
    theirs.load_state_dict(ours.state_dict())  # both ways, no converter
    ours.load_state_dict(theirs.state_dict())


def test_lstm_projection_parameters_and_state_dict():
    theirs, ours = _pair(
        "LSTM", torch.float64, input_size=3, hidden_size=6, proj_size=2, num_layers=2
    )
    assert list(theirs.state_dict()) == list(ours.state_dict())
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    out_t, _ = theirs(x)
    out_o, (h_o, c_o) = ours(x)
    assert out_o.shape == (4, 2, 2) and h_o.shape == (2, 2, 2) and c_o.shape == (2, 2, 6)
    assert_close(out_o, out_t)


def test_save_load_pickle_deepcopy_and_dtype_moves():
    ours = rnn_fused.GRU(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    expected = ours(x)[0]
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    for clone in (
        torch.load(buf, weights_only=False),
        pickle.loads(pickle.dumps(ours)),
        copy.deepcopy(ours),
    ):
        assert torch.equal(clone(x)[0], expected)
    doubled = copy.deepcopy(ours).double()
    assert doubled.weight_ih_l0.dtype == torch.float64
    assert_close(doubled(x.double())[0].float(), expected)


def test_flatten_parameters_changes_nothing():
    """torch.nn's flatten_parameters packs cuDNN's weight buffer; ours has none to pack, so
    the call must leave the parameters (storage and values) and the results as they were."""
    torch.manual_seed(3)
    ours = rnn_fused.LSTM(3, 5, num_layers=2)
    x = torch.randn(4, 2, 3)
    before = [(p.data_ptr(), p.detach().clone()) for p in ours.parameters()]
    expected = ours(x)[0]
    assert ours.flatten_parameters() is None
    after = list(ours.parameters())
    assert [p.data_ptr() for p in after] == [ptr for ptr, _ in before]
    assert all(torch.equal(p, v) for p, (_, v) in zip(after, before, strict=True))
    assert torch.equal(ours(x)[0], expected)


def test_meta_construction_and_to_empty():
    m = rnn_fused.LSTM(3, 4, device="meta")
    assert m.weight_ih_l0.is_meta
    m.to_empty(device="cpu")
    m.reset_parameters()
    assert m(torch.randn(2, 1, 3))[0].shape == (2, 1, 4)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_dropout_between_layers_only_in_training(cell):
    theirs, ours = _pair(
        cell, torch.float64, input_size=3, hidden_size=4, num_layers=3, dropout=0.5
    )
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    ours.eval()
    theirs.eval()
    assert_close(ours(x)[0], theirs(x)[0])
    ours.train()
    a, b = ours(x)[0], ours(x)[0]
    assert not torch.equal(a, b), "training mode must drop out"
    ours.dropout = theirs.dropout = 0.0  # changeable after construction
    theirs.train()
    assert_close(ours(x)[0], theirs(x)[0])


def test_dropout_scaling_with_unit_weights():
    # All weights 1: the first layer's output is the same in every unit, so after dropout
    # the second layer sees 0 or 1/(1-p) times it; the layer output shows the mask.
    ours = rnn_fused.RNN(1, 1000, num_layers=2, dropout=0.4, nonlinearity="relu", bias=False)
    with torch.no_grad():
        for p in ours.parameters():
            p.fill_(1)
        ours.weight_hh_l0.zero_()
        ours.weight_hh_l1.zero_()
        ours.weight_ih_l1.fill_(1e-3)
    x = torch.ones(1, 1, 1)
    out = ours(x)[0].flatten()
    kept = out[0].item() / (1e-3 * 1000 / 0.6)
    assert 0.45 < kept < 0.75, kept  # the fraction kept, about 1 - p
    assert torch.allclose(out, out[0])


def test_replace_rnns_and_conversions():
    model = nn.Sequential(nn.LSTM(3, 4), nn.Sequential(nn.GRUCell(4, 4), nn.RNN(4, 2)))
    x = torch.randn(5, 2, 3)
    replaced = rnn_fused.replace_rnns(copy.deepcopy(model))
    assert isinstance(replaced[0], rnn_fused.LSTM)
    assert isinstance(replaced[1][0], rnn_fused.GRUCell)
    assert isinstance(replaced[1][1], rnn_fused.RNN)
    assert_close(replaced[0](x)[0], model[0](x)[0])
    back = replaced[0].to_torch()
    assert type(back) is nn.LSTM
    assert_close(back(x)[0], model[0](x)[0])
    with pytest.raises(TypeError, match="expects a GRU"):
        rnn_fused.GRU.from_torch(nn.LSTM(3, 4))


def test_backward_in_eval_mode_and_retain_graph():
    ours = rnn_fused.LSTM(3, 4, num_layers=2).eval()
    x = torch.randn(5, 2, 3, requires_grad=True)
    out = ours(x)[0].sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    assert_close(x.grad, 2 * first)


def _outcome(call, module):
    """What call(module) gives: its result, or its exception's type and message."""
    try:
        return call(module)
    except Exception as e:  # compared with torch.nn's, type and text
        return type(e), str(e)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize(
    ("cell", "kw"),
    [
        ("LSTM", dict(proj_size=3, bidirectional=True)),
        ("LSTM", dict(num_layers=2)),
        ("GRU", dict(bidirectional=True)),
        ("RNN_TANH", dict(num_layers=3)),
    ],
    ids=str,
)
def test_rnnbase_helpers_match_torch_nn(cell, kw, batch_first):
    """torch.nn.RNNBase's public helpers (check_input, get_expected_hidden_size,
    check_hidden_size, check_forward_args, permute_hidden; LSTM's get_expected_cell_size):
    the same results and the same exceptions, type and text, as torch.nn's."""
    seed("helpers", cell, batch_first)
    theirs, ours = _pair(cell, input_size=4, hidden_size=5, batch_first=batch_first, **kw)
    T, B = 6, 3
    x = torch.randn(*((B, T) if batch_first else (T, B)), 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=batch_first)
    D = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    h = torch.randn(D, B, kw.get("proj_size") or 5, dtype=torch.float64)
    c = torch.randn(D, B, 5, dtype=torch.float64)
    hidden = (h, c) if cell == "LSTM" else h
    bad_hidden = (h, c[:, :2]) if cell == "LSTM" else h[:, :2]
    order = torch.tensor([2, 0, 1])
    calls = {
        "check_input": lambda m: m.check_input(x, None),
        "check_input packed": lambda m: m.check_input(packed.data, packed.batch_sizes),
        "check_input dims": lambda m: m.check_input(x, packed.batch_sizes),
        "check_input size": lambda m: m.check_input(x[..., :3], None),
        "check_input dtype": lambda m: m.check_input(x.float(), None),
        "hidden size": lambda m: m.get_expected_hidden_size(x, None),
        "hidden size packed": lambda m: m.get_expected_hidden_size(packed.data, packed.batch_sizes),
        "check_hidden_size": lambda m: m.check_hidden_size(h, (D, B, 9)),
        "check_hidden_size msg": lambda m: m.check_hidden_size(h, (1, 2, 3), "want {}, got {}"),
        "forward args": lambda m: m.check_forward_args(x, hidden, None),
        "forward args bad": lambda m: m.check_forward_args(x, bad_hidden, None),
        "permute_hidden": lambda m: m.permute_hidden(hidden, order),
        "permute_hidden none": lambda m: m.permute_hidden(hidden, None),
    }
    if cell == "LSTM":
        calls["cell size"] = lambda m: m.get_expected_cell_size(x, None)
    for what, call in calls.items():
        got, want = _outcome(call, ours), _outcome(call, theirs)
        if isinstance(want, tuple) and want and isinstance(want[0], torch.Tensor):
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), what
        elif isinstance(want, torch.Tensor):
            assert torch.equal(got, want), what
        else:
            assert got == want, what


@pytest.mark.parametrize("as_list", [False, True])
def test_lstm_states_as_list_with_unsorted_packed_input(as_list):
    """An LSTM's (h_0, c_0) given as a list with a PackedSequence whose batch is reordered
    (enforce_sorted=False): outputs and final states as torch.nn's."""
    seed("list states", as_list)
    theirs, ours = _pair("LSTM", input_size=3, hidden_size=5, num_layers=2)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([2, 6, 4]), enforce_sorted=False)
    states = [torch.randn(2, 3, 5, dtype=torch.float64) for _ in range(2)]
    hx = states if as_list else tuple(states)
    out_t, (h_t, c_t) = theirs(packed, hx)
    out_o, (h_o, c_o) = ours(packed, hx)
    for a, b in [(out_o.data, out_t.data), (h_o, h_t), (c_o, c_t)]:
        assert_close(a, b)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_projection_gradient_none_where_c_n_alone_is_differentiated(steps: int, packed: bool):
    """A projected LSTM whose c_n alone reaches the loss: after one step W_hr has no path to
    it, and its gradient is None as torch.nn's (an optimizer skips it), not zeros; after two
    steps it has one. Every other gradient as torch.nn's."""
    seed("c_n alone", steps, packed)
    theirs, ours = _pair("LSTM", input_size=3, hidden_size=5, proj_size=2, num_layers=2)
    x = torch.randn(steps, 3, 3, dtype=torch.float64)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([steps] * 3))
    for model in (theirs, ours):
        _, (_, c_n) = model(x)
        (c_n * c_n).sum().backward()
    for (name, p_t), p_o in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        assert (p_o.grad is None) == (p_t.grad is None), name
        if p_t.grad is not None:
            assert_close(p_o.grad, p_t.grad)
    assert (theirs.weight_hr_l1.grad is None) == (steps == 1)


@pytest.mark.parametrize("c_dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_lstm_cell_c_of_another_dtype_promotes_as_torch_nn(c_dtype: torch.dtype, batched: bool):
    """LSTMCell with a float32 input and h_0 and a c_0 of another dtype: torch.nn's gates run
    in float32 and c_0 promotes the new states. Ours: the same dtypes, values and gradients."""
    seed("c dtype", str(c_dtype), batched)
    theirs = nn.LSTMCell(5, 7)
    ours = rnn_fused.LSTMCell(5, 7)
    ours.load_state_dict(theirs.state_dict())
    shape = (3, 7) if batched else (7,)
    x = torch.randn(*shape[:-1], 5)
    h0, c0 = torch.randn(shape), torch.randn(shape).to(c_dtype)
    results = []
    for model in (theirs, ours):
        c = c0.clone().requires_grad_()
        h1, c1 = model(x, (h0, c))
        (h1.double().sum() + c1.double().pow(2).sum()).backward()
        results.append((h1, c1, c.grad, model.weight_hh.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want)


def _odd_unit_strides(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor that is contiguous but whose size-1 dimensions step by other
    strides (what a transpose of such a dimension gives)."""
    strides, step = [], 1
    for d in reversed(range(t.dim())):
        strides.append(step if t.size(d) != 1 else 5 * step + 3)
        step *= t.size(d)
    odd = torch.empty_like(t).as_strided(t.shape, list(reversed(strides)))
    odd.copy_(t.detach())
    assert odd.is_contiguous() and (1 not in t.shape or odd.stride() != t.contiguous().stride())
    return odd.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", list(LAYERS))
def test_size_one_dimensions_with_other_strides(cell: str, dtype: torch.dtype, batch: int):
    """A contiguous input, states and weights whose size-1 dimensions (I = 1, and B = 1)
    carry other strides: the values and gradients of the plain tensors, forward and backward."""
    seed("unit strides", cell, str(dtype), batch)
    _, ours = _pair(cell, dtype=dtype, input_size=1, hidden_size=6, bidirectional=True)
    plain = copy.deepcopy(ours)
    with torch.no_grad():
        ours.weight_ih_l0 = nn.Parameter(_odd_unit_strides(ours.weight_ih_l0))
    x, h = torch.randn(7, batch, 1, dtype=dtype), torch.randn(2, batch, 6, dtype=dtype)
    states = (h, torch.randn_like(h)) if cell == "LSTM" else h

    def run(module, fn):
        args = (fn(x).requires_grad_(), tree_map(lambda s: fn(s).requires_grad_(), states))
        return _values(module, args, weights)

    weights = [torch.randn_like(t) for t in _flat(plain(x, states))]
    for got, want in zip(run(ours, _odd_unit_strides), run(plain, torch.clone), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("c_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kw", [{}, dict(num_layers=2, bidirectional=True)], ids=["1", "2bi"])
def test_float64_lstm_promotes_a_narrower_c0_as_torch_nn(c_dtype: torch.dtype, kw: dict):
    """torch.nn's float64 LSTM takes a c_0 of a narrower floating dtype (promoted at its first
    step); ours the same: outputs and states in float64, c_0's gradient in its own dtype."""
    seed("c0 dtype", str(c_dtype), len(kw))
    theirs, ours = _pair("LSTM", input_size=3, hidden_size=5, **kw)
    D = 4 if kw else 1
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0, c0 = torch.randn(D, 2, 5, dtype=torch.float64), torch.randn(D, 2, 5).to(c_dtype)
    results = []
    for model in (theirs, ours):
        c = c0.clone().requires_grad_()
        out, (h_n, c_n) = model(x, (h0, c))
        (out.sum() + c_n.pow(2).sum()).backward()
        results.append((out, h_n, c_n, c.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)  # float64's tolerance, or c_0's dtype's


@pytest.mark.parametrize("missing", ["bias_ih", "bias_hh"])
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_with_one_bias_removed_runs_as_torch_nn(cell: str, missing: str):
    """A cell whose bias_ih or bias_hh was set to None by hand: torch.nn runs it without that
    bias; ours the same values and gradients."""
    seed("one bias", cell, missing)
    theirs = getattr(nn, cell)(3, 5, dtype=torch.float64)
    ours = getattr(rnn_fused, cell).from_torch(theirs)
    for model in (theirs, ours):
        setattr(model, missing, None)
    x, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    state = (h, torch.randn_like(h)) if cell == "LSTMCell" else h
    _compare(theirs, ours, lambda: (x.clone().requires_grad_(), state))


META_CASES = {
    "LSTM": dict(num_layers=2, bidirectional=True, proj_size=3),
    "GRU": dict(batch_first=True),
    "RNN": dict(nonlinearity="relu"),
    "LSTMCell": {},
    "GRUCell": {},
    "RNNCell": {},
}


# zoneout where the module has it: LSTM and GRU without projection, and their cells.
@pytest.mark.parametrize(
    ("name", "zoneout"),
    [(name, False) for name in META_CASES] + [(n, True) for n in ("GRU", "LSTMCell", "GRUCell")],
)
def test_meta_forward_gives_torch_nn_shapes(name: str, zoneout: bool):
    """A module and input on the meta device (shape inference without memory): torch.nn's
    output shapes, on meta (with zoneout too)."""
    kw = META_CASES[name]
    x = torch.randn(3, 4) if name.endswith("Cell") else torch.randn(5, 3, 4)
    x = x.to("meta")
    want = _flat(getattr(nn, name)(4, 6, **kw, device="meta")(x))
    ours_kw = dict(kw, zoneout=0.25) if zoneout else kw
    got = _flat(getattr(rnn_fused, name)(4, 6, **ours_kw, device="meta")(x))
    assert [t.shape for t in got] == [t.shape for t in want]
    assert all(t.is_meta for t in got)


@pytest.mark.parametrize("name", ["IndRNN", "LayerNormLSTM", "LayerNormGRU"])
def test_meta_forward_of_the_variants(name: str):
    x = torch.randn(5, 3, 4)
    on_cpu = _flat(getattr(rnn_fused, name)(4, 6, bidirectional=True)(x))
    on_meta = _flat(getattr(rnn_fused, name)(4, 6, bidirectional=True, device="meta")(x.to("meta")))
    assert [t.shape for t in on_meta] == [t.shape for t in on_cpu]
    assert all(t.is_meta for t in on_meta)

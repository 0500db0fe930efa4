"""The door from Python to the kernels: the public operator rnn_fused::layer with autograd
in C++, what its backward saves and computes, and the checks of the backward operator."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, as_list, make_layer, make_states, rand, seed, weighted_sum
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import rnn_fused
from rnn_fused import reference
from rnn_fused.ops import rnn_layer

DT = torch.float64


@pytest.mark.parametrize("mode", CELLS)
def test_bias_changed_in_place_between_forward_and_backward(mode):
    """The backward never reads the biases, so (as with torch.nn) changing one in place
    after the forward leaves the gradients of the forward's values."""
    seed(mode)
    layer = make_layer(mode, 4, 7, dtype=DT)
    x = rand(5, 3, 4, dtype=DT)
    out, _, _ = rnn_layer(mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    expected = reference.rnn_layer(mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    want = torch.autograd.grad(expected[0].sum(), [x, layer.w_ih, layer.w_hh, layer.b_ih])
    with torch.no_grad():
        layer.b_ih.add_(1.0)
    got = torch.autograd.grad(out.sum(), [x, layer.w_ih, layer.w_hh, layer.b_ih])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_double_backward_refuses_a_bias_changed_in_place():
    seed("double")
    layer = make_layer("GRU", 4, 7, dtype=DT)
    x = rand(5, 3, 4, dtype=DT)
    out, _, _ = rnn_layer("GRU", x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    with torch.no_grad():
        layer.b_hh.mul_(2.0)
    # With create_graph the backward differentiates reference.py's time loop, which needs
    # the biases of the forward.
    with pytest.raises(RuntimeError, match=r"b_hh was modified by an inplace operation"):
        torch.autograd.grad(out.sum(), [x], create_graph=True)


# A tensor changed in place between the forward and the backward. torch.nn's backward reads
# the input for W_ih's gradient, W_ih for the input's, W_hh to go back a step or to h_0, W_hr
# where anything but W_hr wants a gradient, and refuses a change of those only; the
# operator's backward saves the same. Fields: the module, what is changed, the input's shape,
# the states given (their gradients wanted: "h", "c"), whether the input wants a gradient,
# the parameters that do ("all", "none" or one name), the loss's outputs; kw of the module.
IN_PLACE_CASES = [
    ("LSTM", "weight_ih_l0", (5, 2, 3), "", False, "all", "out", {}),  # an optimizer step
    ("GRU", "weight_ih_l0", (5, 2, 3), "h", True, "all", "out", {}),  # refused: dx reads W_ih
    ("RNN", "weight_hh_l0", (1, 2, 3), "", True, "all", "out", {}),  # one step, no dh_0
    ("RNN", "weight_hh_l0", (1, 2, 3), "h", True, "all", "out", {}),  # refused: dh_0 reads W_hh
    ("LSTM", "weight_hh_l0", (1, 2, 3), "c", False, "all", "out+c", {}),  # dc_0 does not
    ("GRU", "weight_hh_l0", (4, 2, 3), "", False, "all", "out", {}),  # refused: steps read W_hh
    ("LSTMCell", "weight_hh", (2, 3), "", False, "all", "out", {}),
    ("LSTMCell", "weight_hh", (2, 3), "c", False, "all", "out+c", {}),
    ("GRUCell", "weight_ih", (3,), "h", False, "all", "out", {}),
    ("RNNCell", "weight_hh", (2, 3), "h", True, "all", "out", {}),  # refused
    ("LSTM", "input", (5, 2, 3), "", True, "none", "out", {}),  # frozen weights: x unread
    ("GRU", "input", (5, 2, 3), "", True, "all", "out", {}),  # refused: W_ih's gradient reads x
    ("LSTM", "weight_hr_l0", (1, 2, 3), "", False, "weight_hr_l0", "out", {"proj_size": 2}),
    ("LSTM", "weight_hr_l0", (1, 2, 3), "", False, "weight_hr_l0", "out+c", {"proj_size": 2}),
    ("LSTM", "weight_hr_l0", (2, 2, 3), "", False, "weight_hr_l0", "out", {"proj_size": 2}),
    ("LSTM", "weight_hr_l0", (1, 2, 3), "", True, "all", "out", {"proj_size": 2}),  # refused
]


@pytest.mark.parametrize(
    ("name", "changed", "shape", "states", "x_grad", "trains", "loss", "kw"), IN_PLACE_CASES
)
def test_changed_in_place_before_the_backward_as_torch_nn(
    name, changed, shape, states, x_grad, trains, loss, kw
):
    """A weight or input changed in place between the forward and the backward: refused
    where torch.nn's backward reads it, else the gradients of the forward's values; the
    outputs want gradients where torch.nn's do."""
    seed("in place", name, changed, shape, states, trains)
    theirs = getattr(torch.nn, name)(3, 4, **kw).double()
    ours = getattr(rnn_fused, name)(3, 4, **kw).double()  # parameters of its own (each changes)
    ours.load_state_dict(theirs.state_dict())
    x0 = torch.randn(shape, dtype=DT)
    batch = shape[:-1] if "Cell" in name else (1, *shape[1:-1])
    h00 = torch.randn(*batch, kw.get("proj_size", 4), dtype=DT)
    c00 = torch.randn(*batch, 4, dtype=DT)
    results = []
    for module in (theirs, ours):
        for param_name, p in module.named_parameters():
            p.requires_grad_(trains == "all" or param_name == trains)
        module.zero_grad()
        x = x0.clone().requires_grad_(x_grad)
        h0 = h00.clone().requires_grad_("h" in states)
        c0 = c00.clone().requires_grad_("c" in states)
        given = () if not states else ((h0, c0),) if name.startswith("LSTM") else (h0,)
        out = module(x, *given)
        if name in ("LSTMCell",):
            out, c_n = out
        elif name.startswith("LSTM"):
            out, (_, c_n) = out
        else:
            out = out[0] if isinstance(out, tuple) else out
        with torch.no_grad():
            (x if changed == "input" else getattr(module, changed)).add_(0.5)
        wanted = [out.requires_grad] + ([c_n.requires_grad] if "c" in loss else [])
        total = out.sum() + (c_n.sum() if "c" in loss and c_n.requires_grad else 0)
        try:
            total.backward()
        except RuntimeError as err:
            assert "modified by an inplace operation" in str(err)
            results.append((wanted, None))
            continue
        leaves = [x, *((h0, c0) if states else ()), *module.parameters()]
        results.append((wanted, [t.grad for t in leaves]))
    (want_flags, want), (got_flags, got) = results
    assert got_flags == want_flags, "which outputs want a gradient"
    assert (got is None) == (want is None), f"torch.nn {'refused' if want is None else 'ran'}"
    for g, w in zip(got or [], want or [], strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("wanted", ["input", "weights", "state"])
def test_only_the_gradients_asked_for(wanted):
    """Gradients of one kind of input only: equal to reference.py's, the others absent."""
    seed(wanted)
    layer = make_layer("LSTM", 4, 9, dtype=DT)
    h0, c0 = make_states(layer, 3, dtype=DT)
    x = rand(6, 3, 4, dtype=DT)
    leaves = {"input": [x], "weights": layer.tensors(), "state": [h0, c0]}[wanted]
    for group in ({"input": [x], "weights": layer.tensors(), "state": [h0, c0]}).values():
        for t in group:
            t.requires_grad_(any(t is w for w in leaves))
    args = (x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0)
    ours = rnn_layer("LSTM", *args)
    exact = reference.rnn_layer("LSTM", *args)
    upstream = [torch.randn_like(o) for o in exact]
    got = torch.autograd.grad(ours, leaves, upstream)
    want = torch.autograd.grad(exact, leaves, upstream)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("steps", [1, 7])
def test_initial_state_gradient_left_out_changes_no_other_gradient(name, steps):
    """Without a gradient of the initial state, the backward skips the first step's product
    with W_hh (whose result is that gradient only): every other gradient keeps its bits,
    float32, both directions of a 2-layer layer."""
    seed(name, steps)
    module = getattr(rnn_fused, name)(5, 33, num_layers=2, bidirectional=True)
    x = torch.randn(steps, 3, 5, requires_grad=True)
    h0 = torch.randn(4, 3, 33)
    state = (h0, torch.randn(4, 3, 33)) if name == "LSTM" else h0
    leaves = [x, *module.parameters()]
    grads = []
    for state_grad in (True, False):
        for t in state if isinstance(state, tuple) else (state,):
            t.requires_grad_(state_grad)
        out, _ = module(x, state)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(steps))
        grads.append(torch.autograd.grad(out, leaves, upstream))
    for with_state, without in zip(*grads, strict=True):
        assert torch.equal(with_state, without)


def test_backward_operator_checks_the_layout_of_grad_output():
    """A grad_output of the right size in the wrong shape is refused, naming it."""
    seed("layout")
    layer = make_layer("GRU", 4, 5, dtype=DT)
    x = rand(6, 3, 4, dtype=DT).detach()
    w_ih, w_hh = layer.w_ih.detach(), layer.w_hh.detach()
    _, _, _, saved, h_prev = torch.ops.rnn_fused.forward(
        "GRU", x, None, None, w_ih, w_hh, None, None, None, None, False, True
    )
    for wrong in (torch.randn(3, 6, 5, dtype=DT), torch.randn(90, dtype=DT)):
        with pytest.raises(RuntimeError, match=r"grad_output must have shape \[6, 3, 5\]"):
            torch.ops.rnn_fused.backward(
                "GRU", wrong, None, None, x, w_ih, w_hh, None, None, False, saved, h_prev, 3,
                [True, True, True],
            )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("expanded", ["one value", "a row"])
def test_expanded_gradients_give_the_bits_of_contiguous_ones(dtype, expanded):
    """Incoming gradients expanded from one value (`h.sum()`, `h.mean()`) or from a row give
    the gradients of the same values in memory, bit for bit, on every element size."""
    seed("expanded", dtype, expanded)
    layer = make_layer("LSTM", 7, 33, dtype=dtype)
    h0, c0 = make_states(layer, 3, dtype=dtype)
    x = rand(3, 7, dtype=dtype)
    weights = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    _, h, c = rnn_layer("LSTM", x, *weights, h0, c0)
    if expanded == "one value":
        given = torch.randn((), dtype=dtype).expand(3, 33)
    else:
        given = torch.randn(33, dtype=dtype).expand(3, 33)
    wrt = [x, h0, c0, *weights]
    found = torch.autograd.grad([h, c], wrt, [given, given], retain_graph=True)
    expected = torch.autograd.grad([h, c], wrt, [given.contiguous(), given.contiguous()])
    assert all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))


def test_packed_input_without_initial_state():
    """Packed input needs no hx: the batch is the first step's, the state starts at zero."""
    seed("packed")
    layer = make_layer("RNN_TANH", 4, 5, dtype=DT)
    batch_sizes = torch.tensor([3, 2, 2, 1])
    x = rand(8, 4, dtype=DT)
    ours = rnn_layer("RNN_TANH", x, layer.w_ih, layer.w_hh, batch_sizes=batch_sizes)
    exact = reference.rnn_layer("RNN_TANH", x, layer.w_ih, layer.w_hh, batch_sizes=batch_sizes)
    torch.testing.assert_close(ours[0], exact[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], exact[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", CELLS)
def test_one_step_input_is_a_sequence_of_one(mode):
    """Input [B, I] (what the cells pass) is one step: the bits of [1, B, I], output [B, H],
    and gradients reach the 2-D input as they reach the 3-D one."""
    seed("one-step", mode)
    layer = make_layer(mode, 7, 33, dtype=torch.float32)
    h0, c0 = make_states(layer, 3, dtype=torch.float32)
    x = rand(3, 7, dtype=torch.float32)
    args = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0)
    step = rnn_layer(mode, x, *args)
    sequence = rnn_layer(mode, x.unsqueeze(0), *args)
    assert step[0].shape == (3, 33)
    assert torch.equal(step[0], sequence[0][0])
    for a, b in zip(step[1:], sequence[1:], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    (g_step,) = torch.autograd.grad(step[0].sum(), x)
    (g_sequence,) = torch.autograd.grad(sequence[0].sum(), x)
    assert torch.equal(g_step, g_sequence)
    exact = reference.rnn_layer(mode, x.double(), *(t.double() for t in args if t is not None))
    torch.testing.assert_close(step[0].double(), exact[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", CELLS)
def test_unbatched_step_is_a_batch_of_one(mode):
    """Input [I] with states [H] (an unbatched cell's call) is one step of a batch of one:
    its bits, results [H], gradients [I] and [H] with the batch of one's bits, gradcheck and
    gradgradcheck in float64, and one node in the graph (no view nodes above it)."""
    seed("unbatched", mode)
    layer = make_layer(mode, 7, 33, dtype=torch.float32)
    lstm = mode == "LSTM"
    x, h0 = rand(7, dtype=torch.float32), rand(33, dtype=torch.float32)
    c0 = rand(33, dtype=torch.float32) if lstm else None
    weights = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    one = rnn_layer(mode, x, *weights, h0, c0)
    batch = rnn_layer(mode, x[None], *weights, h0[None], c0[None] if lstm else None)
    assert one[0].shape == one[1].shape == (33,)
    for a, b in zip(one, batch, strict=True):
        assert (a is None and b is None) or torch.equal(a, b[0])
    assert one[0].grad_fn.next_functions[0][0].variable is x  # no view node on the way
    wrt = [x, h0, *([c0] if lstm else []), *weights]
    found = torch.autograd.grad(sum(t.sum() for t in one[:2]), wrt)
    expected = torch.autograd.grad(sum(t.sum() for t in batch[:2]), wrt)
    assert all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))

    layer = make_layer(mode, 3, 5)
    h0, c0 = make_states(layer, 1, dtype=DT)
    states = [h0[0].detach().requires_grad_()]
    if lstm:
        states.append(c0[0].detach().requires_grad_())

    def step(x, *tensors):
        states, w = tensors[: len(tensors) - 4], tensors[len(tensors) - 4 :]
        return rnn_layer(mode, x, *w, *states)[:2]

    inputs = (rand(3, dtype=DT), *states, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)
    exact = reference.rnn_layer(mode, inputs[0], *inputs[-4:], *states)
    for a, b in zip(step(*inputs), exact, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # torch.func.grad runs reference.py's loop on the unbatched step (the operator has no
    # functorch rule): autograd's gradient through the operator.
    found = torch.func.grad(lambda x: step(x, *inputs[1:])[1].sum())(inputs[0])
    (expected,) = torch.autograd.grad(step(*inputs)[1].sum(), inputs[0])
    torch.testing.assert_close(found, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"unbatched step .* needs hx of 1 dimension"):
        rnn_layer(mode, inputs[0], *inputs[-4:], states[0][None])


@pytest.mark.parametrize("mode", CELLS)
def test_stacked_states_are_one_layer_of_torch_nn_states(mode):
    """stacked_states: hx, cx, h_n and c_n as [1, B, H] (one layer of torch.nn's states), the
    bits of [B, H] with the views made by _C.layer, and the same shapes from the Python that
    serves declined calls (forward-mode AD: reference.py's loop) and torch.compile; another
    first size is refused."""
    seed("stacked", mode)
    lstm = mode == "LSTM"
    layer = make_layer(mode, 7, 33, dtype=DT)
    h0, c0 = make_states(layer, 3, dtype=DT)
    x = rand(5, 3, 7, dtype=DT)
    weights = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
    flat = rnn_layer(mode, x, *weights, h0, c0)
    states = (h0[None], c0[None] if lstm else None)
    stacked = rnn_layer(mode, x, *weights, *states, stacked_states=True)
    assert torch.equal(stacked[0], flat[0])
    assert stacked[1].shape == (1, 3, 33) and torch.equal(stacked[1][0], flat[1])
    assert (stacked[2] is None) if not lstm else torch.equal(stacked[2][0], flat[2])
    wrt = [x, h0, *([c0] if lstm else []), *weights]
    found = torch.autograd.grad(sum(t.sum() for t in stacked if t is not None), wrt)
    expected = torch.autograd.grad(sum(t.sum() for t in flat if t is not None), wrt)
    assert all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # _C.layer declines: the Python's own views
        served = rnn_layer(mode, x, *weights, *states, stacked_states=True)
    for a, b in zip(served, stacked, strict=True):
        assert (a is None and b is None) or a.shape == b.shape
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if lstm:  # and traced whole by torch.compile (which never calls _C.layer)

        def call(x, h, c):
            return rnn_layer(mode, x, *weights, h, c, stacked_states=True)

        compiled = torch.compile(call, fullgraph=True)(x, *states)
        assert all(torch.equal(a, b) for a, b in zip(compiled, stacked, strict=True))
    with pytest.raises(RuntimeError, match=r"stacked hx must be \[1, batch, size\]"):
        rnn_layer(mode, x, *weights, h0[None].expand(2, 3, 33), stacked_states=True)


def test_eager_and_dispatcher_doors_agree():
    """_C.layer (eager) and torch.ops.rnn_fused.layer (what torch.compile traces) run the
    same operator: the same bits."""
    seed("doors")
    layer = make_layer("LSTM", 4, 6, dtype=torch.float32)
    h0, c0 = make_states(layer, 2, dtype=torch.float32)
    x = rand(5, 2, 4, dtype=torch.float32)
    args = ("LSTM", x, h0, c0, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, None, None, True)
    for a, b in zip(rnn_fused.ops._C.layer(*args), torch.ops.rnn_fused.layer(*args), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("door", "change", "message"),
    [
        ("layer", {10: 1}, "rnn_fused._C.layer: argument 10 (reverse) must be a bool, got int"),
        ("layer", {2: 0.5}, "argument 2 (hx) must be a Tensor or None, got float"),
        ("layer", {0: b"LSTM"}, "argument 0 (mode) must be a str, got bytes"),
        ("layer", {"count": 10}, "rnn_fused._C.layer takes 11 to 15 positional arguments, got 10"),
        ("cell", {2: 0.5}, "_C.cell: argument 2 (hx) must be a Tensor or None, got float"),
        ("cell", {"count": 9}, "rnn_fused._C.cell takes 8 positional arguments, got 9"),
    ],
)
def test_eager_doors_name_a_wrong_argument(door, change, message):
    """_C.layer and _C.cell (plain CPython functions) raise TypeError naming the argument,
    the expected and the given type; the cells' fast path takes TypeError as its cue to run
    torch.nn's checks."""
    seed("door-types")
    layer = make_layer("LSTM", 4, 6, dtype=torch.float32)
    h0, c0 = make_states(layer, 2, dtype=torch.float32)
    weights = [layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh]
    if door == "layer":
        args = ["LSTM", rand(5, 2, 4, dtype=torch.float32), h0, c0, *weights, None, None, False]
    else:
        args = ["LSTM", rand(2, 4, dtype=torch.float32), h0, c0, *weights]
    for k, value in change.items():
        if k == "count":
            args = (args + [None] * value)[:value]
        else:
            args[k] = value
    with pytest.raises(TypeError) as err:
        getattr(rnn_fused.ops._C, door)(*args)
    assert message in str(err.value)


def test_cell_door_refuses_a_sequence():
    """_C.cell takes one step ([B, I] or [I]); a sequence [T, B, I] is refused by name, not
    run whole."""
    seed("cell door sequence")
    layer = make_layer("LSTM", 4, 6, dtype=torch.float32)
    args = ("LSTM", rand(5, 2, 4, dtype=torch.float32), None, None, *layer.tensors()[:4])
    with pytest.raises(RuntimeError, match=r"_C.cell: input must be one step, \[B, I\] or \[I\]"):
        rnn_fused.ops.cell_step(*args)


def test_cell_fast_path_keeps_torch_nn_errors():
    """The cells' unchecked fast path falls back to torch.nn's checks and messages."""
    ours, theirs = rnn_fused.LSTMCell(4, 6), torch.nn.LSTMCell(4, 6)
    x, h = torch.randn(3, 4), torch.randn(2, 6)
    with pytest.raises(RuntimeError) as e_ours:
        ours(x, (h, h))
    with pytest.raises(RuntimeError) as e_theirs:
        theirs(x, (h, h))
    assert str(e_ours.value) == str(e_theirs.value)


_FORMS = ["no states", "unbatched", "unbatched, no states"]


@pytest.mark.parametrize(
    ("name", "form"),
    [(n, f) for n in ("LSTMCell", "GRUCell", "RNNCell") for f in _FORMS] + [("LSTMCell", "list")],
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_cell_calls_take_the_short_door(name, form, grad, monkeypatch):
    """The forms of a cell call that torch.nn takes besides (input [B, I], states given):
    without states (zeros), unbatched ([I], states [H]) and an LSTMCell's states as a list
    take the same short door (the modules' checks, most of such a call's time, do not run),
    with the bits of the batched call given the states, and the same gradients."""
    seed("short-door", name, form, grad)
    cell = getattr(rnn_fused, name)(7, 33, dtype=DT)
    unbatched = form.startswith("unbatched")
    x = rand(1 if unbatched else 3, 7, dtype=DT)
    states = [rand(x.size(0), 33, dtype=DT) for _ in range(2 if name == "LSTMCell" else 1)]
    if form.endswith("no states"):
        states = [torch.zeros_like(s) for s in states]
    given = as_list(cell(x, tuple(states) if name == "LSTMCell" else states[0]))

    def refuse(*args, **kwargs):
        raise AssertionError("the cell's checks ran: the call left the short door")

    monkeypatch.setattr(type(cell), "_inputs", refuse)
    args = [x[0] if unbatched else x]
    if not form.endswith("no states"):
        hx = [s[0] for s in states] if unbatched else states
        args.append(hx if form == "list" else tuple(hx) if name == "LSTMCell" else hx[0])
    with torch.set_grad_enabled(grad):
        got = as_list(cell(*args))
    if unbatched:
        assert all(t.dim() == 1 for t in got)
        got = [t.unsqueeze(0) for t in got]
    for a, b in zip(got, given, strict=True):
        assert torch.equal(a, b)
    assert got[0].requires_grad == grad
    if grad:
        leaves = [x, *cell.parameters()]
        want = torch.autograd.grad(given[0].sum(), leaves)
        for a, b in zip(torch.autograd.grad(got[0].sum(), leaves), want, strict=True):
            assert torch.equal(a, b)


_LAYER_FORMS = ["no states", "states", "batch_first", "unbatched"]


@pytest.mark.parametrize(
    ("name", "form"),
    [(n, f) for n in ("LSTM", "GRU", "RNN") for f in _LAYER_FORMS] + [("LSTM", "states as a list")],
)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_layer_calls_take_the_short_door(name, form, grad, monkeypatch):
    """A layer of one direction called with a tensor (no states, torch.nn's states,
    batch_first, unbatched) runs forward's short path, which leaves the checks to the
    operator (_fast_forward): the bits and gradients of the full path."""
    seed("short-layer", name, form, grad)
    layer = getattr(rnn_fused, name)(7, 33, batch_first=form == "batch_first", dtype=DT)
    x = rand(5, 7, dtype=DT) if form == "unbatched" else rand(5, 3, 7, dtype=DT)
    args = [x]
    if "states" in form and form != "no states":
        states = [rand(1, 3, 33, dtype=DT) for _ in range(2 if name == "LSTM" else 1)]
        args.append(states if "list" in form else tuple(states) if name == "LSTM" else states[0])

    def run() -> list[torch.Tensor]:
        with torch.set_grad_enabled(grad):
            out, hidden = layer(*args)
        return [out, *as_list(hidden)]

    monkeypatch.setattr(type(layer), "_fast_forward", lambda *a: None)
    full = run()
    monkeypatch.undo()

    def refuse(*a, **k):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(type(layer), "_run_layers", refuse)
    short = run()
    for a, b in zip(short, full, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
        assert a.requires_grad == grad
    if grad:
        leaves = [x, *layer.parameters()]
        want = torch.autograd.grad(sum(t.sum() for t in full), leaves)
        for a, b in zip(torch.autograd.grad(sum(t.sum() for t in short), leaves), want):
            assert torch.equal(a, b)


def test_forward_ad_is_exact_or_refused_never_silently_zero():
    """rnn_layer gives dual inputs exact tangents (through reference.py); the operator itself
    has no forward-mode formula and raises rather than give outputs whose tangents read as
    zero."""
    import torch.autograd.forward_ad as fwAD

    seed("fwad")
    layer = make_layer("LSTM", 4, 5, dtype=DT)
    x = rand(3, 2, 4, dtype=DT).detach()
    v = torch.randn_like(x)
    w_ih, w_hh = layer.w_ih.detach(), layer.w_hh.detach()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, v)
        tangent = fwAD.unpack_dual(rnn_layer("LSTM", dual, w_ih, w_hh)[0]).tangent
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.ops.rnn_fused.layer("LSTM", dual, None, None, w_ih, w_hh, None, None, None,
                                      None, False)  # fmt: skip
    eps = 1e-6
    with torch.no_grad():
        fd = (rnn_layer("LSTM", x + eps * v, w_ih, w_hh)[0]
              - rnn_layer("LSTM", x - eps * v, w_ih, w_hh)[0]) / (2 * eps)  # fmt: skip
    assert tangent.abs().max() > 0
    assert (tangent - fd).abs().max() < 1e-7


def _cell_args(mode: str, dtype: torch.dtype = DT):
    layer = make_layer(mode, 7, 33, dtype=dtype)
    h0, c0 = make_states(layer, 3, dtype=dtype)
    x = rand(3, 7, dtype=dtype)
    return (mode, x, h0, c0, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)


@pytest.mark.parametrize("mode", CELLS)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "plain tensors"])
def test_call_without_graph_runs_straight_on_the_engine(mode, context):
    """A CPU call that records no graph skips the dispatcher (op_adapters.cpp, call_layer):
    the values of reference.py, fresh states (hx untouched), and from _C.layer an output of
    its own; _C.cell's h is its step's output."""
    seed("straight", mode, context)
    args = _cell_args(mode)
    if context == "plain tensors":
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    hx_before = args[2].clone()
    exact = reference.rnn_layer(mode, args[1], *args[4:], args[2], args[3])
    guard = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        context, torch.enable_grad
    )
    with guard():
        output, h_n, c_n = rnn_fused.ops._C.layer(*args, None, None, False)
        h, c = rnn_fused.ops._C.cell(*args)
    assert not output.requires_grad and output.data_ptr() != h_n.data_ptr()
    assert torch.equal(args[2], hx_before) and h.data_ptr() != args[2].data_ptr()
    for got in (output, h_n, h):
        torch.testing.assert_close(got, exact[1], rtol=1e-12, atol=1e-12)
    if mode == "LSTM":
        torch.testing.assert_close(c_n, exact[2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, exact[2], rtol=1e-12, atol=1e-12)


class _PassThrough(TorchDispatchMode):
    """Sees every operator and runs it: calls go through the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_profiler_and_dispatch_modes_still_see_the_operators():
    """With a profiler or a TorchDispatchMode on, a call without a graph, and a node's
    backward, go through the dispatcher, so both see rnn_fused::layer, rnn_fused::forward and
    rnn_fused::backward."""
    seed("visible")
    args = _cell_args("GRU")
    with torch.no_grad():
        with _PassThrough() as seen:
            rnn_fused.ops._C.cell(*args)
    assert "rnn_fused.forward.default" in seen.ops
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            rnn_fused.ops._C.cell(*args)
        rnn_fused.ops._C.cell(*args)[0].sum().backward()
    names = {e.name for e in prof.events()}
    assert {"rnn_fused::layer", "rnn_fused::forward", "rnn_fused::backward"} <= names


@pytest.mark.parametrize("mode", CELLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["sequence", "step", "unbatched step", "packed"])
@pytest.mark.parametrize("wanted", ["all", "no input", "no states", "weights only"])
def test_node_backward_straight_on_the_engine_gives_the_dispatchers_bits(mode, dtype, form, wanted):
    """A node's backward on CPU tensors runs the engine without the dispatcher
    (op_adapters.cpp, call_backward): the same bits as the `backward` operator gives through
    the dispatcher (under a TorchDispatchMode), with every gradient asked for or some left out
    (which the engine then returns undefined)."""
    seed("straight-backward", mode, dtype, form, wanted)
    layer = make_layer(mode, 7, 33, dtype=dtype)
    h0, c0 = make_states(layer, 3, dtype=dtype)
    x = rand(*{"sequence": (5, 3, 7), "packed": (9, 7)}.get(form, (3, 7)), dtype=dtype)
    sizes = torch.tensor([3, 3, 2, 1]) if form == "packed" else None
    if form == "unbatched step":
        x, h0, c0 = (t[0].detach().requires_grad_() if t is not None else t for t in (x, h0, c0))
    if wanted in ("no input", "weights only"):
        x.requires_grad_(False)
    if wanted in ("no states", "weights only"):
        h0.requires_grad_(False)
        if c0 is not None:
            c0.requires_grad_(False)
    leaves = [t for t in (x, h0, c0, *layer.tensors()) if t is not None and t.requires_grad]
    weights: list[Tensor] = []

    def grads() -> tuple[Tensor, ...]:
        out = rnn_layer(mode, x, *layer.tensors(), h0, c0, batch_sizes=sizes)
        outputs = tuple(o for o in out if o is not None)
        weights[:] = weights or [torch.randn_like(o) for o in outputs]
        return torch.autograd.grad(weighted_sum(outputs, weights), leaves)

    straight = grads()
    with _PassThrough() as seen:
        dispatched = grads()
    assert "rnn_fused.backward.default" in seen.ops
    for got, want in zip(straight, dispatched, strict=True):
        assert torch.equal(got, want)


def test_dual_tensor_is_refused_without_a_graph_too():
    """Under no_grad the operator still refuses a dual tensor rather than drop its tangent;
    the eager doors leave such calls to ops.rnn_layer's Python (None), which runs
    reference.py's loop and keeps the tangent."""
    import torch.autograd.forward_ad as fwAD

    seed("dual-no-grad")
    args = list(_cell_args("RNN_TANH"))
    mode, x, h0, _, w_ih, w_hh, b_ih, b_hh = args
    tangent = torch.randn_like(x)
    with fwAD.dual_level(), torch.no_grad():
        args[1] = fwAD.make_dual(x.detach(), tangent)
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            torch.ops.rnn_fused.layer(*args, None, None, False)
        assert rnn_fused.ops._C.cell(*args) is None
        assert rnn_fused.ops._C.layer(*args, None, None, False) is None
        _, h, _ = rnn_layer(mode, args[1], w_ih, w_hh, b_ih, b_hh, h0)
        found = fwAD.unpack_dual(h).tangent
    step = lambda x: reference.rnn_layer(mode, x, w_ih, w_hh, b_ih, b_hh, h0)[1]  # noqa: E731
    expected = torch.func.jvp(step, (x.detach(),), (tangent,))[1]
    torch.testing.assert_close(found, expected)

"""float16 and bfloat16 on the CPU: every cell and layer feature against torch.nn under the
half-type accuracy rule (half_cases.py), and the dtypes that come out."""

from __future__ import annotations

import pytest
import torch
from half_cases import (
    HALF_CONFIGS,
    HALF_TYPES,
    half_layer_errors,
    half_type_errors,
    outputs_and_grads,
)
from helpers import seed
from tolerances import HALF_SLACK, rel_err
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn_fused

SLACK = HALF_SLACK


def _assert_rule(errors: list[tuple[float, float]]) -> None:
    for i, (ours, theirs) in enumerate(errors):
        assert ours <= 2 * theirs + SLACK, f"tensor {i}: ours {ours:.2e}, torch.nn {theirs:.2e}"


# Short calls (15 rows at batch 3; 9 steps at batch 1, whose input projection runs in chunks
# of 4 rows; two steps at batch 7) read their weights as stored; long ones (65 rows, or 20 at
# batch 1) pack them, and bfloat16 ones take the bfloat16 dot products where the CPU has them
# (their input projection in unit order below a batch of 8), as do bfloat16 calls of two
# steps from 96 rows; wide ones (17 rows a step) take AMX tiles where it has them.
LENGTHS = {
    "short": (5, 3),
    "single": (9, 1),
    "long single": (20, 1),
    "two steps": (2, 7),
    "long": (13, 5),
    "wide": (5, 17),
    "two wide steps": (2, 48),
}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(("cell", "kw"), HALF_CONFIGS, ids=[c for c, _ in HALF_CONFIGS])
def test_layer_no_worse_than_twice_torch_nn(cell, kw, dtype, length):
    seed(cell, kw, dtype, length)
    _assert_rule(half_layer_errors(cell, kw, dtype, "cpu", *LENGTHS[length]))


@pytest.mark.parametrize("hidden", [5, 8])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(("cell", "kw"), HALF_CONFIGS, ids=[c for c, _ in HALF_CONFIGS])
def test_rows_of_few_units_no_worse_than_twice_torch_nn(cell, kw, dtype, hidden):
    """Rows of at most 8 units run their cell math gathered into one long row (pointwise.h,
    forward_rows_staged), the output written in the half type from there."""
    seed(cell, kw, dtype, hidden)
    _assert_rule(half_layer_errors(cell, kw, dtype, "cpu", 6, 40, H=hidden))


@pytest.mark.parametrize("length", ["short", "long", "wide"])
@pytest.mark.parametrize(
    "kw",
    [{}, dict(num_layers=2, bidirectional=True, dropout=0.0), dict(batch_first=True, bias=False)],
    ids=["1", "2bi", "batch_first"],
)
def test_bf16_lstm_with_a_float32_c0_as_torch_nn(kw, length):
    """torch.nn's bfloat16 LSTM on the CPU (oneDNN's) takes a float32 c_0 and returns a float32
    c_n, c_0's gradient in float32: ours the same dtypes, under the accuracy rule."""
    seed("bf16 lstm float32 c0", kw, length)
    T, B = LENGTHS[length]
    theirs = nn.LSTM(5, 33, **kw).bfloat16()
    ours = rnn_fused.LSTM(5, 33, **kw).bfloat16()
    ours.load_state_dict(theirs.state_dict())
    exact = nn.LSTM(5, 33, **kw).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    D = 2 * kw["num_layers"] if "num_layers" in kw else 1
    x = torch.randn((B, T, 5) if kw.get("batch_first") else (T, B, 5)).bfloat16()
    states = [torch.randn(D, B, 33).bfloat16(), torch.randn(D, B, 33)]
    weights = [torch.randn(s) for s in ((T, B, 33 * (2 if D > 1 else 1)), (D, B, 33), (D, B, 33))]
    if kw.get("batch_first"):
        weights[0] = weights[0].transpose(0, 1)
    got = outputs_and_grads(ours, x, states, weights)
    try:
        want = outputs_and_grads(theirs, x, states, weights)
    except RuntimeError:
        # Without oneDNN's bfloat16 LSTM (an AVX2 CPU) torch.nn refuses a float32 c_0; its own
        # bfloat16 LSTM, c_0 rounded, then sets the dtypes and the errors that bound ours.
        assert not rnn_fused._C.cpu_bf16_dot()
        theirs = _RoundedC0(theirs)
        want = outputs_and_grads(theirs, x, states, weights)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert got[2].dtype == torch.float32 and got[5].dtype == torch.float32  # c_n, c_0's grad
    _assert_rule(half_type_errors(ours, theirs, exact, x, states))


class _RoundedC0(nn.Module):
    """A bfloat16 nn.LSTM that takes a float32 c_0 rounded to bfloat16 and returns c_n in
    float32: the dtypes of oneDNN's LSTM, on the CPUs where oneDNN refuses bfloat16."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        out, (h_n, c_n) = self.lstm(x, (state[0], state[1].bfloat16()))
        return out, (h_n, c_n.float())


@pytest.mark.skipif(
    not rnn_fused._C.cpu_bf16_dot(), reason="this CPU has no AVX-512 BF16 dot products"
)
@pytest.mark.parametrize("input_size", [37, 38], ids=["odd-input", "even-input"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_bf16_dot_products_run_and_match_float32_products(mode, input_size, monkeypatch):
    """The bfloat16 dot-product path is the one taken (its bits differ from float32 products
    of the same operands) and agrees with it to bfloat16 rounding of the recurrent state. An
    even input size is read in bfloat16 as it is, an odd one through a float32 copy. ReLU RNNs
    take it for the input projection and the backward. The forward's path shows in the
    float32 workspace (the pre-activations), whose bits the output's rounding may hide."""
    seed("bf16 dot", mode, input_size)
    gates = rnn_fused.ops.GATES[mode]
    x = torch.randn(13, 5, input_size).bfloat16()
    w_ih = torch.randn(gates * 67, input_size).bfloat16()
    w_hh = torch.randn(gates * 67, 67).bfloat16()
    w_ih, w_hh = w_ih / 6, w_hh / 8
    grad = torch.randn(13, 5, 67).bfloat16()

    def forward_and_grads() -> list[torch.Tensor]:
        ops = torch.ops.rnn_fused
        output, _, _, saved, h_prev = ops.forward(
            mode, x, None, None, w_ih, w_hh, None, None, None, None, False, True
        )
        grads = ops.backward(mode, grad, None, None, x, w_ih, w_hh, None, None, False, saved,
                             h_prev, 5, [True, False, True])  # fmt: skip
        return [saved, output, grads[0], grads[3], grads[4]]

    dot = forward_and_grads()
    monkeypatch.setenv("RNN_FUSED_BF16_DOT", "0")
    plain = forward_and_grads()
    assert not torch.equal(dot[0], plain[0])
    assert not all(torch.equal(a, b) for a, b in zip(dot[2:], plain[2:], strict=True))
    for a, b in zip(dot[1:], plain[1:], strict=True):
        assert rel_err(a, b.double()) < 2e-2


@pytest.mark.skipif(not rnn_fused._C.cpu_bf16_tiles(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize(
    "steps, batch, hidden", [(9, 17, 130), (11, 3, 130), (1, 33, 130), (5, 40, 130), (4, 70, 96)]
)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_bf16_tiles_run_and_match_dot_products(mode, steps, batch, hidden, monkeypatch):
    """With 2 rows or more a step's products and the input projection run on AMX tiles and
    agree with the dot products to bfloat16 rounding of the state, in the outputs and every
    gradient. Both sum each product's pairs in order, so the bits may agree too: at batch 17
    over 9 steps they differ somewhere. A single step packs its weights for the tiles (at
    batch 33 its backward too, where the dot products read them as stored) and writes its
    bfloat16 weight gradients from their float32 sums. At batch 40 a thread takes
    its rows in one block (kOwnRowsTileBlock), not in blocks of 16. At hidden 96 (a multiple
    of 32) the steps run on our own AMX tile kernel (AmxGateTiles; each thread's 35 rows in
    blocks of 32 and 3), and the second unit block is a panel half of zeros."""
    seed("bf16 tiles", mode, steps, hidden)
    gates = rnn_fused.ops.GATES[mode]
    x = torch.randn(steps, batch, 37).bfloat16()
    w_ih = (torch.randn(gates * hidden, 37) / 6).bfloat16()
    w_hh = (torch.randn(gates * hidden, hidden) / 12).bfloat16()
    grad = torch.randn(steps, batch, hidden).bfloat16()

    def outputs_and_grads() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, w_ih, w_hh)]
        out = rnn_fused.rnn_layer(mode, *leaves)[0]
        return [out, *torch.autograd.grad(out, leaves, grad)]

    tiles = outputs_and_grads()
    monkeypatch.setenv("RNN_FUSED_BF16_TILES", "0")
    dots = outputs_and_grads()
    if (steps, batch) == (9, 17):
        assert not all(torch.equal(a, b) for a, b in zip(tiles, dots, strict=True))
    for a, b in zip(tiles, dots, strict=True):
        assert rel_err(a, b.double()) < 2e-2


@pytest.mark.skipif(not rnn_fused._C.cpu_bf16_tiles(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize("batch", [70, 48])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_bf16_gate_tiles_no_worse_than_twice_torch_nn(cell, batch):
    """Hidden 64 (a multiple of 32): each thread's rows of a step run on our own AMX tile
    kernel (AmxGateTiles) in blocks of up to 32, whose compact sums the cell math reads (at
    batch 70, 35 rows a thread: 32 and 3; at batch 48, 24 in one block)."""
    seed("gate tiles", cell, batch)
    _assert_rule(half_layer_errors(cell, {}, torch.bfloat16, "cpu", 6, batch, H=64))


@pytest.mark.skipif(not rnn_fused._C.cpu_bf16_tiles(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize(
    ("mode", "batch", "input_size", "hidden"),
    [("LSTM", 64, 64, 96), ("GRU", 24, 32, 256), ("RNN_TANH", 40, 64, 64), ("LSTM", 33, 96, 160)],
)
def test_bf16_step_reads_weights_as_stored_on_tiles(mode, batch, input_size, hidden, monkeypatch):
    """A bfloat16 step of 17 rows or more on AMX tiles reads its weights as stored, the tiles
    taking W's rows as they are (products W x^T, sums transposed back: amx_gates.cpp
    rows_times_w), where RNN_FUSED_STORED_TILES=0 packs them: the same bits, outputs and
    every gradient. Hidden 96 and 160 leave a last unit block of 32; batch 33 and 40 a last
    block of rows under 16."""
    seed("stored tiles", mode, batch, hidden)
    gates = rnn_fused.ops.GATES[mode]
    x = torch.randn(1, batch, input_size).bfloat16()
    w_ih = (torch.randn(gates * hidden, input_size) / 6).bfloat16()
    w_hh = (torch.randn(gates * hidden, hidden) / 12).bfloat16()
    b_ih, b_hh = (
        (torch.randn(gates * hidden) / 4).bfloat16(),
        (torch.randn(gates * hidden) / 4).bfloat16(),
    )
    h0 = torch.randn(1, batch, hidden).bfloat16()
    grad = torch.randn(1, batch, hidden).bfloat16()

    def outputs_and_grads() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (x, w_ih, w_hh, b_ih, b_hh, h0)]
        out = rnn_fused.rnn_layer(mode, *leaves[:5], leaves[5][0])[0]
        return [out, *torch.autograd.grad(out, leaves, grad)]

    stored = outputs_and_grads()
    monkeypatch.setenv("RNN_FUSED_STORED_TILES", "0")
    packed = outputs_and_grads()
    for a, b in zip(stored, packed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not rnn_fused._C.cpu_bf16_tiles(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize(("name", "batch"), [("LSTMCell", 2), ("GRUCell", 8), ("RNNCell", 16)])
def test_small_bf16_cell_under_no_grad_on_tiles(name, batch):
    """Under no_grad a bfloat16 cell of hidden 256 takes the tiles from 2 rows, its weights
    read as stored (engine.h, stored_tiles_step): against float64 under the rule."""
    seed("stored tiles no_grad", name, batch)
    theirs = getattr(nn, name)(256, 256).bfloat16()
    ours = getattr(rnn_fused, name).from_torch(theirs)
    exact = getattr(nn, name)(256, 256).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x, h = torch.randn(batch, 256).bfloat16(), torch.randn(batch, 256).bfloat16()
    state = (h, torch.randn(batch, 256).bfloat16()) if name == "LSTMCell" else h
    exact_state = tuple(s.double() for s in state) if name == "LSTMCell" else h.double()
    with torch.no_grad():
        results = [
            m(a, st)
            for m, a, st in ((ours, x, state), (exact, x.double(), exact_state), (theirs, x, state))
        ]
    got, expected, torch_out = (_flat(r) for r in results)
    _assert_rule(
        [(rel_err(a, e), rel_err(t, e)) for a, e, t in zip(got, expected, torch_out, strict=True)]
    )


@pytest.mark.skipif(not rnn_fused._C.cpu_bf16_tiles(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize(
    ("name", "steps", "batch"),
    [("LSTMCell", 0, 12), ("GRUCell", 0, 16), ("RNNCell", 0, 16), ("LSTM", 4, 3)],
)
def test_small_bf16_training_forward_on_tiles(name, steps, batch):
    """In training, a bfloat16 call of up to 16 rows at hidden 256 runs its forward on the
    tiles as under no_grad (engine.h, stored_tiles_step), its backward on the dot products:
    the forward's bits those of no_grad, and every gradient under the rule against float64."""
    seed("stored tiles training", name, steps, batch)
    theirs = getattr(nn, name)(256, 256).bfloat16()
    ours = rnn_fused.replace_rnns(getattr(nn, name)(256, 256)).bfloat16()
    ours.load_state_dict(theirs.state_dict())
    exact = getattr(nn, name)(256, 256).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(*((steps,) if steps else ()), batch, 256).bfloat16()
    with torch.no_grad():
        inferred = _flat(ours(x))

    def run(module, inp):
        inp = inp.clone().requires_grad_()
        out = _flat(module(inp))
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in out)
        return out, list(torch.autograd.grad(loss, [inp, *module.parameters()]))

    (got, got_grads), (want, want_grads), (base, base_grads) = (
        run(m, a) for m, a in ((ours, x), (exact, x.double()), (theirs, x))
    )
    assert torch.equal(got[0].detach(), inferred[0]), "training's forward: the no_grad path"
    pairs = zip(got + got_grads, want + want_grads, base + base_grads, strict=True)
    _assert_rule([(rel_err(a, e), rel_err(t, e)) for a, e, t in pairs])


@pytest.mark.skipif(not rnn_fused._C.cpu_bf16_tiles(), reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.parametrize(
    ("cell", "steps", "batch"),
    [("LSTM", 12, 1), ("GRU", 10, 1), ("LSTM", 16, 1), ("RNN_TANH", 12, 1)],
)
def test_short_bf16_inference_packs_its_weights(cell, steps, batch):
    """Short bfloat16 calls under no_grad whose weights are large enough (a MiB: hidden 256)
    pack them, where the same call in training reads them as stored (engine.h,
    small_bf16_inference; calls of up to 8 steps read them as stored on the tiles either way):
    other bits, both under the rule against float64."""
    seed("short inference", cell, steps, batch)
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(cell, nn.RNN)
    kw = {"nonlinearity": "tanh"} if cell.startswith("RNN") else {}
    theirs = cls(256, 256, **kw).bfloat16()
    ours = rnn_fused.replace_rnns(cls(256, 256, **kw)).bfloat16()
    ours.load_state_dict(theirs.state_dict())
    exact = cls(256, 256, **kw).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(steps, batch, 256).bfloat16()
    with torch.no_grad():
        inferred, expected, torch_nn = ours(x), exact(x.double()), theirs(x)
    trained = ours(x.clone().requires_grad_())
    got, exact_out, torch_out, trained_out = (
        _flat(r) for r in (inferred, expected, torch_nn, trained)
    )
    for ours_out in (got, trained_out):
        pairs = zip(ours_out, exact_out, torch_out, strict=True)
        _assert_rule([(rel_err(a, e), rel_err(t, e)) for a, e, t in pairs])
    assert not torch.equal(got[0], trained_out[0].detach()), "no_grad and training: one path"


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_no_worse_than_twice_torch_nn(name, dtype):
    seed(name, dtype)
    theirs = getattr(nn, name)(5, 33).to(dtype)
    ours = getattr(rnn_fused, name).from_torch(theirs)
    exact = getattr(nn, name)(5, 33).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(3, 5).to(dtype)
    states = [torch.randn(3, 33).to(dtype) for _ in range(2 if name == "LSTMCell" else 1)]
    _assert_rule(half_type_errors(ours, theirs, exact, x, states))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("batch", [1, 4, 7, 95])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_small_batch_cell_no_worse_than_twice_torch_nn(name, batch, dtype):
    """A step at batch 1 to 4 reads half-type weights as stored (products widen each value
    as they read it; at batch 7 and 95 bfloat16 ones are read as stored by the dot products
    where the CPU has them, or at 95 packed for AMX tiles where it has those, the others
    converted once): the rule, for every gradient too, at
    a width whose products split into several column blocks with a partial one (70 units:
    280 gate rows, 70 columns of dh)."""
    seed(name, batch, dtype)
    theirs = getattr(nn, name)(37, 70).to(dtype)
    ours = getattr(rnn_fused, name).from_torch(theirs)
    exact = getattr(nn, name)(37, 70).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(batch, 37).to(dtype)
    states = [torch.randn(batch, 70).to(dtype) for _ in range(2 if name == "LSTMCell" else 1)]
    _assert_rule(half_type_errors(ours, theirs, exact, x, states))


@pytest.mark.parametrize("batch", [1, 7, 95, 130])
def test_bf16_relu_cell_no_worse_than_twice_torch_nn(batch):
    """A ReLU RNNCell's bfloat16 step runs on the bfloat16 dot products like the other cells
    (its h_0 comes in bfloat16, so rounding it for the products changes nothing): the rule
    for the output and every gradient, with weights read as stored (batch 1 to 95) and
    packed (130)."""
    seed("bf16 relu cell", batch)
    theirs = nn.RNNCell(37, 70, nonlinearity="relu").to(torch.bfloat16)
    ours = rnn_fused.RNNCell.from_torch(theirs)
    exact = nn.RNNCell(37, 70, nonlinearity="relu").double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(batch, 37).to(torch.bfloat16)
    states = [torch.randn(batch, 70).to(torch.bfloat16)]
    _assert_rule(half_type_errors(ours, theirs, exact, x, states))


@pytest.mark.parametrize("input_size", [37, 38], ids=["odd-input", "even-input"])
def test_bf16_relu_layers_no_worse_than_twice_torch_nn(input_size):
    """ReLU RNNs of many steps that pack their weights run the input projection and the
    backward on the bfloat16 dot products, the state products of the forward in float32: the
    rule for the outputs and every gradient of a bidirectional layer. (One layer: with two,
    whichever side a rounded first-layer output flips ReLU's derivative for is off by that
    gradient, and the rule is a draw; ARCHITECTURE.md, Numerics.)"""
    seed("bf16 relu layers", input_size)
    kw = dict(bidirectional=True, nonlinearity="relu")
    theirs = nn.RNN(input_size, 64, **kw).to(torch.bfloat16)
    ours = rnn_fused.RNN.from_torch(theirs)
    exact = nn.RNN(input_size, 64, **kw).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(20, 16, input_size).to(torch.bfloat16)
    states = [torch.randn(2, 16, 64).to(torch.bfloat16)]
    _assert_rule(half_type_errors(ours, theirs, exact, x, states))


@pytest.mark.parametrize("batch", [1, 7, 95, 130])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_bf16_cell_step_gradients_whichever_are_asked_for(name, batch):
    """The backward of a bfloat16 step writes its weight gradients in bfloat16 (on the dot
    products where the CPU has them, from AMX tiles at 2 rows or more where it has those)
    and, at more than 4 rows (its forward packs the weights from 96 rows, or from 16 with AMX
    tiles; its backward reads them as stored, but packs them too from 32 with AMX tiles),
    rounds its gate gradients once for dh, dX and both weight gradients: each gradient comes
    in its tensor's dtype with the same bits whichever others are asked for (weights alone,
    the input alone, the state alone, all), and the weights' are those of float32 weights of
    the same values to bfloat16 rounding of each product's operands (2% of their norm)."""
    seed("bf16 step grads", name, batch)
    cell = getattr(rnn_fused, name)(37, 35).to(torch.bfloat16)
    x = torch.randn(batch, 37).bfloat16()
    states = [torch.randn(batch, 35).bfloat16() for _ in range(2 if name == "LSTMCell" else 1)]
    grads = [torch.randn(batch, 35).bfloat16() for _ in states]

    def run(module: nn.Module, dtype: torch.dtype, inputs: bool, state: bool, weights: bool):
        x_ = x.to(dtype, copy=True).requires_grad_(inputs)
        s_ = [s.to(dtype, copy=True).requires_grad_(state) for s in states]
        for p in module.parameters():
            p.grad = None
            p.requires_grad_(weights)
        out = module(x_, tuple(s_) if len(s_) == 2 else s_[0])
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [g.to(dtype) for g in grads])
        params = [p.grad for p in module.parameters()] if weights else []
        return [x_.grad] * inputs + [s_[0].grad] * state + params

    everything = run(cell, torch.bfloat16, True, True, True)
    assert all(g.dtype == torch.bfloat16 for g in everything)
    for asked in [(False, False, True), (True, False, False), (False, True, False)]:
        alone = run(cell, torch.bfloat16, *asked)
        wanted = [g for g, on in zip(everything[:2], asked[:2], strict=True) if on]
        wanted += everything[2:] if asked[2] else []
        assert len(alone) == len(wanted)
        assert all(torch.equal(a, b) for a, b in zip(alone, wanted, strict=True))
    wide = run(cell.float(), torch.float32, True, True, True)
    for ours, theirs in zip(everything[2:], wide[2:], strict=True):
        assert rel_err(ours.float(), theirs.double()) < 2e-2


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_bf16_step_at_batch_1_weight_gradients_are_outer_products(name):
    """At batch 1 a bfloat16 step's weight gradients are the outer products of its gate
    gradients (its biases' gradients, the hidden side's apart for GRU) and its input and
    state, each a product of two bfloat16 values rounded once (gemm.cpp, outer_product): exact
    in torch's float32 too. Sizes 37 and 35 leave tails after whole vectors."""
    seed("bf16 outer products", name)
    cell = getattr(rnn_fused, name)(37, 35).to(torch.bfloat16)
    x = torch.randn(1, 37).bfloat16()
    states = [torch.randn(1, 35).bfloat16() for _ in range(2 if name == "LSTMCell" else 1)]
    out = cell(x, tuple(states) if len(states) == 2 else states[0])
    out = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn(1, 35).bfloat16() for _ in out]
    torch.autograd.backward(out, grads)
    for w, b, side in (
        (cell.weight_ih, cell.bias_ih, x),
        (cell.weight_hh, cell.bias_hh, states[0]),
    ):
        assert w.grad.dtype == torch.bfloat16 and b.grad.abs().min() > 0
        outer = (b.grad.float()[:, None] * side.float()).bfloat16()
        assert torch.equal(w.grad, outer) or not rnn_fused._C.cpu_bf16_dot()
    if not rnn_fused._C.cpu_bf16_dot():
        # Without the dot products a bfloat16 call is the float32 call rounded (engine.h): its
        # gate gradients stay in float32, and its weight gradients are those of the float32 call
        # rounded once (within a bfloat16 step: the two calls' gate gradients may differ in
        # their last float32 bits).
        wide = getattr(rnn_fused, name)(37, 35)
        wide.load_state_dict({k: v.float() for k, v in cell.state_dict().items()})
        wide_states = [s.float() for s in states]
        out = wide(x.float(), tuple(wide_states) if len(wide_states) == 2 else wide_states[0])
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [g.float() for g in grads])
        for ours, theirs in zip(cell.parameters(), wide.parameters(), strict=True):
            assert torch.allclose(ours.grad.float(), theirs.grad, rtol=2**-8, atol=0)


def _one_step_and_its_float32(mode: str, dtype: torch.dtype, batch: int, units: int, scale: int):
    """(ours, float32) result pairs of one step of a layer on random values in dtype (37
    inputs, initial states, biases; weights divided by scale), and of the float32 call on
    the same values."""
    gates = rnn_fused.ops.GATES[mode]
    x = torch.randn(1, batch, 37).to(dtype)
    w_ih, w_hh = (torch.randn(gates * units, n).div(scale).to(dtype) for n in (37, units))
    b_ih, b_hh = (torch.randn(gates * units).to(dtype) for _ in range(2))
    h0, c0 = (torch.randn(batch, units).to(dtype) for _ in range(2))
    c0 = c0 if mode == "LSTM" else None
    half = rnn_fused.rnn_layer(mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0)
    wide = [None if t is None else t.float() for t in (x, w_ih, w_hh, b_ih, b_hh, h0, c0)]
    single = rnn_fused.rnn_layer(mode, *wide)
    return [(got, want) for got, want in zip(half, single, strict=True) if want is not None]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_half_weights_at_batch_1_give_the_float32_step_rounded(mode, dtype):
    """At batch 1 the products of half-type weights read as stored are float32 products of
    their exact values, summed as the float32 engine sums them: a step's results are the
    float32 call's on the same values, rounded to the dtype."""
    seed("batch 1 step", mode, dtype)
    for got, want in _one_step_and_its_float32(mode, dtype, batch=1, units=70, scale=8):
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("batch", [7, 95, 96])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_bf16_step_at_larger_batches_gives_the_float32_step_to_rounding(mode, batch):
    """A step reads bfloat16 weights as stored at more than 4 rows too (on the dot products
    where the CPU has them; packed from 96 rows, or from 16 with AMX tiles): products of
    bfloat16 values are exact in float32, so the results are the float32 call's on the same
    values, summed in another order, within rounding to bfloat16. Odd sizes throughout: 37
    inputs, 35 units (105 gate rows in GRU), batches that leave partial blocks of rows."""
    seed("bf16 rows", mode, batch)
    for got, want in _one_step_and_its_float32(mode, torch.bfloat16, batch, units=35, scale=6):
        assert got.dtype == torch.bfloat16
        # Rounding to nearest: at most half a unit in the last place, 2^-8 of the value.
        assert ((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_float16_large_states_give_the_float32_call_rounded(mode, steps):
    """float16 runs the float32 engine on float32 copies: with states of more values than one
    thread converts (661 x 101), the outputs and every gradient are the float32 call's on
    the same values, rounded to float16, bit for bit."""
    seed("float16 large states", mode, steps)
    gates, units, batch = rnn_fused.ops.GATES[mode], 101, 661
    values = [torch.randn(steps, batch, 37)]
    values += [torch.randn(gates * units, n).div(6) for n in (37, units)]
    values += [torch.randn(gates * units) for _ in range(2)]
    values += [torch.randn(batch, units) for _ in range(2 if mode == "LSTM" else 1)]
    half = [v.half().requires_grad_() for v in values]
    wide = [v.half().float().requires_grad_() for v in values]
    got, want = rnn_fused.rnn_layer(mode, *half), rnn_fused.rnn_layer(mode, *wide)
    pairs = [(g, w) for g, w in zip(got, want, strict=True) if w is not None]
    for g, w in pairs:
        assert g.dtype == torch.float16 and torch.equal(g, w.half())
    grads = [torch.randn_like(w).half() for _, w in pairs]
    torch.autograd.backward([g for g, _ in pairs], grads)
    torch.autograd.backward([w for _, w in pairs], [g.float() for g in grads])
    for h, w in zip(half, wide, strict=True):
        assert h.grad.dtype == torch.float16 and torch.equal(h.grad, w.grad.half())


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_packed_bidirectional_matches_float64(dtype):
    seed("packed", dtype)
    theirs = nn.LSTM(5, 33, bidirectional=True).to(dtype)
    ours = rnn_fused.LSTM.from_torch(theirs)
    exact = nn.LSTM(5, 33, bidirectional=True).double()
    exact.load_state_dict({k: v.double() for k, v in theirs.state_dict().items()})
    x = torch.randn(7, 3, 5).to(dtype)
    lengths = [7, 4, 2]
    out, (h_n, c_n) = ours(pack_padded_sequence(x, lengths))
    ref, (h64, c64) = exact(pack_padded_sequence(x.double(), lengths))
    base, _ = theirs(pack_padded_sequence(x, lengths))
    assert out.data.dtype == h_n.dtype == c_n.dtype == dtype
    got, want = pad_packed_sequence(out)[0], pad_packed_sequence(ref)[0]
    assert rel_err(got, want) <= 2 * rel_err(pad_packed_sequence(base)[0], want) + SLACK
    assert rel_err(h_n, h64) < 1e-2 and rel_err(c_n, c64) < 1e-2


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_operator_results_in_input_dtype_and_workspace_in_float32(mode, dtype):
    """The forward's results come out in the call's dtype and its workspace in float32 (the
    engine's dtype for half types on the CPU), and a backward takes that workspace back."""
    seed(mode, dtype)
    gates = rnn_fused.ops.GATES[mode]
    x = torch.randn(4, 3, 6).to(dtype)
    w_ih, w_hh = torch.randn(gates * 9, 6).to(dtype), torch.randn(gates * 9, 9).to(dtype)
    outs = torch.ops.rnn_fused.forward(mode, x, None, None, w_ih, w_hh, None, None, None, None,
                                       False, True)  # fmt: skip
    output, h_n, c_n, saved, h_prev = outs
    assert output.dtype == h_n.dtype == c_n.dtype == dtype
    assert saved.dtype == h_prev.dtype == torch.float32
    grads = torch.ops.rnn_fused.backward(mode, torch.randn_like(output), None, None, x, w_ih,
                                         w_hh, None, None, False, saved, h_prev, 3,
                                         [True, True, True])  # fmt: skip
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    assert grads[0].shape == x.shape and grads[3].shape == w_ih.shape


# The lengths of a packed input (None: padded). torch.nn's LSTM without projection runs
# oneDNN's LSTM, results in the autocast dtype, for a packed input whose sequences all have
# the same length too.
UNEVEN, FULL = [7, 5, 2], [7, 7, 7]
AUTOCAST_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True), None),
    ("LSTM", dict(num_layers=2, bidirectional=True), UNEVEN),
    ("LSTM", dict(num_layers=2, bidirectional=True), FULL),
    ("LSTM", dict(num_layers=2, proj_size=3), None),
    ("LSTM", dict(proj_size=3), FULL),
    ("GRU", dict(num_layers=2), None),
    ("GRU", dict(), UNEVEN),
    ("GRU", dict(), FULL),
    ("RNN", dict(nonlinearity="relu"), None),
    ("RNN", dict(num_layers=2), UNEVEN),
    ("LSTMCell", dict(), None),
    ("GRUCell", dict(), None),
    ("RNNCell", dict(), None),
]


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if hasattr(result, "batch_sizes"):
        return [result.data]
    return [t for r in result for t in _flat(r)]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_off_the_short_door_under_autocast(name, dtype):
    """A cell call that leaves the cells' short door under CPU autocast (a parametrized
    weight; for LSTMCell zoneout and LayerNorm too): the result dtypes of torch.nn's cell, as
    on the short door, and its values within a half type's rounding."""
    seed("cell off the door", name, dtype)
    theirs = getattr(nn, name)(5, 33)
    ours = getattr(rnn_fused, name).from_torch(theirs)
    for m in (theirs, ours):
        nn.utils.parametrizations.weight_norm(m, "weight_hh")
    x = torch.randn(3, 5)
    with torch.autocast("cpu", dtype=dtype):
        want, got = _flat(theirs(x)), _flat(ours(x))
        others = []
        if name == "LSTMCell":
            zoneout = rnn_fused.LSTMCell(5, 33, zoneout=0.2).eval()
            others = [_flat(zoneout(x)), _flat(rnn_fused.LayerNormLSTMCell(5, 33)(x))]
    assert [o.dtype for o in got] == [o.dtype for o in want]
    assert all(rel_err(a, b) < 2e-2 for a, b in zip(got, want, strict=True))
    for out in others:
        assert [o.dtype for o in out] == [o.dtype for o in want]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize(("name", "kw", "packed"), AUTOCAST_CASES)
def test_cpu_autocast_like_torch_nn(name, kw, packed, dtype):
    """A float32 module under torch.autocast("cpu"): the dtypes torch.nn's results have, and
    values and parameter gradients within the accuracy rule against float64 on the rounded
    operands."""
    seed(name, kw, packed, dtype)
    theirs = getattr(nn, name)(5, 33, **kw)
    ours = rnn_fused.replace_rnns(getattr(nn, name)(5, 33, **kw))
    ours.load_state_dict(theirs.state_dict())
    exact = getattr(nn, name)(5, 33, **kw).double()
    # The reference runs what autocast asks for: products of the operands rounded to dtype.
    exact.load_state_dict({k: v.to(dtype).double() for k, v in theirs.state_dict().items()})
    cell = name.endswith("Cell")
    x = torch.randn(3, 5) if cell else torch.randn(7, 3, 5)

    def run(module, inp):
        if packed is not None:
            inp = pack_padded_sequence(inp, packed)
        with torch.autocast("cpu", dtype=dtype):
            outs = _flat(module(inp))
        grads = torch.autograd.grad(sum(o.double().sum() for o in outs), list(module.parameters()))
        return outs, list(grads)

    got, got_grads = run(ours, x)
    want, want_grads = run(exact, x.to(dtype).double())
    try:
        base, base_grads = run(theirs, x)
    except RuntimeError:
        # torch.nn's oneDNN LSTM refuses float16 on CPUs without float16 support, and bfloat16
        # on those without bfloat16 (AVX2); where it runs, its results are in the autocast
        # dtype, as ours are.
        no_bf16 = not rnn_fused._C.cpu_bf16_dot()
        assert dtype == torch.float16 or no_bf16
        assert name == "LSTM" and packed in (None, FULL)
        assert all(o.dtype == dtype for o in got)
        assert all(rel_err(o, w) < 1e-2 for o, w in zip(got, want))
        return
    assert [o.dtype for o in got] == [o.dtype for o in base]
    assert [g.dtype for g in got_grads] == [torch.float32] * len(got_grads)
    for a, b, r in zip(got + got_grads, base + base_grads, want + want_grads):
        assert rel_err(a, r) <= 2 * rel_err(b, r) + SLACK

"""IndRNN: the module against reference.py's plain loop (float64, to 1e-12), gradients by
gradcheck, and the torch.nn.RNN contract it shares (batch_first, states, packed input)."""

from __future__ import annotations

import copy

import pytest
import torch
from tolerances import assert_within_twice
from torch import nn
from torch.func import functional_call

import rnn_fused
from rnn_fused import reference


def _reference(m: rnn_fused.IndRNN, x: torch.Tensor, h0: torch.Tensor) -> tuple:
    """reference.rnn_layer (u as its 1-D w_hh) over the module's layers and directions; x is
    [T, B, I]."""
    directions = 2 if m.bidirectional else 1
    h_n = []
    for layer in range(m.num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            p = {k: getattr(m, k + suffix, None) for k in names}
            out, h, _ = reference.rnn_layer(
                m.mode, x, p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"],
                h0[layer * directions + d], reverse=d == 1,
            )  # fmt: skip
            outputs.append(out)
            h_n.append(h)
        x = torch.cat(outputs, dim=-1)
    return x, torch.stack(h_n)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_the_plain_loop(nonlinearity: str, bias: bool):
    torch.manual_seed(0)
    m = rnn_fused.IndRNN(
        5, 33, num_layers=2, nonlinearity=nonlinearity, bias=bias, batch_first=True,
        bidirectional=True,
    ).double()  # fmt: skip
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    h0 = torch.randn(4, 3, 33, dtype=torch.float64)
    out, h_n = m(x, h0)
    want, want_h = _reference(m, x.transpose(0, 1), h0)
    torch.testing.assert_close(out, want.transpose(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n, want_h, rtol=1e-12, atol=1e-12)


def test_parameters_and_initialisation():
    torch.manual_seed(1)
    m = rnn_fused.IndRNN(4, 6, num_layers=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["weight_hh_l0"] == shapes["weight_hh_l1"] == (6,)
    assert shapes["weight_ih_l1"] == (6, 6) and shapes["bias_hh_l0"] == (6,)
    u = torch.cat([m.weight_hh_l0, m.weight_hh_l1])
    assert u.abs().max() <= 1 and u.abs().max() > 1 / 6**0.5, "u uniform in [-1, 1]"
    with pytest.raises(ValueError, match="Unknown nonlinearity 'gelu'"):
        rnn_fused.IndRNN(4, 6, nonlinearity="gelu")
    with pytest.raises(TypeError, match=r"no torch\.nn counterpart"):
        m.to_torch()


def test_packed_input_equals_one_sequence_at_a_time():
    torch.manual_seed(2)
    m = rnn_fused.IndRNN(3, 5, nonlinearity="relu").double()
    lengths = [6, 4, 1]
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
    out, h_n = m(packed)
    padded, _ = nn.utils.rnn.pad_packed_sequence(out)
    for b, n in enumerate(lengths):
        alone, h_alone = m(x[:n, b : b + 1])
        torch.testing.assert_close(padded[:n, b : b + 1], alone, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h_n[:, b : b + 1], h_alone, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(3)
    m = rnn_fused.IndRNN(3, 4, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    u = m.weight_hh_l0_reverse.detach().clone().requires_grad_()
    w = m.weight_ih_l0.detach().clone().requires_grad_()

    def f(x, u, w):
        params = {"weight_hh_l0_reverse": u, "weight_ih_l0": w}
        return functional_call(m, params, (x,), strict=False)

    assert torch.autograd.gradcheck(f, (x, u, w))


def test_compiles_without_graph_break():
    torch.manual_seed(4)
    m = rnn_fused.IndRNN(3, 5, num_layers=2)
    x = torch.randn(6, 2, 3)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x), m(x), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_long_calls_and_gradients_match(nonlinearity: str):
    """A call past the short-call path (more than 32 rows and 2 steps: packed W_ih, threads),
    outputs and every gradient against the plain loop in float64."""
    torch.manual_seed(5)
    m = rnn_fused.IndRNN(6, 70, nonlinearity=nonlinearity).double()
    x = torch.randn(40, 16, 6, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 16, 70, dtype=torch.float64, requires_grad=True)
    out, h_n = m(x, h0)
    want, want_h = _reference(m, x, h0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g_out, g_h = torch.randn_like(out), torch.randn_like(h_n)
    leaves = [x, h0, *m.parameters()]
    ours = torch.autograd.grad([out, h_n], leaves, [g_out, g_h])
    theirs = torch.autograd.grad([want, want_h], leaves, [g_out, g_h])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_types_no_worse_than_twice_the_loop(dtype: torch.dtype):
    """The half-type accuracy rule, with the plain loop in the same dtype as the yardstick
    (torch.nn has no IndRNN): against float64, at most twice its error."""
    torch.manual_seed(6)
    m = rnn_fused.IndRNN(5, 40).to(dtype)
    x = torch.randn(30, 8, 5).to(dtype)
    out, _ = m(x)
    p = {k: v.double() for k, v in m.state_dict().items()}
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    exact = reference.rnn_layer("RNN_TANH", x.double(), *(p[k] for k in names))[0]
    same = reference.rnn_layer("RNN_TANH", x, *(getattr(m, k) for k in names))[0]
    assert out.dtype == dtype

    def err(a: torch.Tensor) -> float:
        return ((a.detach().double() - exact).norm() / exact.norm()).item()

    assert err(out) <= 2 * err(same) + 1e-4


def test_float32_gradients_no_less_accurate_than_the_loop():
    """float32 at T=100 B=64: every gradient within twice the error of the plain loop in
    float32 (both against the module in float64). u's gradient summed its 6400 rows in order
    had 6x the loop's error (whose sums run per step); pairwise now."""
    torch.manual_seed(8)
    m = rnn_fused.IndRNN(33, 256).double()
    x = torch.randn(100, 64, 33, dtype=torch.float64)
    h0 = torch.randn(1, 64, 256, dtype=torch.float64)
    g = torch.randn(100, 64, 256, dtype=torch.float64)

    def grads(module: nn.Module, dtype: torch.dtype, loop: bool) -> tuple:
        module = module.to(dtype)
        xs = x.to(dtype).requires_grad_()
        hs = h0.to(dtype).requires_grad_()
        out = _reference(module, xs, hs)[0] if loop else module(xs, hs)[0]
        return torch.autograd.grad(out, [xs, hs, *module.parameters()], g.to(dtype))

    exact = grads(copy.deepcopy(m), torch.float64, False)
    ours = grads(copy.deepcopy(m), torch.float32, False)
    loop = grads(copy.deepcopy(m), torch.float32, True)
    names = ["input", "h_0", *(n for n, _ in m.named_parameters())]
    assert_within_twice(list(ours), list(loop), list(exact), names)


def test_units_over_threads_packed():
    """A packed call large enough for its units to run on two threads (blocks of 16 of H=100,
    rows of shrinking batches): every sequence and gradient against the plain loop in
    float64, and the same bits on one thread as on two."""
    torch.manual_seed(7)
    m = rnn_fused.IndRNN(6, 100).double()
    lengths = list(range(60, 12, -2))  # 888 rows x 100 units: past 65536, one chunk
    x = torch.randn(max(lengths), 24, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(max(lengths), 24, 100, dtype=torch.float64)

    def ours() -> list[torch.Tensor]:
        out = m(nn.utils.rnn.pack_padded_sequence(x, lengths))[0]
        padded = nn.utils.rnn.pad_packed_sequence(out)[0]
        return [padded, *torch.autograd.grad((padded * g).sum(), [x, *m.parameters()])]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ours()
        torch.set_num_threads(2)
        double = ours()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, double, strict=True):
        assert torch.equal(a, b), "one thread and two threads differ"
    loss = 0
    for b, n in enumerate(lengths):
        want, _ = _reference(m, x[:n, b : b + 1], torch.zeros(1, 1, 100, dtype=torch.float64))
        torch.testing.assert_close(double[0][:n, b : b + 1], want, rtol=1e-12, atol=1e-12)
        loss = loss + (want * g[:n, b : b + 1]).sum()
    theirs = torch.autograd.grad(loss, [x, *m.parameters()])
    for a, b in zip(double[1:], theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

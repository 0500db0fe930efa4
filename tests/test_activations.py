"""The CPU kernels' own sigmoid and tanh (csrc/cpu/vec_math.h: a polynomial and exp form,
not Sleef's) against numpy's long double, in float32 and float64; and the cheaper ones of
bfloat16 calls on the bfloat16 products (Bf16CellVec), against the exact value rounded.

The kernels' activations are read through layers whose products are exact: a tanh RNN whose
W_ih is the identity and whose W_hh is zero outputs tanh(x) of its input; a GRU whose W_ih
feeds x to the update gate z only, with W_hh zero and h_prev = 1, outputs
(1 - z) * tanh(0) + z * 1 = sigmoid(x). Every value is a row of a single step, so that no
value depends on another. 64 units: whole vectors; 51 units: a partial last vector as well.
A bfloat16 call of at least 96 rows packs its weights and runs on the bfloat16 products where
the CPU has them (elsewhere it takes float32's activations, which pass the same tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import assert_close

import rnn_fused

DTYPES = [torch.float32, torch.float64]
# The rows of a bfloat16 call that packs its weights (csrc/cpu/engine.h, small_problem).
BF16_PACKED_ROWS = 96


def kernel(x: torch.Tensor, activation: str, units: int) -> torch.Tensor:
    rows = -(-x.numel() // units)
    if x.dtype == torch.bfloat16:
        rows = max(rows, BF16_PACKED_ROWS)
    padded = torch.cat([x, x.new_ones(rows * units - x.numel())]).reshape(1, rows, units)
    eye, zero = torch.eye(units, dtype=x.dtype), torch.zeros(units, units, dtype=x.dtype)
    with torch.no_grad():
        if activation == "tanh":
            layer = rnn_fused.RNN(units, units, bias=False).to(x.dtype)
            layer.weight_ih_l0.copy_(eye)
            layer.weight_hh_l0.zero_()
            y = layer(padded)[0]
        else:
            layer = rnn_fused.GRU(units, units, bias=False).to(x.dtype)
            layer.weight_ih_l0.copy_(torch.cat([zero, eye, zero]))
            layer.weight_hh_l0.zero_()
            y = layer(padded, torch.ones(1, rows, units, dtype=x.dtype))[0]
    return y.reshape(-1)[: x.numel()]


def exact(x: torch.Tensor, activation: str) -> np.ndarray:
    xl = x.numpy().astype(np.longdouble)
    return np.tanh(xl) if activation == "tanh" else 1 / (1 + np.exp(-xl))


def sweep(dtype: torch.dtype) -> torch.Tensor:
    smallest = -300 if dtype == torch.float64 else -30
    magnitudes = torch.logspace(smallest, 2.9, 20001, dtype=torch.float64)
    edges = torch.tensor([0.0, 0.625, -0.625, 9.0, -9.0, 88.0, -100.0, -700.0, -750.0])
    x = torch.linspace(-40, 40, 200003, dtype=torch.float64)
    return torch.cat([x, magnitudes, -magnitudes, edges.double()]).to(dtype)


@pytest.mark.parametrize("units", [64, 51])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, max_ulp", [("tanh", 2.0), ("sigmoid", 3.0)])
def test_activation_within_ulps(activation: str, max_ulp: float, dtype: torch.dtype, units: int):
    x = sweep(dtype)
    y = kernel(x, activation, units).numpy().astype(np.longdouble)
    want = exact(x, activation)
    err = np.abs(y - want)
    # Where the exact value is below the normal numbers, within the least normal one.
    tiny = np.finfo(x.numpy().dtype).tiny
    below = np.abs(want) < tiny
    if activation == "sigmoid":
        assert below.any()  # the sweep reaches sigmoid(x) below the normal numbers
    assert (err[below] <= tiny).all()
    spacing = np.abs(np.spacing(want.astype(x.numpy().dtype))).astype(np.longdouble)
    ulps = np.where(below, 0, err / spacing)
    worst = int(ulps.argmax())
    assert ulps[worst] <= max_ulp, f"{float(ulps[worst]):.2f} ulp at x = {x[worst].item()!r}"


def bfloat16_spacing(v: np.ndarray) -> np.ndarray:
    """The distance between bfloat16 numbers at |v| (normal numbers; 8 significant bits)."""
    return np.exp2(np.floor(np.log2(np.abs(v))) - 7)


@pytest.mark.parametrize("units", [64, 51])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_bfloat16_activation_is_the_value_rounded(activation: str, units: int):
    """Within 4e-6 of the value (a thousandth of a bfloat16 ulp): every output is the exact
    value rounded to bfloat16, or its neighbour where the exact value lies that close to
    halfway between two; below the normal numbers, within the least normal one."""
    x = sweep(torch.float32).to(torch.bfloat16)
    y = kernel(x, activation, units).double().numpy()
    want = exact(x.float(), activation).astype(np.float64)
    tiny = float(np.finfo(np.float32).tiny)
    normal = np.abs(want) >= tiny
    assert (np.abs(y[~normal]) <= tiny).all()
    err, bound = np.abs(y - want)[normal], bfloat16_spacing(want[normal]) / 2
    worst = int((err / bound).argmax())
    assert err[worst] <= bound[worst] + 4e-6 * abs(want[normal][worst]), f"x = {x[normal][worst]}"
    rounded = torch.from_numpy(want).to(torch.bfloat16).double().numpy()
    assert (y == rounded).mean() > 0.999


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
def test_tanh_odd_exact_at_zero_and_saturated(dtype: torch.dtype):
    y = kernel(torch.tensor([0.0, 0.3, -0.3, 20.0, -20.0], dtype=dtype), "tanh", 51)
    assert y[0].item() == 0.0 and y[1].item() == -y[2].item()
    assert y[3].item() == 1.0 and y[4].item() == -1.0


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
def test_sigmoid_limits(dtype: torch.dtype):
    y = kernel(torch.tensor([0.0, 50.0, -800.0, 800.0], dtype=dtype), "sigmoid", 51)
    assert y.tolist() == [0.5, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
def test_activation_keeps_nan(activation: str, dtype: torch.dtype):
    # (A NaN spreads to every unit through the product with the identity: one NaN alone.)
    assert torch.isnan(kernel(torch.tensor([float("nan")], dtype=dtype), activation, 51)).all()


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
@pytest.mark.parametrize("units", [5, 51])
def test_relu_keeps_nan_and_passes_its_gradient(dtype: torch.dtype, units: int):
    """torch.relu keeps a NaN, and its backward passes the gradient through a NaN unit (its
    test is `output <= 0`): a ReLU RNN with NaN among its inputs gives torch.nn's outputs
    and gradients, NaN where torch.nn's are."""
    torch.manual_seed(units)
    theirs = torch.nn.RNN(3, units, nonlinearity="relu", num_layers=2).to(dtype)
    ours = rnn_fused.RNN.from_torch(theirs)
    # One step, batch 128 (a bfloat16 call of that many rows takes its packed products).
    x = torch.randn(1, 128, 3, dtype=dtype)
    x[0, ::7, 0] = float("nan")
    grads = []
    for module in (theirs, ours):
        module.zero_grad()
        xs = x.clone().requires_grad_()
        out = module(xs)[0]
        out.backward(torch.ones_like(out))
        grads.append((out, xs.grad, *(p.grad for p in module.parameters())))
    for want, got in zip(*grads, strict=True):
        if dtype == torch.bfloat16:  # sums in another order: the same NaN (the accuracy
            assert torch.equal(got.isnan(), want.isnan())  # is test_half_types.py's)
        else:
            torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
@pytest.mark.parametrize("units", [5, 51])
def test_relu_unit_that_is_off_stops_an_infinite_gradient(dtype: torch.dtype, units: int):
    """torch's relu backward chooses the gradient (0 where the output is <= 0) rather than
    multiplying it by the derivative: an infinite gradient reaching a unit that is off gives
    0, not 0 * inf = NaN. A ReLU RNN and RNNCell given inf exactly at their units that are
    off: torch.nn's finite gradients (NaN before)."""
    torch.manual_seed(units + 1)
    layer = torch.nn.RNN(3, units, nonlinearity="relu").to(dtype)
    cell = torch.nn.RNNCell(3, units, nonlinearity="relu").to(dtype)
    for theirs, ours, x in (
        (layer, rnn_fused.RNN.from_torch(layer), torch.randn(4, 128, 3, dtype=dtype)),
        (cell, rnn_fused.RNNCell.from_torch(cell), torch.randn(9, 3, dtype=dtype)),
    ):
        grads = []
        for module in (theirs, ours):
            module.zero_grad()
            xs = x.clone().requires_grad_()
            out = module(xs)
            out = out[0] if isinstance(out, tuple) else out
            upstream = torch.where(out <= 0, float("inf"), torch.ones_like(out))
            out.backward(upstream)
            grads.append((xs.grad, *(p.grad for p in module.parameters())))
        for want, got in zip(*grads, strict=True):
            assert torch.isfinite(want).all() and torch.isfinite(got).all()
            if dtype != torch.bfloat16:  # (bfloat16's accuracy is test_half_types.py's)
                assert_close(got, want, "gradient")

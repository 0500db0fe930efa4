"""The CPU kernels' float32 tanh (its own polynomial and exp form, not Sleef's) against float64.

A tanh RNN whose W_ih is the identity and whose W_hh is zero outputs tanh(x) of its input
exactly as the kernels compute it: the product with the identity is exact.
"""

from __future__ import annotations

import numpy as np
import torch

import rnn_fused


def kernel_tanh(x: torch.Tensor, units: int = 64) -> torch.Tensor:
    steps = -(-x.numel() // units)
    padded = torch.cat([x, x.new_ones(steps * units - x.numel())])
    layer = rnn_fused.RNN(units, units, bias=False)
    with torch.no_grad():
        layer.weight_ih_l0.copy_(torch.eye(units))
        layer.weight_hh_l0.zero_()
        return layer(padded.reshape(steps, 1, units))[0].reshape(-1)[: x.numel()]


def ulps(y: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    spacing = np.spacing(exact.abs().float().numpy())
    return (y.double() - exact).abs() / torch.from_numpy(spacing).double()


def test_float32_tanh_within_two_ulp_of_float64() -> None:
    magnitudes = torch.logspace(-30, 1.2, 20001)
    x = torch.cat([torch.linspace(-12, 12, 200003), magnitudes, -magnitudes])
    x = torch.cat([x, torch.tensor([0.0, 0.625, -0.625, 9.0, -9.0, 88.0, -100.0])])
    err = ulps(kernel_tanh(x), torch.tanh(x.double()))
    assert err.max().item() <= 2.0, f"{err.max().item():.2f} ulp at x = {x[err.argmax()].item()}"
    # Odd, exact at 0, saturated to +-1 far out.
    y = kernel_tanh(torch.tensor([0.0, 0.3, -0.3, 20.0, -20.0]))
    assert y[0].item() == 0.0 and y[1].item() == -y[2].item()
    assert y[3].item() == 1.0 and y[4].item() == -1.0


def test_float32_tanh_keeps_nan() -> None:
    # (A NaN spreads to every unit through the product with the identity: one NaN alone.)
    assert torch.isnan(kernel_tanh(torch.tensor([float("nan")]))).all()

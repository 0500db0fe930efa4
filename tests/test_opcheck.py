"""torch.library.opcheck on both operators: schema, fake kernel, autograd registration and
AOT dispatch, for every cell, padded and packed, with and without optional inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed

import rnn_fused  # noqa: F401  (registers the operators)

CASES = [
    (mode, case)
    for mode in CELLS
    for case in ["padded", "packed", "no-optionals", "reverse", "proj"]
    if case != "proj" or mode == "LSTM"  # the projection exists for LSTM only
]


def _forward_args(mode: str, case: str) -> tuple:
    dt = torch.float64
    proj = 2 if case == "proj" else 0
    layer = make_layer(mode, 4, 5, bias=case != "no-optionals", proj=proj, dtype=dt)
    h0, c0 = make_states(layer, 3, dtype=dt)
    batch_sizes = None
    if case == "packed":
        batch_sizes = torch.tensor([3, 2, 2, 1])
        x = rand(8, 4, dtype=dt)
    else:
        x = rand(4, 3, 4, dtype=dt)
    if case == "no-optionals":
        h0, c0 = None, None
    return (
        mode,
        x,
        h0,
        c0,
        layer.w_ih,
        layer.w_hh,
        layer.b_ih,
        layer.b_hh,
        layer.w_hr,
        batch_sizes,
        case == "reverse",
        True,
    )


@pytest.mark.parametrize(("mode", "case"), CASES)
def test_opcheck_forward(mode, case):
    seed(mode, case)
    torch.library.opcheck(torch.ops.rnn_fused.forward.default, _forward_args(mode, case))


@pytest.mark.parametrize(("mode", "case"), CASES)
def test_opcheck_backward(mode, case):
    seed(mode, case)
    args = _forward_args(mode, case)
    with torch.no_grad():
        out, h_n, c_n, saved, h_prev = torch.ops.rnn_fused.forward(*args)
    mode, x, h0, _c0, w_ih, w_hh, _b_ih, _b_hh, w_hr, batch_sizes, reverse, _train = args
    grad_c_n = torch.randn_like(c_n) if mode == "LSTM" else None
    bwd_args = (
        mode,
        torch.randn_like(out),
        torch.randn_like(h_n),
        grad_c_n,
        x.detach(),
        h0,
        w_ih.detach(),
        w_hh.detach(),
        w_hr,
        batch_sizes,
        reverse,
        saved,
        h_prev,
    )
    bwd_args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in bwd_args)
    torch.library.opcheck(torch.ops.rnn_fused.backward.default, bwd_args)

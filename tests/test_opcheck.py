"""torch.library.opcheck on the operators: schema, fake kernel, autograd registration and
AOT dispatch, for every cell, padded, packed and one step ([B, I]; for `layer` unbatched [I]
too), with and without optional inputs. `layer` is the public one (autograd in C++);
`forward` and `backward` are the kernels under it."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed

import rnn_fused  # noqa: F401  (registers the operators)

CASES = [
    (mode, case)
    for mode in CELLS
    for case in [
        "padded",
        "packed",
        "one-step",
        "no-optionals",
        "reverse",
        "proj",
        "zoneout",
        "zoneout-packed",
        "zoneout-one-step",
    ]
    if case != "proj" or mode == "LSTM"  # the projection exists for LSTM only
]
# An unbatched cell's step (input [I], states [H]): layer's own, run below it as a batch of one.
LAYER_CASES = CASES + [(mode, "unbatched") for mode in CELLS]


def _forward_args(mode: str, case: str, dt: torch.dtype = torch.float64) -> tuple:
    """layer's arguments; zoneout cases add the trailing zoneout weights."""
    proj = 2 if case == "proj" else 0
    layer = make_layer(mode, 4, 5, bias=case != "no-optionals", proj=proj, dtype=dt)
    h0, c0 = make_states(layer, 3, dtype=dt)
    batch_sizes = None
    if "packed" in case:
        batch_sizes = torch.tensor([3, 2, 2, 1])
        x = rand(8, 4, dtype=dt)
    elif "one-step" in case:  # a cell's call: input [B, I]
        x = rand(3, 4, dtype=dt)
    elif case == "unbatched":  # input [I], states [H]
        x, h0 = rand(4, dtype=dt), h0[0].detach().requires_grad_()
        c0 = c0[0].detach().requires_grad_() if c0 is not None else None
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
    ) + ((torch.rand(*x.shape[:-1], 5, dtype=dt),) if "zoneout" in case else ())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("mode", "case"), LAYER_CASES)
def test_opcheck_layer(mode, case, dtype):
    seed(mode, case, dtype)
    torch.library.opcheck(torch.ops.rnn_fused.layer.default, _forward_args(mode, case, dtype))


@pytest.mark.parametrize(("mode", "case"), CASES)
@pytest.mark.parametrize("train", [True, False])
def test_opcheck_forward(mode, case, train):
    """forward is the kernel under layer's autograd: it is called on tensors below autograd."""
    seed(mode, case, train)
    args = tuple(_detached(a) for a in _forward_args(mode, case))
    # forward's train comes before the trailing zoneout.
    torch.library.opcheck(torch.ops.rnn_fused.forward.default, (*args[:11], train, *args[11:]))


def _detached(a):
    return a.detach() if isinstance(a, torch.Tensor) else a


def _backward_args(args: tuple, mask: tuple[bool, bool, bool]) -> tuple:
    """backward's arguments after forward on layer's arguments `args`, in training."""
    with torch.no_grad():
        out, h_n, c_n, saved, h_prev = torch.ops.rnn_fused.forward(*args[:11], True, *args[11:])
    mode, x, _h0, _c0, w_ih, w_hh, _b_ih, _b_hh, w_hr, batch_sizes, reverse = args[:11]
    grad_c_n = torch.randn_like(c_n) if mode == "LSTM" else None
    bwd_args = (
        mode,
        torch.randn_like(out),
        torch.randn_like(h_n),
        grad_c_n,
        x.detach(),
        w_ih.detach(),
        w_hh.detach(),
        w_hr,
        batch_sizes,
        reverse,
        saved,
        h_prev,
        h_n.shape[0],
        list(mask),
        *args[11:],
    )
    return tuple(_detached(a) for a in bwd_args)


@pytest.mark.parametrize(("mode", "case"), CASES)
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, True)])
def test_opcheck_backward(mode, case, mask):
    seed(mode, case, mask)
    torch.library.opcheck(
        torch.ops.rnn_fused.backward.default, _backward_args(_forward_args(mode, case), mask)
    )


@pytest.mark.parametrize(
    ("mode", "case"), [(m, c) for m, c in CASES if c in ("padded", "packed", "one-step", "proj")]
)
def test_opcheck_half_parameters(mode, case):
    """A float32 call with bfloat16 parameters (what LSTMCell and GRU run under CPU autocast):
    results in float32, the parameters' gradients in bfloat16, through all three operators."""
    seed(mode, case, "half parameters")
    args = tuple(
        a.detach().bfloat16().requires_grad_() if 4 <= i <= 8 and a is not None else a
        for i, a in enumerate(_forward_args(mode, case, torch.float32))
    )
    torch.library.opcheck(torch.ops.rnn_fused.layer.default, args)
    detached = tuple(_detached(a) for a in args)
    torch.library.opcheck(torch.ops.rnn_fused.forward.default, (*detached[:11], True))
    torch.library.opcheck(
        torch.ops.rnn_fused.backward.default, _backward_args(detached, (True, True, True))
    )

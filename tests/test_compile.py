"""torch.compile(fullgraph=True) keeps each operator as one node (no graph break) and gives
the eager outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed, weighted_sum
from tolerances import assert_close

from rnn_fused.ops import rnn_layer


def _run(fn, mode, x, layer, h0, c0, batch_sizes):
    return fn(
        mode,
        x,
        layer.w_ih,
        layer.w_hh,
        layer.b_ih,
        layer.b_hh,
        h0,
        c0,
        batch_sizes=batch_sizes,
        reverse=True,
    )


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", CELLS)
def test_compile_fullgraph_matches_eager(mode, packed):
    seed(mode, packed)
    torch._dynamo.reset()
    dt = torch.float32
    layer = make_layer(mode, 5, 7, dtype=dt)
    h0, c0 = make_states(layer, 3, dtype=dt)
    batch_sizes = torch.tensor([3, 3, 2, 1]) if packed else None
    x = rand(9, 5, dtype=dt) if packed else rand(4, 3, 5, dtype=dt)
    inputs = [x, *layer.tensors(), h0, *([c0] if c0 is not None else [])]

    eager = _run(rnn_layer, mode, x, layer, h0, c0, batch_sizes)
    weights = [torch.randn_like(o) for o in eager if o is not None]
    g_eager = torch.autograd.grad(weighted_sum(eager, weights), inputs)

    compiled_fn = torch.compile(rnn_layer, fullgraph=True, dynamic=False)
    compiled = _run(compiled_fn, mode, x, layer, h0, c0, batch_sizes)
    g_compiled = torch.autograd.grad(weighted_sum(compiled, weights), inputs)

    for a, b in zip(compiled, eager, strict=True):
        if b is not None:
            assert_close(a, b, "output")
    for i, (a, b) in enumerate(zip(g_compiled, g_eager, strict=True)):
        assert_close(a, b, f"grad {i}")

"""Values and every gradient against reference.py and against torch.nn with the same
weights, in float64 and float32."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed, weighted_sum
from tolerances import assert_close
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnn_fused
from rnn_fused import reference
from rnn_fused.ops import rnn_layer

DTYPES = [torch.float64, torch.float32]


def _outputs_and_grads(fn, x, layer, h0, c0, weights, **kw):
    out = fn(
        layer.mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0, w_hr=layer.w_hr, **kw
    )
    inputs = [x, *layer.tensors(), *(t for t in (h0, c0) if t is not None)]
    grads = torch.autograd.grad(weighted_sum(out, weights), inputs)
    return [o for o in out if o is not None], grads


def _input(case: dict, dtype) -> tuple[torch.Tensor, dict]:
    """A case's input, [T, B, I] or packed rows with their batch_sizes, and the direction."""
    T, B, I = case["T"], case["B"], case["I"]
    kw = dict(reverse=case.get("reverse", False))
    if "packed" not in case:
        return rand(T, B, I, dtype=dtype), kw
    lengths = torch.tensor(case["packed"])
    kw["batch_sizes"] = torch.tensor([(lengths > t).sum().item() for t in range(T)])
    return rand(int(lengths.sum()), I, dtype=dtype), kw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case",
    [
        dict(T=7, B=3, I=5, H=33),
        dict(T=7, B=3, I=5, H=33, reverse=True),
        dict(T=4, B=2, I=3, H=17, bias=False, h0=False),
        dict(T=6, B=5, I=4, H=9, packed=[6, 4, 4, 2, 1]),
        dict(T=6, B=4, I=4, H=9, packed=[6, 5, 3, 1], reverse=True),
        # Above 32 rows the CPU engine packs its weights (below, it does not).
        dict(T=11, B=5, I=6, H=70),
        dict(T=9, B=7, I=5, H=33, packed=[9, 8, 8, 6, 5, 3, 1], reverse=True),
        # Wide enough for the large-problem weight gradients in float32 (packed panels or
        # blocked BLAS, by CPU kind: test_both_weight_gradient_paths runs both).
        dict(T=5, B=7, I=389, H=390),
        dict(T=5, B=7, I=13, H=391, proj=17),  # LSTM's dL/dr too; the others: H alone
        # Steps of one row against the weights as stored (dot products of 16 float32 rows or
        # 8 float64 ones, over the threads), widths and sums off their vector sizes.
        dict(T=3, B=1, I=13, H=67),
        dict(T=1, B=1, I=300, H=131),
    ],
    ids=[
        "H33",
        "H33-rev",
        "nobias-noh0",
        "packed",
        "packed-rev",
        "large",
        "large-packed-rev",
        "wide",
        "wide-proj",
        "batch1",
        "batch1-wide",
    ],
)
@pytest.mark.parametrize("mode", CELLS)
def test_matches_reference(mode, case, dtype):
    seed(mode, case, dtype)
    B, I, H = case["B"], case["I"], case["H"]
    # Weights ~ 1/sqrt(H): gradients neither vanish nor explode over the steps, so that
    # float32 rounding is not amplified past the tolerance.
    proj = case.get("proj", 0) if mode == "LSTM" else 0
    layer = make_layer(
        mode, I, H, bias=case.get("bias", True), proj=proj, dtype=dtype, scale=H**-0.5
    )
    h0, c0 = make_states(layer, B, dtype=dtype) if case.get("h0", True) else (None, None)
    x, kw = _input(case, dtype)
    out_ref = reference.rnn_layer(
        mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0, w_hr=layer.w_hr, **kw
    )
    weights = [torch.randn_like(o) for o in out_ref if o is not None]
    ours, ours_g = _outputs_and_grads(rnn_layer, x, layer, h0, c0, weights, **kw)
    ref, ref_g = _outputs_and_grads(reference.rnn_layer, x, layer, h0, c0, weights, **kw)
    names = ["output", "h_n", "c_n"]
    for name, a, b in zip(names, ours, ref):
        assert_close(a, b, name)
    for i, (a, b) in enumerate(zip(ours_g, ref_g)):
        assert_close(a, b, f"grad {i}")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("hidden", [65, 72, 81, 97, 112, 121, 127])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_small_batch_every_panel_width(mode, dtype, hidden, batch):
    """Steps of 1 to 4 rows on packed weights (more than 32 rows in all) whose gates end in
    a panel of every width class: 1 to 63 columns, on each number of SIMD vectors of float32
    (16 lanes) and float64 (8), forward and backward."""
    test_matches_reference(mode, dict(T=40, B=batch, I=5, H=hidden), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_rows_of_few_units(mode, dtype):
    """Rows of at most half a vector's units (8 in float32, 4 in float64) run their cell math
    gathered into one long row (csrc/cpu/pointwise.h, forward_rows_staged): with and without
    biases, packed and reversed, projected, and steps of 600 rows taken in several blocks."""
    for case in [
        dict(T=9, B=37, I=3, H=3),
        dict(T=6, B=6, I=4, H=4, packed=[6, 5, 4, 4, 2, 1], reverse=True),
        dict(T=5, B=19, I=4, H=1, bias=False, h0=False),
        dict(T=2, B=600, I=5, H=4),
        dict(T=1, B=300, I=5, H=7),
        dict(T=5, B=9, I=4, H=8, proj=3),
    ]:
        test_matches_reference(mode, case, dtype)


@pytest.mark.parametrize("path", ["blas", "packed"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_both_weight_gradient_paths(mode, path, monkeypatch):
    """The CPU backward's two ways to float32 weight gradients (each CPU kind has its
    default: see blas_weight_grads) both match the reference, wide and with a projection."""
    monkeypatch.setenv("RNN_FUSED_CPU_WEIGHT_GRADS", path)
    test_matches_reference(mode, dict(T=5, B=7, I=389, H=390), torch.float32)
    test_matches_reference(mode, dict(T=5, B=7, I=13, H=391, proj=17), torch.float32)


@pytest.mark.parametrize("streamed", ["0", "1"], ids=["brgemm", "streamed"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_both_float32_step_kernels(mode, streamed, monkeypatch):
    """Float32 products on packed panels of more than 2 MiB (the steps' W_hh; W_ih in the
    input projection and dX): ATen's brgemm or the streamed kernel (gemm.cpp, streamed_panel;
    by default on Intel CPUs) both match the reference, with full and partial panels and
    blocks of 6 rows and remainders of 3 and 5."""
    monkeypatch.setenv("RNN_FUSED_STREAMED_PANELS", streamed)
    test_matches_reference(mode, dict(T=5, B=11, I=7, H=420), torch.float32)
    test_matches_reference(mode, dict(T=4, B=9, I=448, H=448, reverse=True), torch.float32)


@pytest.mark.parametrize("kernel", ["0", "1"], ids=["blas", "tiles"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_both_tile_kernel_settings(mode, dtype, kernel):
    """Products that go to BLAS, by MKL or by our tile kernel (csrc/cpu/tile_gemm.cpp; by
    default on AMD CPUs), both match the reference: a cell's step at batch 97 with an input of
    one column (products of one column stay with MKL), one at batch 49, and layers of packed
    weights (float64's steps on the kernel too, in tiles of 6 rows and rows left over)."""
    rnn_fused._C.cpu_force_tile_kernel(int(kernel))
    try:
        test_matches_reference(mode, dict(T=1, B=97, I=1, H=51), dtype)
        test_matches_reference(mode, dict(T=1, B=49, I=33, H=45), dtype)
        test_matches_reference(mode, dict(T=11, B=5, I=6, H=70), dtype)
        test_matches_reference(mode, dict(T=9, B=13, I=7, H=70, reverse=True), dtype)
    finally:
        rnn_fused._C.cpu_force_tile_kernel(-1)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_initial_state_in_place_gives_the_copys_bits(mode, dtype, grad):
    """A forward whose first step all rows take reads a contiguous h_0 where it is
    (forward_cpu.cpp, forward_native); an h_0 of the same values laid out column by column
    is copied first. Both give the same bits, outputs and gradients, and h_0 is left as it
    was: a step at batch 97, seven steps, and packed input read forward (in place) and in
    reverse (copied either way)."""
    cases = [
        dict(T=1, B=97, I=5, H=33),
        dict(T=7, B=3, I=5, H=33),
        dict(T=6, B=5, I=4, H=9, packed=[6, 4, 4, 2, 1]),
        dict(T=6, B=5, I=4, H=9, packed=[6, 4, 4, 2, 1], reverse=True),
    ]
    for case in cases:
        seed(mode, dtype, grad, case)
        B, I, H = case["B"], case["I"], case["H"]
        layer = make_layer(mode, I, H, dtype=dtype, scale=H**-0.5)
        h0, c0 = make_states(layer, B, dtype=dtype)
        x, kw = _input(case, dtype)
        before = h0.detach().clone()
        columns = h0.detach().t().contiguous().t().requires_grad_()
        assert not columns.is_contiguous() and torch.equal(columns, h0)
        weights = (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)
        results = []
        for h in (h0, columns):
            with torch.set_grad_enabled(grad):
                out = rnn_layer(mode, x, *weights, h, c0, **kw)
            outs = [o for o in out if o is not None]
            grads = []
            if grad:
                inputs = [x, *layer.tensors(), h, *(t for t in (c0,) if t is not None)]
                grads = torch.autograd.grad(sum(o.sum() for o in outs), inputs)
            results.append((outs, grads))
        assert torch.equal(h0, before)
        (a_outs, a_grads), (b_outs, b_grads) = results
        for i, (a, b) in enumerate([*zip(a_outs, b_outs), *zip(a_grads, b_grads)]):
            assert torch.equal(a, b), f"{case}: result {i} differs by {(a - b).abs().max()}"


def _torch_module(mode: str, I: int, H: int, bias: bool, proj: int, dtype) -> nn.Module:
    kw = dict(bias=bias, bidirectional=True, dtype=dtype)
    if mode == "LSTM":
        return nn.LSTM(I, H, proj_size=proj, **kw)
    if mode == "GRU":
        return nn.GRU(I, H, **kw)
    return nn.RNN(I, H, nonlinearity=mode[4:].lower(), **kw)


def _ours_bidirectional(mode, module, x, h0, c0, batch_sizes=None):
    outs, hs, cs = [], [], []
    for d, suffix in enumerate(["", "_reverse"]):
        p = {
            n: getattr(module, f"{n}_l0{suffix}", None)
            for n in ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"]
        }
        out, h, c = rnn_layer(
            mode,
            x,
            p["weight_ih"],
            p["weight_hh"],
            p["bias_ih"],
            p["bias_hh"],
            h0[d],
            None if c0 is None else c0[d],
            w_hr=p["weight_hr"],
            batch_sizes=batch_sizes,
            reverse=d == 1,
        )
        outs.append(out)
        hs.append(h)
        cs.append(c)
    result = [torch.cat(outs, -1), torch.stack(hs)]
    return result + ([torch.stack(cs)] if c0 is not None else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", [*CELLS, "LSTM-proj"])
def test_matches_torch_nn(mode, bias, packed, dtype):
    seed(mode, bias, packed, dtype)
    proj = 4 if mode == "LSTM-proj" else 0
    mode = mode.removesuffix("-proj")
    T, B, I, H = 7, 3, 5, 11
    module = _torch_module(mode, I, H, bias, proj, dtype)
    out_size = proj or H
    x = rand(T, B, I, dtype=dtype)
    h0 = rand(2, B, out_size, dtype=dtype)
    c0 = rand(2, B, H, dtype=dtype) if mode == "LSTM" else None
    hx = (h0, c0) if c0 is not None else h0
    if packed:
        lengths = torch.tensor([7, 5, 2])
        seq = pack_padded_sequence(x, lengths)
        expected = module(seq, hx)
        exp = [expected[0].data, *(expected[1] if c0 is not None else (expected[1],))]
        ours = _ours_bidirectional(mode, module, seq.data, h0, c0, seq.batch_sizes)
    else:
        expected = module(x, hx)
        exp = [expected[0], *(expected[1] if c0 is not None else (expected[1],))]
        ours = _ours_bidirectional(mode, module, x, h0, c0)
    for name, a, b in zip(["output", "h_n", "c_n"], ours, exp):
        assert_close(a, b, name)
    weights = [torch.randn_like(e) for e in exp]
    inputs = [x, h0, *([c0] if c0 is not None else []), *module.parameters()]
    # retain_graph: with packed input both sides share the packing's graph.
    g_ours = torch.autograd.grad(weighted_sum(tuple(ours), weights), inputs, retain_graph=True)
    g_exp = torch.autograd.grad(weighted_sum(tuple(exp), weights), inputs)
    for i, (a, b) in enumerate(zip(g_ours, g_exp)):
        assert_close(a, b, f"grad {i}")

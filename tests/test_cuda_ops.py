"""The CUDA operators: every cell, dtype, bias, h0, direction, packed and projection
against reference.py in float64; gradcheck on CUDA; CPU and CUDA agree; every output
element written; bitwise reproducible; non-default streams and CUDA graph capture. These
run wherever a GPU is present."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, Layer, make_layer, make_states, rand, seed, weighted_sum
from tolerances import GRADCHECK, HALF_SLACK, assert_close, rel_err

from rnn_fused import reference
from rnn_fused.ops import rnn_layer

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rnn_fused::forward", "CUDA"
)
pytestmark = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and rnn_fused's CUDA kernels"
)

DEV = "cuda"


@pytest.fixture(params=["fused", "standard", "persistent", "persistent-grid"])
def path(request, monkeypatch):
    """Each CUDA path: fused step kernels, cuBLAS plus pointwise kernels, and the persistent
    kernels as a cluster and as a cooperative grid (under graph capture: the fused launches
    they fall back to)."""
    monkeypatch.setenv("RNN_FUSED_CUDA_PATH", request.param)
    return request.param


def _case(mode, dtype, *, bias=True, with_h0=True, reverse=False, packed=False, proj=0):
    # Weights small enough that relu runs stay far from float16's range in 7 steps.
    layer = make_layer(mode, 5, 33, bias=bias, proj=proj, dtype=dtype, device=DEV, scale=0.25)
    h0, c0 = make_states(layer, 3, dtype=dtype, device=DEV) if with_h0 or packed else (None, None)
    kw = dict(reverse=reverse, w_hr=layer.w_hr)
    if packed:
        kw["batch_sizes"] = torch.tensor([3, 3, 2, 2, 1, 1, 1])
        x = rand(13, 5, dtype=dtype, device=DEV)
    else:
        x = rand(7, 3, 5, dtype=dtype, device=DEV)
    return layer, x, h0, c0, kw


def _run(fn, layer, x, h0, c0, kw, weights=None):
    """Outputs (detached: a graph kept alive keeps its leaves' AccumulateGrad nodes on the
    stream they were made on, which a later CUDA graph capture of a backward cannot wait
    for), the gradients of a weighted sum of them, and the weights."""
    out = fn(layer.mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0, **kw)
    leaves = [x, *layer.tensors(), *(t for t in (h0, c0) if t is not None)]
    weights = weights or [torch.randn_like(o) for o in out if o is not None]
    return (
        [o.detach() for o in out if o is not None],
        torch.autograd.grad(weighted_sum(out, weights), leaves),
        weights,
    )


def _to64(layer, x, h0, c0, kw):
    def conv(t):
        return None if t is None else t.detach().double().requires_grad_()

    l64 = Layer(
        layer.mode,
        *(conv(t) for t in (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)),
        conv(layer.w_hr),
    )
    kw64 = dict(kw, w_hr=l64.w_hr)
    return l64, conv(x), conv(h0), conv(c0), kw64


FEATURES = ["plain", "nobias", "noh0", "reverse", "packed", "packed-reverse", "proj"]
CASES = [(m, f) for m in CELLS for f in FEATURES if f != "proj" or m == "LSTM"]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize(("mode", "feature"), CASES)
def test_cuda_matches_float64_reference(mode, feature, dtype, path):
    seed(mode, feature, dtype)
    case = _case(
        mode,
        dtype,
        bias=feature != "nobias",
        with_h0=feature != "noh0",
        reverse="reverse" in feature,
        packed="packed" in feature,
        proj=2 if feature == "proj" else 0,
    )
    out, grads, weights = _run(rnn_layer, *case)
    # Inference keeps no workspace and reads its state from other buffers: checked too.
    layer, x, h0, c0, kw = case
    with torch.no_grad():
        out_ng = rnn_layer(mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0, **kw)
    out_ng = [o for o in out_ng if o is not None]
    case64 = _to64(*case)
    w64 = [w.double() for w in weights]
    ref, ref_grads, _ = _run(reference.rnn_layer, *case64, weights=w64)
    if dtype in (torch.float32, torch.float64):
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip([*out, *grads, *out_ng], [*ref, *ref_grads, *ref]):
            assert rel_err(a, b) < tol
        return
    # Half types: no worse than twice the error of the reference run in the same dtype.
    same, same_grads, _ = _run(reference.rnn_layer, *case, weights=weights)
    for a, s, b in zip(
        [*out, *grads, *out_ng], [*same, *same_grads, *same], [*ref, *ref_grads, *ref]
    ):
        assert rel_err(a, b) <= 2 * rel_err(s, b) + HALF_SLACK


# float32 relu is left out here: among the ~10^5 pre-activations of a case, one within float32
# rounding of zero flips relu's derivative against the float64 reference (float64 covers it).
TILE_CASES = [(m, d) for m in CELLS for d in (torch.float64, torch.float32)]
TILE_CASES.remove(("RNN_RELU", torch.float32))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("mode", "dtype"), TILE_CASES, ids=str)
def test_cuda_tile_edges(mode, dtype, packed, path):
    """Sizes past the fused kernels' blocks (32 and 8 rows, 8 and 32 units, a staged chunk
    of K) in both directions, against reference.py in float64."""
    seed("tile-edges", mode, packed, dtype)
    layer = make_layer(mode, 20, 130, dtype=dtype, device=DEV, scale=0.1)
    h0, c0 = make_states(layer, 37, dtype=dtype, device=DEV)
    for reverse in (False, True):
        kw = dict(reverse=reverse, w_hr=None)
        if packed:
            sizes = [37, 37, 33, 20, 9, 1]
            kw["batch_sizes"] = torch.tensor(sizes)
            x = rand(sum(sizes), 20, dtype=dtype, device=DEV)
        else:
            x = rand(5, 37, 20, dtype=dtype, device=DEV)
        case = (layer, x, h0, c0, kw)
        out, grads, weights = _run(rnn_layer, *case)
        ref, ref_grads, _ = _run(
            reference.rnn_layer, *_to64(*case), weights=[w.double() for w in weights]
        )
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        for a, b in zip([*out, *grads], [*ref, *ref_grads]):
            assert rel_err(a, b) < tol


@pytest.mark.parametrize("mode", CELLS)
def test_cuda_gradcheck(mode, path):
    seed("gradcheck", mode)
    layer, x, h0, c0, kw = _case(mode, torch.float64, packed=True, reverse=True)

    def fn(x, *params):
        return tuple(o for o in rnn_layer(mode, x, *params[:4], *params[4:], **kw) if o is not None)

    inputs = [
        x,
        layer.w_ih,
        layer.w_hh,
        layer.b_ih,
        layer.b_hh,
        h0,
        *([c0] if c0 is not None else []),
    ]
    # fast_mode: random projections instead of one forward pair per input element (about
    # 10^4 of them here, each a dozen launches); the full check runs on the CPU engine.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True, **GRADCHECK)


@pytest.mark.parametrize("mode", CELLS)
def test_cpu_and_cuda_agree(mode, path):
    seed("cpu-cuda", mode)
    case = _case(mode, torch.float64, packed=True)
    out, grads, weights = _run(rnn_layer, *case)
    layer, x, h0, c0, kw = case

    def cpu(t):
        return None if t is None else t.detach().cpu().requires_grad_()

    lc = Layer(mode, *(cpu(t) for t in (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)), None)
    out_c, grads_c, _ = _run(
        rnn_layer, lc, cpu(x), cpu(h0), cpu(c0), kw, weights=[w.cpu() for w in weights]
    )
    for a, b in zip([*out, *grads], [*out_c, *grads_c]):
        assert_close(a.cpu(), b)


@pytest.mark.parametrize("mode", CELLS)
def test_outputs_fully_written_and_reproducible(mode, path):
    seed("poison", mode)
    layer, x, h0, c0, kw = _case(mode, torch.float32)
    # NaN-filled blocks go back to the caching allocator's small pool (blocks up to 1 MiB),
    # where the outputs and gradients of this size are then carved from.
    torch.cuda.empty_cache()
    poison = [torch.full((1 << 18,), float("nan"), device=DEV) for _ in range(16)]
    del poison
    first, grads, weights = _run(rnn_layer, layer, x, h0, c0, kw)
    for t in [*first, *grads]:
        assert torch.isfinite(t).all()
    second, grads2, _ = _run(rnn_layer, layer, x, h0, c0, kw, weights=weights)
    for a, b in zip([*first, *grads], [*second, *grads2]):
        assert torch.equal(a, b), "two runs must agree bit for bit"


def test_non_default_stream_and_graph_capture(path):
    seed("graph")
    layer, x, h0, c0, kw = _case("LSTM", torch.float32)
    expected, expected_grads, weights = _run(rnn_layer, layer, x, h0, c0, kw)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, grads, _ = _run(rnn_layer, layer, x, h0, c0, kw, weights=weights)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip([*out, *grads], [*expected, *expected_grads]):
        assert torch.equal(a, b)

    static_x = x.detach().clone().requires_grad_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph asks
        _run(rnn_layer, layer, static_x, h0, c0, kw, weights=weights)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        g_out, g_grads, _ = _run(rnn_layer, layer, static_x, h0, c0, kw, weights=weights)
    new_x = rand(*x.shape, dtype=x.dtype, device=DEV)
    with torch.no_grad():
        static_x.copy_(new_x)
    graph.replay()
    ref_out, ref_grads, _ = _run(
        rnn_layer, layer, new_x.requires_grad_(), h0, c0, kw, weights=weights
    )
    for a, b in zip([*g_out, *g_grads], [*ref_out, *ref_grads]):
        assert_close(a, b)

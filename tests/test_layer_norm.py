"""LayerNorm LSTM and GRU (the operator's layer_norm argument, LayerNormLSTM, LayerNormGRU):
against reference.py's loop in float64 (values and every gradient, the gains' included;
padded, packed, reverse, small and packed-weight problems, with zoneout), gradcheck and
gradgradcheck, the exact zeros of a one-unit cell state's normalisation, the modules against a
loop over reference.py's cells, other dtypes, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_layer, make_states, rand, seed, weighted_sum
from tolerances import GRADCHECK, assert_as_accurate, assert_no_worse

import rnn_fused
from rnn_fused import reference
from rnn_fused.ops import GATES, rnn_layer

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rnn_fused::forward", "CUDA"
)
CUDA_ONLY = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and rnn_fused's CUDA kernels"
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_ONLY)]
MODES = ["LSTM", "GRU"]
SIZES = [(7, 3, 33), (6, 11, 70)]  # a small problem, and one with packed weights and threads


def _gains(mode: str, hidden: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The layer_norm argument: gains around 1 (and the cell bias around 0), never exact."""
    gates = 2 * GATES[mode] * hidden
    cell = 2 * hidden if mode == "LSTM" else 0
    g = 1 + 0.3 * torch.randn(gates + cell, dtype=torch.float64)
    if cell:
        g[-hidden:] = 0.2 * torch.randn(hidden, dtype=torch.float64)
    return g.to(dtype).requires_grad_()


def _packed_batch_sizes(steps: int, batch: int) -> torch.Tensor:
    """A packed sequence's batch sizes: random, non-increasing, the whole batch first."""
    sizes = torch.tensor(sorted(torch.randint(1, batch + 1, (steps,)).tolist(), reverse=True))
    sizes[0] = batch
    return sizes


@pytest.mark.parametrize("zoneout", [False, True], ids=["plain", "zoneout"])
@pytest.mark.parametrize("form", ["padded", "packed", "reverse", "packed-reverse"])
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_operator_matches_reference(mode, size, form, zoneout):
    seed("layer_norm", mode, size, form, zoneout)
    T, B, H = size
    layer = make_layer(mode, 5, H, dtype=torch.float64)
    h0, c0 = make_states(layer, B, dtype=torch.float64)
    gains = _gains(mode, H)
    batch_sizes = None
    if "packed" in form:
        batch_sizes = _packed_batch_sizes(T, B)
        x = rand(int(batch_sizes.sum()), 5, dtype=torch.float64)
    else:
        x = rand(T, B, 5, dtype=torch.float64)
    keep = torch.rand(*x.shape[:-1], H, dtype=torch.float64) if zoneout else None
    args = (mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0)
    kw = dict(batch_sizes=batch_sizes, reverse="reverse" in form, zoneout=keep, layer_norm=gains)
    ours, want = rnn_layer(*args, **kw), reference.rnn_layer(*args, **kw)
    leaves = [x, h0, *([c0] if c0 is not None else []), *layer.tensors(), gains]
    up = [torch.randn_like(o) for o in want if o is not None]
    g_ours = torch.autograd.grad(weighted_sum(ours, up), leaves)
    g_want = torch.autograd.grad(weighted_sum(want, up), leaves)
    for a, b in zip([*ours, *g_ours], [*want, *g_want], strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = rnn_layer(*args, batch_sizes=batch_sizes, reverse="reverse" in form, zoneout=keep)
    assert not torch.allclose(ours[0], plain[0]), "the normalisations changed the output"


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode):
    seed("layer_norm gradcheck", mode)
    layer = make_layer(mode, 3, 5, dtype=torch.float64)
    h0, c0 = make_states(layer, 2, dtype=torch.float64)
    x = rand(4, 2, 3, dtype=torch.float64)
    gains = _gains(mode, 5)

    def f(x, h0, gains, *weights):
        out = rnn_layer(mode, x, *weights, h0, c0, layer_norm=gains)
        return out[0], out[1]

    inputs = (x, h0, gains, *layer.tensors())
    assert torch.autograd.gradcheck(f, inputs, **GRADCHECK)
    assert torch.autograd.gradgradcheck(f, inputs, **GRADCHECK), "double backward"


@pytest.mark.parametrize("form", ["padded", "packed-reverse"])
@pytest.mark.parametrize("batch", [3, 40], ids=["small", "threads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_one_unit_cell_state_normalises_to_zero(device, dtype, batch, form):
    """A LayerNorm LSTM of one unit normalises its cell state over that unit: exactly 0 at
    every step, so the output does not depend on c (nor on the cell gain) and their
    gradients are exactly 0, the backward's recomputed c_t included."""
    seed("layer_norm one unit", dtype, batch, form)
    T = 9
    layer = make_layer("LSTM", 6, 1, dtype=dtype, device=device)
    h0, c0 = make_states(layer, batch, dtype=dtype, device=device)
    gains = _gains("LSTM", 1, dtype).detach().to(device).requires_grad_()
    batch_sizes = None
    if "packed" in form:
        batch_sizes = _packed_batch_sizes(T, batch)
        x = rand(int(batch_sizes.sum()), 6, dtype=dtype, device=device)
    else:
        x = rand(T, batch, 6, dtype=dtype, device=device)
    kw = dict(batch_sizes=batch_sizes, reverse="reverse" in form, layer_norm=gains)
    output, h_n, _ = rnn_layer("LSTM", x, *layer.tensors(), h0, c0, **kw)
    up = [torch.randn_like(output), torch.randn_like(h_n)]
    g_c0, g_gains = torch.autograd.grad(weighted_sum((output, h_n), up), [c0, gains])
    assert torch.equal(g_c0, torch.zeros_like(c0))
    assert g_gains[-2].item() == 0.0, "the cell-state gain's gradient"
    assert g_gains[-1].item() != 0.0, "the cell-state bias's gradient"


def _module_reference(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's layers and directions as reference.py's loops."""
    directions = 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(m, k + suffix) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            ln = torch.cat([getattr(m, k + suffix) for k, _ in m._layer_norm_shapes()])
            out, _, _ = reference.rnn_layer(m.mode, x, *w, reverse=d == 1, layer_norm=ln)
            outputs.append(out)
        x = torch.cat(outputs, dim=-1)
    return x


@pytest.mark.parametrize("name", ["LayerNormLSTM", "LayerNormGRU"])
def test_modules(name):
    seed("layer_norm module", name)
    m = getattr(rnn_fused, name)(3, 7, num_layers=2, bidirectional=True).double()
    for key, p in m.named_parameters():  # the initialisation: gains 1, cell bias 0
        if key.startswith("ln_"):
            assert torch.equal(p, torch.full_like(p, 0.0 if "bias" in key else 1.0)), key
    with torch.no_grad():  # move them off their start, so that the test sees them
        for key, p in m.named_parameters():
            if key.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    out, state = m(x)
    torch.testing.assert_close(out, _module_reference(m, x), rtol=1e-12, atol=1e-12)
    expected_names = {"ln_weight_ih_l1_reverse", "ln_weight_hh_l0"}
    if name == "LayerNormLSTM":
        assert state[1].shape == (4, 2, 7)
        expected_names |= {"ln_weight_cell_l0", "ln_bias_cell_l1_reverse"}
    assert expected_names <= set(dict(m.named_parameters()))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(TypeError, match=r"no torch\.nn counterpart"):
        m.to_torch()


@pytest.mark.parametrize("name", ["LayerNormLSTMCell", "LayerNormGRUCell"])
def test_cells(name):
    seed("layer_norm cell", name)
    cell = getattr(rnn_fused, name)(4, 5).double()
    with torch.no_grad():
        for key, p in cell.named_parameters():
            if key.startswith("ln_"):
                p.add_(0.3 * torch.randn_like(p))
    mode = name.removeprefix("LayerNorm").removesuffix("Cell")
    x, h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    c = torch.randn(3, 5, dtype=torch.float64)
    ours = cell(x, (h, c) if mode == "LSTM" else h)
    ln = torch.cat([getattr(cell, k) for k, _ in cell._layer_norm_shapes()])
    p = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    want_h, want_c = reference.cell_step(
        mode, x, h, c if mode == "LSTM" else None, *p, layer_norm=ln
    )
    got = ours if mode == "GRU" else ours[0]
    torch.testing.assert_close(got, want_h, rtol=1e-12, atol=1e-12)
    if mode == "LSTM":
        torch.testing.assert_close(ours[1], want_c, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(got.sum(), cell.ln_weight_hh)
    g_want = torch.autograd.grad(want_h.sum(), cell.ln_weight_hh)
    torch.testing.assert_close(g_ours[0], g_want[0], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"no torch\.nn counterpart"):
        getattr(rnn_fused, name).from_torch(torch.nn.LSTMCell(4, 5))


@pytest.mark.parametrize("batch, hidden", [(5, 40), (70, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_other_dtypes(mode, dtype, batch, hidden):
    """Against float64: float32 within its tolerance, bfloat16 no worse than twice
    reference.py's own error in bfloat16. At batch 70 and hidden 64 a bfloat16 step's
    threads take 35 rows each on AMX tiles where the CPU has them, which the plain cells'
    steps would run on our own AMX tile kernel (AmxGateTiles; the LayerNorm cells keep the
    step's buffer)."""
    seed("layer_norm dtypes", mode, dtype, batch)
    layer = make_layer(mode, 6, hidden, dtype=torch.float64, scale=0.3)
    x = rand(8, batch, 6, dtype=torch.float64)
    gains = _gains(mode, hidden)
    upstream = [
        torch.randn(8, batch, hidden, dtype=torch.float64),
        torch.randn(batch, hidden, dtype=torch.float64),
    ]

    def run(fn, to):
        leaves = [t.detach().to(to).requires_grad_() for t in (x, gains, *layer.tensors())]
        out = fn(mode, leaves[0], *leaves[2:], layer_norm=leaves[1])
        up = [w.to(to) for w in upstream]
        return [*out[:2], *torch.autograd.grad(weighted_sum(out[:2], up), leaves)]

    exact = run(reference.rnn_layer, torch.float64)
    assert_as_accurate(run(rnn_layer, dtype), exact, lambda: run(reference.rnn_layer, dtype), dtype)


def test_errors_name_the_argument():
    layer = make_layer("GRU", 3, 4, dtype=torch.float64)
    x = rand(5, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"layer_norm must have shape \[24\], got \[20\]"):
        rnn_layer("GRU", x, *layer.tensors(), layer_norm=torch.ones(20, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="layer_norm must have the dtype of input"):
        rnn_layer("GRU", x, *layer.tensors(), layer_norm=torch.ones(24))
    rnn = make_layer("RNN_TANH", 3, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="layer_norm is for modes LSTM and GRU, got mode RNN"):
        rnn_layer("RNN_TANH", x, *rnn.tensors(), layer_norm=torch.ones(8, dtype=torch.float64))


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", ["LayerNormLSTM", "LayerNormGRU"])
def test_cuda_matches_cpu(name, dtype):
    """The CUDA engine's LayerNorm steps against the CPU engine's, values and gradients, each
    held to tolerances.assert_no_worse against the CPU engine in float64."""
    seed("layer_norm cuda", name, dtype)
    cpu = getattr(rnn_fused, name)(5, 33, num_layers=2, bidirectional=True).to(dtype)
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.1 * torch.randn_like(p))  # gains away from 1, cell biases from 0
    gpu = copy.deepcopy(cpu).cuda()
    exact = copy.deepcopy(cpu).double()
    x = rand(7, 3, 5, dtype=dtype)
    up = torch.randn(7, 3, 2 * 33, dtype=dtype)

    def values(module, device, dtype):
        xs = x.detach().to(device=device, dtype=dtype, copy=True).requires_grad_()
        out = module(xs)[0]
        out.backward(up.to(device=device, dtype=dtype))
        return [t.detach().cpu() for t in [out, xs.grad, *(p.grad for p in module.parameters())]]

    names = ["output", "input grad", *(n for n, _ in cpu.named_parameters())]
    ours, theirs = values(gpu, "cuda", dtype), values(cpu, "cpu", dtype)
    assert_no_worse(ours, theirs, values(exact, "cpu", torch.float64), names)

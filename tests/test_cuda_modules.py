"""CUDA variants of the module contract; they run where a GPU and the CUDA kernels exist."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close, rel_err
from torch import nn

import rnn_fused

HAS_CUDA_KERNELS = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "rnn_fused::forward", "CUDA"
)
pytestmark = pytest.mark.skipif(
    not HAS_CUDA_KERNELS, reason="needs a CUDA device and rnn_fused's CUDA kernels"
)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_cuda_module_matches_torch_nn(cls):
    theirs = cls(3, 5, num_layers=2, bidirectional=True).cuda().double()
    ours = rnn_fused.replace_rnns(cls(3, 5, num_layers=2, bidirectional=True)).cuda().double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 2, 3, device="cuda", dtype=torch.float64)
    out_o, out_t = ours(x), theirs(x)
    flat_o = [out_o[0], *(out_o[1] if isinstance(out_o[1], tuple) else (out_o[1],))]
    flat_t = [out_t[0], *(out_t[1] if isinstance(out_t[1], tuple) else (out_t[1],))]
    for a, b in zip(flat_o, flat_t):
        assert_close(a, b, "output or state")
    g_o = torch.autograd.grad(sum(t.sum() for t in flat_o), list(ours.parameters()))
    g_t = torch.autograd.grad(sum(t.sum() for t in flat_t), list(theirs.parameters()))
    for a, b in zip(g_o, g_t):
        assert_close(a, b, "grad")


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_autocast_runs_in_autocast_dtype(cls):
    ours = rnn_fused.replace_rnns(cls(3, 5)).cuda()
    theirs = cls(3, 5).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 3, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        assert ours(x)[0].dtype == theirs(x)[0].dtype == torch.float16


def _outputs_and_grads(module: nn.Module, x: torch.Tensor, hx, weights: list[torch.Tensor]):
    """Output, final states, and the gradients of input, initial states and parameters."""
    xi = x.clone().requires_grad_()
    states = [s.clone().requires_grad_() for s in hx]
    out, h_n = module(xi, tuple(states) if len(states) > 1 else states[0])
    outs = [out, *(h_n if isinstance(h_n, tuple) else (h_n,))]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    return outs + list(torch.autograd.grad(loss, [xi, *states, *module.parameters()]))


HALF_CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=4, bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("RNN_TANH", dict(num_layers=2, bidirectional=True)),
    ("RNN_RELU", dict(bias=False)),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cell", "kw"), HALF_CONFIGS, ids=[c for c, _ in HALF_CONFIGS])
def test_cuda_half_types_no_worse_than_twice_torch_nn(cell, kw, dtype):
    """Outputs, states and all gradients against torch.nn in float64 with the same (rounded)
    weights: our error is at most twice torch.nn's own error in the same dtype."""
    torch.manual_seed(7)
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(cell, nn.RNN)
    if cell.startswith("RNN"):
        kw = dict(kw, nonlinearity=cell[4:].lower())
    theirs = cls(5, 33, **kw).cuda().to(dtype)
    ours = rnn_fused.replace_rnns(cls(5, 33, **kw)).cuda().to(dtype)
    ours.load_state_dict(theirs.state_dict())
    exact = cls(5, 33, **kw).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in theirs.state_dict().items()})

    D = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    out_size = kw.get("proj_size") or 33
    shape = (3, 7, 5) if kw.get("batch_first") else (7, 3, 5)
    x = torch.randn(*shape, device="cuda").to(dtype)
    hx = [torch.randn(D, 3, out_size, device="cuda").to(dtype)]
    if cell == "LSTM":
        hx.append(torch.randn(D, 3, 33, device="cuda").to(dtype))
    x64, hx64 = x.double().cpu(), [h.double().cpu() for h in hx]
    with torch.no_grad():
        out64, h_n64 = exact(x64, tuple(hx64) if len(hx64) > 1 else hx64[0])
    weights = [torch.randn_like(o) for o in (out64, *(h_n64 if cell == "LSTM" else (h_n64,)))]

    ref = _outputs_and_grads(exact, x64, hx64, weights)
    cuda_w = [w.cuda() for w in weights]
    got = _outputs_and_grads(ours, x, hx, cuda_w)
    base = _outputs_and_grads(theirs, x, hx, cuda_w)
    for i, (a, b, r) in enumerate(zip(got, base, ref)):
        ours_err, theirs_err = rel_err(a.cpu(), r), rel_err(b.cpu(), r)
        assert ours_err <= 2 * theirs_err + 1e-4, f"tensor {i}: {ours_err:.2e} vs {theirs_err:.2e}"

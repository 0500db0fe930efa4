"""Half-type accuracy cases shared by the CPU and CUDA tests. The rule (as flash-attention
states it): against a float64 reference, our error in float16 or bfloat16 is at most twice
torch.nn's own error in the same dtype, for outputs and every gradient."""

from __future__ import annotations

import torch
from tolerances import rel_err
from torch import Tensor, nn

import rnn_fused

HALF_CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(proj_size=4, bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("RNN_TANH", dict(num_layers=2, bidirectional=True)),
    ("RNN_RELU", dict(bias=False)),
]
HALF_TYPES = [torch.float16, torch.bfloat16]


def half_layer_errors(
    cell: str, kw: dict, dtype: torch.dtype, device: str, T: int = 7, B: int = 3, H: int = 33
):
    """half_type_errors for a layer of HALF_CONFIGS (input 5, hidden H)."""
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(cell, nn.RNN)
    if cell.startswith("RNN"):
        kw = dict(kw, nonlinearity=cell[4:].lower())
    theirs = cls(5, H, **kw).to(device, dtype)
    ours = rnn_fused.replace_rnns(cls(5, H, **kw)).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    exact = cls(5, H, **kw).double()
    exact.load_state_dict({k: v.double().cpu() for k, v in theirs.state_dict().items()})
    D = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    out_size = kw.get("proj_size") or H
    shape = (B, T, 5) if kw.get("batch_first") else (T, B, 5)
    x = torch.randn(*shape).to(device, dtype)
    states = [torch.randn(D, B, out_size).to(device, dtype)]
    if cell == "LSTM":
        states.append(torch.randn(D, B, H).to(device, dtype))
    return half_type_errors(ours, theirs, exact, x, states)


def outputs_and_grads(module: torch.nn.Module, x: Tensor, states: list[Tensor], weights):
    """A module's outputs (output and final states, flattened), then the gradients of a
    weighted sum of them with respect to the input, the initial states and the parameters.
    `states` is empty for a call without them; a cell's single state is passed bare."""
    xi = x.clone().requires_grad_()
    given = [s.clone().requires_grad_() for s in states]
    if not given:
        result = module(xi)
    else:
        result = module(xi, tuple(given) if len(given) > 1 else given[0])
    outs = _flat(result)
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights, strict=True))
    return outs + list(torch.autograd.grad(loss, [xi, *given, *module.parameters()]))


def _flat(result) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


def half_type_errors(ours, theirs, exact, x: Tensor, states: list[Tensor]):
    """(ours, torch.nn's) relative error against a float64 module with the same (rounded)
    weights, per output and per gradient: the half-type accuracy rule compares the two."""
    with torch.no_grad():
        outs64 = _flat(exact(x.double().cpu(), *_state_arg([s.double().cpu() for s in states])))
    weights = [torch.randn_like(o) for o in outs64]
    ref = outputs_and_grads(exact, x.double().cpu(), [s.double().cpu() for s in states], weights)
    on_device = [w.to(x.device) for w in weights]
    got = outputs_and_grads(ours, x, states, on_device)
    base = outputs_and_grads(theirs, x, states, on_device)
    pairs = zip(got, base, ref, strict=True)
    return [(rel_err(a.cpu(), r), rel_err(b.cpu(), r)) for a, b, r in pairs]


def _state_arg(states: list[Tensor]) -> tuple:
    if not states:
        return ()
    return (tuple(states) if len(states) > 1 else states[0],)

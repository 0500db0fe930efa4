"""A float32 call with its parameters in a half type, on the CPU: what torch.nn's LSTMCell,
GRUCell and GRU run under CPU autocast (products in the half type, the rest in float32). The
operator's contract (csrc/problem.h, LayerArgs): results and the gradients of input and states
in float32, the parameters' gradients in their dtype, and the values those of the half-type
call before its results are rounded: the same engine, the same products."""

from __future__ import annotations

import pytest
import torch
from half_cases import HALF_TYPES
from helpers import make_layer, seed

import rnn_fused
from rnn_fused import ops

# (mode, steps, batch, input size, hidden, feature); steps 0: one step [B, I] (a cell's call).
# Hidden 256 at batch 64 runs the AMX tiles where there are; 33 and 3 rows the small problems.
CASES = [
    ("LSTM", 0, 3, 5, 33, ""),
    ("GRU", 0, 64, 256, 256, ""),
    ("LSTM", 0, 64, 256, 256, ""),
    ("RNN_TANH", 7, 3, 5, 33, ""),
    ("GRU", 7, 3, 5, 33, "packed"),
    ("LSTM", 7, 4, 5, 33, "proj"),
    ("LSTM", 4, 1, 256, 256, "reverse"),
    ("GRU", 20, 16, 64, 64, ""),
]


def _call(mode: str, steps: int, batch: int, input_size: int, hidden: int, feature: str, dtype):
    """The half-type call's tensors (values of dtype, so that float32 holds them exactly),
    batch_sizes and keywords."""
    layer = make_layer(mode, input_size, hidden, proj=3 if feature == "proj" else 0, dtype=dtype)
    out_size = 3 if feature == "proj" else hidden
    batch_sizes = None
    if feature == "packed":
        batch_sizes = torch.tensor([batch] * 3 + [batch - 1] * 2 + [1] * (steps - 5))
        x = torch.randn(int(batch_sizes.sum()), input_size)
    else:
        x = torch.randn(*((steps,) if steps else ()), batch, input_size)
    h0 = torch.randn(batch, out_size) / 2
    c0 = torch.randn(batch, hidden) / 2 if mode == "LSTM" else None
    activations = [None if t is None else t.to(dtype) for t in (x, h0, c0)]
    params = [None if t is None else t.detach() for t in (*layer.tensors()[:4], layer.w_hr)]
    kw = dict(batch_sizes=batch_sizes, reverse=feature == "reverse")
    return activations, params, kw


def _run(mode, activations, params, kw, grads_out):
    """rnn_layer's results and, given grads_out, the gradients of every tensor."""
    leaves = [None if t is None else t.clone().requires_grad_(grads_out is not None) for t in
              (*activations, *params)]  # fmt: skip
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = leaves
    with torch.set_grad_enabled(grads_out is not None):
        results = ops.rnn_layer(mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr=w_hr, **kw)
    results = [r for r in results if r is not None]
    if grads_out is None:
        return results, []
    wanted = [t for t in leaves if t is not None]
    return results, list(torch.autograd.grad(results, wanted, grads_out))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize(("mode", "steps", "batch", "input_size", "hidden", "feature"), CASES)
def test_half_parameters_give_the_half_call_before_rounding(
    mode, steps, batch, input_size, hidden, feature, grad, dtype
):
    """The results and (training) every gradient of the float32 call, rounded to the half
    type, are the half-type call's bit for bit; their dtypes are the contract's."""
    seed("half parameters", mode, steps, batch, feature, grad, dtype)
    activations, params, kw = _call(mode, steps, batch, input_size, hidden, feature, dtype)
    half_results, _ = _run(mode, activations, params, kw, None)
    grads_out = [torch.randn_like(r).to(dtype) for r in half_results] if grad else None
    half, half_grads = _run(mode, activations, params, kw, grads_out)
    as_float = [None if t is None else t.float() for t in activations]
    float_grads_out = None if grads_out is None else [g.float() for g in grads_out]
    mixed, mixed_grads = _run(mode, as_float, params, kw, float_grads_out)

    assert [r.dtype for r in mixed] == [torch.float32] * len(mixed)
    for a, b in zip(mixed, half, strict=True):
        assert torch.equal(a.to(dtype), b)
    # Gradients: of the activations in float32, of the parameters in their dtype.
    n_act = sum(t is not None for t in activations)
    for i, (a, b) in enumerate(zip(mixed_grads, half_grads, strict=True)):
        assert a.dtype == (torch.float32 if i < n_act else dtype), i
        assert torch.equal(a.to(dtype), b), i


def test_half_parameters_match_float64_with_the_same_parameters():
    """Against float64 on the same (rounded) parameters, a bfloat16-parameter call's error is
    no worse than twice torch.nn's own in bfloat16 with those parameters (the half types'
    accuracy rule). Where the products round the input and the state to bfloat16 at each step
    (the dot products of CPUs without AMX) it is about torch.nn's, not under one rounding of
    the results."""
    seed("half parameters float64")
    activations, params, kw = _call("LSTM", 7, 3, 5, 33, "", torch.float32)
    half_params = [None if t is None else t.bfloat16() for t in params]
    exact_params = [None if t is None else t.double() for t in half_params]
    got, _ = _run("LSTM", activations, half_params, kw, None)
    exact, _ = _run("LSTM", [t.double() for t in activations], exact_params, kw, None)
    x, h0, c0 = activations
    torch_lstm = torch.nn.LSTM(5, 33).bfloat16()
    with torch.no_grad():
        for name, value in zip(
            ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"], half_params, strict=False
        ):
            getattr(torch_lstm, name).copy_(value)
        out, (h_n, c_n) = torch_lstm(x.bfloat16(), (h0.bfloat16()[None], c0.bfloat16()[None]))
    for a, e, t in zip(got, exact, [out, h_n[0], c_n[0]], strict=True):
        err, torch_err = ((r.double() - e).abs().max().item() for r in (a, t))
        assert a.dtype == torch.float32
        assert 0 < err <= 2 * torch_err, (err, torch_err)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(input=torch.float64), "w_ih must have the dtype of input"),
        (dict(w_hh=torch.float32), "w_hh must have the dtype of w_ih"),
        (dict(b_ih=torch.float32), "b_ih must have the dtype of w_ih"),
        (dict(hx=torch.bfloat16), "hx must have the dtype of input"),
    ],
)
@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
def test_half_parameters_refuse_mixed_dtypes(change, message, fake):
    """The kernels and their fake twins (what torch.compile traces) name the argument, the
    dtype it must have and the one it has."""
    seed("half parameters refused", str(change))
    layer = make_layer("GRU", 5, 7, dtype=torch.bfloat16)
    tensors = dict(input=torch.randn(4, 3, 5), hx=torch.randn(3, 7))
    tensors.update(w_ih=layer.w_ih, w_hh=layer.w_hh, b_ih=layer.b_ih, b_hh=layer.b_hh)
    tensors = {k: t.detach().to(change.get(k, t.dtype)) for k, t in tensors.items()}
    args = ("GRU", tensors["input"], tensors["hx"], None, tensors["w_ih"], tensors["w_hh"],
            tensors["b_ih"], tensors["b_hh"], None, None, False)  # fmt: skip
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with pytest.raises(RuntimeError, match=message):
                torch.ops.rnn_fused.layer(*args)
    else:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.rnn_fused.layer(*args)


def test_autocast_casts_parameters_once_per_region():
    """Inside one autocast region the doors cast a parameter once (torch's cache, as torch.nn's
    layers do): steps of a cell convert its weights at the first step only, and a new region
    converts them again."""
    seed("autocast cache")
    cell = rnn_fused.GRUCell(5, 7)
    x = torch.randn(3, 5)

    def weight_casts(steps: int) -> int:
        with torch.profiler.profile(record_shapes=True) as prof:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                h = None
                for _ in range(steps):
                    h = cell(x, h)
        assert h.dtype == torch.float32
        return sum(
            e.name == "aten::_to_copy" and list(e.input_shapes[0]) == [21, 5] for e in prof.events()
        )

    assert weight_casts(1) == 1
    assert weight_casts(4) == 1

"""Random invalid arguments to the operators; each must raise a Python exception. Run as a
script by test_properties.py in its own interpreter, so that a crash shows as a signal.
Derandomized hypothesis: the same cases every run; a failure prints the shrunk case."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rnn_fused
from rnn_fused.ops import GATES

MUTATIONS = [
    "mode",
    "input_dim",
    "input_size",
    "w_ih_rows",
    "w_hh_shape",
    "hx_shape",
    "cx_for_non_lstm",
    "cx_shape",
    "bias_alone",
    "int_dtype",
    "mixed_dtype",
    "meta_weight",
    "meta_state",
    "batch_sizes_increasing",
    "batch_sizes_zero",
    "batch_sizes_sum",
    "batch_sizes_float",
    "w_hr_non_lstm",
    "w_hr_shape",
    "grad_output_shape",
    "saved_shape",
    "backward_batch",
]
cases = 0


def _valid(mode: str, T: int, B: int, I: int, H: int, packed: bool) -> dict:
    g = GATES[mode]
    dt = torch.float64
    call = dict(
        mode=mode,
        input=torch.randn(T * B, I, dtype=dt) if packed else torch.randn(T, B, I, dtype=dt),
        w_ih=torch.randn(g * H, I, dtype=dt),
        w_hh=torch.randn(g * H, H, dtype=dt),
        b_ih=torch.randn(g * H, dtype=dt),
        b_hh=torch.randn(g * H, dtype=dt),
        hx=torch.randn(B, H, dtype=dt),
        cx=torch.randn(B, H, dtype=dt) if mode == "LSTM" else None,
        w_hr=None,
        batch_sizes=torch.full((T,), B, dtype=torch.int64) if packed else None,
    )
    return call


def _layer(c: dict):
    return rnn_fused.rnn_layer(
        c["mode"], c["input"], c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"], c["hx"], c["cx"],
        w_hr=c["w_hr"], batch_sizes=c["batch_sizes"],
    )  # fmt: skip


def _backward(c: dict, grad_output=None, saved_rows=0, batch=None):
    args = (c["mode"], c["input"], c["hx"], c["cx"], c["w_ih"], c["w_hh"], c["b_ih"], c["b_hh"],
            c["w_hr"], c["batch_sizes"], False)  # fmt: skip
    out, h_n, _, saved, h_prev = torch.ops.rnn_fused.forward(*args, True)
    go = torch.randn_like(out) if grad_output is None else grad_output
    if saved_rows:
        saved = saved[:-saved_rows]
    return torch.ops.rnn_fused.backward(
        c["mode"], go, None, None, c["input"], c["w_ih"], c["w_hh"], c["w_hr"],
        c["batch_sizes"], False, saved, h_prev, h_n.shape[0] if batch is None else batch,
        [True, True, True],
    )  # fmt: skip


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    mutation=st.sampled_from(MUTATIONS),
    mode=st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]),
    sizes=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 5), st.integers(1, 6)),
    packed=st.booleans(),
    other=st.integers(1, 7),
)
def check_invalid_raises(mutation, mode, sizes, packed, other):
    global cases
    T, B, I, H = sizes
    c = _valid(mode, T, B, I, H, packed)
    run = _layer
    if mutation == "mode":
        c["mode"] = mode.lower() + "x"
    elif mutation == "input_dim":
        c["input"] = c["input"].reshape(-1) if other % 2 else c["input"].unsqueeze(0)
    elif mutation == "input_size":
        c["input"] = torch.randn(*c["input"].shape[:-1], I + other, dtype=torch.float64)
    elif mutation == "w_ih_rows":
        c["w_ih"] = torch.randn(GATES[mode] * H + 1, I, dtype=torch.float64)
    elif mutation == "w_hh_shape":
        c["w_hh"] = torch.randn(GATES[mode] * H, H + other, dtype=torch.float64)
    elif mutation == "hx_shape":
        c["hx"] = torch.randn(B + other, H, dtype=torch.float64)
    elif mutation == "cx_for_non_lstm":
        if mode == "LSTM":
            c["cx"] = torch.randn(B, H + other, dtype=torch.float64)
        else:
            c["cx"] = torch.randn(B, H, dtype=torch.float64)
    elif mutation == "cx_shape":
        c["mode"], c["cx"] = "LSTM", torch.randn(B + other, H, dtype=torch.float64)
        c["w_ih"], c["w_hh"] = torch.randn(4 * H, I).double(), torch.randn(4 * H, H).double()
        c["b_ih"], c["b_hh"] = torch.randn(4 * H).double(), torch.randn(4 * H).double()
    elif mutation == "bias_alone":
        c["b_hh"] = None
    elif mutation == "int_dtype":
        c["input"] = c["input"].to(torch.int64 if other % 2 else torch.complex64)
    elif mutation == "mixed_dtype":
        c["w_hh"] = c["w_hh"].float()
    elif mutation == "meta_weight":
        c["w_ih"] = c["w_ih"].to("meta")
    elif mutation == "meta_state":
        c["hx"] = c["hx"].to("meta")
    elif mutation.startswith("batch_sizes"):
        if c["batch_sizes"] is None:
            c["input"] = c["input"].reshape(T * B, I)
        sizes_ = torch.full((T,), B, dtype=torch.int64)
        if mutation == "batch_sizes_increasing":
            c["input"] = torch.randn(T * B + 1, I, dtype=torch.float64)
            sizes_ = torch.cat([sizes_, torch.tensor([B + 1])])
            c["input"] = torch.randn(int(sizes_.sum()), I, dtype=torch.float64)
        elif mutation == "batch_sizes_zero":
            sizes_[-1] = 0
        elif mutation == "batch_sizes_sum":
            c["input"] = torch.randn(T * B + other, I, dtype=torch.float64)
        else:
            sizes_ = sizes_.double()
        c["batch_sizes"] = sizes_
    elif mutation == "w_hr_non_lstm":
        if mode == "LSTM":
            c["w_hr"] = torch.randn(H + other, H, dtype=torch.float64)
        else:
            c["w_hr"] = torch.randn(1, H, dtype=torch.float64)
    elif mutation == "w_hr_shape":
        c["mode"], c["w_ih"] = "LSTM", torch.randn(4 * H, I, dtype=torch.float64)
        c["w_hh"] = torch.randn(4 * H, H, dtype=torch.float64)
        c["b_ih"], c["b_hh"] = torch.randn(4 * H).double(), torch.randn(4 * H).double()
        c["cx"] = torch.randn(B, H, dtype=torch.float64)
        c["w_hr"] = torch.randn(H + other, H + 1, dtype=torch.float64)
    elif mutation == "grad_output_shape":

        def run(call):
            return _backward(call, grad_output=torch.randn(T * B * H * 2 + other).double())
    elif mutation == "saved_shape":

        def run(call):
            return _backward(call, saved_rows=1)
    elif mutation == "backward_batch":

        def run(call):
            return _backward(call, batch=B + other)

    try:
        run(c)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError):
        cases += 1
        return
    raise AssertionError(f"no exception for {mutation} on {mode} T,B,I,H={sizes} packed={packed}")


if __name__ == "__main__":
    check_invalid_raises()
    print(f"{cases} cases raised as they should")

"""The only door from Python to the compiled operators torch.ops.rnn_fused.*.

`rnn_layer` runs one layer in one direction over a whole sequence. This module also
registers, for both operators, the fake (meta) kernels that torch.compile and torch.export
trace with, and the autograd formula of the forward (its backward is itself an operator).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (its import registers torch.ops.rnn_fused.*)
except ImportError as err:  # pragma: no cover - depends on the build
    raise ImportError(
        f"rnn_fused: the compiled extension rnn_fused._C could not be loaded ({err}). "
        "Build it with `make build` (or `python setup.py build_ext --inplace`)."
    ) from err

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# Gate blocks of width H per row (csrc/cell_math.h, kGates).
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
# Blocks of width H the forward saves per row (kSaved; an LSTM projection adds one).
SAVED_BLOCKS = {"LSTM": 5, "GRU": 4, "RNN_TANH": 1, "RNN_RELU": 1}

_ops = torch.ops.rnn_fused


def _sizes(mode: str, w_ih: Tensor, w_hr: Tensor | None) -> tuple[int, int]:
    if mode not in GATES:
        raise ValueError(f"rnn_fused: mode must be one of {', '.join(MODES)}, got {mode!r}")
    hidden = w_ih.shape[0] // GATES[mode]
    return hidden, (w_hr.shape[0] if w_hr is not None else hidden)


@torch.library.register_fake("rnn_fused::forward")
def _forward_fake(
    mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    hidden, out_size = _sizes(mode, w_ih, w_hr)
    if batch_sizes is not None:
        rows, batch = input.shape[0], hx.shape[0]
        output = input.new_empty(rows, out_size)
    else:
        batch = input.shape[1]
        rows = input.shape[0] * batch
        output = input.new_empty(input.shape[0], batch, out_size)
    c_n = input.new_empty(batch, hidden) if mode == "LSTM" else input.new_empty(0)
    saved_width = (SAVED_BLOCKS[mode] + (w_hr is not None)) * hidden
    kept_rows = rows if train else 0
    return (
        output,
        input.new_empty(batch, out_size),
        c_n,
        input.new_empty(kept_rows, saved_width),
        input.new_empty(kept_rows, out_size),
    )


@torch.library.register_fake("rnn_fused::backward")
def _backward_fake(
    mode,
    grad_output,
    grad_h_n,
    grad_c_n,
    input,
    hx,
    w_ih,
    w_hh,
    w_hr,
    batch_sizes,
    reverse,
    saved,
    h_prev,
) -> tuple[Tensor, ...]:
    hidden, out_size = _sizes(mode, w_ih, w_hr)
    batch = hx.shape[0] if hx is not None else input.shape[1]
    gate_width = w_ih.shape[0]
    return (
        input.new_empty(input.shape),
        input.new_empty(batch, out_size),
        input.new_empty(batch, hidden) if mode == "LSTM" else input.new_empty(0),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(gate_width),
        w_ih.new_empty(gate_width),
        w_hr.new_empty(w_hr.shape) if w_hr is not None else w_ih.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, _ = inputs
    _, _, _, saved, h_prev = output
    ctx.mode = mode
    ctx.reverse = reverse
    ctx.given = (hx is not None, cx is not None, b_ih is not None, w_hr is not None)
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, saved, h_prev)
    ctx.mark_non_differentiable(saved, h_prev)
    # Outputs without a gradient reach the backward as None instead of zero-filled tensors
    # (the saved workspace alone is several times the output).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_saved, _grad_h_prev):
    input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, saved, h_prev = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. gradient penalties): the kernels' backward
        # is not itself differentiable, so differentiate the plain PyTorch time loop instead.
        return (
            None,
            *_differentiable_grads(
                ctx,
                (grad_output, grad_h_n, grad_c_n),
                input,
                hx,
                cx,
                w_ih,
                w_hh,
                b_ih,
                b_hh,
                w_hr,
                batch_sizes,
            ),
            None,
            None,
            None,
        )
    has_hx, has_cx, has_bias, has_proj = ctx.given
    grads = _ops.backward(
        ctx.mode,
        grad_output,
        grad_h_n,
        grad_c_n if ctx.mode == "LSTM" else None,
        input,
        hx,
        w_ih,
        w_hh,
        w_hr,
        batch_sizes,
        ctx.reverse,
        saved,
        h_prev,
    )
    g_in, g_hx, g_cx, g_wih, g_whh, g_bih, g_bhh, g_whr = grads
    return (
        None,
        g_in,
        g_hx if has_hx else None,
        g_cx if has_cx else None,
        g_wih,
        g_whh,
        g_bih if has_bias else None,
        g_bhh if has_bias else None,
        g_whr if has_proj else None,
        None,
        None,
        None,
    )


def _differentiable_grads(ctx, grads_out, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes):
    """Gradients of the tensor inputs (in the operator's order) that autograd can
    differentiate again, from reference.rnn_layer run on the same inputs."""
    from . import reference

    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    wanted = [t is not None and t.requires_grad for t in tensors]
    with torch.enable_grad():
        outputs = reference.rnn_layer(
            ctx.mode,
            input,
            w_ih,
            w_hh,
            b_ih,
            b_hh,
            hx,
            cx,
            w_hr=w_hr,
            batch_sizes=batch_sizes,
            reverse=ctx.reverse,
        )
        pairs = [(o, g) for o, g in zip(outputs, grads_out) if o is not None and g is not None]
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [t for t, w in zip(tensors, wanted) if w],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
    it = iter(found)
    return tuple(next(it) if w else None for w in wanted)


torch.library.register_autograd("rnn_fused::forward", _backward, setup_context=_setup_context)


def rnn_layer(
    mode: str,
    input: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    hx: Tensor | None = None,
    cx: Tensor | None = None,
    *,
    w_hr: Tensor | None = None,
    batch_sizes: Tensor | None = None,
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One recurrent layer in one direction over all steps, with autograd.

    Args:
        mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU".
        input: [T, B, I], or packed rows [N, I] when `batch_sizes` is given.
        w_ih, w_hh, b_ih, b_hh: torch.nn's weights of the layer (gates stacked in its order).
        hx: initial hidden state [B, H_out] (zeros when None; required with batch_sizes).
        cx: initial cell state [B, H] (LSTM only; zeros when None).
        w_hr: LSTM projection [proj_size, H].
        batch_sizes: per-step batch sizes of a PackedSequence (int64, CPU).
        reverse: run from the last step to the first.

    Returns:
        (output, h_n, c_n): output [T, B, H_out] (or [N, H_out]), h_n [B, H_out], and c_n
        [B, H] for LSTM, else None.
    """
    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr)
    device_type = input.device.type
    if device_type == "cuda" and torch.is_autocast_enabled(device_type):
        # As torch.nn's recurrent layers: run in the autocast dtype, autocast off inside.
        dtype = torch.get_autocast_dtype(device_type)
        input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr = (
            None if t is None else t.to(dtype) for t in tensors
        )
        with torch.autocast(device_type, enabled=False):
            return rnn_layer(
                mode,
                input,
                w_ih,
                w_hh,
                b_ih,
                b_hh,
                hx,
                cx,
                w_hr=w_hr,
                batch_sizes=batch_sizes,
                reverse=reverse,
            )
    # Keep what the backward needs only when autograd will ask for it.
    train = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    output, h_n, c_n, _, _ = _ops.forward(
        mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, train
    )
    return output, h_n, (c_n if mode == "LSTM" else None)

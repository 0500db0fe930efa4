"""ONNX export of models that use rnn_fused layers and cells.

Each call of the operator rnn_fused::layer (one layer, one direction) becomes one standard
ONNX LSTM, GRU or RNN node, so ONNX Runtime and other runtimes run the exported model
without this package. Usage, with the default torch.export-based exporter:

    import rnn_fused.onnx
    program = rnn_fused.onnx.export(model, (x,))   # torch.onnx.export(..., dynamo=True)

or `torch.onnx.export(model, (x,), custom_translation_table=rnn_fused.onnx.translations())`.
That exporter reads translations of custom operators only from that argument. The
TorchScript-based exporter (dynamo=False) has a global registry: importing this module
registers the translation there, so `torch.onnx.export(..., dynamo=False)` needs nothing more.

ONNX's recurrent operators have no projection (LSTM proj_size), no packed rows, no zoneout
and no layer normalisation; export of those raises an error naming the feature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .ops import GATES

# ONNX's gate order, as indices of torch.nn's gate blocks: ONNX LSTM is (i, o, f, c) where
# torch.nn's is (i, f, g, o); ONNX GRU is (z, r, h) where torch.nn's is (r, z, n).
ONNX_GATE_ORDER = {"LSTM": (0, 3, 1, 2), "GRU": (1, 0, 2), "RNN_TANH": (0,), "RNN_RELU": (0,)}
_OPERATOR = {"LSTM": "LSTM", "GRU": "GRU", "RNN_TANH": "RNN", "RNN_RELU": "RNN"}
# ONNX opset of the TorchScript registration (CastLike needs 15).
_TORCHSCRIPT_OPSET = 15


class OnnxExportError(RuntimeError):
    """A layer call that ONNX's recurrent operators cannot express."""


def _unsupported(mode: str, w_hr: bool, packed: bool, zoneout: bool, layer_norm: bool) -> None:
    if mode not in GATES:
        raise OnnxExportError(f"rnn_fused ONNX export: unknown mode {mode!r}")
    if w_hr:
        raise OnnxExportError(
            "rnn_fused ONNX export: LSTM with proj_size > 0 cannot be exported; ONNX's LSTM "
            "operator has no projection (got a layer with w_hr)"
        )
    if packed:
        raise OnnxExportError(
            "rnn_fused ONNX export: PackedSequence input cannot be exported; ONNX's recurrent "
            "operators take padded [T, B, I] input (pass the padded tensor instead)"
        )
    if zoneout:
        raise OnnxExportError(
            "rnn_fused ONNX export: a layer with zoneout cannot be exported; ONNX's recurrent "
            "operators have no zoneout (got a layer call with zoneout weights)"
        )
    if layer_norm:
        raise OnnxExportError(
            "rnn_fused ONNX export: LayerNormLSTM and LayerNormGRU cannot be exported; ONNX's "
            "recurrent operators have no layer normalisation (got a layer call with layer_norm)"
        )


def _gate_rows(mode: str, hidden: int) -> list[int]:
    """Row indices that reorder a torch.nn weight or bias [gates * hidden, ...] into ONNX's
    gate order."""
    return [k * hidden + j for k in ONNX_GATE_ORDER[mode] for j in range(hidden)]


def _emit_layer(emit: Callable[..., Any], ints: Callable[[list[int]], Any], call: dict) -> tuple:
    """The ONNX nodes of one layer call, through `emit(op_type, *inputs, outputs=n, **attrs)`
    and `ints(values)` (an int64 constant), which each exporter provides."""
    mode, hidden = call["mode"], call["hidden"]
    rows = ints(_gate_rows(mode, hidden))
    axis0 = ints([0])

    def onnx_weight(w: Any) -> Any:  # [gates * H, K] -> [1, gates * H, K], ONNX's order
        return emit("Unsqueeze", emit("Gather", w, rows, axis=0), axis0)

    if call["elementwise"]:  # IndRNN's u [H]: ONNX's RNN takes it as R = diag(u)
        square = emit("ConstantOfShape", ints([hidden, hidden]))  # zeros: only its shape counts
        eye = emit("CastLike", emit("EyeLike", square), call["w_hh"])
        recurrent = emit("Unsqueeze", emit("Mul", eye, call["w_hh"]), axis0)
    else:
        recurrent = onnx_weight(call["w_hh"])

    bias = None
    if call["b_ih"] is not None:
        both = [emit("Gather", call[b], rows, axis=0) for b in ("b_ih", "b_hh")]
        bias = emit("Unsqueeze", emit("Concat", *both, axis=0), axis0)
    # A cell's call gives one step [B, I], or an unbatched one [I] with states [H]: a sequence
    # of one step (of a batch of one) for ONNX, its states [1, B, H].
    one_step, unbatched = call["rank"] <= 2, call["rank"] == 1
    state_axes = ints([0, 1]) if unbatched else axis0
    h0 = None if call["hx"] is None else emit("Unsqueeze", call["hx"], state_axes)
    attrs: dict[str, Any] = dict(hidden_size=hidden)
    if call["reverse"]:
        attrs["direction"] = "reverse"
    x = emit("Unsqueeze", call["input"], state_axes) if one_step else call["input"]
    inputs = [x, onnx_weight(call["w_ih"]), recurrent, bias, None, h0]
    if mode == "LSTM":
        c0 = None if call["cx"] is None else emit("Unsqueeze", call["cx"], state_axes)
        y, y_h, y_c = emit("LSTM", *inputs, c0, outputs=3, **attrs)
        c_n = emit("Squeeze", y_c, state_axes)
    else:
        if mode == "GRU":
            attrs["linear_before_reset"] = 1  # torch.nn's n = tanh(W x + b + r * (U h + b_hn))
        else:
            attrs["activations"] = ["Tanh" if mode == "RNN_TANH" else "Relu"]
        y, y_h = emit(_OPERATOR[mode], *inputs, outputs=2, **attrs)
        # The operator's c_n of a cell without one: an empty tensor of the input's dtype.
        c_n = emit("CastLike", emit("ConstantOfShape", ints([0])), call["input"])
    # Y is [T, directions = 1, B, H] (T = 1 squeezed too for one step, and B = 1 for an
    # unbatched one); Y_h is [1, B, H].
    y_axes = ints([0, 1, 2] if unbatched else [0, 1] if one_step else [1])
    return emit("Squeeze", y, y_axes), emit("Squeeze", y_h, state_axes), c_n


# The torch.export-based exporter (dynamo=True).


def _layer_onnxscript(
    mode: str,
    input: Any,
    hx: Any = None,
    cx: Any = None,
    w_ih: Any = None,
    w_hh: Any = None,
    b_ih: Any = None,
    b_hh: Any = None,
    w_hr: Any = None,
    batch_sizes: Any = None,
    reverse: bool = False,
    zoneout: Any = None,
    layer_norm: Any = None,
) -> tuple:
    """rnn_fused::layer as ONNX nodes, traced by onnxscript."""
    from onnxscript import opset18 as op

    given = (w_hr, batch_sizes, zoneout, layer_norm)
    _unsupported(mode, *(t is not None for t in given))

    def emit(op_type: str, *inputs: Any, outputs: int = 1, **attrs: Any) -> Any:
        return getattr(op, op_type)(*inputs, **attrs)  # the schema gives the outputs

    def ints(values: list[int]) -> Any:
        return op.Constant(value_ints=values)

    call = dict(
        mode=mode, input=input, hx=hx, cx=cx, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh,
        reverse=reverse, hidden=int(w_hh.shape[-1]), elementwise=len(w_hh.shape) == 1,
        rank=len(input.shape),
    )  # fmt: skip
    return _emit_layer(emit, ints, call)


def _forward_onnxscript(*args: Any) -> tuple:
    """rnn_fused::forward (what `layer` becomes once the exporter runs its autograd kernel)
    as ONNX nodes: the layer's outputs and an empty workspace (inference keeps none)."""
    from onnxscript import opset18 as op

    output, h_n, c_n = _layer_onnxscript(*args[:11], *args[12:])  # less `train`
    empty = op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0, 0])), output)
    return output, h_n, c_n, empty, op.Identity(empty)


def translations() -> dict[Callable, Callable]:
    """The `custom_translation_table` of torch.onnx.export(dynamo=True) for rnn_fused."""
    ops = torch.ops.rnn_fused
    return {ops.layer.default: _layer_onnxscript, ops.forward.default: _forward_onnxscript}


def export(model: torch.nn.Module, args: tuple, f: Any = None, **kwargs: Any):
    """torch.onnx.export with rnn_fused's translations added to `custom_translation_table`
    (dynamo=True, the default). With dynamo=False the registration made on import serves."""
    if kwargs.get("dynamo", True):
        table = {**translations(), **(kwargs.pop("custom_translation_table", None) or {})}
        kwargs["custom_translation_table"] = table
    return torch.onnx.export(model, args, f, **kwargs)


# The TorchScript-based exporter (dynamo=False).


def _layer_torchscript(
    g, mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, zoneout=None,
    layer_norm=None,
):  # fmt: skip
    from torch.onnx import symbolic_helper as sh

    mode = sh._maybe_get_const(mode, "s")
    given = (w_hr, batch_sizes, zoneout, layer_norm)
    _unsupported(mode, *(t is not None and not sh._is_none(t) for t in given))
    w_hh_sizes = sh._get_tensor_sizes(w_hh)

    def emit(op_type: str, *inputs: Any, outputs: int = 1, **attrs: Any) -> Any:
        inputs = tuple(sh._optional_input_placeholder_tensor(g) if i is None else i for i in inputs)
        suffixed = {}
        for name, value in attrs.items():
            kind = "s" if isinstance(value, str) or isinstance(value, list) else "i"
            suffixed[f"{name}_{kind}"] = value
        return g.op(op_type, *inputs, outputs=outputs, **suffixed)

    def ints(values: list[int]) -> Any:
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    def given(v):
        return None if sh._is_none(v) else v

    call = dict(
        mode=mode, input=input, hx=given(hx), cx=given(cx), w_ih=w_ih, w_hh=w_hh,
        b_ih=given(b_ih), b_hh=given(b_hh), reverse=bool(sh._maybe_get_const(reverse, "b")),
        hidden=w_hh_sizes[-1], elementwise=len(w_hh_sizes) == 1,
        rank=sh._get_tensor_rank(input),
    )  # fmt: skip
    return _emit_layer(emit, ints, call)


def _register_torchscript() -> None:
    register = torch.onnx.register_custom_op_symbolic
    register("rnn_fused::layer", _layer_torchscript, _TORCHSCRIPT_OPSET)


_register_torchscript()

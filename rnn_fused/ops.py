"""The only door from Python to the compiled operators torch.ops.rnn_fused.*.

`rnn_layer` runs one layer in one direction over a whole sequence through the operator
`rnn_fused::layer`, whose autograd is in C++ (csrc/autograd.cpp). In eager mode it enters
through `_C.layer`, a direct call into the dispatcher that skips torch.ops' per-call
argument matching; under torch.compile and torch.export it goes through torch.ops, which
those trace. This module also registers the operators' fake kernels (what torch.compile and
torch.export trace with) and the differentiable gradients of a double backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor
from torch._functorch.pyfunctorch import (
    retrieve_current_functorch_interpreter as _current_interpreter,
)
from torch.utils import _python_dispatch

try:
    from . import _C  # its import registers torch.ops.rnn_fused.*
except ImportError as err:  # pragma: no cover - depends on the build
    raise ImportError(
        f"rnn_fused: the compiled extension rnn_fused._C could not be loaded ({err}). "
        "Build it with `make build` (or `python setup.py build_ext --inplace`)."
    ) from err

MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
# Gate blocks of width H per row, as the kernels define them (csrc/cell_math.h, kGates).
GATES = {mode: _C.gates(mode) for mode in MODES}

_ops = torch.ops.rnn_fused
_peek_interpreter = torch._C._functorch.peek_interpreter_stack
_interpreter_stack = torch._C._functorch.get_interpreter_stack
_VMAP = torch._C._functorch.TransformType.Vmap
_GRAD = torch._C._functorch.TransformType.Grad
_unwrap_batched = torch._C._functorch._unwrap_batched
_add_batch_dim = torch._C._functorch._add_batch_dim
_is_batched = torch._C._functorch.is_batchedtensor
_BATCHED_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)


def empty_workspace_cache() -> None:
    """Frees the memory the CPU engine keeps for reuse by training calls.

    Outputs, a training forward's workspace (what its backward reads), gradients and
    buffers of 256 KiB or more are taken from freed blocks kept for the purpose (up to
    RNN_FUSED_CPU_WORKSPACE_CACHE_MB MiB, 1024 unless set; 0 keeps none), which saves a page
    fault per 4 KiB of fresh memory on each call. This returns the kept
    memory to the system, as torch.cuda.empty_cache does.
    """
    _C.empty_workspace_cache()


def cached_workspace_bytes() -> int:
    """Bytes of freed CPU workspace kept for reuse (see empty_workspace_cache)."""
    return _C.cached_workspace_bytes()


class LayerCall(NamedTuple):
    """The arguments of rnn_fused::layer (and the first ones of rnn_fused::forward)."""

    mode: str
    input: Tensor
    hx: Tensor | None
    cx: Tensor | None
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None
    batch_sizes: Tensor | None
    reverse: bool
    zoneout: Tensor | None = None
    layer_norm: Tensor | None = None


class BackwardCall(NamedTuple):
    """The arguments of rnn_fused::backward."""

    mode: str
    grad_output: Tensor | None
    grad_h_n: Tensor | None
    grad_c_n: Tensor | None
    input: Tensor
    w_ih: Tensor
    w_hh: Tensor
    w_hr: Tensor | None
    batch_sizes: Tensor | None
    reverse: bool
    saved: Tensor
    h_prev: Tensor
    batch: int
    output_mask: list[bool]
    zoneout: Tensor | None = None
    layer_norm: Tensor | None = None


def _sizes(mode: str, w_ih: Tensor, w_hr: Tensor | None) -> tuple[int, int]:
    if mode not in GATES:
        raise ValueError(f"rnn_fused: mode must be one of {', '.join(MODES)}, got {mode!r}")
    hidden = w_ih.shape[0] // GATES[mode]
    return hidden, (w_hr.shape[0] if w_hr is not None else hidden)


def _check_like(
    input: Tensor, like: Tensor | None = None, like_name: str = "input", **tensors: Tensor | None
) -> None:
    """The kernels' dtype and device checks (csrc/problem.cpp), for the fake kernels: each of
    `tensors` in the dtype of `like` (the input when None) and on the input's device."""
    dtype = (input if like is None else like).dtype
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype != dtype:
            raise RuntimeError(
                f"rnn_fused: {name} must have the dtype of {like_name} ({dtype}), got {t.dtype}"
            )
        if t.device != input.device:
            raise RuntimeError(
                f"rnn_fused: {name} must be on the device of input ({input.device}), got {t.device}"
            )


def _check_params(input: Tensor, w_ih: Tensor, **others: Tensor | None) -> None:
    """The kernels' checks of the parameters (csrc/problem.cpp, check_params_dtype): w_ih in
    the input's dtype, or a half type with a float32 input on the CPU; the others in w_ih's."""
    x, w = input.dtype, w_ih.dtype
    half = x == torch.float32 and w in (torch.bfloat16, torch.float16)
    if w != x and not (half and input.device.type == "cpu"):
        raise RuntimeError(
            f"rnn_fused: w_ih must have the dtype of input ({x}) or, with a float32 input on the "
            f"CPU, bfloat16 or float16, got {w} with a {x} input on {input.device}"
        )
    if w_ih.device != input.device:
        raise RuntimeError(
            f"rnn_fused: w_ih must be on the device of input ({input.device}), got {w_ih.device}"
        )
    _check_like(input, w_ih, "w_ih", **others)


def _layer_outputs(call: LayerCall) -> tuple[Tensor, Tensor, Tensor, int, int]:
    """Fake output, h_n and c_n of a layer call, with its rows and hidden size."""
    c = call
    _check_params(c.input, c.w_ih, w_hh=c.w_hh, b_ih=c.b_ih, b_hh=c.b_hh, w_hr=c.w_hr)
    _check_like(c.input, hx=c.hx, cx=c.cx, zoneout=c.zoneout, layer_norm=c.layer_norm)
    hidden, out_size = _sizes(c.mode, c.w_ih, c.w_hr)
    if c.batch_sizes is None and c.input.dim() == 2:  # one step [B, I]
        rows = batch = c.input.shape[0]
        output = c.input.new_empty(rows, out_size)
    elif c.batch_sizes is not None:
        rows = c.input.shape[0]
        # Without hx the batch is the first step's size: a value a fake tensor lacks.
        batch = c.hx.shape[0] if c.hx is not None else torch.library.get_ctx().new_dynamic_size()
        output = c.input.new_empty(rows, out_size)
    else:
        batch = c.input.shape[1]
        rows = c.input.shape[0] * batch
        output = c.input.new_empty(c.input.shape[0], batch, out_size)
    c_n = c.input.new_empty(batch, hidden) if c.mode == "LSTM" else c.input.new_empty(0)
    _check_zoneout(c.zoneout, output, c.w_hr)
    return output, c.input.new_empty(batch, out_size), c_n, rows, hidden


def _check_zoneout(zoneout: Tensor | None, output: Tensor, w_hr: Tensor | None) -> None:
    """The kernels' zoneout checks (csrc/problem.cpp), for the fake kernels."""
    if zoneout is None:
        return
    if w_hr is not None:
        raise RuntimeError(
            "rnn_fused: zoneout needs a layer without projection (w_hr None), got w_hr of shape "
            f"{list(w_hr.shape)}"
        )
    if zoneout.shape != output.shape:
        raise RuntimeError(
            f"rnn_fused: zoneout must have shape {list(output.shape)}, got {list(zoneout.shape)}"
        )


@torch.library.register_fake("rnn_fused::layer")
def _layer_fake(*args) -> tuple[Tensor, Tensor, Tensor]:
    output, h_n, c_n, _, _ = _layer_outputs(LayerCall(*args))
    return output, h_n, c_n


@torch.library.register_fake("rnn_fused::forward")
def _forward_fake(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    call, train = LayerCall(*args[:11], *args[12:]), args[11]
    output, h_n, c_n, rows, hidden = _layer_outputs(call)
    kept_rows = rows if train else 0
    blocks = _C.saved_blocks(call.mode, call.w_hr is not None, call.layer_norm is not None)
    saved_width = blocks * hidden
    workspace = _C.workspace_dtype(str(call.input.device), call.input.dtype)
    return (
        output,
        h_n,
        c_n,
        call.input.new_empty(kept_rows, saved_width, dtype=workspace),
        call.input.new_empty(kept_rows, output.shape[-1], dtype=workspace),
    )


@torch.library.register_fake("rnn_fused::backward")
def _backward_fake(*args) -> tuple[Tensor, ...]:
    c = BackwardCall(*args)
    _check_params(c.input, c.w_ih, w_hh=c.w_hh, w_hr=c.w_hr)
    _check_like(c.input, zoneout=c.zoneout, layer_norm=c.layer_norm)
    # As check_workspace in csrc/problem.cpp: workspace_dtype, or the input's dtype.
    workspace = _C.workspace_dtype(str(c.input.device), c.input.dtype)
    for name, t in (("saved", c.saved), ("h_prev", c.h_prev)):
        if t.dtype not in (workspace, c.input.dtype) or t.device != c.input.device:
            raise RuntimeError(
                f"rnn_fused: {name} must be a {workspace} or {c.input.dtype} tensor on "
                f"{c.input.device} (the workspace of a {c.input.dtype} input), got {t.dtype} "
                f"on {t.device}"
            )
    _check_like(c.input, grad_output=c.grad_output, grad_h_n=c.grad_h_n, grad_c_n=c.grad_c_n)
    hidden, out_size = _sizes(c.mode, c.w_ih, c.w_hr)
    batch = c.batch
    need_input, need_state, need_weights = c.output_mask
    gate_width = c.w_ih.shape[0]
    ln_size = c.layer_norm.shape[0] if c.layer_norm is not None else 0

    def new(wanted: bool, *shape, like: Tensor = c.input) -> Tensor:
        return like.new_empty(*shape) if wanted else like.new_empty(0)

    # The parameters' gradients in their dtype (w_ih's), the others in the input's.
    return (
        new(need_input, c.input.shape),
        new(need_state, batch, out_size),
        new(need_state and c.mode == "LSTM", batch, hidden),
        new(need_weights, c.w_ih.shape, like=c.w_ih),
        new(need_weights, c.w_hh.shape, like=c.w_ih),
        new(need_weights, gate_width, like=c.w_ih),
        new(need_weights, gate_width, like=c.w_ih),
        new(need_weights and c.w_hr is not None, (out_size, hidden), like=c.w_ih),
        new(need_weights and c.layer_norm is not None, ln_size),
    )


@torch.library.register_fake("rnn_fused::zoneout_mask")
def _zoneout_mask_fake(seed: Tensor, size: list[int], p: float, dtype: torch.dtype) -> Tensor:
    return seed.new_empty(size, dtype=dtype)


def zoneout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A zoneout training mask of `shape` on like's device in like's dtype: each element 1
    (keep the previous state) with probability p, else 0, drawn from torch's generator so that
    torch.manual_seed repeats it. On the CPU, one seed from torch's generator starts the
    operator rnn_fused::zoneout_mask's counter-based draw (csrc/cpu/zoneout_mask.cpp; a
    bernoulli_ of torch's CPU generator costs 7 ns an element); elsewhere bernoulli_."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(p)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return _ops.zoneout_mask(seed, list(shape), p, like.dtype)


def _reference_grads(*args) -> list[Tensor]:
    """rnn_fused::reference_grads: gradients of a layer call's tensor inputs that autograd
    can differentiate again (double backward), from reference.py's loop on the same inputs
    (_reference_vjp); zeros for an input that requires no gradient, an empty tensor for an
    absent one."""
    call, grads_out = LayerCall(*args[:11], *args[14:]), args[11:14]
    found = _reference_vjp(call, *grads_out)
    result = []
    for slot in _GRADIENT_SLOTS:
        t = call[slot]
        if t is None:
            result.append(torch.empty(0))
        else:
            g = found[slot]
            result.append(g if t.requires_grad and g is not None else torch.zeros_like(t))
    return result


_impl = torch.library.Library("rnn_fused", "IMPL")
_impl.impl("reference_grads", _reference_grads, "CompositeImplicitAutograd")


# vmap (torch.func.vmap) of the operators. A layer call whose parameters are the same for
# every vmapped sample (vmap over inputs or states) runs once, the samples folded into the
# batch: sample v of batch row b becomes row b * V + v, which keeps a packed sequence's rows
# in step order with its batch sizes times V. So does a backward that returns no parameter
# gradients (jacrev or per-sample gradients of inputs and states). Any other call (an
# ensemble's stacked parameters; each sample's parameter gradients) runs sample by sample,
# as PyTorch's fallback would, without its warning.


def _fold(t: Tensor | None, vmapped: int | None, at: int | None, samples: int) -> Tensor | None:
    """t's samples (its vmapped dimension, or `samples` copies where it has none) merged
    into its batch dimension `at`, after each row; at None (an unbatched step): the samples
    as the batch, a new first dimension."""
    if t is None:
        return None
    if at is None:
        return t.expand(samples, *t.shape) if vmapped is None else t.movedim(vmapped, 0)
    if vmapped is None:
        t = t.unsqueeze(at + 1).expand(*t.shape[: at + 1], samples, *t.shape[at + 1 :])
    else:
        t = t.movedim(vmapped, at + 1)
    return t.flatten(at, at + 1)


def _sample(args: tuple, in_dims: tuple, v: int) -> tuple:
    """The arguments of vmapped sample v. (A list argument's in_dims entry is a list.)"""
    return tuple(a.select(d, v) if isinstance(d, int) else a for a, d in zip(args, in_dims))


def _sample_by_sample(op, samples: int, in_dims: tuple, args: tuple) -> tuple:
    """op on each vmapped sample of args, its results stacked (vmapped dimension 0)."""
    if samples == 0:
        raise ValueError(f"rnn_fused: vmap of {op} over 0 samples is not supported here")
    each = [op(*_sample(args, in_dims, v)) for v in range(samples)]
    if isinstance(each[0], Tensor):
        return torch.stack(each), 0
    results = tuple(torch.stack(r) for r in zip(*each))
    return results, (0,) * len(results)


def _first_sample_error(op, args: tuple, in_dims: tuple) -> RuntimeError | None:
    """The error the first vmapped sample's own call of op raises, if any."""
    try:
        op(*_sample(args, in_dims, 0))
    except RuntimeError as err:
        return err
    return None


def _run_folded(op, folded: Callable[[], list], samples: int, args: tuple, in_dims: tuple):
    """op on the arguments that folded() builds. Bad arguments raise the error of the first
    sample's own call, as an eager call's (the folded sizes would mislead)."""
    try:
        return op(*folded())
    except (RuntimeError, IndexError):
        if samples == 0 or (error := _first_sample_error(op, args, in_dims)) is None:
            raise
        raise error from None


def _batch_dim(input: Tensor, vmapped: int | None, packed: bool) -> int | None:
    """The batch dimension of a call's unvmapped input ([T, B, I]: 1; packed rows [N, I] or a
    step [B, I]: 0), None for an unbatched step [I]; its output's and zoneout's are the same,
    the states' 0."""
    dim = input.dim() - (vmapped is not None)
    return 0 if packed or dim == 2 else (1 if dim == 3 else None)


def _layer_vmap(op, samples: int, in_dims: tuple, args: tuple) -> tuple:
    """The batching rule of rnn_fused::layer, or of rnn_fused::forward (op), over `samples`
    samples (see above): results and their vmapped dimensions. forward's workspace (saved and
    h_prev) comes back as [rows, samples, width]: each sample's rows in its own call's order."""
    train = op is _ops.forward
    if train:  # forward's arguments are layer's with `train` after `reverse`
        args, in_dims = args[:11] + args[12:], in_dims[:11] + in_dims[12:]
    call, dims = LayerCall(*args), LayerCall(*in_dims)
    own = (dims.w_ih, dims.w_hh, dims.b_ih, dims.b_hh, dims.w_hr, dims.layer_norm)
    if any(d is not None for d in (*own, dims.batch_sizes)):
        if train:
            args, in_dims = (*args[:11], True, *args[11:]), (*in_dims[:11], None, *in_dims[11:])
        return _sample_by_sample(op, samples, in_dims, args)
    packed = call.batch_sizes is not None
    at = _batch_dim(call.input, dims.input, packed)
    state_at = None if at is None else 0
    if packed and samples == 0:
        raise ValueError("rnn_fused: vmap over 0 samples of a packed input is not supported")

    def folded() -> list:
        return [
            call.mode,
            _fold(call.input, dims.input, at, samples),
            _fold(call.hx, dims.hx, state_at, samples),
            _fold(call.cx, dims.cx, state_at, samples),
            call.w_ih, call.w_hh, call.b_ih, call.b_hh, call.w_hr,
            call.batch_sizes * samples if packed else None,
            call.reverse,
            *((True,) if train else ()),
            _fold(call.zoneout, dims.zoneout, at, samples),
            call.layer_norm,
        ]  # fmt: skip

    output, h_n, c_n, *workspace = _run_folded(op, folded, samples, args, in_dims)
    # The workspace's rows are the folded input's, sample v of row r at r * samples + v.
    workspace = [w.unflatten(0, (w.shape[0] // max(samples, 1), samples)) for w in workspace]
    c_dim = 0 if call.mode == "LSTM" else None  # else an empty tensor, the same for all
    if at is None:
        return (output, h_n, c_n, *workspace), (0, 0, c_dim, *(1,) * len(workspace))
    # The unfolded input's size at `at` is the output's; the states' batch is the same
    # unless packed (then the first step's).
    rows = call.input.shape[at + int(dims.input is not None and dims.input <= at)]
    batch = h_n.shape[0] // samples if packed else rows
    output = output.unflatten(at, (rows, samples))
    h_n = h_n.unflatten(0, (batch, samples))
    if c_dim is not None:
        c_n, c_dim = c_n.unflatten(0, (batch, samples)), 1
    return (output, h_n, c_n, *workspace), (at + 1, 1, c_dim, *(1,) * len(workspace))


# The most bytes that _backward_vmap copies to fold: a forward that was not vmapped (jacrev
# of one call) left one workspace, which the folded rows repeat for each sample; a call per
# sample reads the one in cache. jacrev of an output step w.r.t. the input, float32 (AMD
# EPYC): folds copying 0.3-35 MB ran 1.2-2.3x faster than the calls, 44-300 MB from 0.74x
# (B=16) to 1.5x (B=1), and memory grows with the copy.
_FOLD_COPY_BYTES = 32 << 20


def _fold_copies(call: BackwardCall, dims: BackwardCall, samples: int) -> int:
    """The bytes _backward_vmap copies to fold call's unbatched per-row tensors."""
    rows = (call.input, call.saved, call.h_prev, call.zoneout)
    unbatched = (dims.input, dims.saved, dims.h_prev, dims.zoneout)
    return samples * sum(
        t.numel() * t.element_size() for t, d in zip(rows, unbatched) if t is not None and d is None
    )


def _backward_vmap(info, in_dims: tuple, *args) -> tuple:
    """The batching rule of rnn_fused::backward. Without parameter gradients (jacrev or a
    vmapped vjp of the input or the states: one incoming gradient a sample) and with shared
    parameters, the samples fold into the batch as in _layer_vmap, one call; else each
    sample's parameter gradients are its own, sample by sample."""
    samples, call, dims = info.batch_size, BackwardCall(*args), BackwardCall(*in_dims)
    own = (dims.w_ih, dims.w_hh, dims.w_hr, dims.batch_sizes, dims.layer_norm)
    if (
        call.output_mask[2]
        or samples == 0
        or any(d is not None for d in own)
        or _fold_copies(call, dims, samples) > _FOLD_COPY_BYTES
    ):
        return _sample_by_sample(_ops.backward, samples, in_dims, args)
    packed = call.batch_sizes is not None
    at = _batch_dim(call.input, dims.input, packed)
    state_at = None if at is None else 0

    def folded() -> BackwardCall:
        return call._replace(
            grad_output=_fold(call.grad_output, dims.grad_output, at, samples),
            grad_h_n=_fold(call.grad_h_n, dims.grad_h_n, state_at, samples),
            grad_c_n=_fold(call.grad_c_n, dims.grad_c_n, state_at, samples),
            input=_fold(call.input, dims.input, at, samples),
            batch_sizes=call.batch_sizes * samples if packed else None,
            # The workspace's rows as the folded forward's: sample v of row r at r * V + v.
            saved=_fold(call.saved, dims.saved, 0, samples),
            h_prev=_fold(call.h_prev, dims.h_prev, 0, samples),
            batch=call.batch * samples if at is not None else samples,
            zoneout=_fold(call.zoneout, dims.zoneout, at, samples),
        )

    grad_input, grad_hx, grad_cx, *params = _run_folded(
        _ops.backward, folded, samples, args, in_dims
    )

    def unfold(t: Tensor, asked: bool, at: int | None) -> tuple[Tensor, int | None]:
        if not asked:  # an empty tensor, the same for every sample
            return t, None
        if at is None:
            return t, 0
        return t.unflatten(at, (t.shape[at] // samples, samples)), at + 1

    need_input, need_states, _ = call.output_mask
    results, out_dims = zip(
        unfold(grad_input, need_input, at),
        unfold(grad_hx, need_states, state_at),
        unfold(grad_cx, need_states and call.mode == "LSTM", state_at),
    )
    return (*results, *params), (*out_dims, *(None,) * len(params))


def _zoneout_mask_vmap(info, in_dims: tuple, *args) -> tuple:
    # A seed per sample (vmap's randomness="different"): a mask from each.
    return _sample_by_sample(_ops.zoneout_mask, info.batch_size, in_dims, args)


def _batched(op):
    """The kernel of op (rnn_fused::layer or forward) at vmap's key (FuncTorchBatched):
    _layer_vmap on the tensors of the current vmap level, as torch.library.register_vmap runs
    a rule (vmap's randomness does not matter to it: the operator draws nothing), without its
    wrapper's passes of pytree over the arguments (about 150 us a call, most of a short
    call's; AMD EPYC)."""

    def kernel(*args) -> tuple[Tensor, ...]:
        interpreter = _current_interpreter()
        level = interpreter.level()
        unwrapped, in_dims = [], []
        for a in args:
            a, d = _unwrap_batched(a, level) if isinstance(a, Tensor) else (a, None)
            unwrapped.append(a)
            in_dims.append(d)
        with torch._C._ExcludeDispatchKeyGuard(_BATCHED_KEY):
            if all(d is None for d in in_dims):  # nothing of this level's
                return op(*unwrapped)
            results, out_dims = _layer_vmap(op, interpreter.batch_size(), tuple(in_dims), unwrapped)
        return tuple(
            r if d is None else _add_batch_dim(r, d, level) for r, d in zip(results, out_dims)
        )

    return kernel


_impl.impl("layer", _batched(_ops.layer), "FuncTorchBatched")
_impl.impl("forward", _batched(_ops.forward), "FuncTorchBatched")
torch.library.register_vmap("rnn_fused::backward", _backward_vmap)
torch.library.register_vmap("rnn_fused::zoneout_mask", _zoneout_mask_vmap)


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
    zoneout: Tensor | None = None,
    layer_norm: Tensor | None = None,
    cell: bool = False,
    stacked_states: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One recurrent layer in one direction over all steps, with autograd.

    Args:
        mode: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU".
        input: [T, B, I], packed rows [N, I] when `batch_sizes` is given, or one step [B, I]
            (then output is [B, H_out]), or an unbatched step [I] (with states [H_out] and
            [H], and results without their batch dimension).
        w_ih, w_hh, b_ih, b_hh: torch.nn's weights of the layer (gates stacked in its order),
            in the input's dtype, or on the CPU (with w_hr) all in bfloat16 or float16 with a
            float32 input: products in that dtype, the rest and the results in float32, as
            torch.nn's LSTMCell and GRU run under CPU autocast.
        hx: initial hidden state [B, H_out] (zeros when None).
        cx: initial cell state [B, H] (LSTM only; zeros when None).
        w_hr: LSTM projection [proj_size, H].
        batch_sizes: per-step batch sizes of a PackedSequence (int64, CPU).
        reverse: run from the last step to the first.
        zoneout: shaped like the output: per row and unit, the weight w of the state kept
            from the step before, h_t = w h_{t-1} + (1 - w) h~_t with h~_t the cell's (a
            0/1 mask in training, the zoneout probability in eval); not differentiated, and
            not with w_hr.
        layer_norm: LSTM and GRU: the LayerNorm cells' gains (and the LSTM cell state's gain
            and bias), concatenated: see reference.cell_step. Not with w_hr.
        cell: the call is a step of LSTMCell, GRUCell or RNNCell, whose results under CPU
            autocast have other dtypes than a layer's (see _cpu_autocast_results).
        stacked_states: hx, cx, h_n and c_n as one layer's slice of torch.nn's states,
            [1, B, H] (what a one-layer module takes and returns), not [B, H].

    Returns:
        (output, h_n, c_n): output [T, B, H_out] ([N, H_out] packed, [B, H_out] for one
        step), h_n [B, H_out], and c_n [B, H] for LSTM, else None.
    """
    # Eager calls go to _C.layer, which declines (None) the ones _layer_in_python serves; the
    # arguments in LayerCall's order (a call per step costs its every microsecond).
    args = (mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse, zoneout)
    compiling = torch.compiler.is_compiling()
    if compiling or (done := _C.layer(*args, layer_norm, stacked_states, cell)) is None:
        if stacked_states:  # the views _C.layer makes in C++
            hx, cx = (None if t is None else t.squeeze(0) for t in (hx, cx))
            args = (mode, input, hx, cx, *args[4:])
        done = _layer_in_python(LayerCall(*args, layer_norm), cell, compiling)
        if stacked_states:
            output, h_n, c_n = done
            done = output, h_n.unsqueeze(0), (c_n.unsqueeze(0) if mode == "LSTM" else None)
    output, h_n, c_n = done
    return output, h_n, (c_n if mode == "LSTM" else None)


def _layer_in_python(
    call: LayerCall, cell: bool, compiling: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The calls of rnn_layer that _C.layer declines (torch.func transforms, forward-mode AD:
    _FusedLayer or reference.py's loop for those that differentiate; under autocast cast
    first), and every call under torch.compile, which traces torch.ops.rnn_fused.layer."""
    c = call
    if torch._C._is_any_autocast_enabled() and torch.float32 in (c.input.dtype, c.w_ih.dtype):
        if (done := _under_autocast(call, cell)) is not None:
            return done
    if _differentiated_in_trace() if compiling else _differentiated_by_transform():
        if not compiling and _fused_differentiation() and not _one_step(call):
            return _fused_layer(call)
        from . import reference

        if not compiling and _forward_ad._current_level >= 0:
            c = call = _element_wise_operands_dual(call)
        return reference.rnn_layer(
            c.mode, c.input, c.w_ih, c.w_hh, c.b_ih, c.b_hh, c.hx, c.cx,
            w_hr=c.w_hr, batch_sizes=c.batch_sizes, reverse=c.reverse, zoneout=c.zoneout,
            layer_norm=c.layer_norm,
        )  # fmt: skip
    if compiling and c.batch_sizes is not None and c.batch_sizes.numel() > 0 and c.hx is None:
        call = _with_zero_states(call)
    return _ops.layer(*call)


def _with_zero_states(call: LayerCall) -> LayerCall:
    """A packed call's zero initial states, made explicit: without them the traced operator's
    batch (the first step's) would be a size of its own, which vmap's rule cannot unfold."""
    batch = call.batch_sizes[0].item()
    hidden, out_size = _sizes(call.mode, call.w_ih, call.w_hr)
    hx = call.input.new_zeros(batch, out_size)
    cx = call.input.new_zeros(batch, hidden) if call.mode == "LSTM" and call.cx is None else call.cx
    return call._replace(hx=hx, cx=cx)


def _with_tangent(t: object) -> object:
    """A tensor without a tangent at the current forward-mode level made dual with a zero
    one: PyTorch's forward-mode formulas take 100-200 us more for an element-wise operation
    of a dual and a plain tensor (a bias added to a product) than of two duals (about 5 us;
    AMD EPYC). Not for the weight matrices: a zero tangent costs a product with zeros each."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or _is_batched(t):
        return t  # (vmap's tensors inside jvp have no rule for unpack_dual: left as they are)
    if _forward_ad.unpack_dual(t).tangent is not None:
        return t
    return _forward_ad.make_dual(t, torch.zeros_like(t))


def _element_wise_operands_dual(call: LayerCall) -> LayerCall:
    """call with _with_tangent on every tensor but the weight matrices (IndRNN's vector W_hh
    is an element-wise operand)."""
    c = call._replace(
        **{f: _with_tangent(t) for f, t in call._asdict().items() if f not in _MATRICES}
    )
    return c._replace(w_hh=_with_tangent(c.w_hh)) if c.w_hh.dim() == 1 else c


_MATRICES = ("w_ih", "w_hh", "w_hr")


# The least work (multiply-adds of a direction's products) for which both_directions opens a
# parallel region: the bar of the CPU engine's parallel products (csrc/cpu/gemm.h,
# split_over_threads). Below it a region costs more than it saves, and a process that never
# opens one can fork.
_MIN_DIRECTION_WORK = 1 << 16


class Direction(NamedTuple):
    """One direction's own arguments of a bidirectional layer (see rnn_layer)."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    hx: Tensor | None
    cx: Tensor | None
    w_hr: Tensor | None
    zoneout: Tensor | None
    layer_norm: Tensor | None


def both_directions(
    mode: str, input: Tensor, directions: tuple[Direction, Direction], batch_sizes: Tensor | None
) -> list[tuple[Tensor, Tensor, Tensor | None]] | None:
    """Both directions of a bidirectional layer at once on the CPU, one thread each, where
    nothing needs a graph: [(output, h_n, c_n)] per direction, as rnn_layer's. None where
    rnn_layer must run each direction instead: on a GPU, with one thread, with gradients to
    record, under autocast, torch.compile, torch.jit.trace, torch.func transforms,
    forward-mode AD, a Python dispatch mode or tensor subclasses (the threads would not see
    them), and where a direction's products come to fewer than _MIN_DIRECTION_WORK
    multiply-adds."""
    if torch.compiler.is_compiling() or input.device.type != "cpu" or torch.get_num_threads() < 2:
        return None
    f, r = directions
    rows = input.numel() // max(input.shape[-1], 1)
    if rows * f.w_ih.shape[0] * (f.w_ih.shape[1] + f.w_hh.shape[-1]) < _MIN_DIRECTION_WORK:
        return None
    tensors = (input, *(t for d in directions for t in d if t is not None))
    if (
        (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        or torch._C._is_any_autocast_enabled()
        or torch.jit.is_tracing()
        or _peek_interpreter() is not None
        or _forward_ad._current_level >= 0
        or _python_dispatch._get_current_dispatch_mode() is not None
        or torch.overrides.has_torch_function(tensors)
    ):
        return None
    results = _C.layer_pair(
        mode, input, [f.hx, r.hx], [f.cx, r.cx], [f.w_ih, r.w_ih], [f.w_hh, r.w_hh],
        [f.b_ih, r.b_ih], [f.b_hh, r.b_hh], [f.w_hr, r.w_hr], batch_sizes,
        [f.zoneout, r.zoneout], [f.layer_norm, r.layer_norm],
    )  # fmt: skip
    return [(out, h, c if mode == "LSTM" else None) for out, h, c in results]


def cell_step(
    mode: str,
    input: Tensor,
    hx: Tensor | None,
    cx: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor | None] | None:
    """One eager step of a cell: rnn_layer on input [B, I] or unbatched [I] (one step;
    states None are zeros), returning (h, c) (c None except for LSTM), by the shortest door
    a step per call can take. None where rnn_layer must run the call instead: tracing by
    torch.compile, and the calls _C.cell declines as _C.layer does (torch.func transforms,
    forward-mode AD); None too for parameters of another dtype than the input's outside
    autocast, which torch.nn's cells refuse (the caller raises their error)."""
    if torch.compiler.is_compiling():
        return None
    return _C.cell(mode, input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def served_by_rnn_layer() -> bool:
    """Whether cell_step declines every call now (torch.compile, torch.func transforms,
    forward-mode AD: as _C.cell's test), for a caller with work to do only if it serves."""
    return (
        torch.compiler.is_compiling()
        or _peek_interpreter() is not None
        or _forward_ad._current_level >= 0
    )


def _differentiated_by_transform() -> bool:
    """Whether forward-mode AD or a torch.func transform that differentiates (grad, vjp,
    jacrev, jvp, jacfwd, hessian) is active. The operator's autograd (a C++ autograd
    function) serves neither, so such calls run _FusedLayer where _fused_differentiation
    allows, else reference.py's time loop: the same recurrence in PyTorch operators, which
    have forward-mode and torch.func formulas, so tangents and gradients are exact (unfused,
    and as slow as an unfused layer). vmap alone keeps the operator; vmap inside grad does
    not (every level of the stack is asked)."""
    if _peek_interpreter() is not None:
        if any(level.key() != _VMAP for level in _interpreter_stack()):
            return True
    return _forward_ad._current_level >= 0


def _differentiated_in_trace() -> bool:
    """Under torch.compile: whether a torch.func transform that differentiates (grad, vjp,
    jacrev, jvp) is active, which the traced operator's C++ autograd function cannot serve, so
    the call traces reference.py's loop. Dynamo cannot trace _interpreter_stack; it traces
    each level's question, the next level down reached by lowering the current one."""
    if not torch._C._are_functorch_transforms_active():
        return False
    level = _current_interpreter()
    if level.key() != _VMAP:
        return True
    with level.lower():
        return _differentiated_in_trace()


def _fused_differentiation() -> bool:
    """Whether a call that a torch.func transform differentiates can run the fused operators
    (_FusedLayer): reverse-mode levels (grad, vjp, jacrev) and vmaps only. Forward mode (jvp,
    jacfwd, forward-mode AD) needs a forward-mode formula, which _FusedLayer has not: those
    calls run reference.py's loop, as do calls of one step (a cell's), where functorch's
    handling of _FusedLayer and _FusedGradients costs more than the step's few operations
    (a loop of 50 LSTMCell(32) steps at batch 1 under grad: 30 ms by reference.py's step,
    45 fused; AMD EPYC)."""
    if _forward_ad._current_level >= 0:
        return False
    return all(level.key() in (_VMAP, _GRAD) for level in _interpreter_stack())


def _fused_layer(call: LayerCall) -> tuple[Tensor, Tensor, Tensor]:
    """rnn_fused::layer's results from _FusedLayer (a call of more than one step)."""
    output, h_n, c_n, _, _ = _FusedLayer.apply(*call)
    return output, h_n, c_n


class _FusedLayer(torch.autograd.Function):
    """rnn_fused::layer as a Python autograd function over the forward and backward
    operators, for torch.func's reverse-mode transforms (grad, vjp, jacrev), which the C++
    autograd function cannot serve and this one can: its vmap rule is generated from the
    operators' own (forward folds shared-parameter samples into its batch, the backward too
    unless each sample's parameter gradients are asked for), so per-sample gradients,
    vmap(grad(...)), and jacrev run fused too. The arguments are LayerCall's; the results
    are forward's (the workspace not differentiable). Its gradients come from
    _FusedGradients, differentiable again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*args: object) -> tuple[Tensor, ...]:
        c = LayerCall(*args)
        return _ops.forward(*c[:11], True, c.zoneout, c.layer_norm)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        c = LayerCall(*inputs)
        h_n, saved, h_prev = output[1], output[3], output[4]
        ctx.save_for_backward(*(c[k] for k in _TENSOR_FIELDS), saved, h_prev)
        ctx.mode, ctx.reverse, ctx.batch = c.mode, c.reverse, h_n.shape[0]
        ctx.mark_non_differentiable(saved, h_prev)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_workspace) -> tuple:
        *tensors, saved, h_prev = ctx.saved_tensors
        call = _call_of(ctx.mode, ctx.reverse, tensors)
        need = ctx.needs_input_grad  # per LayerCall field
        mask = (need[1], need[2] or need[3], any(need[4:9]) or need[12])
        if ctx.mode != "LSTM":
            grad_c_n = None
        grads = _FusedGradients.apply(
            ctx.batch, mask, *call, grad_output, grad_h_n, grad_c_n, saved, h_prev
        )
        result: list[Tensor | None] = [None] * len(need)
        for slot, grad in zip(_GRADIENT_SLOTS, grads):
            result[slot] = grad if need[slot] else None
        # As the C++ node: over one step, W_hr reaches c_n through no path, so without an
        # incoming gradient for the output or h_n its gradient is None, not zeros.
        if grad_output is None and grad_h_n is None and _one_step(call):
            result[8] = None
        return tuple(result)


class _FusedGradients(torch.autograd.Function):
    """_FusedLayer's gradients (rnn_fused::backward's, for _GRADIENT_SLOTS) from the fused
    backward operator. Differentiating them again (a double backward, a gradient penalty
    inside torch.func.grad, jacrev of jacrev, an incoming gradient that requires grad) runs
    reference.py's loop: the backward is the vector-Jacobian product of _reference_vjp's
    gradients, taken by torch.func.vjp, which composes with every transform around it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(batch: int, mask: tuple[bool, bool, bool], *args: object) -> tuple[Tensor, ...]:
        c, (grad_output, grad_h_n, grad_c_n, saved, h_prev) = LayerCall(*args[:13]), args[13:]
        return _ops.backward(
            c.mode, grad_output, grad_h_n, grad_c_n, c.input, c.w_ih, c.w_hh, c.w_hr,
            c.batch_sizes, c.reverse, saved, h_prev, batch, list(mask), c.zoneout, c.layer_norm,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        call, incoming = LayerCall(*inputs[2:15]), inputs[15:18]
        ctx.mode, ctx.reverse = call.mode, call.reverse
        ctx.save_for_backward(*(call[k] for k in _TENSOR_FIELDS), *incoming)
        ctx.set_materialize_grads(False)  # a gradient not differentiated again: None

    @staticmethod
    def backward(ctx, *grad_grads: Tensor | None) -> tuple:
        *tensors, grad_output, grad_h_n, grad_c_n = ctx.saved_tensors
        call = _call_of(ctx.mode, ctx.reverse, tensors)
        # The gradients differentiated (their slots), as functions of the present tensors of
        # the call and the present incoming gradients.
        by_slot = dict(zip(_GRADIENT_SLOTS, grad_grads))
        slots = [slot for slot in _GRADIENT_SLOTS if call[slot] is not None]
        wanted = [slot for slot in slots if by_slot[slot] is not None]
        given = (grad_output, grad_h_n, grad_c_n)
        incoming = [k for k, g in enumerate(given) if g is not None]

        def gradients(*primals: Tensor) -> tuple[Tensor, ...]:
            c = call._replace(**{LayerCall._fields[s]: t for s, t in zip(slots, primals)})
            g: list[Tensor | None] = [None, None, None]
            for k, t in zip(incoming, primals[len(slots) :]):
                g[k] = t
            found = _reference_vjp(c, *g)
            return tuple(found[slot] for slot in wanted)

        result: list[Tensor | None] = [None] * len(ctx.needs_input_grad)  # per forward argument
        if not wanted:
            return tuple(result)
        primals = [call[s] for s in slots] + [given[k] for k in incoming]
        _, pull = torch.func.vjp(gradients, *primals)
        found = pull(tuple(by_slot[slot] for slot in wanted))
        for s, g in zip(slots, found):
            result[2 + s] = g
        for k, g in zip(incoming, found[len(slots) :]):
            result[2 + len(LayerCall._fields) + k] = g
        return tuple(result)


def _reference_vjp(
    call: LayerCall, grad_output: Tensor | None, grad_h_n: Tensor | None, grad_c_n: Tensor | None
) -> dict[int, Tensor]:
    """The gradients of call's present differentiable tensors (by LayerCall field) for the
    incoming ones (None: zeros), from reference.py's loop by torch.func.vjp. Half-type
    parameters of a float32 call read as float32 (LayerCall)."""
    from . import reference

    slots = [slot for slot in _GRADIENT_SLOTS if call[slot] is not None]

    def layer(*primals: Tensor) -> tuple[Tensor, ...]:
        c = call._replace(**{LayerCall._fields[s]: t for s, t in zip(slots, primals)})
        w_ih, w_hh, b_ih, b_hh, w_hr = (
            None if t is None else t.to(c.input.dtype)
            for t in (c.w_ih, c.w_hh, c.b_ih, c.b_hh, c.w_hr)
        )
        output, h_n, c_n = reference.rnn_layer(
            c.mode, c.input, w_ih, w_hh, b_ih, b_hh, c.hx, c.cx, w_hr=w_hr,
            batch_sizes=c.batch_sizes, reverse=c.reverse, zoneout=c.zoneout,
            layer_norm=c.layer_norm,
        )  # fmt: skip
        return (output, h_n) if c_n is None else (output, h_n, c_n)

    outputs, pull = torch.func.vjp(layer, *(call[s] for s in slots))
    given = (grad_output, grad_h_n, grad_c_n)
    cotangents = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, given))
    return dict(zip(slots, pull(cotangents)))


def _call_of(mode: str, reverse: bool, tensors: list[Tensor | None]) -> LayerCall:
    """The LayerCall of mode, reverse and its tensors in _TENSOR_FIELDS' order."""
    field = dict(zip(_TENSOR_FIELDS, tensors))
    return LayerCall(mode, *(field[k] for k in range(1, 10)), reverse, field[11], field[12])


def _one_step(call: LayerCall) -> bool:
    """Whether the call is one step: a packed batch of one, [B, I], [I] or [1, B, I]."""
    if call.batch_sizes is not None:
        return len(call.batch_sizes) == 1
    return call.input.dim() <= 2 or call.input.shape[0] == 1


# LayerCall's tensor fields, and those of rnn_fused::backward's gradients in its order.
_TENSOR_FIELDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)
_GRADIENT_SLOTS = (1, 2, 3, 4, 5, 6, 7, 8, 12)


def _under_autocast(call: LayerCall, cell: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """A float32 call (or one with float32 weights) under autocast, as torch.nn's recurrent
    layers run it: products in the autocast dtype, and results in the dtypes torch.nn's
    give. None: autocast is off for the call's device. The calls Python serves; the eager
    doors run the same rule in C++ (csrc/autocast_call.h)."""
    device = call.input.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None  # off, or a device without autocast (meta)
    low = torch.get_autocast_dtype(device)
    low_h, low_c = (True, True) if device != "cpu" else _cpu_autocast_results(call, cell)
    # The parameters in the autocast dtype (a compiled graph casts them in the graph; the eager
    # doors take torch's cached cast, once per autocast region).
    params = [None if t is None else t.to(low) for t in call[4:9]]
    if low_h and low_c:
        cast = [None if t is None else t.to(low) for t in call[1:4]] + params
    else:
        # A float32 input rounded to the autocast dtype: the operator's products run in the
        # parameters' dtype, and the states, the cell math and the results stay float32, as
        # torch.nn's.
        states = [None if t is None else t.float() for t in (call.hx, call.cx)]
        cast = [call.input.to(low).float(), *states, *params]
    zoneout, ln = (None if t is None else t.to(cast[0].dtype) for t in call[11:13])
    with torch.autocast(device, enabled=False):
        output, h_n, c_n = rnn_layer(
            call.mode, cast[0], cast[3], cast[4], cast[5], cast[6], cast[1], cast[2],
            w_hr=cast[7], batch_sizes=call.batch_sizes, reverse=call.reverse, zoneout=zoneout,
            layer_norm=ln,
        )  # fmt: skip
    if low_h and not low_c:
        output, h_n = output.to(low), h_n.to(low)
    return output, h_n, c_n


def _all_full(batch_sizes: Tensor) -> bool:
    """Whether a packed input's steps all have the first step's batch (no sequence ends
    early). A traced call cannot branch on the sizes' values: it answers no, the general
    packed case (torch.nn's layers do not compile)."""
    if torch.compiler.is_compiling():
        return False
    return bool(batch_sizes[0] == batch_sizes[-1])


def _cpu_autocast_results(call: LayerCall, cell: bool) -> tuple[bool, bool]:
    """Whether (output and h_n, c_n) come out in the autocast dtype from torch.nn's layer or
    cell of the call on the CPU. Its products run in the autocast dtype there, and the rest
    follows type promotion with the float32 states, except in oneDNN's LSTM. (The eager
    doors' is csrc/autocast_call.cpp's autocast_results: keep the two alike.)"""
    if call.mode in ("RNN_TANH", "RNN_RELU"):
        return True, True  # h = act(x W + h W): products only
    if call.mode == "GRU":
        return False, False  # h = n + z (h_prev - n), with the float32 h_prev
    # A padded LSTM layer without projection runs oneDNN's LSTM whole, and so does a packed one
    # whose sequences all have the first one's length.
    if not cell and call.w_hr is None and (call.batch_sizes is None or _all_full(call.batch_sizes)):
        return True, True
    # c = f c_prev + i g with the float32 c_prev, h = o tanh(c): float32; a projection of h is
    # a product again.
    return call.w_hr is not None, False

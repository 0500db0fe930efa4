"""PyTorch's own module test inputs (torch.testing._internal.common_modules: the RNN, GRU,
LSTM and cell input and error generators) run over our classes with generic checks in the
manner of PyTorch's test_modules.py: forward against the references and torch.nn, factory
kwargs, repr, save/load, non-contiguous inputs, errors, gradcheck and gradgradcheck."""

from __future__ import annotations

import io

import pytest
import torch
import torch.testing._internal.common_modules as common_modules
from tolerances import GRADCHECK, assert_close
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnn_fused

OURS = {
    nn.LSTM: rnn_fused.LSTM,
    nn.GRU: rnn_fused.GRU,
    nn.RNN: rnn_fused.RNN,
    nn.LSTMCell: rnn_fused.LSTMCell,
    nn.GRUCell: rnn_fused.GRUCell,
    nn.RNNCell: rnn_fused.RNNCell,
}
INFOS = [info for info in common_modules.module_db if info.module_cls in OURS]
assert len(INFOS) == len(OURS), "common_modules lost an RNN ModuleInfo"
IDS = [info.module_cls.__name__ for info in INFOS]


def _samples(info, dtype=torch.float64, requires_grad=True):
    extra = {} if info.module_cls.__name__.endswith("Cell") else {"with_packed_sequence": True}
    return info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=True, **extra
    )


def _build(info, sample, dtype=torch.float64):
    ctor = sample.constructor_input
    ours = OURS[info.module_cls](*ctor.args, **ctor.kwargs, dtype=dtype)
    theirs = info.module_cls(*ctor.args, **ctor.kwargs, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, PackedSequence):
        return value._replace(data=fn(value.data))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    return value


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_forward_matches_references(info):
    for sample in _samples(info):
        ours, theirs = _build(info, sample)
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        out = _tensors(ours(*args, **kwargs))
        for a, b in zip(out, _tensors(theirs(*args, **kwargs)), strict=True):
            assert_close(a, b, f"{sample.desc} vs torch.nn")
        # The unbatched reference of common_modules batchifies plain tensors only.
        if sample.reference_fn is not None and not isinstance(args[0], PackedSequence):
            ref = sample.reference_fn(ours, *args, **kwargs)  # it adds the parameters
            for a, b in zip(out, _tensors(ref), strict=True):
                assert_close(a, b, f"{sample.desc} vs reference_fn")


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_factory_kwargs_and_meta(info):
    sample = _samples(info)[0]
    ctor = sample.constructor_input
    cls = OURS[info.module_cls]
    m = cls(*ctor.args, **ctor.kwargs, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    meta = cls(*ctor.args, **ctor.kwargs, device="meta")
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_repr_and_save_load(info):
    for sample in _samples(info):
        ours, theirs = _build(info, sample)
        assert repr(ours) == repr(theirs)
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        args = sample.forward_input.args
        for a, b in zip(_tensors(loaded(*args)), _tensors(ours(*args)), strict=True):
            assert torch.equal(a, b)


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last dimension is strided."""
    spread = torch.stack([t.detach(), torch.full_like(t, float("nan"))], dim=-1)
    out = spread[..., 0]
    assert t.dim() == 0 or not out.is_contiguous()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_non_contiguous_inputs(info):
    for sample in _samples(info):
        ours, _ = _build(info, sample)
        args = sample.forward_input.args
        strided = _map_tensors(args, _non_contiguous)
        out, out_s = _tensors(ours(*args)), _tensors(ours(*strided))
        for a, b in zip(out_s, out, strict=True):
            assert_close(a, b, sample.desc)
        leaves = [t for t in _tensors(args) if t.requires_grad]
        leaves_s = [t for t in _tensors(strided) if t.requires_grad]
        g = torch.autograd.grad(sum(o.sum() for o in out), leaves)
        g_s = torch.autograd.grad(sum(o.sum() for o in out_s), leaves_s)
        for a, b in zip(g_s, g, strict=True):
            assert_close(a, b, f"{sample.desc} grad")


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_errors(info):
    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=False, training=True
    )
    assert errors
    cls = OURS[info.module_cls]
    for err in errors:
        ctor = err.module_error_input.constructor_input
        fwd = err.module_error_input.forward_input
        with pytest.raises(err.error_type, match=err.error_regex):
            if err.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
                cls(*ctor.args, **ctor.kwargs)
            else:
                cls(*ctor.args, **ctor.kwargs)(*fwd.args, **fwd.kwargs)


def _as_function(module, args):
    """(tensor inputs..., parameters...) -> outputs, for gradcheck."""
    names = [n for n, _ in module.named_parameters()]
    leaves = [t for t in _tensors(args) if t.requires_grad]

    def fn(*flat):
        it = iter(flat[: len(leaves)])
        new_args = _map_tensors(args, lambda t: next(it) if t.requires_grad else t)
        params = dict(zip(names, flat[len(leaves) :], strict=True))
        return tuple(_tensors(torch.func.functional_call(module, params, new_args)))

    return fn, [*leaves, *module.parameters()]


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_gradcheck(info):
    for sample in _samples(info):
        ours, _ = _build(info, sample)
        fn, inputs = _as_function(ours, sample.forward_input.args)
        assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_gradgradcheck(info):
    for sample in _samples(info)[:2]:
        ours, _ = _build(info, sample)
        fn, inputs = _as_function(ours, sample.forward_input.args)
        assert torch.autograd.gradgradcheck(fn, inputs)

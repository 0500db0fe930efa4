"""Swap the torch.nn recurrent modules inside a model for rnn_fused's, keeping the weights."""

from __future__ import annotations

from torch import nn

from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

_OURS = {m._torch_class: m for m in (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)}


def replace_rnns(model: nn.Module) -> nn.Module:
    """Replaces every torch.nn LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell in `model`
    (the model itself included) by the rnn_fused equivalent, in place, and returns the
    model. Each replacement holds the original's Parameter objects and hooks (from_torch),
    so optimisers made before, frozen weights and weights tied between modules stay as
    they were; a module registered in two places gets one replacement. Only those exact
    classes are replaced: a subclass may change forward, and stays as it is."""
    return _replaced(model, {})


def _replaced(model: nn.Module, done: dict[int, nn.Module]) -> nn.Module:
    if id(model) in done:
        return done[id(model)]
    if type(model) in _OURS:
        new = _OURS[type(model)].from_torch(model)
    else:
        new = model
        for name, child in model._modules.items():  # each registration (named_children: once)
            if child is not None:
                model._modules[name] = _replaced(child, done)
    done[id(model)] = new
    return new

"""Swap the torch.nn recurrent modules inside a model for rnn_fused's, keeping the weights."""

from __future__ import annotations

from torch import nn

from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

_OURS = {m._torch_class: m for m in (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)}


def replace_rnns(model: nn.Module) -> nn.Module:
    """Replaces every torch.nn LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell in `model`
    (the model itself included) by the rnn_fused equivalent sharing its parameters' data,
    in place, and returns the model."""
    if type(model) in _OURS:
        return _OURS[type(model)].from_torch(model)
    for name, child in model.named_children():
        setattr(model, name, replace_rnns(child))
    return model

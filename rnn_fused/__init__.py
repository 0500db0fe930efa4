"""rnn_fused: fused LSTM, GRU and RNN recurrences for PyTorch, on CPU and CUDA.

Drop-in modules (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell), IndRNN, LayerNormLSTM and
LayerNormGRU and their cells, the per-layer operator (rnn_layer) and converters between
torch.nn and rnn_fused modules.
"""

from . import ops  # noqa: F401  (loads the extension and registers the operators)
from .convert import replace_rnns
from .modules import (
    GRU,
    LSTM,
    RNN,
    GRUCell,
    IndRNN,
    LayerNormGRU,
    LayerNormGRUCell,
    LayerNormLSTM,
    LayerNormLSTMCell,
    LSTMCell,
    RNNCell,
)
from .ops import rnn_layer

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "IndRNN",
    "LSTMCell",
    "LayerNormGRU",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "RNNCell",
    "replace_rnns",
    "rnn_layer",
]

"""rnn_fused: fused LSTM, GRU and RNN recurrences for PyTorch, on CPU and CUDA."""

from . import ops  # noqa: F401  (loads the extension and registers the operators)
from .ops import rnn_layer

__all__ = ["rnn_layer"]

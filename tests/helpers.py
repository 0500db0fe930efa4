"""Random layers and inputs for the tests: fresh random values, odd sizes, never zeros."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from rnn_fused.ops import GATES, MODES

CELLS = MODES
# Module-level tests run on every device; CUDA variants are reported as skipped without a GPU.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    ),
]

# torch.nn layer configurations the torch.func tests run (name, keyword arguments), and ids.
FUNC_LAYERS = [
    ("LSTM", dict()),
    ("LSTM", dict(proj_size=2, num_layers=2)),
    ("GRU", dict(bidirectional=True, batch_first=True)),
    ("RNN", dict(nonlinearity="relu", num_layers=2, bias=False)),
    ("RNN", dict(nonlinearity="tanh", bidirectional=True)),
]
FUNC_LAYER_IDS = ["LSTM", "LSTM-proj-2", "GRU-bi-batch_first", "RNN-relu-2", "RNN-tanh-bi"]


@dataclass
class Layer:
    mode: str
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.w_ih, self.w_hh, self.b_ih, self.b_hh, self.w_hr) if t is not None]


def rand(*shape: int, dtype: torch.dtype, device: str = "cpu", scale: float = 0.5) -> Tensor:
    return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_()


def make_layer(
    mode: str,
    input_size: int,
    hidden: int,
    *,
    bias: bool = True,
    proj: int = 0,
    dtype: torch.dtype = torch.float64,
    device: str = "cpu",
    scale: float = 0.5,
) -> Layer:
    gh = GATES[mode] * hidden
    out = proj or hidden
    kw = dict(dtype=dtype, device=device, scale=scale)
    return Layer(
        mode,
        rand(gh, input_size, **kw),
        rand(gh, out, **kw),
        rand(gh, **kw) if bias else None,
        rand(gh, **kw) if bias else None,
        rand(proj, hidden, **kw) if proj else None,
    )


def make_states(
    layer: Layer, batch: int, *, dtype: torch.dtype, device: str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    hidden = layer.w_ih.shape[0] // GATES[layer.mode]
    out = layer.w_hr.shape[0] if layer.w_hr is not None else hidden
    h0 = rand(batch, out, dtype=dtype, device=device)
    c0 = rand(batch, hidden, dtype=dtype, device=device) if layer.mode == "LSTM" else None
    return h0, c0


def as_list(out: Tensor | tuple[Tensor, ...]) -> list[Tensor]:
    """A module's output (a tensor or a tuple of them) as a list of tensors."""
    return list(out) if isinstance(out, tuple) else [out]


def weighted_sum(outputs: tuple[Tensor | None, ...], weights: list[Tensor]) -> Tensor:
    """A scalar loss that gives every output element its own random gradient; weights pair
    with the outputs that are not None, in order."""
    present = [o for o in outputs if o is not None]
    return sum((o * w).sum() for o, w in zip(present, weights, strict=True))


def seed(*key: object) -> None:
    """Seeds torch from a test's parameters: fresh values per case, same values per run."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))

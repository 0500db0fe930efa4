"""The oracle: a plain PyTorch time loop for every cell, written straight from torch.nn's
equations with no fusion and no shared code with the kernels. Slow, obviously right, and
differentiable by autograd, so that every test can compare values and gradients with it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def _times(x: Tensor, w: Tensor) -> Tensor:
    """x W^T; a vector w is IndRNN's element-wise recurrent weight u: x * u."""
    return x @ w.t() if w.dim() == 2 else x * w


LAYER_NORM_EPS = 1e-5


def _normalized(v: Tensor, gain: Tensor, bias: Tensor | None = None) -> Tensor:
    """Layer normalisation over the last dimension: gain * (v - mean) / sqrt(var + eps)
    (+ bias), with the biased variance, as torch.nn.LayerNorm."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    y = (v - mean) / torch.sqrt(var + LAYER_NORM_EPS) * gain
    return y if bias is None else y + bias


def cell_step(
    mode: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    layer_norm: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One step of one cell: returns (h_t, c_t); c_t is None except for LSTM.

    layer_norm (LSTM and GRU; Ba, Kiros and Hinton 2016 as haste's LayerNorm cells): the
    gains of the normalisations of W_ih x and of W_hh h (each over all gates), then for LSTM
    the gain and bias of the normalisation of c_t before its tanh; concatenated, G*H, G*H
    (H, H). The biases are added after the normalisations; c_t itself is kept unnormalised."""
    gi = _times(x, w_ih)
    gh = _times(h, w_hh)
    if layer_norm is not None:
        gw = gi.shape[-1]
        gi = _normalized(gi, layer_norm[:gw])
        gh = _normalized(gh, layer_norm[gw : 2 * gw])
    gi = gi if b_ih is None else gi + b_ih
    gh = gh if b_hh is None else gh + b_hh
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        cn = c
        if layer_norm is not None:
            hidden = c.shape[-1]
            cn = _normalized(c, layer_norm[-2 * hidden : -hidden], layer_norm[-hidden:])
        h = torch.sigmoid(o) * torch.tanh(cn)
        return (h if w_hr is None else h @ w_hr.t()), c
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None
    raise ValueError(f"unknown mode {mode!r}")


def dropconnect_weight(w: Tensor, p: float) -> Tensor:
    """A weight under DropConnect as one mask drawn from torch's generator: each element kept
    with probability 1 - p and scaled by 1 / (1 - p), the draw F.dropout makes."""
    return w * torch.empty_like(w).bernoulli_(1 - p).div_(1 - p)


def zoneout_mask(seed: int, shape: tuple[int, ...], p: float) -> Tensor:
    """The CPU's zoneout mask for a seed (csrc/cpu/zoneout_mask.cpp), in float64: element i
    (row-major) is 1 where SplitMix64's i-th output from seed, shifted right by 11 bits and
    scaled by 2^-53, is below p."""
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(n, dtype=np.uint64) + np.uint64(1)) * np.uint64(
            0x9E3779B97F4A7C15
        )
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return torch.from_numpy((u < p).astype(np.float64)).reshape(shape)


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
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Same contract as rnn_fused.ops.rnn_layer, computed step by step. zoneout (shaped like
    the output): per row and unit, the weight of h_{t-1} in h_t = w h_{t-1} + (1 - w) h~_t,
    where h~_t is the cell's. layer_norm: see cell_step."""
    if zoneout is not None and w_hr is not None:
        raise ValueError("zoneout needs a layer without projection, got w_hr")
    if batch_sizes is None and input.dim() == 1:  # an unbatched step [I]: a batch of one's
        row = [None if t is None else t.unsqueeze(0) for t in (input, hx, cx, zoneout)]
        output, h_n, c_n = rnn_layer(
            mode, row[0], w_ih, w_hh, b_ih, b_hh, row[1], row[2],
            w_hr=w_hr, zoneout=row[3], layer_norm=layer_norm,
        )  # fmt: skip
        return output[0], h_n[0], (None if c_n is None else c_n[0])
    hidden = w_hh.shape[0] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
    out_size = w_hr.shape[0] if w_hr is not None else hidden
    if batch_sizes is None and input.dim() == 2:  # one step [B, I]: a cell's step
        h = hx if hx is not None else input.new_zeros(input.shape[0], out_size)
        c = cx if cx is not None or mode != "LSTM" else input.new_zeros(input.shape[0], hidden)
        h_t, c_t = cell_step(mode, input, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, layer_norm)
        if zoneout is not None:
            h_t = zoneout * h + (1 - zoneout) * h_t
        return h_t, h_t, c_t
    if batch_sizes is None:
        steps = list(input.unbind(0))
        sizes = [input.shape[1]] * input.shape[0]
        keeps = None if zoneout is None else list(zoneout.unbind(0))
    else:
        sizes = [int(s) for s in batch_sizes]
        steps = list(input.split(sizes, dim=0))
        keeps = None if zoneout is None else list(zoneout.split(sizes, dim=0))
    batch = sizes[0]
    h = hx if hx is not None else input.new_zeros(batch, out_size)
    c = None
    if mode == "LSTM":
        c = cx if cx is not None else input.new_zeros(batch, hidden)
    outputs: list[Tensor] = [input.new_empty(0)] * len(steps)
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    for t in order:
        n = sizes[t]
        # Sequences shorter than the batch are the last rows: only the first n step now.
        h_t, c_t = cell_step(
            mode, steps[t], h[:n], None if c is None else c[:n], w_ih, w_hh, b_ih, b_hh, w_hr,
            layer_norm,
        )  # fmt: skip
        if keeps is not None:
            h_t = keeps[t] * h[:n] + (1 - keeps[t]) * h_t
        outputs[t] = h_t
        h = torch.cat([h_t, h[n:]], dim=0)
        if c is not None:
            c = torch.cat([c_t, c[n:]], dim=0)
    output = torch.stack(outputs) if batch_sizes is None else torch.cat(outputs, dim=0)
    return output, h, c

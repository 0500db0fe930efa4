"""Variant rows of `make bench`: the cells and options torch.nn lacks, against the same
recurrence written as a plain PyTorch time loop (what a user would otherwise write), eager
and under torch.compile, forward (no grad) and forward + backward, with our LSTM of the same
size as a yardstick. Times are median ms of interleaved rounds."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnn_fused
from benchmarks.per_call import per_call_us, timed_call

T, B, H = 100, 32, 256
DROPCONNECT = 0.25
ZONEOUT = 0.1


def indrnn_loop(m: rnn_fused.IndRNN) -> Callable[[Tensor], Tensor]:
    def loop(x: Tensor) -> Tensor:
        xg = x @ m.weight_ih_l0.t() + m.bias_ih_l0 + m.bias_hh_l0
        h, outputs = x.new_zeros(x.shape[1], H), []
        for t in range(x.shape[0]):
            h = torch.tanh(xg[t] + m.weight_hh_l0 * h)
            outputs.append(h)
        return torch.stack(outputs)

    return loop


def dropconnect_lstm_loop(m: rnn_fused.LSTM) -> Callable[[Tensor], Tensor]:
    def loop(x: Tensor) -> Tensor:
        w_hh = F.dropout(m.weight_hh_l0, DROPCONNECT, training=True)  # one mask per forward
        xg = x @ m.weight_ih_l0.t() + m.bias_ih_l0 + m.bias_hh_l0
        h = c = x.new_zeros(x.shape[1], H)
        outputs = []
        for t in range(x.shape[0]):
            i, f, g, o = (xg[t] + h @ w_hh.t()).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs)

    return loop


def zoneout_lstm_loop(m: rnn_fused.LSTM) -> Callable[[Tensor], Tensor]:
    def loop(x: Tensor) -> Tensor:
        # 1: keep h. The module's own draw (bernoulli_ would cost the loop about 6 ms more).
        keep = rnn_fused.ops.zoneout_mask((*x.shape[:2], H), ZONEOUT, x)
        xg = x @ m.weight_ih_l0.t() + m.bias_ih_l0 + m.bias_hh_l0
        h = c = x.new_zeros(x.shape[1], H)
        outputs = []
        for t in range(x.shape[0]):
            i, f, g, o = (xg[t] + h @ m.weight_hh_l0.t()).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = h + (1 - keep[t]) * (torch.sigmoid(o) * torch.tanh(c) - h)
            outputs.append(h)
        return torch.stack(outputs)

    return loop


def layer_norm_lstm_loop(m: rnn_fused.LayerNormLSTM) -> Callable[[Tensor], Tensor]:
    def loop(x: Tensor) -> Tensor:
        ln = F.layer_norm
        gi = ln(x @ m.weight_ih_l0.t(), (4 * H,), m.ln_weight_ih_l0)
        xg = gi + m.bias_ih_l0 + m.bias_hh_l0
        h = c = x.new_zeros(x.shape[1], H)
        outputs = []
        for t in range(x.shape[0]):
            gh = ln(h @ m.weight_hh_l0.t(), (4 * H,), m.ln_weight_hh_l0)
            i, f, g, o = (xg[t] + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            cn = ln(c, (H,), m.ln_weight_cell_l0, m.ln_bias_cell_l0)
            h = torch.sigmoid(o) * torch.tanh(cn)
            outputs.append(h)
        return torch.stack(outputs)

    return loop


def layer_norm_gru_loop(m: rnn_fused.LayerNormGRU) -> Callable[[Tensor], Tensor]:
    def loop(x: Tensor) -> Tensor:
        ln = F.layer_norm
        xg = ln(x @ m.weight_ih_l0.t(), (3 * H,), m.ln_weight_ih_l0) + m.bias_ih_l0
        h = x.new_zeros(x.shape[1], H)
        outputs = []
        for t in range(x.shape[0]):
            gh = ln(h @ m.weight_hh_l0.t(), (3 * H,), m.ln_weight_hh_l0) + m.bias_hh_l0
            x_r, x_z, x_n = xg[t].chunk(3, dim=1)
            h_r, h_z, h_n = gh.chunk(3, dim=1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h = n + z * (h - n)
            outputs.append(h)
        return torch.stack(outputs)

    return loop


VARIANTS = {
    "IndRNN (tanh)": (lambda: rnn_fused.IndRNN(H, H), indrnn_loop),
    f"LSTM dropconnect={DROPCONNECT}": (
        lambda: rnn_fused.LSTM(H, H, dropconnect=DROPCONNECT),
        dropconnect_lstm_loop,
    ),
    f"LSTM zoneout={ZONEOUT}": (lambda: rnn_fused.LSTM(H, H, zoneout=ZONEOUT), zoneout_lstm_loop),
    "LayerNormLSTM": (lambda: rnn_fused.LayerNormLSTM(H, H), layer_norm_lstm_loop),
    "LayerNormGRU": (lambda: rnn_fused.LayerNormGRU(H, H), layer_norm_gru_loop),
}


def _sides(m: nn.Module, loop, lstm: nn.Module, x: Tensor, grad: bool) -> dict:
    compiled = torch.compile(loop)
    xg = x.clone().requires_grad_(grad)
    return {
        "loop": timed_call(lambda: loop(xg), grad),
        "loop compiled": timed_call(lambda: compiled(xg), grad),
        "rnn_fused": timed_call(lambda: m(xg)[0], grad),
        "our LSTM": timed_call(lambda: lstm(xg)[0], grad),
    }


def run(rounds: int) -> list[dict]:
    """Every variant row, printed as it is measured."""
    print(f"\nvariants at T={T} B={B} I=H={H} (median ms; speedup = loop / rnn_fused)")
    names = ["loop", "loop compiled", "rnn_fused", "our LSTM"]
    print(f"{'variant':28} {'kind':8}" + "".join(f"{n:>14}" for n in names), end="")
    print(f"{'vs loop':>9}{'vs compiled':>12}{'/ LSTM':>8}{'max|diff|':>11}")
    rows = []
    for name, (make, make_loop) in VARIANTS.items():
        torch.manual_seed(0)
        m, lstm = make(), rnn_fused.LSTM(H, H)
        loop = make_loop(m)
        x = torch.randn(T, B, H)
        torch.manual_seed(1)
        ours = m(x)[0]
        torch.manual_seed(1)
        diff = (ours - loop(x)).abs().max().item()
        for grad in (False, True):
            t = per_call_us(_sides(m, loop, lstm, x, grad), 1, rounds)
            ms = {k: v / 1e3 for k, v in t.items()}
            row = dict(variant=name, kind="fwd+bwd" if grad else "fwd", **ms, max_abs_diff=diff)
            row["vs loop"] = ms["loop"] / ms["rnn_fused"]
            row["vs compiled"] = ms["loop compiled"] / ms["rnn_fused"]
            row["/ LSTM"] = ms["rnn_fused"] / ms["our LSTM"]
            print(f"{name:28} {row['kind']:8}" + "".join(f"{ms[n]:14.2f}" for n in names), end="")
            print(f"{row['vs loop']:9.2f}{row['vs compiled']:12.2f}{row['/ LSTM']:8.2f}", end="")
            print(f"{diff:11.1e}", flush=True)
            rows.append(row)
    return rows

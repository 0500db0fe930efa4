"""The fused CUDA step kernels run on the CPU under an emulation of CUDA's block model
(tests/emulation/fused_kernels_host.cpp), against the step computed with torch: forward
products and cell math, backward products and the cell's derivative taken by autograd.
Shapes cross every tile edge (rows past a block of 32 or 8, units past 8 or 32, K past a
staged chunk); outputs start poisoned so that unwritten or overwritten elements show."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CELLS, seed
from torch.utils.cpp_extension import load

from rnn_fused.ops import GATES

ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(
        name="rnn_fused_emulated_kernels",
        sources=[str(ROOT / "tests" / "emulation" / "fused_kernels_host.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-Wno-unknown-pragmas"],
        extra_ldflags=["-pthread"],
        build_directory=str(tmp_path_factory.mktemp("emulated")),
    )


TOL = {torch.float64: 1e-12, torch.float32: 2e-6}
# (rows, hidden): one partial block; rows past 32 (forward) and 8 (backward) blocks; hidden
# past a chunk of K (64 values in float64, 128 in float32) and past 8 / 32 units.
SIZES = [(3, 33), (1, 5), (37, 9), (9, 70), (40, 130)]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= TOL[expected.dtype], f"{what}: relative error {err:.2e}"


def _cell(mode: str, x: torch.Tensor, hh: torch.Tensor, h_prev, c_prev):
    """h, c and the saved values of one step from pre-activations (bias included)."""
    H = h_prev.shape[1]
    if mode == "LSTM":
        i, f, g, o = (x + hh).split(H, 1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c_prev + i * g
        return o * c.tanh(), c, torch.cat([i, f, g, o, c_prev], 1)
    if mode == "GRU":
        xr, xz, xn = x.split(H, 1)
        hr, hz, hn = hh.split(H, 1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        return n + z * (h_prev - n), None, torch.cat([r, z, n, hn], 1)
    h = (x + hh).tanh() if mode == "RNN_TANH" else (x + hh).relu()
    return h, None, h


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "H"), SIZES)
@pytest.mark.parametrize("mode", CELLS)
def test_fused_forward_step(kernels, mode, n, H, dtype):
    seed("fused-forward", mode, n, H, dtype)
    G = GATES[mode]
    kw = dict(dtype=dtype)
    h_prev, xg = torch.randn(n, H, **kw), torch.randn(n, G * H, **kw)
    w_hh = torch.randn(G * H, H, **kw) / H**0.5
    b_ih, b_hh = torch.randn(G * H, **kw), torch.randn(G * H, **kw)
    c = torch.randn(n, H, **kw) if mode == "LSTM" else torch.empty(0, **kw)
    c_prev = c.clone()
    width = {"LSTM": 5, "GRU": 4}.get(mode, 1) * H
    saved, h, h_state, h_next = (torch.full((n, w), NAN, **kw) for w in (width, H, H, H))
    n_next = (n + 1) // 2
    kernels.forward_step(mode, h_prev, w_hh, xg, b_ih, b_hh, c, saved, h, h_state, h_next, n_next)

    hh = h_prev @ w_hh.t() + b_hh
    exp_h, exp_c, exp_saved = _cell(mode, xg + b_ih, hh, h_prev, c_prev)
    close(h, exp_h, "h")
    close(h_state, exp_h, "h_state")
    close(h_next[:n_next], exp_h[:n_next], "h_next")
    assert h_next[n_next:].isnan().all(), "rows past n_next must stay untouched"
    close(saved, exp_saved, "saved")
    if mode == "LSTM":
        close(c, exp_c, "c")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "H"), SIZES)
@pytest.mark.parametrize("rows_gemm", ["none", "fewer", "more"])
@pytest.mark.parametrize("mode", CELLS)
def test_fused_backward_step(kernels, mode, rows_gemm, n, H, dtype):
    seed("fused-backward", mode, rows_gemm, n, H, dtype)
    G = GATES[mode]
    kw = dict(dtype=dtype)
    m = {"none": 0, "fewer": (n + 1) // 2, "more": n + 5}[rows_gemm]
    rows = max(n, m)
    # A forward step from random pre-activations gives saved values the backward trusts.
    x, hh = torch.randn(n, G * H, **kw), torch.randn(n, G * H, **kw)
    h_prev, c_prev = torch.randn(n, H, **kw), torch.randn(n, H, **kw)
    leaves = [t.clone().requires_grad_() for t in (x, hh, h_prev, c_prev)]
    h, c, saved = _cell(mode, *leaves[:2], leaves[2], leaves[3] if mode == "LSTM" else None)

    dg_next = torch.randn(m, G * H, **kw)
    w_hh = torch.randn(G * H, H, **kw) / H**0.5
    dh = torch.randn(rows + 2, H, **kw)  # two rows past every step: must stay untouched
    grad_out = torch.randn(n, H, **kw)
    dc = torch.randn(rows, H, **kw) if mode == "LSTM" else torch.empty(0, **kw)
    dh_in, dc_in = dh.clone(), dc.clone()
    dx = torch.full((n, G * H), NAN, **kw)
    dhh = torch.full((n, G * H), NAN, **kw) if mode == "GRU" else torch.empty(0, **kw)
    kernels.backward_step(mode, n, dg_next, w_hh, dh, grad_out, dc, saved.detach(), h_prev, dx, dhh)

    total = dh_in[:rows].clone()
    total[:m] += dg_next @ w_hh
    upstream = total[:n] + grad_out
    loss = (h * upstream).sum() + ((c * dc_in[:n]).sum() if mode == "LSTM" else 0)
    gx, ghh, gh_prev, gc_prev = torch.autograd.grad(loss, leaves, allow_unused=True)
    close(dx, gx, "dx")
    if mode == "GRU":
        close(dhh, ghh, "dhh")
        close(dh[:n], gh_prev, "dh carried (GRU: the part bypassing W_hh)")
    else:
        assert (dh[:n] == 0).all(), "nothing bypasses W_hh in this cell"
    if mode == "LSTM":
        close(dc[:n], gc_prev, "dc")
        assert torch.equal(dc[n:], dc_in[n:])
    if m > n:
        close(dh[n:rows], total[n:rows], "rows past the step: the finished sums")
    assert torch.equal(dh[rows:], dh_in[rows:]), "rows past both must stay untouched"

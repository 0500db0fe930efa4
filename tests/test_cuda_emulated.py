"""The CUDA engine and kernels run on the CPU under an emulation of CUDA's block model
(tests/emulation/cuda_host.cpp).

Kernels, one step at a time, against the step computed with torch: forward products and
cell math, backward products and the cell's derivative taken by autograd. Shapes cross
every tile edge (rows past a block of 32 or 8, units past 8 or 32, K past a staged chunk);
outputs start poisoned so that unwritten or overwritten elements show.

The engine, whole layers on each path (standard, fused, persistent as a cluster and as a
cooperative grid), against reference.py in float64: every cell, bias or not, h0 or not,
reverse, packed both ways, projection, training and inference, forward and backward. The
persistent kernels run as launches whose blocks take turns between barriers, in an order
that alternates: a test shows that dropping the barriers breaks them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed
from tolerances import GRADCHECK, HALF_SLACK
from torch.utils.cpp_extension import load

from rnn_fused import reference
from rnn_fused.ops import GATES

ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return load(
        name="rnn_fused_emulated_cuda",
        sources=[
            str(ROOT / "tests" / "emulation" / "cuda_host.cpp"),
            str(ROOT / "csrc" / "problem.cpp"),
        ],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2", "-Wno-unknown-pragmas"],
        extra_ldflags=["-pthread"],
        build_directory=str(tmp_path_factory.mktemp("emulated")),
    )


# Half types store in their dtype and compute in float: the expected values come from the
# same rounded inputs in float, so the tolerance covers the rounding of what is stored.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}
HALF = (torch.bfloat16, torch.float16)
# (rows, hidden): one partial block; rows past 32 (forward) and 8 (backward) blocks; hidden
# past a chunk of K (64 values in float64, 128 in float32) and past 8 / 32 units.
SIZES = [(3, 33), (1, 5), (37, 9), (9, 70), (40, 130)]
CASES = [(n, H, d) for n, H in SIZES for d in (torch.float64, torch.float32)]
CASES += [(n, H, d) for n, H in [(3, 33), (40, 130)] for d in HALF]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    actual, expected = actual.to(expected.dtype), expected.detach()
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e}"


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


@pytest.mark.parametrize("block_rows", [4, 8, 16, 32])
@pytest.mark.parametrize(("n", "H", "dtype"), CASES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_fused_forward_step(kernels, mode, n, H, dtype, block_rows):
    seed("fused-forward", mode, n, H, dtype)
    G = GATES[mode]
    acc = torch.float32 if dtype in HALF else dtype  # what the kernels compute in
    kw, akw = dict(dtype=dtype), dict(dtype=acc)
    h_prev, xg = torch.randn(n, H, **kw), torch.randn(n, G * H, **akw)
    w_hh = (torch.randn(G * H, H, **akw) / H**0.5).to(dtype)
    b_ih, b_hh = torch.randn(G * H, **kw), torch.randn(G * H, **kw)
    c = torch.randn(n, H, **akw) if mode == "LSTM" else torch.empty(0, **akw)
    c_prev = c.clone()
    width = {"LSTM": 5, "GRU": 4}.get(mode, 1) * H
    saved, h, h_state, h_next = (torch.full((n, w), NAN, **kw) for w in (width, H, H, H))
    n_next = (n + 1) // 2
    kernels.forward_step(
        mode, h_prev, w_hh, xg, b_ih, b_hh, c, saved, h, h_state, h_next, n_next, block_rows
    )

    hp = h_prev.to(acc)
    hh = hp @ w_hh.to(acc).t() + b_hh.to(acc)
    exp_h, exp_c, exp_saved = _cell(mode, xg + b_ih.to(acc), hh, hp, c_prev)
    close(h, exp_h, "h", dtype)
    close(h_state, exp_h, "h_state", dtype)
    close(h_next[:n_next], exp_h[:n_next], "h_next", dtype)
    assert h_next[n_next:].isnan().all(), "rows past n_next must stay untouched"
    close(saved, exp_saved, "saved", dtype)
    if mode == "LSTM":
        close(c, exp_c, "c", dtype)


@pytest.mark.parametrize(("n", "H", "dtype"), CASES, ids=str)
@pytest.mark.parametrize("rows_gemm", ["none", "fewer", "more"])
@pytest.mark.parametrize("mode", CELLS)
def test_fused_backward_step(kernels, mode, rows_gemm, n, H, dtype):
    seed("fused-backward", mode, rows_gemm, n, H, dtype)
    G = GATES[mode]
    acc = torch.float32 if dtype in HALF else dtype
    kw, akw = dict(dtype=dtype), dict(dtype=acc)
    m = {"none": 0, "fewer": (n + 1) // 2, "more": n + 5}[rows_gemm]
    rows = max(n, m)
    # A forward step from random pre-activations gives saved values the backward trusts
    # (half types: rounded to the dtype, as the engine stores them).
    x, hh = torch.randn(n, G * H, **akw), torch.randn(n, G * H, **akw)
    h_prev, c_prev = torch.randn(n, H, **kw).to(acc), torch.randn(n, H, **akw)
    leaves = [t.clone().requires_grad_() for t in (x, hh, h_prev, c_prev)]
    h, c, saved = _cell(mode, *leaves[:2], leaves[2], leaves[3] if mode == "LSTM" else None)

    dg_next = torch.randn(m, G * H, **akw)  # gate gradients are kept in the accumulation type
    w_hh = (torch.randn(G * H, H, **akw) / H**0.5).to(dtype)
    dh = torch.randn(rows + 2, H, **akw)  # two rows past every step: must stay untouched
    grad_out = torch.randn(n, H, **kw)
    dc = torch.randn(rows, H, **akw) if mode == "LSTM" else torch.empty(0, **akw)
    dh_in, dc_in = dh.clone(), dc.clone()
    dx = torch.full((n, G * H), NAN, **akw)
    dhh = torch.full((n, G * H), NAN, **akw) if mode == "GRU" else torch.empty(0, **akw)
    kernels.backward_step(
        mode,
        n,
        dg_next,
        w_hh,
        dh,
        grad_out,
        dc,
        saved.detach().to(dtype),
        h_prev.to(dtype),
        dx,
        dhh,
    )

    total = dh_in[:rows].clone()
    total[:m] += dg_next.to(acc) @ w_hh.to(acc)
    upstream = total[:n] + grad_out.to(acc)
    loss = (h * upstream).sum() + ((c * dc_in[:n]).sum() if mode == "LSTM" else 0)
    gx, ghh, gh_prev, gc_prev = torch.autograd.grad(loss, leaves, allow_unused=True)
    close(dx, gx, "dx", dtype)
    if mode == "GRU":
        close(dhh, ghh, "dhh", dtype)
        close(dh[:n], gh_prev, "dh carried (GRU: the part bypassing W_hh)", dtype)
    else:
        assert (dh[:n] == 0).all(), "nothing bypasses W_hh in this cell"
    if mode == "LSTM":
        close(dc[:n], gc_prev, "dc", dtype)
        assert torch.equal(dc[n:], dc_in[n:])
    if m > n:
        close(dh[n:rows], total[n:rows], "rows past the step: the finished sums", dtype)
    assert torch.equal(dh[rows:], dh_in[rows:]), "rows past both must stay untouched"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_relu_step_keeps_nan_and_passes_its_gradient(kernels, dtype):
    """A NaN pre-activation: relu keeps it, and the backward passes the gradient through
    it, as torch.relu's (cell_math.h, MathOps: relu and positive)."""
    seed("relu-nan", dtype)
    n, H = 3, 33
    x = torch.randn(n, H, dtype=dtype)
    x[:, ::5] = NAN
    b = torch.zeros(H, dtype=dtype)
    empty = torch.empty(0, dtype=dtype)
    saved, h, h_state, h_next = (torch.full((n, H), 1.0, dtype=dtype) for _ in range(4))
    w_hh = torch.randn(H, H, dtype=dtype)
    kernels.forward_step("RNN_RELU", torch.zeros(n, H, dtype=dtype), w_hh, x, b, b, empty,
                         saved, h, h_state, h_next, n, 8)  # fmt: skip
    torch.testing.assert_close(h, x.relu(), equal_nan=True)
    leaf = x.clone().requires_grad_()
    grad_out = torch.randn(n, H, dtype=dtype)
    (want,) = torch.autograd.grad(leaf.relu(), leaf, grad_out)
    assert want.isfinite().all()
    dx = torch.full((n, H), NAN, dtype=dtype)
    dh = torch.zeros(n + 2, H, dtype=dtype)
    kernels.backward_step("RNN_RELU", n, torch.empty(0, H, dtype=dtype), w_hh, dh, grad_out,
                          empty, saved, torch.zeros(n, H, dtype=dtype), dx, empty)  # fmt: skip
    torch.testing.assert_close(dx, want)


FEATURES = [
    "plain", "nobias", "noh0", "reverse", "packed", "packed-reverse", "one-step", "proj", "indrnn",
    "zoneout", "zoneout-packed-reverse", "layernorm", "layernorm-nobias-packed-reverse",
    "layernorm-zoneout",
]  # fmt: skip
# proj: LSTM only; indrnn (IndRNN's element-wise w_hh, a vector): the RNN modes only;
# layernorm (LayerNormLSTM, LayerNormGRU): LSTM and GRU.
ENGINE_CASES = [
    (m, f)
    for m in CELLS
    for f in FEATURES
    if (f != "proj" or m == "LSTM")
    and (f != "indrnn" or m.startswith("RNN"))
    and ("layernorm" not in f or m in ("LSTM", "GRU"))
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("mode", "feature"), ENGINE_CASES)
@pytest.mark.parametrize("path", ["fused", "standard", "persistent", "persistent-grid"])
def test_engine_matches_reference(kernels, monkeypatch, path, mode, feature, dtype):
    monkeypatch.setenv("RNN_FUSED_CUDA_PATH", path)
    _engine_matches_reference(kernels, mode, feature, dtype)


def _engine_matches_reference(kernels, mode, feature, dtype, batch=9, hidden=33):
    """The engine's forward (inference and training) and backward against reference.py on
    6 steps (one for one-step: input [B, I]); batch and hidden for unpacked features (packed
    ones take 9 rows)."""
    seed("engine", mode, feature, dtype, batch, hidden)
    packed, reverse = "packed" in feature, "reverse" in feature
    # Weights small enough that relu runs stay well scaled (bfloat16 below) over 6 steps.
    layer = make_layer(
        mode,
        5,
        hidden,
        bias="nobias" not in feature,
        proj=2 if feature == "proj" else 0,
        dtype=dtype,
        scale=0.25,
    )
    if feature == "indrnn":
        layer = dataclasses.replace(layer, w_hh=rand(hidden, dtype=dtype, scale=0.9))
    # 9 rows at the first step: past a fused forward block of 8 rows.
    h0, c0 = make_states(layer, batch, dtype=dtype)
    if feature == "noh0":
        h0 = c0 = None
    batch_sizes = torch.tensor([9, 9, 7, 4, 4, 1]) if packed else None
    if packed:
        x = rand(int(batch_sizes.sum()), 5, dtype=dtype)
    elif feature == "one-step":  # a cell's call: input [B, I]
        x = rand(batch, 5, dtype=dtype)
    else:
        x = rand(6, batch, 5, dtype=dtype)
    # Zoneout's weights of h_{t-1}, anywhere in [0, 1): masks and expectations alike.
    keep = torch.rand(*x.shape[:-1], hidden).to(dtype) if "zoneout" in feature else None
    # The LayerNorm gains (and LSTM's cell-state gain and bias), away from 1 and 0.
    ln = None
    if "layernorm" in feature:
        ln = 1 + rand(2 * GATES[mode] * hidden + (2 * hidden if mode == "LSTM" else 0), dtype=dtype)
    # In the operator's order: input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, layer_norm.
    inputs = (x, h0, c0, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, layer.w_hr, ln)

    def reference_run(to: torch.dtype):
        """reference.py's outputs, the leaves, and a function of upstream grads."""
        leaves = [None if t is None else t.detach().to(to).requires_grad_() for t in inputs]
        xl, hl, cl, wi, wh, bi, bh, wr, lnl = leaves
        out = reference.rnn_layer(
            mode, xl, wi, wh, bi, bh, hl, cl, w_hr=wr, batch_sizes=batch_sizes, reverse=reverse,
            zoneout=None if keep is None else keep.to(to), layer_norm=lnl,
        )  # fmt: skip
        out = [o for o in out if o is not None]

        def grads(upstream):
            wanted = [t for t in leaves if t is not None]
            found = iter(torch.autograd.grad(out, wanted, [u.to(to) for u in upstream]))
            return [next(found) if t is not None else None for t in leaves]

        return out, grads

    exact, exact_grads = reference_run(torch.float64)
    upstream = [torch.randn_like(o) for o in exact]
    d = [None if t is None else t.detach() for t in inputs]
    ours = []
    for train in (False, True):  # the training run last: its workspace feeds the backward
        output, h_n, c_n, saved, h_prev = kernels.forward(
            mode, d[0], d[1], d[2], *d[3:8], batch_sizes, reverse, train, keep, d[8]
        )
        ours += [output, h_n, *([c_n] if mode == "LSTM" else [])]
    grads = kernels.backward(
        mode,
        *(u.to(dtype) for u in upstream),
        *([] if mode == "LSTM" else [None]),
        d[0],
        d[3],
        d[4],
        d[7],
        batch_sizes,
        reverse,
        saved,
        h_prev,
        h_n.shape[0],
        [True, True, True],
        keep,
        d[8],
    )
    ours += [g for g, t in zip(grads, inputs) if t is not None]
    expected = [*exact, *exact, *(g for g in exact_grads(upstream) if g is not None)]
    errors = [rel(a, b) for a, b in zip(ours, expected)]
    if dtype != torch.bfloat16:
        assert max(errors) < (TOL[dtype] if dtype == torch.float64 else 1e-5), errors
        return
    # bfloat16: no worse than twice reference.py's own error in bfloat16.
    same, same_grads = reference_run(dtype)
    same_all = [*same, *same, *(g for g in same_grads(upstream) if g is not None)]
    for ours_err, s, e in zip(errors, same_all, expected, strict=True):
        assert ours_err <= 2 * rel(s, e) + HALF_SLACK


def _d(t):
    return None if t is None else t.detach()


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    e = expected.detach().double()
    return ((actual.double() - e).norm() / e.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("feature", ["plain", "packed-reverse", "one-step"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("path", ["fused", "standard", "persistent", "persistent-grid"])
def test_engine_backward_without_state_gradients(kernels, monkeypatch, path, mode, feature):
    """Without dL/dh_0 the backward skips its last product with W_hh (it gives nothing
    else): every other gradient keeps its bits, and the states' are absent."""
    monkeypatch.setenv("RNN_FUSED_CUDA_PATH", path)
    seed("no state grads", path, mode, feature)
    dtype = torch.float32
    layer = make_layer(mode, 5, 33, dtype=dtype, scale=0.25)
    h0, c0 = make_states(layer, 9, dtype=dtype)
    packed = feature == "packed-reverse"
    batch_sizes = torch.tensor([9, 9, 7, 4, 4, 1]) if packed else None
    shape = (9, 5) if feature == "one-step" else (6, 9, 5)
    if packed:
        shape = (int(batch_sizes.sum()), 5)
    x = rand(*shape, dtype=dtype)
    d = [_d(t) for t in (x, h0, c0, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)]
    output, h_n, c_n, saved, h_prev = kernels.forward(
        mode, d[0], d[1], d[2], *d[3:7], None, batch_sizes, packed, True, None, None
    )
    upstream = [torch.randn_like(o) for o in (output, h_n, *([c_n] if mode == "LSTM" else []))]
    no_c = [] if mode == "LSTM" else [None]
    rest = (d[0], d[3], d[4], None, batch_sizes, packed, saved, h_prev, h_n.shape[0])
    grads = [
        kernels.backward(mode, *upstream, *no_c, *rest, [True, state, True], None, None)
        for state in (True, False)
    ]
    assert grads[0][1].numel() > 0 and grads[1][1].numel() == grads[1][2].numel() == 0
    for k in (0, 3, 4, 5, 6):  # input, w_ih, w_hh, b_ih, b_hh
        assert torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_engine_layer_norm_runs_the_standard_path(kernels, monkeypatch, mode):
    """The LayerNorm cells' rows take whole blocks: forced to the fused or persistent path,
    the engine runs them on the standard path all the same (never an error)."""
    for path in ("fused", "persistent"):
        monkeypatch.setenv("RNN_FUSED_CUDA_PATH", path)
        _engine_matches_reference(kernels, mode, "layernorm", torch.float64)


@pytest.mark.parametrize(("batch", "hidden"), [(37, 70), (6, 20), (3, 130), (1, 9)])
@pytest.mark.parametrize("path", ["persistent", "persistent-grid"])
@pytest.mark.parametrize("mode", CELLS)
def test_persistent_path_over_tile_edges(kernels, monkeypatch, mode, path, batch, hidden):
    """Rows past a tile of 32 (8 for batches up to 8, 4 up to 4), units past a block of 8, K past a
    chunk (forward: hidden; backward: gates x hidden); hidden 130 takes 17 blocks, more than
    a cluster, so the grid variant."""
    monkeypatch.setenv("RNN_FUSED_CUDA_PATH", path)
    _engine_matches_reference(kernels, mode, "zoneout", torch.float64, batch, hidden)


@pytest.mark.parametrize("mode", CELLS)
def test_persistent_path_falls_back_to_fused_launches(kernels, monkeypatch, mode):
    """A device that declines the cooperative launch gets the recorded steps as fused
    launches: same results."""
    monkeypatch.setenv("RNN_FUSED_CUDA_PATH", "persistent")
    kernels.set_persistent_launches(False)
    try:
        _engine_matches_reference(kernels, mode, "packed-reverse", torch.float64)
    finally:
        kernels.set_persistent_launches(True)


@pytest.mark.parametrize("path", ["persistent", "persistent-grid"])
@pytest.mark.parametrize("mode", CELLS)
def test_persistent_kernels_need_their_barriers(kernels, monkeypatch, mode, path):
    """Without its grid or cluster barriers a persistent kernel's blocks read states and gate
    gradients that other blocks have not written yet: the emulation must make that visible."""
    monkeypatch.setenv("RNN_FUSED_CUDA_PATH", path)
    kernels.set_grid_barriers(False)
    try:
        with pytest.raises(AssertionError):
            _engine_matches_reference(kernels, mode, "plain", torch.float64)
    finally:
        kernels.set_grid_barriers(True)


class _EmulatedLayer(torch.autograd.Function):
    """One layer call of the emulated CUDA engine, forward and backward, as a differentiable
    function of its tensors (for gradcheck)."""

    @staticmethod
    def forward(ctx, kernels, mode, keep, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gains):
        output, h_n, c_n, saved, h_prev = kernels.forward(
            mode, x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, None, False, True, keep, gains
        )
        ctx.save_for_backward(x, w_ih, w_hh, saved, h_prev, gains)
        ctx.kernels, ctx.mode, ctx.keep, ctx.batch = kernels, mode, keep, h_n.shape[0]
        return output, h_n, c_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        x, w_ih, w_hh, saved, h_prev, gains = ctx.saved_tensors
        lstm = ctx.mode == "LSTM"
        grads = ctx.kernels.backward(
            ctx.mode, grad_output, grad_h_n, grad_c_n if lstm else None, x, w_ih, w_hh, None,
            None, False, saved, h_prev, ctx.batch, [True, True, True], ctx.keep, gains,
        )  # fmt: skip
        gx, gh, gc, gwi, gwh, gbi, gbh, _, gln = grads
        gln = gln if gains is not None else None
        return None, None, None, gx, gh, gc if lstm else None, gwi, gwh, gbi, gbh, gln


GRADCHECK_CASES = [
    ("LSTM", "layernorm"), ("GRU", "layernorm"), ("LSTM", "layernorm-zoneout"),
    ("GRU", "layernorm-zoneout"), ("LSTM", "zoneout"), ("GRU", "zoneout"),
    ("RNN_TANH", "indrnn"), ("RNN_RELU", "indrnn-zoneout"),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "feature"), GRADCHECK_CASES)
def test_engine_variants_gradcheck(kernels, mode, feature):
    """gradcheck in float64 of the emulated CUDA engine on the variants of torch.nn's cells
    (LayerNorm, zoneout, IndRNN): every input, weight, bias and gain."""
    seed("engine gradcheck", mode, feature)
    layer = make_layer(mode, 3, 5, dtype=torch.float64)
    if "indrnn" in feature:
        layer = dataclasses.replace(layer, w_hh=rand(5, dtype=torch.float64, scale=0.9))
    h0, c0 = make_states(layer, 2, dtype=torch.float64)
    x = rand(3, 2, 3, dtype=torch.float64)
    gains = None
    if "layernorm" in feature:
        size = 2 * GATES[mode] * 5 + (10 if mode == "LSTM" else 0)
        gains = (1 + rand(size, dtype=torch.float64)).detach().requires_grad_()
    keep = torch.rand(3, 2, 5, dtype=torch.float64) if "zoneout" in feature else None

    def f(x, h0, c0, w_ih, w_hh, b_ih, b_hh, gains):
        out = _EmulatedLayer.apply(kernels, mode, keep, x, h0, c0, w_ih, w_hh, b_ih, b_hh, gains)
        return out if mode == "LSTM" else out[:2]

    inputs = (x, h0, c0, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, gains)
    assert torch.autograd.gradcheck(f, inputs, **GRADCHECK)


# An H200 (sm_90): 132 SMs, 227 KiB of shared memory per block at most.
SMS, SHARED_BYTES = 132, 227 * 1024


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_persistent_launches_of_the_gpu_check_fit_an_h200(kernels, mode, dtype, backward):
    """The GPU check's small-batch rows (T=100, B=1 and 8, H=512; T=1000, B=16, H=128) ask
    for launches that an H200 can hold at once: the first GPU run measures the persistent
    path there, not its fallback. H=128 forms one cluster."""
    for rows, hidden in [(1, 512), (8, 512), (16, 128)]:
        blocks, shared, cluster = kernels.persistent_plan(
            mode, torch.empty(0, dtype=dtype), hidden, rows, backward
        )
        assert blocks == hidden // 8 and blocks <= SMS
        assert cluster == (blocks <= 16)
        if dtype != torch.float64:  # float64 rows are for accuracy, not for the GPU check
            assert shared <= SHARED_BYTES, (rows, hidden, shared)


def test_engine_refuses_half_parameters_with_a_float32_input(kernels):
    """Half-type parameters with a float32 input (CPU autocast's call) are the CPU engine's
    alone: the CUDA engine names the dtypes instead of reading the weights as float32."""
    seed("half parameters refused")
    layer = make_layer("GRU", 5, 9, dtype=torch.bfloat16)
    x = rand(4, 3, 5, dtype=torch.float32).detach()
    weights = [t.detach() for t in (layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh)]
    with pytest.raises(RuntimeError, match="CUDA engine needs parameters of the input's dtype"):
        kernels.forward("GRU", x, None, None, *weights, None, None, False, True, None, None)

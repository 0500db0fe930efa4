"""The CPU engine's buffer cache (csrc/cpu/workspace.h): outputs, a training forward's
workspace and a backward's gradients of 256 KiB or more are taken from freed blocks when one
fits. Whatever a reused block held before must never reach a result: here it
held NaN."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import seed
from tolerances import assert_close
from torch import nn

import rnn_fused
from rnn_fused.ops import cached_workspace_bytes, empty_workspace_cache

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def _poison_cache(mode: str, module: nn.Module, steps: int, batch: int) -> int:
    """Runs a training forward of the module's first layer on `steps` x `batch` rows, fills its
    workspace with NaN and frees it to the cache; returns the bytes of its `saved`."""
    w = [getattr(module, f"{n}_l0", None) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    w_hr = getattr(module, "weight_hr_l0", None)
    with torch.no_grad():
        x = torch.randn(steps, batch, module.input_size, dtype=w[0].dtype)
        results = torch.ops.rnn_fused.forward(mode, x, None, None, *w, w_hr, None, False, True)
        saved, h_prev = results[3], results[4]
        saved.fill_(float("nan"))
        h_prev.fill_(float("nan"))
    nbytes = saved.nbytes
    del results, saved, h_prev
    return nbytes


# B: rows for a workspace of about 40 MiB, above the 32 MiB that glibc serves from fresh memory
# each time (the cells keep 5, 6, 4 and 1 blocks of H per row).
@pytest.mark.parametrize(
    ("cls", "mode", "kwargs", "B"),
    [
        (nn.LSTM, "LSTM", {}, 246),
        (nn.LSTM, "LSTM", {"proj_size": 29}, 205),
        (nn.GRU, "GRU", {}, 308),
        (nn.RNN, "RNN_TANH", {}, 1229),
    ],
    ids=["lstm", "lstm-proj", "gru", "rnn"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_reused_workspace_gives_fresh_results(cls, mode, kwargs, B, packed):
    seed("workspace", mode, kwargs, packed)
    T, I, H = 41, 23, 97
    ref = cls(I, H, **kwargs).double()
    ours = rnn_fused.replace_rnns(cls(I, H, **kwargs).double())
    ours.load_state_dict(ref.state_dict())
    lengths = torch.randint(T - 4, T + 1, (B,))
    lengths[0] = T
    x = torch.randn(T, B, I, dtype=torch.float64)

    empty_workspace_cache()
    poisoned = _poison_cache(mode, ours, T + 3, B)  # a little larger than the call's own
    assert poisoned >= 32 * MIB, "the case must be large enough for the cache"
    before = cached_workspace_bytes()
    assert before >= poisoned

    def run(m: nn.Module) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_()
        inp = nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False) if packed else xi
        out, _ = m(inp)
        if packed:
            out = nn.utils.rnn.pad_packed_sequence(out)[0]
        cached_during = cached_workspace_bytes()
        grads = torch.autograd.grad((out * out.tanh()).sum(), [xi, *m.parameters()])
        return [out, *grads, torch.tensor(cached_during)]

    *got, cached_during = run(ours)
    *want, _ = run(ref)
    # The forward's scratch (a few MiB) goes back to the cache when the forward ends.
    assert before - cached_during >= poisoned - 8 * MIB, "the forward did not take the freed block"
    for a, b in zip(got, want, strict=True):
        assert not a.isnan().any()
        assert_close(a, b, "reused workspace")
    assert cached_workspace_bytes() >= poisoned, "the backward did not free its workspace"


@pytest.mark.parametrize(
    ("cls", "mode", "B"),
    [(nn.LSTM, "LSTM", 330), (nn.GRU, "GRU", 410), (nn.RNN, "RNN_TANH", 1640)],
    ids=["lstm", "gru", "rnn"],
)
def test_streamed_workspace_gives_the_gradients(cls, mode, B):
    """A float32 training forward writes its saved rows but the last 16 MiB past the caches
    (non-temporal stores, whole aligned vectors: H a multiple of 16); here about 26 MiB, in
    a block that held NaN. Outputs and gradients against torch.nn in float64."""
    seed("streamed workspace", mode)
    T, I, H = 41, 23, 96
    ref = cls(I, H).double()
    ours = rnn_fused.replace_rnns(cls(I, H))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    empty_workspace_cache()
    assert _poison_cache(mode, ours, T, B) >= 24 * MIB, "the case must stream some rows"

    def run(m: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
        xi = x.to(dtype).requires_grad_()
        out, _ = m(xi)
        return [out, *torch.autograd.grad((out * out.tanh()).sum(), [xi, *m.parameters()])]

    for a, b in zip(run(ours, torch.float32), run(ref, torch.float64), strict=True):
        assert not a.isnan().any()
        assert_close(a, b.float(), "streamed workspace")


def test_reused_output_block_gives_fresh_results():
    """An inference call's output (here 1.5 MiB) comes from the cache and goes back to it."""
    seed("workspace-output")
    ref = nn.GRU(19, 75).double()
    ours = rnn_fused.GRU.from_torch(ref)
    x = torch.randn(37, 71, 19, dtype=torch.float64)
    empty_workspace_cache()
    with torch.no_grad():
        first = ours(x)[0]
        first.fill_(float("nan"))
        del first
        freed = cached_workspace_bytes()
        assert freed >= 37 * 71 * 75 * 8, "the output did not come from the cache"
        got, h_n = ours(x)
        assert cached_workspace_bytes() < freed, "the freed output was not reused"
        want, want_h = ref(x)
    assert not got.isnan().any()
    assert_close(got, want, "reused output block")
    assert_close(h_n, want_h, "h_n after a reused output block")


def test_empty_workspace_cache_frees_the_blocks():
    seed("workspace-empty")
    m = rnn_fused.LSTM(64, 512)
    x = torch.randn(50, 80, 64, requires_grad=True)
    m(x)[0].sum().backward()  # saved: 4000 rows x 5 x 512 floats, 39 MiB
    assert cached_workspace_bytes() >= 4000 * 5 * 512 * 4
    empty_workspace_cache()
    assert cached_workspace_bytes() == 0


def test_reused_gradient_blocks_give_fresh_results():
    seed("workspace-gradients")
    I, H, B = 70, 129, 3  # float64 weight gradients of 283 and 521 KiB
    ref = nn.LSTMCell(I, H).double()
    ours = rnn_fused.LSTMCell.from_torch(ref)
    x = torch.randn(B, I, dtype=torch.float64, requires_grad=True)
    state = (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64))

    def grads(m: nn.Module) -> tuple[torch.Tensor, ...]:
        h, c = m(x, state)
        return torch.autograd.grad((h * c.tanh()).sum(), [x, *m.parameters()])

    empty_workspace_cache()
    first = grads(ours)
    first[1].fill_(float("nan"))  # the weight gradients' blocks go back to the cache holding NaN
    first[2].fill_(float("nan"))
    del first
    freed = cached_workspace_bytes()
    assert freed >= 4 * H * (I + H) * 8, "the weight gradients did not come from the cache"
    got = grads(ours)
    assert cached_workspace_bytes() <= freed - 4 * H * (I + H) * 8, "the blocks were not reused"
    for a, b in zip(got, grads(ref), strict=True):
        assert not a.isnan().any()
        assert_close(a, b, "reused gradient block")


def test_cached_gradient_is_an_ordinary_tensor():
    """A parameter's .grad may be a cached block: resizable and accumulated like torch.nn's."""
    seed("workspace-grad-tensor")
    ref = nn.LSTMCell(33, 129).double()
    ours = rnn_fused.LSTMCell.from_torch(copy.deepcopy(ref))  # parameters of its own
    x = torch.randn(3, 33, dtype=torch.float64)
    for m in (ref, ours):
        for _ in range(2):  # the second backward adds into the first's .grad
            m(x)[0].sum().backward()
    assert_close(ours.weight_hh.grad, ref.weight_hh.grad, "accumulated .grad")
    grad = ours.weight_hh.grad
    assert grad.untyped_storage().resizable()
    first = grad.clone()
    grad.resize_(grad.numel() * 2)
    assert torch.equal(grad[: first.numel()], first.flatten())


SCRIPT = textwrap.dedent(
    """
    import torch, rnn_fused
    from rnn_fused.ops import cached_workspace_bytes
    m = rnn_fused.LSTM(64, 512)
    x = torch.randn(50, 80, 64, requires_grad=True)
    try:
        m(x)[0].sum().backward()
    except RuntimeError as err:
        print("error:", err)
    print("cached", cached_workspace_bytes())
    """
)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("0", "cached 0"),
        ("lots", "RNN_FUSED_CPU_WORKSPACE_CACHE_MB must be a number of MiB, got 'lots'"),
    ],
)
def test_cache_setting(setting: str, expected: str):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RNN_FUSED_CPU_WORKSPACE_CACHE_MB": setting}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, done.stdout + done.stderr[-2000:]

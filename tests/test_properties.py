"""Property-based tests (hypothesis, derandomized: the same examples every run). Random valid
configurations against torch.nn with the same state_dict in float64; random invalid operator
arguments, which must raise a Python exception and never crash the process (they run in a
child interpreter, so a crash fails the test with its signal instead of ending the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import rel_err
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn_fused

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(
    derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def configurations(draw):
    cell = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    hidden = draw(st.integers(1, 9))
    kw = dict(
        input_size=draw(st.integers(1, 6)),
        hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
    )
    if cell == "LSTM" and hidden > 1 and draw(st.booleans()):
        kw["proj_size"] = draw(st.integers(1, hidden - 1))
    if cell.startswith("RNN"):
        kw["nonlinearity"] = cell[4:].lower()
    batch = draw(st.integers(1, 4))
    steps = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    packed = draw(st.booleans())
    states = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return cell, kw, batch, steps, lengths if packed else None, states, seed


def _flat(result) -> list[torch.Tensor]:
    if isinstance(result, PackedSequence):
        return [result.data]
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


@SETTINGS
@given(configurations())
def test_random_configurations_match_torch_nn(config):
    cell, kw, batch, steps, lengths, with_states, seed = config
    torch.manual_seed(seed)
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU}.get(cell, nn.RNN)
    theirs = cls(**kw).double()
    ours = rnn_fused.replace_rnns(cls(**kw)).double()
    ours.load_state_dict(theirs.state_dict())
    I = kw["input_size"]
    shape = (batch, steps, I) if kw["batch_first"] else (steps, batch, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    D = (2 if kw["bidirectional"] else 1) * kw["num_layers"]
    out_size = kw.get("proj_size") or kw["hidden_size"]
    states = []
    if with_states:
        states.append(torch.randn(D, batch, out_size, dtype=torch.float64, requires_grad=True))
        if cell == "LSTM":
            states.append(torch.randn(D, batch, kw["hidden_size"], dtype=torch.float64))
            states[-1].requires_grad_()

    def run(module):
        inp = x
        if lengths is not None:
            first = kw["batch_first"]
            inp = pack_padded_sequence(x, lengths, batch_first=first, enforce_sorted=False)
        args = (inp,) if not states else (inp, tuple(states) if len(states) > 1 else states[0])
        outs = _flat(module(*args))
        # Every element gets its own weight in the loss, so no gradient is a plain sum.
        ramps = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outs]
        loss = sum((o * r).sum() for o, r in zip(outs, ramps, strict=True))
        grads = torch.autograd.grad(loss, [x, *states, *module.parameters()], allow_unused=True)
        return outs + [g for g in grads if g is not None]

    got, expected = run(ours), run(theirs)
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert rel_err(a, b) < 1e-10, f"tensor {i} of {config}: {rel_err(a, b):.2e}"


def test_random_invalid_operator_arguments_raise():
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz_invalid.py")],
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"exit code {done.returncode} (negative: killed by that signal)\n"
        + done.stdout[-3000:]
        + done.stderr[-3000:]
    )
    assert "cases" in done.stdout

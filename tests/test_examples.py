"""The examples run and show what they claim: models learn, gradients vanish or not,
bidirectional layers see the future, weights are shared over time."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sequence_shapes_learn():
    results = _load("sequence_shapes").run(steps=150, seed=1)
    assert len(results) == 3
    for name, losses in results.items():
        first, last = losses[0], sum(losses[-10:]) / 10
        assert len(losses) == 150
        assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


def test_activation_derivatives_shrink_gradients():
    d = _load("vanishing_gradients").derivatives()
    tanh_d, sigmoid_d = d["tanh'"], d["sigmoid'"]
    at_zero = int(d["x"].abs().argmin())
    assert tanh_d.max() == tanh_d[at_zero] == 1.0 and sigmoid_d.max() == sigmoid_d[at_zero] == 0.25
    assert tanh_d[0] < 1e-4 and sigmoid_d[0] < 3e-3, "saturated units pass almost nothing"


def test_vanishing_gradients_show_the_difference():
    module = _load("vanishing_gradients")
    results = module.run(steps=120)
    at = {d: i for i, d in enumerate(d for d in module.DISTANCES if d < 120)}
    rnn, lstm_f = results["RNN (tanh)"], results["LSTM, forget bias 3"]
    # Norms are relative to the last step's (distance 0), so they start at 1 by construction.
    assert rnn[at[50]] < 1e-6 < rnn[at[5]] < 1, "a tanh RNN's gradient decays geometrically"
    assert rnn[at[20]] / rnn[at[5]] < rnn[at[5]], "faster than linearly in the distance"
    assert lstm_f[at[100]] > 1e-2, "the cell path keeps it when the forget gate is near 1"


def test_bidirectional_sees_the_future():
    results = _load("bidirectional").run(steps=200, seed=1, every=50)
    bi, uni = results["bidirectional"], results["unidirectional"]
    assert len(bi) == len(uni) == 5  # before training, then every 50 steps
    assert bi[-1] > 0.95 and uni[-1] < 0.6
    assert max(uni) < 0.6, "one direction stays at chance throughout"


def test_weight_sharing_sums():
    short = _load("weight_sharing").run(steps=7, seed=2)
    long = _load("weight_sharing").run(steps=19, seed=2)
    assert short["outputs vs LSTMCell loop"] < 1e-12
    assert short["grad W_hh vs sum of steps"] < 1e-12
    assert len(short["per-step grad norms"]) == 7 and min(short["per-step grad norms"][1:]) > 0
    # One LSTM(4, 6) whatever the length: 4 gates x 6 units x (4 inputs + 6 states + 2 biases).
    assert short["parameters"] == long["parameters"] == 4 * 6 * (4 + 6 + 2)
    assert len(long["per-step grad norms"]) == 19
    # The running sum of the steps' contributions ends at the layer's gradient.
    assert abs(short["running sum norms"][-1] - short["layer grad norm"]) < 1e-12


def test_long_term_dependency_needs_a_kept_state():
    module = _load("long_term_dependency")
    short = module.run(lengths=(25,), cells=("GRU, update bias 5", "LSTM, forget bias 5"))
    assert min(a[0] for a in short.values()) > 0.9, short
    long = module.run(lengths=(200,))
    assert long.pop("GRU, update bias 5")[0] > 0.9, "a GRU that starts out keeping its state"
    assert max(a[0] for a in long.values()) < 0.6, f"every other cell stays near chance: {long}"


def test_examples_draw(tmp_path):
    """Each example's --png writes a figure (the numbers behind it are tested above)."""
    for name, args in (
        ("vanishing_gradients", ["--steps", "30"]),
        ("bidirectional", ["--steps", "20"]),
        ("sequence_shapes", ["--steps", "20"]),
        ("weight_sharing", []),
        ("long_term_dependency", ["--lengths", "5", "8", "--steps", "3"]),
    ):
        png = tmp_path / f"{name}.png"
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / f"{name}.py"), *args, "--png", str(png)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

"""The examples run and show what they claim: models learn, gradients vanish or not,
bidirectional layers see the future, weights are shared over time."""

from __future__ import annotations

import importlib.util
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
    for name, (first, last) in results.items():
        assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


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
    results = _load("bidirectional").run(steps=200, seed=1)
    assert results["bidirectional"] > 0.95
    assert results["unidirectional"] < 0.6


def test_weight_sharing_sums():
    short = _load("weight_sharing").run(steps=7, seed=2)
    long = _load("weight_sharing").run(steps=19, seed=2)
    assert short["outputs vs LSTMCell loop"] < 1e-12
    assert short["grad W_hh vs sum of steps"] < 1e-12
    assert len(short["per-step grad norms"]) == 7 and min(short["per-step grad norms"][1:]) > 0
    # One LSTM(4, 6) whatever the length: 4 gates x 6 units x (4 inputs + 6 states + 2 biases).
    assert short["parameters"] == long["parameters"] == 4 * 6 * (4 + 6 + 2)
    assert len(long["per-step grad norms"]) == 19

"""The examples run and learn: each model's loss falls well below where it started."""

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

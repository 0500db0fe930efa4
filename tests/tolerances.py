"""The one table of tolerances, and the comparison every test uses.

Errors are relative norms, ||actual - expected|| / ||expected||, against a reference computed
in the same dtype (or in float64 where a test says so). ARCHITECTURE.md: fp32 < 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
}

# Half types are held to "no worse than twice torch.nn's (or reference.py's) own error in the
# same dtype"; HALF_SLACK is added for errors near zero, where twice means little. It is a
# tenth of float16's machine epsilon (9.8e-4), far below either dtype's budget.
HALF_SLACK = 1e-4

# gradcheck in float64 (torch.autograd.gradcheck's own defaults are eps=1e-6, atol=1e-5).
GRADCHECK = {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).norm().item()
    scale = expected.double().norm().item()
    return diff / max(scale, 1e-30) if scale > 0 else diff


def assert_as_accurate(
    ours: list[torch.Tensor],
    exact: list[torch.Tensor],
    same: Callable[[], list[torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    """ours against exact (float64): within REL_TOL for float32 and float64; for half types
    no worse than twice the error of same() (reference.py in the same dtype) + HALF_SLACK."""
    if dtype in REL_TOL:
        for a, b in zip(ours, exact, strict=True):
            assert rel_err(a, b) <= REL_TOL[dtype]
        return
    for a, s, b in zip(ours, same(), exact, strict=True):
        assert rel_err(a, b) <= 2 * rel_err(s, b) + HALF_SLACK


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    tol = REL_TOL[expected.dtype]
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({expected.dtype})"


def assert_within_twice(
    ours: list[torch.Tensor],
    theirs: list[torch.Tensor],
    exact: list[torch.Tensor],
    names: list[str],
) -> None:
    """assert_no_worse with no REL_TOL floor: where our sums run in another order than theirs
    (torch.nn, or reference.py's loop in ours' dtype), ours must not round more."""
    assert_no_worse(ours, theirs, exact, names, floor=False)


def assert_no_worse(
    ours: list[torch.Tensor],
    theirs: list[torch.Tensor],
    exact: list[torch.Tensor],
    names: list[str],
    floor: bool = True,
) -> None:
    """Each of ours within REL_TOL of exact (float64 values) (floor), or within twice the
    error of theirs (another computation in ours' dtype) where that is larger: two float32
    computations in different orders, cuDNN among them, can each be some ulps off over a
    long chain, so neither is the other's oracle."""
    for what, a, b, e in zip(names, ours, theirs, exact, strict=True):
        ours_err, theirs_err = rel_err(a, e), rel_err(b, e)
        assert ours_err <= max(REL_TOL[a.dtype] if floor else 0.0, 2 * theirs_err), (
            f"{what}: relative error {ours_err:.3e} against float64, the other's {theirs_err:.3e}"
        )

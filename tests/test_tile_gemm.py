"""The tile kernel of small products (csrc/cpu/tile_gemm.cpp), float32 and float64: every
value of C is a sum of fused multiply-add chains over k in order (CHAIN k each, added in
order), checked bit for bit against those chains in exact rational arithmetic, and larger
shapes against torch.mm. The recurrences with
the kernel on and off (_C.cpu_force_tile_kernel): test_parity.py,
test_both_tile_kernel_settings."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import rand, seed
from tolerances import assert_close

import rnn_fused

pytestmark = pytest.mark.skipif(
    not rnn_fused._C.cpu_tile_kernel(), reason="the tile kernel needs an AVX-512 or AVX2 build"
)

DTYPES = [torch.float64, torch.float32]


def _operands(M: int, N: int, K: int, trans_a: bool, trans_b: bool, dtype, pad: int = 0):
    """a and b as stored (transposed when asked) and op(a) [M, K], op(b) [K, N]; rows `pad`
    wider than their values, so that leading dimensions exceed widths."""
    a_rows, a_cols = (K, M) if trans_a else (M, K)
    b_rows, b_cols = (N, K) if trans_b else (K, N)
    a = rand(a_rows, a_cols + pad, dtype=dtype).detach()[:, :a_cols]
    b = rand(b_rows, b_cols + pad, dtype=dtype).detach()[:, :b_cols]
    return a, b, (a.t() if trans_a else a), (b.t() if trans_b else b)


def _rounded(x: Fraction, dtype) -> float:
    """x rounded to nearest even in dtype (Fraction's float() is correctly rounded to float64;
    for float32 the nearest of float32 neighbours, compared exactly)."""
    if dtype == torch.float64:
        return float(x)
    near = np.float32(float(x))
    down, up = np.float32(-np.inf), np.float32(np.inf)
    candidates = [np.nextafter(near, down), near, np.nextafter(near, up)]
    best = min(abs(Fraction(float(f)) - x) for f in candidates)
    ties = [f for f in candidates if abs(Fraction(float(f)) - x) == best]
    return float(min(ties, key=lambda f: int(np.array(f).view(np.uint32)) & 1))


# The k of each chain (tile_gemm.cpp's kChain).
CHAIN = 128


def _fma_chain(row: list[float], column: list[float], start: float, accumulate: bool, dtype):
    """sum_k row[k] * column[k] as the kernel runs it: correctly rounded fused multiply-adds in
    k order from zero, CHAIN of them a chain, each chain's sum added to the ones before it,
    then the whole added to start when accumulating."""
    total = None
    for k0 in range(0, max(len(row), 1), CHAIN):
        acc = 0.0
        for x, y in zip(row[k0 : k0 + CHAIN], column[k0 : k0 + CHAIN]):
            acc = _rounded(Fraction(x) * Fraction(y) + Fraction(acc), dtype)
        total = acc if total is None else _rounded(Fraction(total) + Fraction(acc), dtype)
    return _rounded(Fraction(total) + Fraction(start), dtype) if accumulate else total


@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize(
    "shape",
    [(13, 50, 11), (5, 19, 8), (2, 2, 1), (7, 68, 19), (3, 17, 257), (7, 5, 1031)],
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_value_is_fma_chains_in_k_order(dtype, shape, trans_a, trans_b, accumulate):
    """Tiles of 6 rows and the rows left (1 to 5), blocks of 3 vectors of columns and the
    columns left (1 or 2 vectors, the last partial), B^T packed over whole and partial square
    blocks, leading dimensions wider than rows, sums of one chain and of several (the last
    one whole or partial), A^T packed into tiles for long sums (K of 1024 and more): the exact
    bits of the chains per value."""
    seed(dtype, shape, trans_a, trans_b)
    M, N, K = shape
    a, b, op_a, op_b = _operands(M, N, K, trans_a, trans_b, dtype, pad=3)
    c = rand(M, N + 2, dtype=dtype).detach()[:, :N]
    before = c.clone()
    rnn_fused._C.cpu_tile_product(a, b, trans_a, trans_b, c, accumulate)
    rows, cols, start = op_a.tolist(), op_b.t().tolist(), before.tolist()
    chains = [
        [_fma_chain(r, col, s, accumulate, dtype) for col, s in zip(cols, s_row)]
        for r, s_row in zip(rows, start)
    ]
    expected = torch.tensor(chains, dtype=dtype)
    assert torch.equal(c, expected), (c - expected).abs().max().item()


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("shape", [(49, 204, 51), (51, 51, 97), (97, 33, 300)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_larger_products_match_torch_mm(dtype, shape, trans_a, trans_b):
    """The shapes of a cell's step at batch 97 (forward, dX, weight-gradient blocks) and a long
    reduction, against torch.mm."""
    seed(dtype, shape, trans_a, trans_b)
    M, N, K = shape
    a, b, op_a, op_b = _operands(M, N, K, trans_a, trans_b, dtype)
    c = torch.empty(M, N, dtype=dtype)
    rnn_fused._C.cpu_tile_product(a, b, trans_a, trans_b, c, False)
    assert_close(c, op_a @ op_b, "product")


def test_refuses_mismatched_operands():
    a, b = torch.rand(4, 5, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    c = torch.empty(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"op\(a\) 4 x 5, op\(b\) of 5 rows"):
        rnn_fused._C.cpu_tile_product(a, b, False, False, c, False)
    with pytest.raises(RuntimeError, match="all of one dtype"):
        rnn_fused._C.cpu_tile_product(a.float(), b, False, False, c, False)


def test_force_refuses_unknown_modes():
    with pytest.raises(RuntimeError, match="mode must be -1, 0 or 1, got 2"):
        rnn_fused._C.cpu_force_tile_kernel(2)

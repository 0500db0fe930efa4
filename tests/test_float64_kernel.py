"""The float64 kernel of small products (csrc/cpu/f64_gemm.cpp): every value of C is one
fused multiply-add chain over k in order, checked bit for bit against that chain in exact
rational arithmetic, and larger shapes against torch.mm. The recurrences with the kernel on
and off: test_parity.py, test_both_float64_product_kernels."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from helpers import rand, seed
from tolerances import assert_close

import rnn_fused

pytestmark = pytest.mark.skipif(
    not rnn_fused._C.cpu_float64_kernel(), reason="the float64 kernel needs an AVX-512 build"
)


def _operands(M: int, N: int, K: int, trans_a: bool, trans_b: bool, pad: int = 0):
    """op(a) [M, K] and op(b) [K, N] as stored (transposed when asked), rows `pad` wider than
    their values (so leading dimensions exceed widths)."""
    a_rows, a_cols = (K, M) if trans_a else (M, K)
    b_rows, b_cols = (N, K) if trans_b else (K, N)
    a = rand(a_rows, a_cols + pad, dtype=torch.float64).detach()[:, :a_cols]
    b = rand(b_rows, b_cols + pad, dtype=torch.float64).detach()[:, :b_cols]
    op_a = a.t() if trans_a else a
    op_b = b.t() if trans_b else b
    return a, b, op_a, op_b


def _fma_chain(row: list[float], column: list[float], start: float, accumulate: bool) -> float:
    """sum_k row[k] * column[k] as the kernel runs it: one correctly rounded fused multiply-add
    per k in order from zero, then added to start when accumulating."""
    acc = 0.0
    for x, y in zip(row, column):
        acc = float(Fraction(x) * Fraction(y) + Fraction(acc))
    return acc + start if accumulate else acc


@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("shape", [(13, 50, 11), (5, 19, 8), (2, 2, 1), (7, 24, 17)], ids=str)
def test_every_value_is_one_fma_chain_in_k_order(shape, trans_a, trans_b, accumulate):
    """Tiles of 6 rows and the rows left (1 to 5), blocks of 24 columns and the columns left
    (1 to 3 vectors, the last partial), transposed packing of B over whole and partial 8 x 8
    blocks, leading dimensions wider than rows: the exact bits of an FMA chain per value."""
    seed(len(shape) + sum(shape) + 2 * trans_a + trans_b)
    M, N, K = shape
    a, b, op_a, op_b = _operands(M, N, K, trans_a, trans_b, pad=3)
    c = rand(M, N + 2, dtype=torch.float64).detach()[:, :N]
    before = c.clone()
    rnn_fused._C.cpu_float64_product(a, b, trans_a, trans_b, c, accumulate)
    rows, cols, start = op_a.tolist(), op_b.t().tolist(), before.tolist()
    chains = [
        [_fma_chain(r, col, s, accumulate) for col, s in zip(cols, s_row)]
        for r, s_row in zip(rows, start)
    ]
    expected = torch.tensor(chains, dtype=torch.float64)
    assert torch.equal(c, expected), (c - expected).abs().max().item()


@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("shape", [(49, 204, 51), (51, 51, 97), (97, 33, 300)], ids=str)
def test_larger_products_match_torch_mm(shape, trans_a, trans_b):
    """The shapes of a cell's step at batch 97 (forward, dX, weight-gradient blocks) and a long
    reduction, against torch.mm in float64."""
    seed(sum(shape))
    M, N, K = shape
    a, b, op_a, op_b = _operands(M, N, K, trans_a, trans_b)
    c = torch.empty(M, N, dtype=torch.float64)
    rnn_fused._C.cpu_float64_product(a, b, trans_a, trans_b, c, False)
    assert_close(c, op_a @ op_b, "product")


def test_refuses_mismatched_operands():
    a, b = torch.rand(4, 5, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    c = torch.empty(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"op\(a\) 4 x 5, op\(b\) of 5 rows"):
        rnn_fused._C.cpu_float64_product(a, b, False, False, c, False)
    with pytest.raises(RuntimeError, match="float64 CPU matrices"):
        rnn_fused._C.cpu_float64_product(a.float(), b, False, False, c, False)

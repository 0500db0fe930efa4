"""Zoneout (Krueger et al. 2016, on h as haste's layers): the operator's zoneout weights
against reference.py's loop in float64 (values and gradients, every cell, padded, packed,
reverse, small and packed-weight problems), gradcheck, the modules' masks drawn from
torch's generator in a stated order, eval's expectation, torch.compile, and the errors."""

from __future__ import annotations

import pytest
import torch
from helpers import CELLS, make_layer, make_states, rand, seed, weighted_sum
from tolerances import GRADCHECK, assert_as_accurate

import rnn_fused
from rnn_fused import reference
from rnn_fused.ops import rnn_layer, zoneout_mask

P = 0.35
# (steps, batch, hidden): a small problem (rows <= 32: weights read as stored, one thread)
# and one whose weights are packed and whose steps may split over threads; and rows of few
# units, whose cell math runs gathered into one long row (pointwise.h, forward_rows_staged).
SIZES = [(7, 3, 33), (6, 11, 70), (5, 37, 4)]


def _weights(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "mask":
        return torch.empty(shape, dtype=torch.float64).bernoulli_(P)
    return torch.full(shape, P, dtype=torch.float64)  # eval's expectation


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.97])
def test_mask_generator(p, dtype):
    """The CPU's counter-based masks: reference.py's bits on any number of threads, each
    element 1 with probability p."""
    torch.manual_seed(21)
    shape = (50, 7, 129)
    masks = []
    for threads in (1, 2):
        torch.manual_seed(21)
        with _threads(threads):
            masks.append(zoneout_mask(shape, p, torch.empty(0, dtype=dtype)))
    assert masks[0].dtype == dtype and masks[0].shape == shape
    assert torch.equal(masks[0], masks[1]), "the same bits on 1 and 2 threads"
    torch.manual_seed(21)
    mask_seed = int(torch.randint(0, 2**62, (1,)))
    assert torch.equal(masks[0].double(), reference.zoneout_mask(mask_seed, shape, p))
    n = masks[0].numel()
    mean = masks[0].double().mean().item()
    assert abs(mean - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12, (mean, p)
    if 0 < p < 1:  # rows and steps are not copies of each other
        assert not torch.equal(masks[0][0], masks[0][1])
        assert not torch.equal(masks[0][:, 0], masks[0][:, 1])


class _threads:
    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


@pytest.mark.parametrize("kind", ["mask", "expectation"])
@pytest.mark.parametrize("form", ["padded", "packed", "reverse", "packed-reverse"])
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_operator_matches_reference(mode, size, form, kind):
    seed("zoneout", mode, size, form, kind)
    T, B, H = size
    layer = make_layer(mode, 5, H, dtype=torch.float64)
    h0, c0 = make_states(layer, B, dtype=torch.float64)
    packed, reverse = "packed" in form, "reverse" in form
    if packed:
        batch_sizes = torch.tensor(sorted(torch.randint(1, B + 1, (T,)).tolist(), reverse=True))
        batch_sizes[0] = B
        x = rand(int(batch_sizes.sum()), 5, dtype=torch.float64)
        keep = _weights((x.shape[0], H), kind)
    else:
        batch_sizes = None
        x = rand(T, B, 5, dtype=torch.float64)
        keep = _weights((T, B, H), kind)
    args = (mode, x, layer.w_ih, layer.w_hh, layer.b_ih, layer.b_hh, h0, c0)
    kw = dict(batch_sizes=batch_sizes, reverse=reverse, zoneout=keep)
    ours, want = rnn_layer(*args, **kw), reference.rnn_layer(*args, **kw)
    leaves = [x, h0, *([c0] if c0 is not None else []), *layer.tensors()]
    up = [torch.randn_like(o) for o in want if o is not None]
    g_ours = torch.autograd.grad(weighted_sum(ours, up), leaves)
    g_want = torch.autograd.grad(weighted_sum(want, up), leaves)
    for a, b in zip([*ours, *g_ours], [*want, *g_want], strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    plain = rnn_layer(*args, batch_sizes=batch_sizes, reverse=reverse)[0]
    assert not torch.allclose(ours[0], plain), "zoneout changed the output"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize(
    ("mode", "layer_norm"), [(m, False) for m in CELLS] + [("LSTM", True), ("GRU", True)]
)
def test_kept_units_keep_their_bits(mode, layer_norm, size, dtype):
    """A unit that the mask keeps keeps its state exactly: keep h_prev + (1 - keep) h, not
    h + keep (h_prev - h), which missed h_prev by an ulp in about a tenth of them."""
    seed("kept bits", mode, size, str(dtype), layer_norm)
    T, B, H = size
    kw = dict(zoneout=P, dtype=dtype)
    if mode.startswith("RNN"):
        kw["nonlinearity"] = mode[4:].lower()
    m = getattr(rnn_fused, ("LayerNorm" if layer_norm else "") + mode.split("_")[0])(5, H, **kw)
    x = rand(T, B, 5, dtype=dtype)
    torch.manual_seed(7)
    out = m(x)[0]
    torch.manual_seed(7)  # the module's draw (see _zoned_reference)
    kept = reference.zoneout_mask(int(torch.randint(0, 2**62, (1,))), out.shape, P) == 1
    previous = torch.cat([torch.zeros_like(out[:1]), out[:-1]])  # h_0: zeros
    assert kept.any() and torch.equal(out[kept], previous[kept])
    if mode != "RNN_RELU":  # (relu's zeros stay zeros)
        assert (out[~kept] != previous[~kept]).double().mean() > 0.9, "the mask is the module's"


@pytest.mark.parametrize("mode", CELLS)
def test_gradcheck(mode):
    seed("zoneout gradcheck", mode)
    layer = make_layer(mode, 3, 5, dtype=torch.float64)
    h0, c0 = make_states(layer, 2, dtype=torch.float64)
    x = rand(4, 2, 3, dtype=torch.float64)
    keep = _weights((4, 2, 5), "mask")

    def f(x, h0, *weights):
        out = rnn_layer(mode, x, *weights[:4], h0, c0, zoneout=keep)
        return out[0], out[1]

    inputs = (x, h0, *layer.tensors())
    assert torch.autograd.gradcheck(f, inputs, **GRADCHECK)
    assert torch.autograd.gradgradcheck(f, inputs, **GRADCHECK), "double backward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", CELLS)
def test_other_dtypes(mode, dtype):
    """Against float64: float32 within its tolerance; half types no worse than twice
    reference.py's own error in the same dtype."""
    seed("zoneout dtypes", mode, dtype)
    layer = make_layer(mode, 6, 40, dtype=torch.float64, scale=0.3)
    x = rand(8, 5, 6, dtype=torch.float64)
    keep = _weights((8, 5, 40), "mask")

    def run(fn, to):
        leaves = [t.detach().to(to).requires_grad_() for t in (x, *layer.tensors())]
        out = fn(mode, leaves[0], *leaves[1:], zoneout=keep.to(to))
        up = [w.to(to) for w in upstream]
        return [*out[:2], *torch.autograd.grad(weighted_sum(out[:2], up), leaves)]

    upstream = [torch.randn(8, 5, 40, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64)]
    exact = run(reference.rnn_layer, torch.float64)
    assert_as_accurate(run(rnn_layer, dtype), exact, lambda: run(reference.rnn_layer, dtype), dtype)


def _zoned_reference(m: torch.nn.Module, x: torch.Tensor, p: float, train: bool):
    """reference.py's layers with zoneout weights drawn in the module's order (per layer,
    per direction, each shaped like that direction's output)."""
    directions = 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        outputs = []
        for d in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            w = [getattr(m, k + suffix) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            shape = (*x.shape[:-1], m.hidden_size)
            if train:  # ops.zoneout_mask's draw: a seed from torch's generator
                keep = reference.zoneout_mask(int(torch.randint(0, 2**62, (1,))), shape, p)
            else:
                keep = torch.full(shape, p, dtype=x.dtype)
            out, _, _ = reference.rnn_layer(m.mode, x, *w, reverse=d == 1, zoneout=keep)
            outputs.append(out)
        x = torch.cat(outputs, dim=-1)
    return x


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "IndRNN"])
def test_module_masks_follow_the_generator(name):
    seed("zoneout module", name)
    m = getattr(rnn_fused, name)(3, 7, num_layers=2, bidirectional=True, zoneout=P).double()
    assert f"zoneout={P}" in repr(m)
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    torch.manual_seed(5)
    ours = m(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(ours, _zoned_reference(m, x, P, True), rtol=1e-12, atol=1e-12)
    torch.manual_seed(5)
    assert torch.equal(m(x)[0], ours), "a seed gives the same masks"
    assert not torch.allclose(m(x)[0], ours), "the next forward draws new masks"
    m.eval()
    torch.testing.assert_close(m(x)[0], _zoned_reference(m, x, P, False), rtol=1e-12, atol=1e-12)


def test_module_packed_and_batch_first():
    seed("zoneout packed")
    m = rnn_fused.GRU(4, 6, batch_first=True, zoneout=P).double()
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    lengths = torch.tensor([8, 5, 2])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
    m.eval()
    out, h_n = m(packed)
    p = m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0
    keep = torch.full((packed.data.shape[0], 6), P, dtype=torch.float64)
    want, want_h, _ = reference.rnn_layer(
        "GRU", packed.data, *p, batch_sizes=packed.batch_sizes, zoneout=keep
    )
    torch.testing.assert_close(out.data, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_n[0], want_h, rtol=1e-12, atol=1e-12)  # lengths sorted


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cells(name, train):
    seed("zoneout cell", name, train)
    cell = getattr(rnn_fused, name)(4, 5, zoneout=P).double().train(train)
    x, h = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    c = torch.randn(3, 5, dtype=torch.float64)
    mode = name.removesuffix("Cell")
    torch.manual_seed(8)
    ours = cell(x, (h, c) if mode == "LSTM" else h)
    torch.manual_seed(8)
    mask_seed = int(torch.randint(0, 2**62, (1,)))
    keep = reference.zoneout_mask(mask_seed, (1, 3, 5), P)[0] if train else _weights((3, 5), "")
    p = cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh
    new_h, new_c = reference.cell_step(mode, x, h, c if mode == "LSTM" else None, *p)
    want_h = keep * h + (1 - keep) * new_h
    got_h = ours[0] if mode == "LSTM" else ours
    torch.testing.assert_close(got_h, want_h, rtol=1e-12, atol=1e-12)
    if mode == "LSTM":
        torch.testing.assert_close(ours[1], new_c, rtol=1e-12, atol=1e-12)  # c is not zoned


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compile_fullgraph(train):
    """No graph break, the mask's draw included; the same masks for a seed."""
    seed("zoneout compile", train)
    m = rnn_fused.LSTM(3, 6, zoneout=P).train(train)
    x = torch.randn(5, 2, 3)
    torch.manual_seed(3)
    eager = m(x)[0]
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    torch.testing.assert_close(compiled(x)[0], eager, rtol=1e-6, atol=1e-6)


def test_errors_name_the_argument():
    for bad in (-0.1, 1.0, True, "0.5"):
        with pytest.raises(ValueError, match=r"zoneout must be a number in \[0, 1\)"):
            rnn_fused.LSTM(3, 4, zoneout=bad)
    with pytest.raises(ValueError, match="zoneout needs proj_size=0, got proj_size=2"):
        rnn_fused.LSTM(3, 4, proj_size=2, zoneout=0.1)
    with pytest.raises(ValueError, match=r"torch\.nn has no zoneout"):
        rnn_fused.GRU(3, 4, zoneout=0.5).to_torch()
    layer = make_layer("GRU", 3, 4, dtype=torch.float64)
    x = rand(5, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"zoneout must have shape \[5, 2, 4\], got \[5, 2, 3\]"):
        rnn_layer("GRU", x, *layer.tensors(), zoneout=torch.zeros(5, 2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="zoneout must have the dtype of input"):
        rnn_layer("GRU", x, *layer.tensors(), zoneout=torch.zeros(5, 2, 4))
    lstm = make_layer("LSTM", 3, 4, proj=2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"zoneout needs a layer without projection"):
        torch.ops.rnn_fused.layer(
            "LSTM", x, None, None, lstm.w_ih, lstm.w_hh, lstm.b_ih, lstm.b_hh, lstm.w_hr, None,
            False, torch.zeros(5, 2, 2, dtype=torch.float64),
        )  # fmt: skip

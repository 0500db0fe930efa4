"""Per-call rows of `make bench`: what one call costs when its work is small, where fixed
costs (Python, dispatch, allocation, threads) dominate. Cells and a T=1 layer call at batch
1, under no_grad and with forward + backward, in float32 and in bfloat16 (both sides in
bfloat16); an LSTMCell without states and unbatched, and GRU and RNN layers of one step;
bfloat16 cells at batch 64, whose weights are read once per call (not packed); float32
cells under CPU autocast (bfloat16), each call an autocast region of its own;
the bare operator against torch.mm of the same product, and a client: a model
stepping two LSTMCells through a sequence in a Python loop (float64, batch 97), trained
with LBFGS and then predicting under no_grad.

Each side runs `calls` calls per timing, interleaved with the other side in rounds; the
figure is the median time per call in microseconds (per step for the client)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import rnn_fused


def per_call_us(sides: dict[str, Callable[[], object]], calls: int, rounds: int):
    """Median microseconds per call of each side, sides alternating within every round."""
    for fn in sides.values():
        for _ in range(max(calls // 10, 2)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def timed_call(output: Callable[[], torch.Tensor], grad: bool) -> Callable[[], object]:
    """One call to time: output() under no_grad, or output().sum() and its backward."""
    if not grad:

        def infer():
            with torch.no_grad():
                return output()

        return infer

    def train():
        output().sum().backward()

    return train


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def cases() -> list[tuple[str, str, Callable[[object], Callable[[], object]]]]:
    """(name, kind, make(namespace) -> one call) for every per-call row; the namespace is
    torch.nn or rnn_fused."""
    rows = []
    for dtype, suffix in ((torch.float32, ""), (torch.bfloat16, " bf16")):
        for H in (32, 256):
            for cell in ("LSTMCell", "GRUCell", "RNNCell"):
                for grad in (False, True):
                    make = _cell_maker(cell, H, grad, dtype)
                    rows.append((f"{cell} B=1 H={H}{suffix}", _kind(grad), make))
            for grad in (False, True):
                make = _layer_maker(H, grad, dtype)
                rows.append((f"LSTM T=1 B=1 H={H}{suffix}", _kind(grad), make))
    for cell in ("LSTMCell", "GRUCell", "RNNCell"):
        for grad in (False, True):
            make = _cell_maker(cell, 256, grad, torch.float64)
            rows.append((f"{cell} B=1 H=256 fp64", _kind(grad), make))
    for cell in ("LSTMCell", "GRUCell"):
        for grad in (False, True):
            make = _cell_maker(cell, 256, grad, torch.bfloat16, batch=64)
            rows.append((f"{cell} B=64 H=256 bf16", _kind(grad), make))
    # float32 cells under torch.autocast("cpu", dtype=torch.bfloat16), a region per call: both
    # sides cast their parameters at every call.
    for cell, batch in (("LSTMCell", 1), ("GRUCell", 64)):
        for grad in (False, True):
            make = _cell_maker(cell, 256, grad, torch.float32, batch=batch, autocast=True)
            rows.append((f"{cell} B={batch} H=256 autocast", _kind(grad), make))
    # The other forms torch.nn takes, float32 at H=32: a cell without states or unbatched,
    # and the other layers of one step.
    for form in ("no states", "unbatched"):
        for grad in (False, True):
            make = _cell_maker("LSTMCell", 32, grad, torch.float32, form=form)
            rows.append((f"LSTMCell B=1 H=32 {form}", _kind(grad), make))
    for layer in ("GRU", "RNN"):
        for grad in (False, True):
            make = _layer_maker(32, grad, torch.float32, layer=layer)
            rows.append((f"{layer} T=1 B=1 H=32", _kind(grad), make))
    return rows


def _kind(grad: bool) -> str:
    return "fwd+bwd" if grad else "fwd"


def _cell_maker(
    cell: str,
    H: int,
    grad: bool,
    dtype: torch.dtype,
    batch: int = 1,
    form: str = "states",
    autocast: bool = False,
):
    """A cell's call: batched with its states, or (form) batched without states, or
    unbatched ([H]) with its states; under CPU autocast to bfloat16 with `autocast` (the
    backward outside it, as autocast's guide has it)."""

    def make(ns):
        torch.manual_seed(0)
        m = getattr(nn, cell)(H, H).to(dtype)
        if ns is rnn_fused:
            m = getattr(rnn_fused, cell).from_torch(m)
        shape = (H,) if form == "unbatched" else (batch, H)
        x = torch.randn(shape, dtype=dtype, requires_grad=grad)
        h = torch.randn(shape, dtype=dtype)
        state = (h, torch.randn(shape, dtype=dtype)) if cell == "LSTMCell" else h
        args = (x,) if form == "no states" else (x, state)
        if not autocast:
            return timed_call(lambda: _first(m(*args)), grad)

        def under_autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _first(m(*args))

        return timed_call(under_autocast, grad)

    return make


def _layer_maker(H: int, grad: bool, dtype: torch.dtype, layer: str = "LSTM"):
    def make(ns):
        torch.manual_seed(0)
        m = getattr(nn, layer)(H, H).to(dtype)
        if ns is rnn_fused:
            m = getattr(rnn_fused, layer).from_torch(m)
        x = torch.randn(1, 1, H, dtype=dtype, requires_grad=grad)
        return timed_call(lambda: m(x)[0], grad)

    return make


def bare_operator_rows(rounds: int) -> list[dict]:
    """rnn_fused.rnn_layer for one LSTM step at B=1 against torch.mm of the same recurrent
    product [1, H] x [H, 4H], both on tensors that do not require grad (no graph either way,
    and no no_grad block on one side only: entering one costs about 2 us, more than mm)."""
    rows = []
    for H in (32, 256):
        t = per_call_us(_operator_and_mm(H), 2000, rounds)
        rows.append(
            dict(name=f"operator vs mm H={H}", kind="fwd", base=t["torch.mm"], ours=t["rnn_fused"])
        )
    return rows


def _operator_and_mm(H: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    w_ih, w_hh = torch.randn(4 * H, H), torch.randn(4 * H, H)
    b = torch.randn(4 * H)
    x, h, c = torch.randn(1, 1, H), torch.randn(1, H), torch.randn(1, H)
    a, w = torch.randn(1, H), torch.randn(H, 4 * H)

    def op():
        return rnn_fused.rnn_layer("LSTM", x, w_ih, w_hh, b, b, h, c)

    return {"torch.mm": lambda: torch.mm(a, w), "rnn_fused": op}


class TwoCells(nn.Module):
    """Two stacked LSTMCells and a linear read-out stepped over a sequence in Python, each
    step's prediction fed back as the next input once the given inputs run out."""

    def __init__(self, ns, hidden: int = 51) -> None:
        super().__init__()
        self.cell1 = ns.LSTMCell(1, hidden)
        self.cell2 = ns.LSTMCell(hidden, hidden)
        self.linear = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, x: torch.Tensor, future: int = 0) -> torch.Tensor:
        B = x.size(0)
        zeros = [x.new_zeros(B, self.hidden) for _ in range(4)]
        h1, c1, h2, c2 = zeros
        outputs = []
        out = x[:, :1]
        for t in range(x.size(1) + future):
            step = x[:, t : t + 1] if t < x.size(1) else out
            h1, c1 = self.cell1(step, (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            out = self.linear(h2)
            outputs.append(out)
        return torch.cat(outputs, dim=1)


def client_rows(rounds: int, steps: int = 1000, batch: int = 97) -> list[dict]:
    """The two-LSTMCell client: one LBFGS step (its closure runs forward + backward up to
    a few times) over `steps` steps, and a no_grad prediction of `steps` steps."""
    torch.manual_seed(0)
    t = torch.arange(steps + 1, dtype=torch.float64)
    phase = torch.randint(-40, 40, (batch, 1), dtype=torch.float64)
    wave = torch.sin((t + phase) / 20.0)
    x, y = wave[:, :-1], wave[:, 1:]
    models = {}
    for name, ns in (("torch.nn", nn), ("rnn_fused", rnn_fused)):
        torch.manual_seed(1)
        models[name] = TwoCells(ns).double()
    models["rnn_fused"].load_state_dict(models["torch.nn"].state_dict())

    def train(m):
        opt = torch.optim.LBFGS(m.parameters(), lr=0.8, max_iter=2)

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        return lambda: opt.step(closure)

    def predict(m):
        def run():
            with torch.no_grad():
                return m(x[:, :1], future=steps - 1)

        return run

    rows = []
    for kind, make in (("train (LBFGS step)", train), ("predict", predict)):
        sides = {name: make(m) for name, m in models.items()}
        tm = per_call_us(sides, 1, rounds)
        rows.append(
            dict(
                name=f"2 x LSTMCell(51) B={batch}, {steps} steps, fp64",
                kind=kind,
                base=tm["torch.nn"] / steps,
                ours=tm["rnn_fused"] / steps,
            )
        )
    return rows


def run(rounds: int, calls: int = 500, client: bool = True) -> list[dict]:
    """Every per-call row, printed as it is measured."""
    print("\nper call (us; client rows: us per step); speedup = torch.nn (or torch.mm) / ours")
    print(f"{'case':44} {'kind':20} {'torch':>10} {'rnn_fused':>10} {'speedup':>8}")
    rows = []
    for name, kind, make in cases():
        t = per_call_us({"torch.nn": make(nn), "rnn_fused": make(rnn_fused)}, calls, rounds)
        rows.append(_printed(dict(name=name, kind=kind, base=t["torch.nn"], ours=t["rnn_fused"])))
    rows += [_printed(r) for r in bare_operator_rows(rounds)]
    if client:
        rows += [_printed(r) for r in client_rows(rounds)]
    return rows


def _printed(r: dict) -> dict:
    r["speedup"] = r["base"] / r["ours"]
    print(
        f"{r['name']:44} {r['kind']:20} {r['base']:10.1f} {r['ours']:10.1f} {r['speedup']:8.2f}",
        flush=True,
    )
    return r

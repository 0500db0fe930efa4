"""The main job: rnn_fused against torch.nn, side by side in one run.

For each grid row and cell it times inference (forward, no grad) and training
(forward + backward) of torch.nn and of rnn_fused with the same weights and inputs: warm-up,
then rounds that alternate the two sides (A, B, A, B) so that machine drift hits both, and
the median of each. Prints a table (times in ms, speed ratio torch/ours, so > 1 means we
are faster, the largest absolute difference of outputs and gradients, and the largest
relative error ||ours - torch|| / ||torch|| over them) and writes a CSV.

    python benchmarks/bench.py [--device cpu|cuda] [--rounds N] [--csv PATH] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused

CELLS = ("LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class Shape:
    T: int
    B: int
    I: int
    H: int
    layers: int = 1
    bidirectional: bool = False

    def __str__(self) -> str:
        s = f"{self.T},{self.B},{self.I},{self.H}"
        return (
            s
            + (f" L{self.layers}" if self.layers > 1 else "")
            + (" bi" if self.bidirectional else "")
        )


# DESIGN.md's CPU grid: (T, B, I, H, layers, bidirectional).
CPU_GRID = [
    Shape(100, 64, 512, 512),
    Shape(100, 1, 256, 256),
    Shape(200, 16, 128, 128),
    Shape(50, 32, 256, 256, 2, True),
]
QUICK_GRID = [Shape(20, 4, 32, 32), Shape(10, 1, 16, 16, 2, True)]


def torch_module(cell: str, s: Shape, device: str) -> nn.Module:
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[cell]
    return cls(s.I, s.H, num_layers=s.layers, bidirectional=s.bidirectional).to(device)


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    if device == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu_time


def side_by_side(a: Callable[[], object], b: Callable[[], object], device: str, rounds: int):
    measure = timer(device)
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure(a))
        tb.append(measure(b))
    return statistics.median(ta), statistics.median(tb)


def bench_row(cell: str, s: Shape, device: str, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    module = torch_module(cell, s, device)
    fused = rnn_fused.replace_rnns(torch_module(cell, s, device))
    fused.load_state_dict(module.state_dict())
    x = torch.randn(s.T, s.B, s.I, device=device)

    def ref_fwd():
        with torch.no_grad():
            return module(x)[0]

    def our_fwd():
        with torch.no_grad():
            return fused(x)[0]

    def train(m: nn.Module) -> Callable[[], list[torch.Tensor]]:
        def step():
            xg = x.detach().requires_grad_()
            out = m(xg)[0]
            return [out, *torch.autograd.grad(out.sum(), [xg, *m.parameters()])]

        return step

    ref_train, our_train = train(module), train(fused)

    rows = []
    for kind, ref, ours in [("fwd", ref_fwd, our_fwd), ("fwd+bwd", ref_train, our_train)]:
        t_ref, t_ours = side_by_side(ref, ours, device, rounds)
        r, o = ref(), ours()
        r, o = (r, o) if isinstance(r, list) else ([r], [o])
        diff = max((a - b).abs().max().item() for a, b in zip(r, o))
        rel = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(r, o))
        rows.append(
            dict(
                cell=cell,
                shape=str(s),
                kind=kind,
                torch_ms=t_ref,
                ours_ms=t_ours,
                speedup=t_ref / t_ours,
                max_abs_diff=diff,
                max_rel_err=rel,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--csv", default="benchmarks/out/bench.csv")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke run")
    args = parser.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("rnn_fused::forward", "CUDA")
    if device == "cuda" and not has_cuda_kernels:
        print("rnn_fused has no CUDA kernels yet: benchmarking on the CPU instead")
        device = "cpu"
    grid = QUICK_GRID if args.quick else CPU_GRID

    print(
        f"rnn_fused vs torch.nn on {device}: torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"{dt.date.today()}"
    )
    print("median ms of", args.rounds, "interleaved rounds; speedup = torch / ours (> 1: faster)")
    header = (
        f"{'cell':5} {'shape':20} {'kind':8} {'torch.nn':>9} {'rnn_fused':>9} "
        f"{'speedup':>8} {'max|diff|':>10} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for s in grid:
        for cell in CELLS:
            for r in bench_row(cell, s, device, args.rounds):
                rows.append(r)
                print(
                    f"{r['cell']:5} {r['shape']:20} {r['kind']:8} {r['torch_ms']:9.2f} "
                    f"{r['ours_ms']:9.2f} {r['speedup']:8.2f} {r['max_abs_diff']:10.1e} "
                    f"{r['max_rel_err']:8.1e}",
                    flush=True,
                )
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys(), "device", "torch", "date"])
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {**r, "device": device, "torch": torch.__version__, "date": dt.date.today()}
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

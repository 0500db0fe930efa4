"""What one time step costs on CUDA, by path: microseconds per step of a long sequence for
cuDNN and for each of rnn_fused's CUDA paths forced (persistent as a cluster where it fits,
persistent as a cooperative grid, fused launches), float32 without TF32, forward
under no_grad and forward with backward. The long-sequence, small-batch corner where a
step's latency, not its arithmetic, sets the time.

    python3 benchmarks/step_cost.py [--steps 1000] [--rounds 5] [--csv PATH] [--quick]
    python3 benchmarks/step_cost.py --once LSTM,200,16,128,persistent,fwd+bwd   (for ncu)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused

PATHS = ["persistent", "persistent-grid", "fused"]
CELLS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def pair(cell: str, H: int) -> tuple[nn.Module, nn.Module]:
    theirs = CELLS[cell](H, H).cuda()
    ours = rnn_fused.replace_rnns(CELLS[cell](H, H)).cuda()
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def call(m: nn.Module, x: torch.Tensor, kind: str, path: str | None) -> Callable[[], None]:
    def run() -> None:
        if path is not None:
            os.environ["RNN_FUSED_CUDA_PATH"] = path
        try:
            if kind == "fwd":
                with torch.no_grad():
                    m(x)
            else:
                m(x.requires_grad_())[0].sum().backward()
        finally:
            os.environ.pop("RNN_FUSED_CUDA_PATH", None)

    return run


def write_csv(path: str, head: list[str], rows: list[dict]) -> None:
    """The rows so far, rewritten after each (a run cut short keeps what it measured)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=head)
        writer.writeheader()
        writer.writerows(rows)


def median_ms(fn: Callable[[], None], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--once", default=None, help="CELL,T,B,H,PATH,KIND: three calls, no table")
    parser.add_argument("--quick", action="store_true", help="B=16 and H=128, 256 only")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.once:
        cell, T, B, H, path, kind = args.once.split(",")
        _, ours = pair(cell, int(H))
        x = torch.randn(int(T), int(B), int(H), device="cuda")
        for _ in range(3):
            call(ours, x, kind, path)()
        torch.cuda.synchronize()
        return
    T = args.steps
    print(f"us per step at T={T}, float32 without TF32, {torch.cuda.get_device_name()}")
    head = ["cell", "B", "H", "kind", "cuDNN", *PATHS, "default"]
    print(" ".join(f"{h:>15}" for h in head), flush=True)
    rows = []
    batches, sizes = ((16,), (128, 256)) if args.quick else ((1, 16), (32, 64, 128, 256, 512))
    for cell in CELLS:
        for B in batches:
            for H in sizes:
                theirs, ours = pair(cell, H)
                x = torch.randn(T, B, H, device="cuda")
                for kind in ("fwd", "fwd+bwd"):
                    row = {"cell": cell, "B": B, "H": H, "kind": kind}
                    sides = {"cuDNN": call(theirs, x, kind, None)}
                    sides |= {p: call(ours, x, kind, p) for p in PATHS}
                    sides["default"] = call(ours, x, kind, None)
                    for name, fn in sides.items():
                        row[name] = round(median_ms(fn, args.rounds) * 1e3 / T, 3)
                    rows.append(row)
                    print(" ".join(f"{row[h]!s:>15}" for h in head), flush=True)
                    if args.csv:
                        write_csv(args.csv, head, rows)


if __name__ == "__main__":
    main()

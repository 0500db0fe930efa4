"""The main job: rnn_fused against torch.nn, side by side in one run.

For each grid row and cell it times inference (forward, no grad) and training
(forward + backward) of torch.nn and of rnn_fused with the same weights and inputs: warm-up,
then rounds that alternate the sides (A, B, A, B) so that machine drift hits all of them,
and the median of each. CPU times with perf_counter, CUDA with events. Prints a table
(times in ms; speedup = baseline / ours, so > 1 means we are faster; the largest absolute
difference of outputs and gradients and the largest relative error ||ours - base|| /
||base||) and writes a CSV (and, with --markdown, a markdown table).

On CUDA the baseline is eager cuDNN in the same dtype (fp32 with TF32 off on both sides,
and bf16), and the table adds cuDNN replayed from a CUDA graph (forward), torch.nn with
cuDNN disabled, for fp32 both sides with TF32 allowed (cuDNN's default in PyTorch;
ours with torch.backends.cuda.matmul.allow_tf32), and ours with each CUDA path forced
(rnn_fused itself picks one by batch size).

On the CPU, a full run (not --quick, --only or --shape) goes on with the per-call rows
(benchmarks/per_call.py, per_call.csv) and the variant rows (benchmarks/variants.py:
IndRNN, DropConnect, zoneout and the LayerNorm cells against plain PyTorch loops, eager and
compiled, variants.csv) and the torch.func rows (benchmarks/func_transforms.py: grad,
per-sample gradients, jacrev and jvp, func_transforms.csv).

    python benchmarks/bench.py [--device cpu|cuda] [--rounds N] [--csv PATH]
                               [--markdown PATH] [--quick] [--only T,B,I,H ...]
                               [--shape T,B,I,H[,L[,bi]] ...]

--shape times shapes of your own instead of the grid, every cell (L layers, bi for
bidirectional), e.g. --shape 10,128,256,256 --shape 50,32,256,256,2,bi.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused
from benchmarks import func_transforms, per_call, variants
from benchmarks.chart import write_chart

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


# The grids of ARCHITECTURE.md: (T, B, I, H, layers, bidirectional).
CPU_GRID = [
    Shape(100, 64, 512, 512),
    Shape(100, 1, 256, 256),
    Shape(200, 16, 128, 128),
    Shape(50, 32, 256, 256, 2, True),
    Shape(64, 3, 33, 513),  # a few rows a step, each gate's last panel of one unit
]
# On CUDA each row names the cells it runs: the project's grids, the DeepBench rows for the
# cell DeepBench gives them.
ALL = CELLS
CUDA_GRID: list[tuple[Shape, tuple[str, ...]]] = [
    (Shape(100, 64, 512, 512), ALL),  # fastrnns default
    *((Shape(100, b, h, h), ALL) for b in (1, 8) for h in (256, 512, 1024)),  # small batch
    (Shape(50, 256, 1024, 1024), ALL),  # large
    (Shape(1000, 16, 128, 128), ALL),  # long sequence
    (Shape(100, 32, 256, 256, 2, True), ALL),  # deep bidirectional
    *((Shape(25, b, h, h), ("LSTM",)) for h in (512, 1024, 2048) for b in (16, 32, 64, 128)),
    (Shape(1500, 32, 1024, 1024), ("GRU",)),  # DeepBench GRU
    *((Shape(25, b, 1024, 1024), ("LSTM", "GRU")) for b in (1, 2, 4)),  # DeepBench inference
]
QUICK_GRID = [Shape(20, 4, 32, 32), Shape(10, 1, 16, 16, 2, True)]
# CPU rows that also run float16 and float64 (a large batch and a single sequence, where the
# engine's paths differ most): rnn_fused is to be faster than torch.nn in every precision,
# not only in the two of the full grid.
OTHER_PRECISION_SHAPES = (Shape(100, 64, 512, 512), Shape(100, 1, 256, 256))

# What the two ratio columns of a device's table are.
RATIOS = {
    "tf32 speedup": "speedup = cuDNN / rnn_fused in the row's dtype; "
    "tf32 speedup = cuDNN tf32 / ours tf32",
    "vs fp32": "speedup = torch.nn / rnn_fused in the row's dtype; "
    "vs fp32 = torch.nn fp32 / rnn_fused in bf16 or fp16",
}


def parse_shape(text: str) -> Shape:
    """--shape's T,B,I,H[,L[,bi]]."""
    parts = text.split(",")
    bidirectional = parts[-1] == "bi"
    numbers = parts[:-1] if bidirectional else parts
    if len(numbers) not in (4, 5) or not all(p.isdigit() and int(p) > 0 for p in numbers):
        raise argparse.ArgumentTypeError(f"expected T,B,I,H[,L[,bi]] (positive), got {text}")
    return Shape(*map(int, numbers), bidirectional=bidirectional)


def cpu_description() -> str:
    """The CPU's name and the features its kernels choose by (a speed result holds for the
    kind of CPU it was measured on)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ["avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"]
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX-512'})"


def torch_module(cell: str, s: Shape, device: str, dtype: torch.dtype) -> nn.Module:
    cls = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}[cell]
    m = cls(s.I, s.H, num_layers=s.layers, bidirectional=s.bidirectional)
    return m.to(device=device, dtype=dtype)


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


def interleaved(sides: dict[str, Callable[[], object]], device: str, rounds: int):
    """Median ms of each side, the sides alternating within every round, after a warm-up."""
    measure = timer(device)
    for fn in sides.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            times[name].append(measure(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def compare(base: list[torch.Tensor], ours: list[torch.Tensor]) -> tuple[float, float]:
    """Largest absolute difference and largest relative error over pairs of tensors."""
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ours, base))
    rel = max(
        ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
        for a, b in zip(ours, base)
    )
    return diff, rel


def inference(m: nn.Module, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    def run():
        with torch.no_grad():
            return [m(x)[0]]

    return run


def training(m: nn.Module, x: torch.Tensor) -> Callable[[], list[torch.Tensor]]:
    def run():
        xg = x.detach().requires_grad_()
        out = m(xg)[0]
        return [out, *torch.autograd.grad(out.float().sum(), [xg, *m.parameters()])]

    return run


def bench_cpu(cell: str, s: Shape, rounds: int) -> Iterator[dict]:
    """fp32 rows, then bf16 rows: ours and torch.nn in bf16, and torch.nn in fp32 beside them
    (what a user gains or loses by switching to bf16); on OTHER_PRECISION_SHAPES fp16 rows
    (torch.nn fp32 beside them too) and fp64 rows after them."""
    torch.manual_seed(0)
    module32 = torch_module(cell, s, "cpu", torch.float32)
    x32 = torch.randn(s.T, s.B, s.I)
    precisions = [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]
    if s in OTHER_PRECISION_SHAPES:
        precisions += [(torch.float16, "fp16"), (torch.float64, "fp64")]
    for dtype, name in precisions:
        module = torch_module(cell, s, "cpu", dtype)
        module.load_state_dict(module32.state_dict())
        fused = rnn_fused.replace_rnns(torch_module(cell, s, "cpu", dtype))
        fused.load_state_dict(module32.state_dict())
        x = x32.to(dtype)
        for kind, make in [("fwd", inference), ("fwd+bwd", training)]:
            base, ours = make(module, x), make(fused, x)
            sides = {"torch.nn": base, "rnn_fused": ours}
            if dtype in (torch.bfloat16, torch.float16):
                sides["torch.nn fp32"] = make(module32, x32)
            t = interleaved(sides, "cpu", rounds)
            ratios = {"speedup": t["torch.nn"] / t["rnn_fused"]}
            if "torch.nn fp32" in t:
                ratios["vs fp32"] = t["torch.nn fp32"] / t["rnn_fused"]
            yield table_row(cell, s, name, kind, t, ratios, base, ours)


def table_row(cell, s: Shape, dtype: str, kind: str, times: dict, ratios: dict, base, ours):
    """One row of the table: the times of every side, the ratios, and how far ours is from
    the baseline (outputs and gradients of one more call of each)."""
    diff, rel = compare(base(), ours())
    return dict(
        cell=cell,
        shape=str(s),
        dtype=dtype,
        kind=kind,
        **times,
        **ratios,
        max_abs_diff=diff,
        max_rel_err=rel,
    )


def cudnn_graph(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """m's forward captured in a CUDA graph: cuDNN without the host's launch overhead."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            m(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        m(static_x)
    return graph.replay


def with_flags(run: Callable[[], object], *, cudnn: bool = True, tf32: bool = False):
    """run under the given cuDNN switch and TF32 flags (restored afterwards)."""

    def wrapped():
        matmul = torch.backends.cuda.matmul
        saved = matmul.allow_tf32
        matmul.allow_tf32 = tf32
        try:
            with torch.backends.cudnn.flags(enabled=cudnn, allow_tf32=tf32):
                return run()
        finally:
            matmul.allow_tf32 = saved

    return wrapped


def with_path(run: Callable[[], object], path: str):
    """run with rnn_fused's CUDA path forced (RNN_FUSED_CUDA_PATH: persistent, fused or
    standard)."""

    def wrapped():
        before = os.environ.get("RNN_FUSED_CUDA_PATH")
        os.environ["RNN_FUSED_CUDA_PATH"] = path
        try:
            return run()
        finally:
            if before is None:
                del os.environ["RNN_FUSED_CUDA_PATH"]
            else:
                os.environ["RNN_FUSED_CUDA_PATH"] = before

    return wrapped


def bench_cuda(cell: str, s: Shape, rounds: int) -> Iterator[dict]:
    for dtype, name in [(torch.float32, "fp32"), (torch.bfloat16, "bf16")]:
        torch.manual_seed(0)
        module = torch_module(cell, s, "cuda", dtype)
        fused = rnn_fused.replace_rnns(torch_module(cell, s, "cuda", dtype))
        fused.load_state_dict(module.state_dict())
        x = torch.randn(s.T, s.B, s.I, device="cuda", dtype=dtype)
        for kind, make in [("fwd", inference), ("fwd+bwd", training)]:
            base, ours = make(module, x), make(fused, x)
            sides = {
                "cuDNN": base,
                "rnn_fused": ours,
                "cuDNN off": with_flags(make(module, x), cudnn=False),
                "ours persistent": with_path(ours, "persistent"),
                "ours fused": with_path(ours, "fused"),
                "ours standard": with_path(ours, "standard"),
            }
            if dtype == torch.float32:  # PyTorch's defaults let cuDNN's RNNs use TF32
                sides["cuDNN tf32"] = with_flags(base, tf32=True)
                sides["ours tf32"] = with_flags(ours, tf32=True)
            if kind == "fwd":
                sides["cuDNN graph"] = cudnn_graph(module, x)
            t = interleaved(sides, "cuda", rounds)
            ratios = {"speedup": t["cuDNN"] / t["rnn_fused"]}
            if "ours tf32" in t:
                ratios["tf32 speedup"] = t["cuDNN tf32"] / t["ours tf32"]
            yield table_row(cell, s, name, kind, t, ratios, base, ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--csv", default="benchmarks/out/bench.csv")
    parser.add_argument("--markdown", default=None, help="also write a markdown table here")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke run")
    parser.add_argument(
        "--only", action="append", metavar="T,B,I,H", help="only these rows of the grid"
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        metavar="T,B,I,H[,L[,bi]]",
        help="these shapes instead of the grid, every cell",
    )
    args = parser.parse_args()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        # Same precision on both sides: fp32 without TF32 (bf16 rows are bf16 on both).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        grid = [(g, CELLS) for g in QUICK_GRID] if args.quick else CUDA_GRID
        columns = [
            "cuDNN",
            "rnn_fused",
            "cuDNN graph",
            "cuDNN off",
            "cuDNN tf32",
            "ours tf32",
            "ours persistent",
            "ours fused",
            "ours standard",
        ]
        what = (
            f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        grid = [(g, CELLS) for g in (QUICK_GRID if args.quick else CPU_GRID)]
        columns = ["torch.nn", "rnn_fused", "torch.nn fp32"]
        what = f"{torch.get_num_threads()} threads, {cpu_description()}"
    if args.shape:
        grid = [(s, CELLS) for s in args.shape]
    if args.only:
        grid = [(g, cells) for g, cells in grid if str(g) in args.only]
        if not grid:
            sys.exit(f"no grid row is one of {args.only}")
    ratios = ["speedup", "tf32 speedup" if device == "cuda" else "vs fp32"]
    header = (
        f"rnn_fused vs torch.nn on {device}: torch {torch.__version__}, {what}, {dt.date.today()}"
    )
    print(header)
    print(f"median ms of {args.rounds} interleaved rounds; {RATIOS[ratios[1]]}")
    names = ["cell", "shape", "dtype", "kind", *columns, *ratios, "max|diff|", "rel err"]
    widths = [5, 20, 5, 8, *[11] * len(columns), *[12] * len(ratios), 10, 8]

    def print_line(values: list[str]) -> None:
        print(
            " ".join(
                f"{v:>{w}}" if i > 3 else f"{v:{w}}" for i, (v, w) in enumerate(zip(values, widths))
            ),
            flush=True,
        )

    print_line(names)
    rows, failed = [], []
    for s, cells in grid:
        for cell in cells:
            # A failing row is reported and the grid goes on; the files are rewritten after
            # every row, so a run cut short (or a dtype that fails) keeps what it measured.
            try:
                for r in (bench_cuda if device == "cuda" else bench_cpu)(cell, s, args.rounds):
                    rows.append(r)
                    line = [r["cell"], r["shape"], r["dtype"], r["kind"]]
                    line += [f"{r.get(c, float('nan')):.2f}" for c in [*columns, *ratios]]
                    line += [f"{r['max_abs_diff']:.1e}", f"{r['max_rel_err']:.1e}"]
                    print_line(line)
                    write_outputs(rows, columns, ratios, header, args)
            except Exception:
                failed.append(f"{cell} {s}")
                traceback.print_exc()
    chart = Path(args.csv).with_suffix(".png")
    write_chart(rows, chart, header)
    print(f"wrote {args.csv}, {chart}" + (f" and {args.markdown}" if args.markdown else ""))
    if device == "cpu" and not args.only and not args.shape:
        calls = per_call.run(args.rounds, calls=50 if args.quick else 500, client=not args.quick)
        write_rows(calls, Path(args.csv).with_name("per_call.csv"))
        if not args.quick:
            write_rows(variants.run(args.rounds), Path(args.csv).with_name("variants.csv"))
            transforms = func_transforms.run(args.rounds)
            write_rows(transforms, Path(args.csv).with_name("func_transforms.csv"))
    if failed:
        sys.exit(f"failed rows: {', '.join(failed)}")


def write_rows(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def write_outputs(
    rows: list[dict], columns: list[str], ratios: list[str], header: str, args
) -> None:
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["cell", "shape", "dtype", "kind", *columns, *ratios, "max_abs_diff", "max_rel_err"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if args.markdown:
        lines = [
            f"# {header}",
            "",
            f"Median ms of {args.rounds} interleaved rounds; {RATIOS[ratios[1]]} "
            "(> 1: rnn_fused faster).",
            "",
            "| " + " | ".join(fields) + " |",
            "|" + "---|" * len(fields),
        ]
        for r in rows:
            vals = [r["cell"], r["shape"], r["dtype"], r["kind"]]
            vals += [f"{r.get(c, float('nan')):.3f}" for c in columns]
            vals += [f"{r.get(c, float('nan')):.2f}" for c in ratios]
            vals += [f"{r['max_abs_diff']:.1e}", f"{r['max_rel_err']:.1e}"]
            lines.append("| " + " | ".join(vals) + " |")
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""A short summary of a CUDA benchmark CSV (benchmarks/bench.py --csv): one line per cell and
shape with the speedups over eager cuDNN, issue 4's target rows, and the slowest rows.

    python benchmarks/summarize.py bench.csv
"""

from __future__ import annotations

import csv
import math
import sys

TARGET_SHAPE = "100,64,512,512"  # LSTM and GRU fwd+bwd, fp32 (TF32 off) and bf16: >= 1


# The summary's columns: (dtype, kind, field of the CSV).
COLUMNS = [
    ("fp32", "fwd", "speedup"),
    ("fp32", "fwd+bwd", "speedup"),
    ("bf16", "fwd", "speedup"),
    ("bf16", "fwd+bwd", "speedup"),
    ("fp32", "fwd+bwd", "tf32 speedup"),
]
# Per-path times (ms) of fp32 fwd+bwd: which path wins where.
PATHS = ["ours fused", "ours standard"]


def ratio(row: dict | None, field: str = "speedup") -> float:
    value = (row or {}).get(field) or "nan"
    return float(value)


def main(path: str) -> None:
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        sys.exit(f"no benchmark results: {e}")
    by_key = {(r["cell"], r["shape"], r["dtype"], r["kind"]): r for r in rows}
    pairs = list(dict.fromkeys((r["cell"], r["shape"]) for r in rows))
    print("speedup = eager cuDNN / rnn_fused (> 1: ours faster); tf32: both sides with TF32")
    print(
        f"{'cell':5} {'shape':20} {'fp32 fwd':>8} {'fp32 f+b':>8} {'bf16 fwd':>8} "
        f"{'bf16 f+b':>8} {'tf32 f+b':>8} {'ours f+b ms':>11} {'fused':>8} {'standard':>8}"
    )
    for cell, shape in pairs:
        values = [ratio(by_key.get((cell, shape, d, k)), f) for d, k, f in COLUMNS]
        f32 = by_key.get((cell, shape, "fp32", "fwd+bwd"))
        ms = [ratio(f32, "rnn_fused"), *(ratio(f32, p) for p in PATHS)]
        print(
            f"{cell:5} {shape:20} "
            + " ".join(f"{v:8.2f}" for v in values)
            + f" {ms[0]:11.3f} {ms[1]:8.3f} {ms[2]:8.3f}"
        )

    print(f"\ntarget rows ({TARGET_SHAPE}, fwd+bwd, need >= 1.00):")
    for cell in ("LSTM", "GRU"):
        for dtype in ("fp32", "bf16"):
            r = ratio(by_key.get((cell, TARGET_SHAPE, dtype, "fwd+bwd")))
            verdict = "ok" if r >= 1.0 else "BELOW" if not math.isnan(r) else "missing"
            print(f"  {cell:5} {dtype}: {r:.2f} {verdict}")

    slowest = sorted(rows, key=lambda r: ratio(r))[:6]
    print("\nslowest rows:")
    for r in slowest:
        print(
            f"  {r['cell']:5} {r['shape']:20} {r['dtype']} {r['kind']:8} {ratio(r):.2f} "
            f"(cuDNN {float(r['cuDNN']):.3f} ms, ours {float(r['rnn_fused']):.3f} ms)"
        )


if __name__ == "__main__":
    main(sys.argv[1])

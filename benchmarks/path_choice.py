"""Where each CUDA path wins in the types that have tensor cores: the fused path (the
recurrent product on CUDA cores, one launch a step) against the standard one (cuBLAS on
tensor cores, then a pointwise kernel), both forced, with cuDNN beside them; bfloat16, and
float32 with TF32. The data behind use_fused_path's limit (csrc/cuda/recurrence_engine.h).

    python3 benchmarks/path_choice.py [--rounds 5] [--csv PATH]

Milliseconds per call (CUDA events around one eager call, host overhead included, median of
the rounds after a warm-up); fwd under no_grad, fwd+bwd the forward and the backward of
out.sum(). T=1 rows are a single step (no persistent path); T=100 rows start above the
persistent path's batches.
"""

from __future__ import annotations

import argparse

import torch
from step_cost import call, median_ms, pair, write_csv

CASES = [(1, B) for B in (1, 8, 32, 64)] + [(100, B) for B in (24, 32, 64)]
SIZES = (64, 128, 256, 512, 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--csv", default=None)
    args = parser.parse_args()
    head = ["cell", "dtype", "T", "B", "H", "kind", "cuDNN", "fused", "standard", "std/fused"]
    print(f"ms per call, {torch.cuda.get_device_name()}")
    print(" ".join(f"{h:>9}" for h in head), flush=True)
    rows = []
    for dtype in ("bf16", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = dtype == "tf32"
        for cell in ("LSTM", "GRU", "RNN"):
            for H in SIZES:
                theirs, ours = pair(cell, H)
                if dtype == "bf16":
                    theirs, ours = theirs.bfloat16(), ours.bfloat16()
                for T, B in CASES:
                    x = torch.randn(T, B, H, device="cuda", dtype=next(ours.parameters()).dtype)
                    for kind in ("fwd", "fwd+bwd"):
                        row = {"cell": cell, "dtype": dtype, "T": T, "B": B, "H": H, "kind": kind}
                        row["cuDNN"] = median_ms(call(theirs, x, kind, None), args.rounds)
                        for path in ("fused", "standard"):
                            row[path] = median_ms(call(ours, x, kind, path), args.rounds)
                        row["std/fused"] = row["standard"] / row["fused"]
                        rows.append(row)
                        print(
                            " ".join(
                                f"{v:>9.3f}" if isinstance(v, float) else f"{v!s:>9}"
                                for v in row.values()
                            ),
                            flush=True,
                        )
                        if args.csv:
                            write_csv(args.csv, head, rows)


if __name__ == "__main__":
    main()

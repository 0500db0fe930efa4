"""Small calls of every CUDA kernel for compute-sanitizer (memcheck, racecheck): each cell,
both CUDA paths, fp32 and bf16, padded, packed and reverse, the LSTM projection, forward and
backward. Prints one line per case; the sanitizer's report says whether any access was bad.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_cuda.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused
from rnn_fused.ops import GATES


def run_case(mode: str, path: str, dtype: torch.dtype, packed: bool, reverse: bool, proj: int):
    os.environ["RNN_FUSED_CUDA_PATH"] = path
    g, (T, B, I, H) = GATES[mode], (3, 2, 5, 7)
    out = proj or H
    dev = dict(device="cuda", dtype=dtype)
    tensors = [
        torch.randn(T * B, I, **dev) if packed else torch.randn(T, B, I, **dev),
        torch.randn(g * H, I, **dev) / 3,
        torch.randn(g * H, out, **dev) / 3,
        torch.randn(g * H, **dev),
        torch.randn(g * H, **dev),
        torch.randn(B, out, **dev),
        torch.randn(B, H, **dev) if mode == "LSTM" else None,
        torch.randn(proj, H, **dev) / 3 if proj else None,
    ]
    for t in tensors:
        if t is not None:
            t.requires_grad_()
    x, w_ih, w_hh, b_ih, b_hh, h0, c0, w_hr = tensors
    batch_sizes = torch.tensor([2, 2, 2]) if packed else None
    output, h_n, c_n = rnn_fused.rnn_layer(
        mode, x, w_ih, w_hh, b_ih, b_hh, h0, c0,
        w_hr=w_hr, batch_sizes=batch_sizes, reverse=reverse,
    )  # fmt: skip
    loss = output.float().sum() + h_n.float().sum() + (c_n.float().sum() if c_n is not None else 0)
    loss.backward()
    torch.cuda.synchronize()


def main() -> None:
    cases = 0
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
        for path in ("persistent", "persistent-grid", "fused", "standard"):
            for dtype in (torch.float32, torch.bfloat16):
                for packed, reverse in ((False, False), (True, False), (False, True)):
                    for proj in (0, 3) if mode == "LSTM" else (0,):
                        run_case(mode, path, dtype, packed, reverse, proj)
                        cases += 1
                        print(mode, path, dtype, "packed" if packed else "padded",
                              "reverse" if reverse else "", f"proj={proj}", flush=True)  # fmt: skip
    print(f"{cases} cases ran")


if __name__ == "__main__":
    main()

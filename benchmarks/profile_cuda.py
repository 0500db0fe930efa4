"""Where the time goes on CUDA: the kernels of one training step (forward + backward) of
rnn_fused and of cuDNN at issue 4's target shape, from torch.profiler.

For each side it prints the wall time per iteration (CUDA events), the GPU time summed over
its kernels, the number of kernels, and the kernels taking the most GPU time. Wall time well
above kernel time means the GPU waits for the host (launch-bound).

    python benchmarks/profile_cuda.py [--shape T,B,I,H] [--iters N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused


def training_step(m: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        xg = x.detach().requires_grad_()
        out = m(xg)[0]
        torch.autograd.grad(out.float().sum(), [xg, *m.parameters()])

    return run


def wall_ms(fn: Callable[[], None], iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def kernel_times(fn: Callable[[], None], iters: int) -> list[tuple[str, int, float]]:
    """(kernel name, launches per iteration, GPU ms per iteration), largest first."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            entry = totals.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += e.time_range.elapsed_us() / 1e3
    rows = [(name, round(n / iters), ms / iters) for name, (n, ms) in totals.items()]
    return sorted(rows, key=lambda r: -r[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="100,64,512,512")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    T, B, I, H = (int(v) for v in args.shape.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, shape T,B,I,H={args.shape}")
    for cls in (nn.LSTM, nn.GRU):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            theirs = cls(I, H).cuda().to(dtype)
            ours = rnn_fused.replace_rnns(cls(I, H).cuda().to(dtype))
            ours.load_state_dict(theirs.state_dict())
            x = torch.randn(T, B, I, device="cuda", dtype=dtype)
            for name, m in (("cuDNN", theirs), ("rnn_fused", ours)):
                fn = training_step(m, x)
                fn()
                wall = wall_ms(fn, args.iters)
                try:
                    kernels = kernel_times(fn, args.iters)
                except RuntimeError as e:  # no CUPTI on the machine: wall times only
                    print(f"\n{cls.__name__} {name}: wall {wall:.3f} ms/iter (profiler: {e})")
                    continue
                gpu = sum(k[2] for k in kernels)
                count = sum(k[1] for k in kernels)
                print(
                    f"\n{cls.__name__} {str(dtype)[6:]} {name}: wall {wall:.3f} ms/iter, "
                    f"kernels {gpu:.3f} ms in {count} launches"
                )
                for kname, n, ms in kernels[:8]:
                    print(f"  {ms:8.3f} ms {n:5d}x  {kname[:100]}")


if __name__ == "__main__":
    main()

"""The GPU check's first line: versions and the device's properties (or that there is no
GPU), so that a run's results say what they ran on. Exit status 0 with a GPU, 3 without.

    python3 benchmarks/preflight.py
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import torch


def nvcc_version() -> str:
    if shutil.which("nvcc") is None:
        return "none on PATH"
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].split("release")[-1].strip() if release else "unknown"


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    smem = getattr(p, "shared_memory_per_block_optin", None)
    parts = [
        f"{p.name} sm_{p.major}{p.minor}",
        f"{p.multi_processor_count} SMs",
        f"{p.total_memory / 2**30:.0f} GiB",
        f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB",
        f"shared memory per block (opt-in) {smem // 1024} KiB" if smem else "",
        f"thread-block clusters {'yes' if p.major >= 9 else 'no'}",
    ]
    return ", ".join(x for x in parts if x)


def main() -> int:
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    print(
        f"preflight: python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, cuDNN {cudnn}), nvcc {nvcc_version()}, "
        f"CPU cores {os.cpu_count()}"
    )
    if not torch.cuda.is_available():
        print("device: no GPU present (the GPU stages report it and skip)")
        return 3
    print(f"device: {device_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

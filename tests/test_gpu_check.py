"""The GPU check's script parses, and its preflight names the versions and the device, or
says that no GPU is present (exit 3), so that the script's GPU stages skip with a line
each instead of failing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


def test_preflight_names_versions_and_device():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "preflight.py")], capture_output=True, text=True
    )
    assert f"torch {torch.__version__}" in run.stdout, run.stderr
    if torch.cuda.is_available():
        assert run.returncode == 0 and " SMs, " in run.stdout, run.stdout
    else:
        assert run.returncode == 3 and "device: no GPU present" in run.stdout, run.stdout

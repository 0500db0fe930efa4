"""A process that ran small layers can fork, and the child can run them (as with torch.nn):
small products open no OpenMP region, whose threads a forked child would wait for forever.
Each case runs in a fresh interpreter, since this test process has used threads already."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Models from the report of the hang (GRU 16->32 at T=17, RNN 16->100 at T=20, batch 2),
# with a training step before the fork. Not cells: their products go to MKL, whose OpenMP
# threads hang a forked child for torch.nn's cells too (LSTMCell(16, 24) at batch 3).
SCRIPT = textwrap.dedent(
    """
    import os, torch, rnn_fused
    torch.manual_seed(0)
    cases = [
        (rnn_fused.GRU(16, 32), torch.randn(17, 2, 16)),
        (rnn_fused.RNN(16, 100), torch.randn(20, 2, 16)),
    ]
    run = lambda m, x: m(x)[0]
    cases[0][0](cases[0][1])[0].sum().backward()
    with torch.no_grad():
        before = [run(m, x) for m, x in cases]
    pid = os.fork()
    if pid == 0:
        with torch.no_grad():
            after = [run(m, x) for m, x in cases]
        os._exit(0 if all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) else 3)
    _, status = os.waitpid(pid, 0)
    print("child exit code", os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="os.fork is POSIX only")
def test_child_of_fork_runs_small_layers():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "child exit code 0" in done.stdout, done.stdout + done.stderr[-2000:]

"""What the examples share to draw what they print: a --png option and a saver.

matplotlib is optional: only an example asked for a PNG imports it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

FIGURES = Path(__file__).resolve().parent / "figures"


def add_png_option(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument(
        "--png",
        nargs="?",
        const=str(FIGURES / f"{name}.png"),
        default=None,
        metavar="PATH",
        help=f"also draw the results into a PNG (default path: examples/figures/{name}.png)",
    )


def pyplot() -> Any:
    """matplotlib.pyplot on a file-only backend, or a clear error if it is missing."""
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("--png needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")

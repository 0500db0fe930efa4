"""A PNG chart of a benchmark table's speed ratios: one bar per row, the line at 1 where
torch.nn (or cuDNN) and rnn_fused take the same time."""

from __future__ import annotations

from pathlib import Path


def write_chart(rows: list[dict], path: Path, title: str) -> None:
    """Bars of each row's `speedup` (and of `vs fp32` where a bf16 or fp16 row has it), on a log
    scale. Needs matplotlib (in requirements.txt); without it, says so and writes nothing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no chart at {path}")
        return
    labels = [f"{r['cell']} {r['shape']} {r['dtype']} {r['kind']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.6))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["speedup"] for r in rows], height=0.4, label="speedup")
    if any("vs fp32" in r for r in rows):
        ax.barh(
            [y - 0.2 for y in ys],
            [r.get("vs fp32", 0.0) for r in rows],
            height=0.4,
            label="vs torch.nn fp32",
        )
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time of torch.nn / time of rnn_fused (> 1: rnn_fused faster)")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

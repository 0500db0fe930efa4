"""Bidirectional layers see the future: a task that one direction cannot solve.

Each input is a sequence of random bits; the target at step t is the bit at step t + 3.
A unidirectional GRU has not read that bit yet when it must answer, so it stays at chance
(50%). A bidirectional GRU also runs right to left, and its backward direction has read
the bit three steps ago; the two directions' outputs are concatenated at every step.

Trains both for a few hundred steps and prints their accuracy on fresh sequences (and,
with --png, draws it over the training).

    python examples/bidirectional.py [--steps N] [--png [PATH]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # rnn_fused, and drawing.py
import drawing  # noqa: E402  (examples/drawing.py)

import rnn_fused  # noqa: E402

AHEAD = 3  # the target is the input this many steps later


class Tagger(nn.Module):
    def __init__(self, bidirectional: bool, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = rnn_fused.GRU(1, hidden, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 1] -> logits [B, T - AHEAD]
        out, _ = self.rnn(x)  # [B, T, hidden * directions]
        return self.head(out[:, :-AHEAD]).squeeze(-1)


def batch(size: int, length: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [B, length, 1] of +-1, and targets [B, length - AHEAD]: the bits AHEAD later
    (the last AHEAD steps have no target inside the sequence)."""
    bits = torch.randint(0, 2, (size, length)).float()
    return bits[:, :, None] * 2 - 1, bits[:, AHEAD:]


def run(steps: int = 300, seed: int = 0, every: int = 10) -> dict[str, list[float]]:
    """Accuracy of each model on 1000 fresh sequences before training and every `every`
    steps of it; the last entry is the accuracy after training."""
    torch.manual_seed(seed)
    held_out = batch(1000)
    results = {}
    for name, bidirectional in (("unidirectional", False), ("bidirectional", True)):
        model = Tagger(bidirectional)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        curve = [accuracy(model, *held_out)]
        for step in range(1, steps + 1):
            x, y = batch(64)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % every == 0 or step == steps:
                curve.append(accuracy(model, *held_out))
        results[name] = curve
    return results


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return ((model(x) > 0).float() == y).float().mean().item()


def draw(results: dict[str, list[float]], steps: int, every: int, path: str) -> None:
    plt = drawing.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in results.items():
        ax.plot([min(i * every, steps) for i in range(len(curve))], curve, label=name)
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.set(
        title=f"Predicting the bit {AHEAD} steps ahead (GRU)",
        xlabel="training step",
        ylabel="accuracy on fresh sequences",
        ylim=(0.3, 1.02),
    )
    ax.legend()
    drawing.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    drawing.add_png_option(parser, "bidirectional")
    args = parser.parse_args()
    results = run(args.steps)
    for name, curve in results.items():
        print(f"{name:15} accuracy {curve[-1]:.1%} (predicting the bit {AHEAD} steps ahead)")
    if args.png:
        draw(results, args.steps, 10, args.png)


if __name__ == "__main__":
    main()

"""Bidirectional layers see the future: a task that one direction cannot solve.

Each input is a sequence of random bits; the target at step t is the bit at step t + 3.
A unidirectional GRU has not read that bit yet when it must answer, so it stays at chance
(50%). A bidirectional GRU also runs right to left, and its backward direction has read
the bit three steps ago; the two directions' outputs are concatenated at every step.

Trains both for a few hundred steps and prints their accuracy on fresh sequences.

    python examples/bidirectional.py [--steps N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused

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


def run(steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Accuracy of each model on fresh sequences after training."""
    torch.manual_seed(seed)
    results = {}
    for name, bidirectional in (("unidirectional", False), ("bidirectional", True)):
        model = Tagger(bidirectional)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            x, y = batch(64)
            loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        x, y = batch(1000)
        with torch.no_grad():
            results[name] = ((model(x) > 0).float() == y).float().mean().item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    for name, accuracy in run(args.steps).items():
        print(f"{name:15} accuracy {accuracy:.1%} (predicting the bit {AHEAD} steps ahead)")


if __name__ == "__main__":
    main()

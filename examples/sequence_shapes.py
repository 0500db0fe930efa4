"""The three shapes of sequence modeling, each a few lines on rnn_fused's drop-in layers.

- many-to-one: read a whole sequence, answer once (here: is the sum of the inputs positive?)
- many-to-many: answer at every step (here: the running sign of the sum so far)
- one-to-many: from one input, generate a sequence (here: a sine wave from its phase)

Each model trains for a few hundred steps on synthetic data and prints its loss going down
(with --png, draws its learning curve).
The same weights are shared by every time step: h(t) = f(W_ih x(t) + W_hh h(t-1) + b).

    python examples/sequence_shapes.py [--steps N] [--png [PATH]]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # rnn_fused, and drawing.py
import drawing  # noqa: E402  (examples/drawing.py)

import rnn_fused  # noqa: E402


class ManyToOne(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = rnn_fused.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 1] -> logits [B]
        _, h_n = self.rnn(x)
        return self.head(h_n[-1]).squeeze(-1)


class ManyToMany(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = rnn_fused.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 1] -> logits [B, T]
        out, _ = self.rnn(x)
        return self.head(out).squeeze(-1)


class OneToMany(nn.Module):
    """Generates T values from a phase, feeding each output back in as the next input."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.start = nn.Linear(1, hidden)
        self.cell = rnn_fused.LSTMCell(1, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, phase: torch.Tensor, steps: int) -> torch.Tensor:  # [B, 1] -> [B, T]
        h = torch.tanh(self.start(phase))
        c = torch.zeros_like(h)
        y = torch.zeros_like(phase)
        outputs = []
        for _ in range(steps):
            h, c = self.cell(y, (h, c))
            y = self.head(h)
            outputs.append(y)
        return torch.cat(outputs, dim=1)


def train(model: nn.Module, batch_fn, loss_fn, steps: int, lr: float = 1e-2) -> list[float]:
    """The loss of every training step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        inputs, target = batch_fn()
        loss = loss_fn(model(*inputs), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run(steps: int = 300, seed: int = 0) -> dict[str, list[float]]:
    """The learning curve (loss per training step) of each model."""
    torch.manual_seed(seed)
    T, B = 20, 32
    bce = nn.BCEWithLogitsLoss()

    def sums():
        x = torch.randn(B, T, 1)
        return (x,), (x.sum(dim=(1, 2)) > 0).float()

    def running_signs():
        x = torch.randn(B, T, 1)
        return (x,), (x.squeeze(-1).cumsum(dim=1) > 0).float()

    def sines():
        phase = torch.rand(B, 1) * 2 * math.pi
        t = torch.arange(1, T + 1) * 0.3
        return (phase, T), torch.sin(phase + t)

    return {
        "many-to-one (GRU)": train(ManyToOne(), sums, bce, steps),
        "many-to-many (LSTM)": train(ManyToMany(), running_signs, bce, steps),
        "one-to-many (LSTMCell)": train(OneToMany(), sines, nn.MSELoss(), steps),
    }


def draw(curves: dict[str, list[float]], path: str) -> None:
    plt = drawing.pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(12, 3.6))
    for ax, (name, losses) in zip(axes, curves.items(), strict=True):
        ax.plot(losses, linewidth=0.8)
        ax.set(title=name, xlabel="training step", ylabel="loss")
    drawing.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    drawing.add_png_option(parser, "sequence_shapes")
    args = parser.parse_args()
    curves = run(args.steps)
    for name, losses in curves.items():
        print(f"{name:24} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if args.png:
        draw(curves, args.png)


if __name__ == "__main__":
    main()

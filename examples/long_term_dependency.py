"""Long-term dependencies: which cells can carry one symbol across T steps?

Each sequence starts with one of four symbols; then come T - 1 steps of distractors (random
symbols of another set), and at the last step the model must name the first symbol. Chance
is 25%. The only way to learn the task is a gradient from the last step back to the first,
through T - 1 steps of the recurrence (see vanishing_gradients.py): a tanh RNN's fades
geometrically, while the gated cells (GRU, LSTM) can keep a path along which it survives
(when their gates hold the state).

Trains a tanh RNN, a GRU and an LSTM of the same width at several T with the same budget
of steps, and the two gated cells again with their keep gate initialised near 1 (bias 5):
LSTM's forget gate, GRU's update gate. Prints the accuracy each reaches on fresh sequences.
With PyTorch's default initialisation the GRU stays at chance from T = 50 on in 300 steps
(the LSTM already at T = 25), and the tanh RNN is a gamble (chance at some lengths, 100% at
others, changing with the seed). The GRU that starts out keeping its state learns every T
here; the LSTM that does learns up to T = 50, as its input gate still writes every
distractor into the cell state.

    python examples/long_term_dependency.py [--lengths T ...] [--steps N] [--png [PATH]]
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

SYMBOLS = 4  # to remember
DISTRACTORS = 4  # to ignore
LENGTHS = (25, 50, 100, 200)
KEEP_BIAS = 5.0  # sigmoid(5) = 0.993: a gate that keeps the state unless taught otherwise


def keeping(cell: type[nn.Module]):
    """The cell with its keep gate's bias at KEEP_BIAS (LSTM's forget gate, GRU's update
    gate: the second block of H in torch.nn's gate order of both)."""

    def make(input_size: int, hidden: int, **kwargs) -> nn.Module:
        m = cell(input_size, hidden, **kwargs)
        with torch.no_grad():
            m.bias_ih_l0[hidden : 2 * hidden] = KEEP_BIAS
        return m

    return make


CELLS = {
    "RNN (tanh)": rnn_fused.RNN,
    "GRU": rnn_fused.GRU,
    "LSTM": rnn_fused.LSTM,
    "GRU, update bias 5": keeping(rnn_fused.GRU),
    "LSTM, forget bias 5": keeping(rnn_fused.LSTM),
}


class Recaller(nn.Module):
    def __init__(self, cell, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = cell(SYMBOLS + DISTRACTORS, hidden, batch_first=True)
        self.head = nn.Linear(hidden, SYMBOLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 8] -> logits [B, SYMBOLS]
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def batch(size: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot inputs [B, length, 8]: a symbol at step 0, distractors after; and the symbol."""
    first = torch.randint(0, SYMBOLS, (size,))
    later = torch.randint(SYMBOLS, SYMBOLS + DISTRACTORS, (size, length - 1))
    x = nn.functional.one_hot(torch.cat([first[:, None], later], dim=1), SYMBOLS + DISTRACTORS)
    return x.float(), first


def accuracy_after_training(cell, length: int, steps: int) -> float:
    model = Recaller(cell)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = batch(64, length)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(1000, length)
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def run(
    lengths: tuple[int, ...] = LENGTHS,
    steps: int = 300,
    seed: int = 0,
    cells: tuple[str, ...] = tuple(CELLS),
) -> dict[str, list[float]]:
    """Accuracy after `steps` training steps, per cell and sequence length."""
    results = {}
    for name in cells:
        cell = CELLS[name]
        results[name] = []
        for length in lengths:
            torch.manual_seed(seed)
            results[name].append(accuracy_after_training(cell, length, steps))
    return results


def draw(results: dict[str, list[float]], lengths: tuple[int, ...], path: str) -> None:
    plt = drawing.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accuracies in results.items():
        ax.plot(lengths, accuracies, marker="o", label=name)
    ax.axhline(1 / SYMBOLS, color="gray", linestyle=":", label="chance")
    ax.set(
        title="Recalling the first symbol after T steps",
        xlabel="T (steps between the symbol and the question)",
        ylabel="accuracy on fresh sequences",
        xscale="log",
        xticks=lengths,
        xticklabels=[str(t) for t in lengths],
        ylim=(0, 1.05),
    )
    ax.minorticks_off()
    ax.legend()
    drawing.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--steps", type=int, default=300)
    drawing.add_png_option(parser, "long_term_dependency")
    args = parser.parse_args()
    lengths = tuple(args.lengths)
    results = run(lengths, args.steps)
    print("accuracy recalling the first of T symbols (chance 25%)")
    print(f"{'cell':22}" + "".join(f"{'T=' + str(t):>8}" for t in lengths))
    for name, accuracies in results.items():
        print(f"{name:22}" + "".join(f"{a:8.0%}" for a in accuracies))
    if args.png:
        draw(results, lengths, args.png)


if __name__ == "__main__":
    main()

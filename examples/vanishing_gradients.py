"""Vanishing gradients, measured: how much of a loss at the last step reaches each earlier
input, for a vanilla RNN, a GRU and an LSTM over a long sequence.

The gradient reaching x(T - d) passes through d steps of the recurrence. A tanh RNN
multiplies it by W_hh^T diag(1 - h^2) at every step, so it shrinks geometrically. An LSTM
also carries it along the cell state, multiplied only by the forget gate f; with f near 1
(a positive forget-gate bias, a common initialisation) it survives hundreds of steps. With
PyTorch's default initialisation (forget bias 0, so f ~ 0.5) an untrained LSTM's gradient
vanishes about as fast as the RNN's.

Prints ||dL/dx(T - d)|| / ||dL/dx(T)|| for several distances d.

    python examples/vanishing_gradients.py [--steps T] [--png [PATH]]
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

DISTANCES = (0, 5, 20, 50, 100, 199)


def models(hidden: int) -> dict[str, nn.Module]:
    lstm_f = rnn_fused.LSTM(8, hidden)
    with torch.no_grad():  # forget-gate bias (the second quarter of each bias) = 3: f ~ 0.95
        lstm_f.bias_ih_l0[hidden : 2 * hidden] = 3.0
        lstm_f.bias_hh_l0[hidden : 2 * hidden] = 0.0
    return {
        "RNN (tanh)": rnn_fused.RNN(8, hidden),
        "GRU": rnn_fused.GRU(8, hidden),
        "LSTM": rnn_fused.LSTM(8, hidden),
        "LSTM, forget bias 3": lstm_f,
    }


def profile(steps: int = 200, hidden: int = 64, seed: int = 0) -> dict[str, list[float]]:
    """||dL/dx(T - d)|| / ||dL/dx(T)|| for d = 0 .. steps - 1, per model."""
    torch.manual_seed(seed)
    x = torch.randn(steps, 16, 8, dtype=torch.float64)
    results = {}
    for name, model in models(hidden).items():
        model = model.double()
        xg = x.clone().requires_grad_()
        out, _ = model(xg)
        out[-1].sum().backward()  # a loss on the last step only
        norms = xg.grad.norm(dim=(1, 2)).flip(0)  # one norm per distance back in time
        results[name] = (norms / norms[0]).tolist()
    return results


def run(steps: int = 200, hidden: int = 64, seed: int = 0) -> dict[str, list[float]]:
    """Relative gradient norm at each of DISTANCES (those below steps), per model."""
    return {
        name: [ratios[d] for d in DISTANCES if d < steps]
        for name, ratios in profile(steps, hidden, seed).items()
    }


def derivatives(span: float = 6.0, points: int = 241) -> dict[str, torch.Tensor]:
    """x, tanh'(x) = 1 - tanh(x)^2 and sigmoid'(x) = s(x) (1 - s(x)): at most 1 and 1/4, so
    every step through them can only shrink a gradient unless the weights make up for it."""
    x = torch.linspace(-span, span, points, dtype=torch.float64)
    s = torch.sigmoid(x)
    return {"x": x, "tanh'": 1 - torch.tanh(x) ** 2, "sigmoid'": s * (1 - s)}


def draw(curves: dict[str, list[float]], path: str) -> None:
    plt = drawing.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=(1, 2))
    d = derivatives()
    for name in ("tanh'", "sigmoid'"):
        left.plot(d["x"], d[name], label=name)
    left.set(title="Derivatives of the activations", xlabel="pre-activation")
    left.legend()
    for name, ratios in curves.items():
        right.semilogy(range(len(ratios)), ratios, label=name)
    right.set(
        title="Gradient reaching d steps back (loss on the last step)",
        xlabel="d (steps back in time)",
        ylabel="||dL/dx(T-d)|| / ||dL/dx(T)||",
        ylim=(1e-18, 10),
    )
    right.legend()
    drawing.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    drawing.add_png_option(parser, "vanishing_gradients")
    args = parser.parse_args()
    curves = profile(args.steps)
    results = {name: [r[d] for d in DISTANCES if d < args.steps] for name, r in curves.items()}
    shown = [d for d in DISTANCES if d < args.steps]
    print("||dL/dx(T-d)|| / ||dL/dx(T)||, loss on the last step")
    print(f"{'model':22}" + "".join(f"{'d=' + str(d):>10}" for d in shown))
    for name, ratios in results.items():
        print(f"{name:22}" + "".join(f"{r:10.1e}" for r in ratios))
    if args.png:
        draw(curves, args.png)


if __name__ == "__main__":
    main()

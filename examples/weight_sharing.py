"""Weight sharing over time: an LSTM layer is one LSTMCell applied at every step, with the
same weights, and the gradient of a weight is the sum of what each step contributes.

1. The layer's outputs equal a Python loop of LSTMCell steps using the layer's weights.
2. Unrolling the loop with a separate copy of W_hh for every step shows where the
   gradient comes from: the copies' gradients, one per step, add up to the layer's
   gradient of its one shared W_hh.
3. The parameter count does not depend on the sequence length.

Runs in float64, so the sums agree to rounding (about 1e-15).

    python examples/weight_sharing.py [--png [PATH]]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # rnn_fused, and drawing.py
import drawing  # noqa: E402  (examples/drawing.py)

import rnn_fused  # noqa: E402


def run(steps: int = 12, seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    layer = rnn_fused.LSTM(4, 6).double()
    cell = rnn_fused.LSTMCell(4, 6).double()
    cell.load_state_dict({k[: -len("_l0")]: v for k, v in layer.state_dict().items()})
    x = torch.randn(steps, 3, 4, dtype=torch.float64)

    out, _ = layer(x)
    out.sum().backward()

    # The same recurrence as a loop of cells, with one copy of W_hh per step.
    copies = [cell.weight_hh.detach().clone().requires_grad_() for _ in range(steps)]
    h = c = torch.zeros(3, 6, dtype=torch.float64)
    looped = []
    for t in range(steps):
        gates = x[t] @ cell.weight_ih.t() + cell.bias_ih + h @ copies[t].t() + cell.bias_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        looped.append(h)
    torch.stack(looped).sum().backward()
    per_step = [w.grad for w in copies]

    with torch.no_grad():  # the cell module itself, step by step, for the outputs
        hc, cells = None, []
        for t in range(steps):
            hc = cell(x[t], hc)
            cells.append(hc[0])
    return {
        "outputs vs LSTMCell loop": (out.detach() - torch.stack(cells)).abs().max().item(),
        "grad W_hh vs sum of steps": (layer.weight_hh_l0.grad - sum(per_step)).abs().max().item(),
        "per-step grad norms": [g.norm().item() for g in per_step],
        "running sum norms": [sum(per_step[: t + 1]).norm().item() for t in range(steps)],
        "layer grad norm": layer.weight_hh_l0.grad.norm().item(),
        "parameters": sum(p.numel() for p in layer.parameters()),
    }


def draw(result: dict[str, object], path: str) -> None:
    plt = drawing.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = range(1, len(result["per-step grad norms"]) + 1)
    ax.bar(steps, result["per-step grad norms"], color="tab:blue", label="step t's contribution")
    ax.plot(steps, result["running sum norms"], "o-", color="tab:orange", label="sum of steps 1..t")
    ax.axhline(result["layer grad norm"], color="black", linestyle="--", label="layer's grad W_hh")
    ax.set(
        title="One W_hh shared by every step: its gradient is a sum",
        xlabel="step t",
        ylabel="Frobenius norm",
    )
    ax.legend()
    drawing.save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    drawing.add_png_option(parser, "weight_sharing")
    args = parser.parse_args()
    short, long = run(steps=12), run(steps=48)
    print(f"max |layer output - LSTMCell loop|          {short['outputs vs LSTMCell loop']:.1e}")
    print(f"max |grad W_hh - sum of per-step grads|     {short['grad W_hh vs sum of steps']:.1e}")
    norms = ", ".join(f"{n:.2f}" for n in short["per-step grad norms"])
    print(f"per-step contributions to grad W_hh (norms): {norms}")
    print(f"parameters for 12 steps: {short['parameters']}, for 48 steps: {long['parameters']}")
    if args.png:
        draw(short, args.png)


if __name__ == "__main__":
    main()

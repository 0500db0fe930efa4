"""torch.func rows of `make bench`: gradients by torch.func.grad and per-sample gradients by
vmap(grad(...)) over the batch (differential privacy's clipping, influence functions), of
torch.nn's layer and of ours with the same weights, side by side in interleaved rounds,
with the parameters detached as torch.func's tutorials pass them, the Jacobian of one
sequence's last output w.r.t. its inputs by jacrev (how far back a step's output reaches),
and a jvp (forward mode: ours runs reference.py's loop there, not the fused kernels).
Times are median ms; speedup = torch.nn / rnn_fused. On the CPU torch.nn's GRU and RNN
raise under vmap(grad(...)) (an in-place update in their unbatched decomposition) and its
float32 LSTM under jvp (oneDNN's layer has no forward-mode formula): those rows time ours
alone; its float32 LSTM under jacrev runs through PyTorch's vmap fallback, a loop.

    python benchmarks/func_transforms.py [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_fused
from benchmarks.per_call import per_call_us

# (layer, T, B, I=H): an LSTM of medium size, a GRU and an RNN over 100 steps, a short LSTM call.
CASES = [("LSTM", 50, 16, 128), ("GRU", 100, 8, 64), ("RNN", 100, 4, 32), ("LSTM", 10, 1, 32)]


def _loss(module: nn.Module) -> Callable[[dict, Tensor], Tensor]:
    def loss(params: dict, x: Tensor) -> Tensor:
        return functional_call(module, params, (x,))[0].square().sum()

    return loss


def _calls(module: nn.Module, x: Tensor) -> dict[str, Callable[[], object]]:
    """The transformed calls of `module` on x [T, B, H]: grad of the parameters, per-sample
    gradients (a sample: one batch column, [T, 1, H]), the Jacobian of the first sequence's
    last output w.r.t. that sequence (jacrev: H incoming gradients), and a forward-mode
    product of the output's Jacobian with a direction of the input (jvp)."""
    params = {k: v.detach() for k, v in module.named_parameters()}
    loss = _loss(module)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def one_sample(p: dict, x: Tensor) -> Tensor:
        return loss(p, x.unsqueeze(1))

    return {
        "grad": lambda: grad(loss)(params, x),
        "per-sample grad": lambda: vmap(grad(one_sample), in_dims=(None, 1))(params, x),
        "jacrev": lambda: jacrev(lambda a: functional_call(module, params, (a,))[0][-1])(x[:, :1]),
        "jvp": lambda: jvp(lambda a: module(a)[0], (x,), (direction,)),
    }


def _raises(call: Callable[[], object]) -> bool:
    try:
        call()
    except RuntimeError:
        return True
    return False


def run(rounds: int) -> list[dict]:
    """Every row, printed as it is measured."""
    print("\ntorch.func (float32; median ms; speedup = torch.nn / rnn_fused)")
    print(f"{'layer':24} {'transform':16}{'torch.nn':>12}{'rnn_fused':>12}{'speedup':>9}")
    rows = []
    for layer, T, B, H in CASES:
        torch.manual_seed(0)
        theirs = getattr(nn, layer)(H, H)
        ours = getattr(rnn_fused, layer).from_torch(theirs)
        x = torch.randn(T, B, H)
        name = f"{layer} T={T} B={B} I=H={H}"
        for kind, (base, fused) in _paired(_calls(theirs, x), _calls(ours, x)).items():
            sides = (
                {"rnn_fused": fused} if _raises(base) else {"torch.nn": base, "rnn_fused": fused}
            )
            ms = {k: v / 1e3 for k, v in per_call_us(sides, 1, rounds).items()}
            base_ms = ms.get("torch.nn", float("nan"))
            row = {
                "layer": name,
                "transform": kind,
                "torch.nn": base_ms,
                "rnn_fused": ms["rnn_fused"],
            }
            row["speedup"] = base_ms / ms["rnn_fused"]
            shown = f"{base_ms:12.2f}" if "torch.nn" in sides else f"{'raises':>12}"
            print(
                f"{name:24} {kind:16}{shown}{ms['rnn_fused']:12.2f}{row['speedup']:9.2f}",
                flush=True,
            )
            rows.append(row)
    return rows


def _paired(base: dict, ours: dict) -> dict[str, tuple]:
    return {k: (base[k], ours[k]) for k in base}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    run(parser.parse_args().rounds)

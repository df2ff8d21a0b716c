"""Quick start: train an MLP on MNIST-1D, compress it with `compress_`, fine-tune, report.

    python -m lmd_lightning.cli.quickstart [--energy 0.9] [--epochs 30] [--finetune-epochs 10]

Plain PyTorch on purpose: `compress_` needs no Lightning. The data is generated locally.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmd_lightning import EnergyRank, compress_
from lmd_lightning.data import Split, load_mnist1d


def mlp(width: int = 512) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(40, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def train(model: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y), generator=gen).split(100):
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    return float((model(data.x).argmax(-1) == data.y).float().mean()) * 100


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--energy", type=float, default=0.7, help="EnergyRank: share of ‖W‖² each layer keeps")
    parser.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=10, help="epochs after compression")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    splits = load_mnist1d()
    mean, std = splits["train"].x.mean(0), splits["train"].x.std(0)
    splits = {name: Split((s.x - mean) / std, s.y) for name, s in splits.items()}
    model = mlp()
    train(model, splits["train"], args.epochs, 1e-3, args.seed)
    dense_params = sum(p.numel() for p in model.parameters())
    results = {"dense": (accuracy(model, splits["val"]), accuracy(model, splits["test"]))}

    # Leave the 10-way head dense: it is tiny and every class needs its own direction.
    report = compress_(model, EnergyRank(args.energy), exclude="6")
    results["one-shot"] = (accuracy(model, splits["val"]), accuracy(model, splits["test"]))
    train(model, splits["train"], args.finetune_epochs, 3e-4, args.seed + 1)
    results["fine-tuned"] = (accuracy(model, splits["val"]), accuracy(model, splits["test"]))

    print(report)
    print()
    print(f"{'model':<12}{'params':>10}{'val acc':>10}{'test acc':>10}")
    for name, (val, test) in results.items():
        params = dense_params if name == "dense" else report.model_params_after
        print(f"{name:<12}{params:>10,}{val:>9.1f}%{test:>9.1f}%")
    print(f"\n{dense_params / report.model_params_after:.2f}× fewer parameters; {time.perf_counter() - start:.0f} s")
    return {f"{name}_{split}": acc for name, pair in results.items() for split, acc in zip(("val", "test"), pair)}


if __name__ == "__main__":
    main()

"""One-shot allocation at equal parameters: the callback's default (loss metric) against uniform rank.

Each MNIST-1D recipe model trains dense for `--epochs` epochs per seed; the trained model is then
truncated once, with no fine-tuning, to a share of its targeted layers' parameters (the head
stays dense, as in the recipes), and validation accuracy is measured. The test split is not used.

Contenders at each budget:
- `GlobalBudget`, loss metric: what `LMDCompression` does by default (`metric="loss"`): the
  loss's K-FAC metric on the first 8 training batches (the model's own cross-entropy);
- `GlobalBudget`, data metric and weight metric: the same budget under `metric="data"` and
  plain Eckart–Young (`metric="weight"`, the callback's default before the loss metric);
- uniform rank: one rank for every targeted layer, the smallest whose parameter count is at least
  the loss-metric allocation's, so uniform rank never has fewer parameters than what it is
  compared with.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
from fnmatch import fnmatch
from itertools import islice

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from benchmarks.common import command, device_args, markdown_table, write_result
from benchmarks.mnist1d import build, mean_std, trainer
from lmd_lightning import DataMetric, FixedRank, GlobalBudget, LossMetric, compress_

BUDGETS = (0.5, 0.25, 0.125)
MODELS = ("mlp", "cnn", "transformer")
CONTENDERS = (
    "GlobalBudget, loss metric (default)",
    "GlobalBudget, data metric",
    "GlobalBudget, weight",
    "uniform rank",
)


def cross_entropy(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def val_acc(net: pl.LightningModule, data: pl.LightningDataModule) -> float:
    return 100 * trainer(1, []).validate(net, datamodule=data, verbose=False)[0]["val_acc"]


def targeted(net: torch.nn.Module) -> int:
    """Parameters of every layer but the head (`*head`, what the recipes exclude): what the budget is a share of."""
    return sum(p.numel() for name, p in net.named_parameters() if not fnmatch(name.rpartition(".")[0], "*head"))


def allocate(dense: pl.LightningModule, contender: str, budget: float, calibration: list) -> torch.nn.Module:
    net = copy.deepcopy(dense)
    metric, batches = {
        CONTENDERS[0]: (LossMetric(loss=cross_entropy), calibration),
        CONTENDERS[1]: (DataMetric(), calibration),
        CONTENDERS[2]: ("weight", None),
    }[contender]
    compress_(net, GlobalBudget(params=budget), exclude="*head", metric=metric, calibration=batches)
    return net


def uniform(dense: pl.LightningModule, at_least: int) -> torch.nn.Module:
    """The smallest uniform rank whose targeted parameters are at least `at_least`."""
    full = max(min(m.weight.shape[0], m.weight[0].numel()) for m in dense.modules() if hasattr(m, "weight"))
    lo, hi = 1, full
    while lo < hi:
        mid = (lo + hi) // 2
        net = copy.deepcopy(dense)
        compress_(net, FixedRank(mid), exclude="*head")
        lo, hi = (mid + 1, hi) if targeted(net) < at_least else (lo, mid)
    net = copy.deepcopy(dense)
    compress_(net, FixedRank(lo), exclude="*head")
    return net


def run(model: str, seed: int, epochs: int, quick: bool) -> dict[tuple[str, float], tuple[float, int]]:
    pl.seed_everything(seed, verbose=False)
    net, data = build(model, quick)
    trainer(epochs, [], validate_at_end_only=True).fit(net, datamodule=data)
    calibration = list(islice(iter(data.train_dataloader()), 8))
    rows = {("dense", 1.0): (val_acc(net, data), targeted(net))}
    for budget in BUDGETS:
        loss = allocate(net, CONTENDERS[0], budget, calibration)
        rows[(CONTENDERS[0], budget)] = (val_acc(loss, data), targeted(loss))
        for contender in CONTENDERS[1:3]:
            other = allocate(net, contender, budget, calibration)
            rows[(contender, budget)] = (val_acc(other, data), targeted(other))
        same = uniform(net, targeted(loss))
        rows[(CONTENDERS[3], budget)] = (val_acc(same, data), targeted(same))
    return rows


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    extra.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    extra.add_argument("--epochs", type=int, default=20, help="dense epochs before the one-shot cut")
    known, rest = extra.parse_known_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    args = device_args(__doc__.splitlines()[0], "MLP only, 2 epochs on 1,000 samples, 1 seed", rest)
    models, seeds, epochs = (["mlp"], [0], 2) if args.quick else (known.models, known.seeds, known.epochs)
    sections = []
    for model in models:
        runs = [run(model, seed, epochs, args.quick) for seed in seeds]
        table_rows, wins = [], []
        for key in runs[0]:
            accs = [r[key][0] for r in runs]
            params = statistics.mean(r[key][1] for r in runs)
            table_rows.append([key[0], f"{key[1]:g}", f"{params:,.0f}", mean_std(accs)])
        for budget in BUDGETS:
            gaps = [r[(CONTENDERS[0], budget)][0] - r[(CONTENDERS[3], budget)][0] for r in runs]
            wins.append(f"{budget:g}: {', '.join(f'{g:+.1f}' for g in gaps)}")
        sections.append(
            f"## {model}: dense {epochs} epochs, seeds {', '.join(map(str, seeds))}\n\n"
            + markdown_table(["allocation", "budget", "targeted params", "val acc %"], table_rows, "lrrr")
            + "\n\nLoss metric minus uniform rank, validation points per seed, by budget: "
            + "; ".join(wins)
            + "."
        )
    body = __doc__.split("\n\n", 1)[1] + "\n" + "\n\n".join(sections)
    name = "allocation_quick" if args.quick else "allocation"
    path = write_result(
        name, "One-shot allocation at equal parameters (MNIST-1D, validation)", body, command("bench_allocation", argv)
    )
    print(path.read_text())


if __name__ == "__main__":
    main()

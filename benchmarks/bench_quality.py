"""Compression quality against the field's baselines: accuracy vs parameters and vs CPU latency.

    python -m benchmarks.bench_quality [--quick] [--models mlp cnn transformer] [--seeds 0 1 2] [--epochs 40 40 40]

Every contender trains the recipe's MNIST-1D model and optimizer (configs/model/*.yaml) for the same
number of epochs from the same seed, in this one process: for each seed, every contender in the
order of the table. Contenders, all truncating the same layers (every Linear and
Conv2d but the head):

- dense: no compression;
- one-shot SVD after training: the dense model at the end, `compress_` to the GlobalBudget below,
  no fine-tuning, in the weights' metric (Eckart–Young) and in the data's (`metric="data"`); its
  train time is the dense run's plus the truncation;
- Pufferfish-style: `trigger="epoch"` at 80/300 of the epochs (Pufferfish's CIFAR-10 warm-up),
  `RankRatio(0.25)` on the same layers (Pufferfish itself keeps its first layers full-rank);
- Cuttlefish-style: `trigger="stable_rank"` with the scaled stable rank `StableRank()`;
- lmd_lightning: the ‖∇L‖ trigger (defaults; quality.md was measured when the default criterion
  was "step", and a re-run now uses "epoch") with the recipes' EnergyRank(0.7), ErrorBound(0.3)
  and GlobalBudget (MLP 0.2, CNN 0.5, transformer 0.5: chosen on validation in recipes_mnist1d.md),
  and GlobalBudget with `metric="data"`;
- Lightning's `ModelPruning` (global L1 unstructured magnitude pruning of the same weights, no
  lottery-ticket reset) at the epoch the ‖∇L‖ + GlobalBudget run compressed with the same seed,
  pruning as many weights as that run removed parameters, then fine-tuned like it (its parameter
  column counts non-zeros);
- small dense: the same architecture narrowed (MLP widths, CNN channels, transformer dim) to the
  width whose parameter count is nearest that run's, trained from scratch.

Every seed's numbers are in quality.json. Validation (400 samples) runs once, at the end; test
(1,000) is reported once, for every contender (no hyper-parameter is chosen here). Latency: the
final model's forward pass on a batch of 256 in eval mode under `torch.inference_mode`, the
median of 5 alternating passes over all of a seed's contenders, each the median of 20 runs.
Pruned models are timed as they are, dense tensors with zeros: unstructured sparsity gives no
speed-up without sparse kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from collections.abc import Callable
from itertools import islice

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning

from benchmarks import mnist1d
from benchmarks.common import RESULTS, command, device_args, markdown_table, time_it, write_result
from benchmarks.mnist1d import build, mean_std
from lmd_lightning import EnergyRank, ErrorBound, GlobalBudget, LMDCompression, RankRatio, StableRank, compress_
from lmd_lightning.truncate.targets import find_targets

BUDGET = {"mlp": 0.2, "cnn": 0.5, "transformer": 0.5}
EPOCHS = {"mlp": 40, "cnn": 40, "transformer": 40}  # the recipes' max_epochs
LATENCY_BATCH = 256
BUDGET_RUN = "‖∇L‖ + GlobalBudget"
TRAINED = {  # contender → its LMDCompression (None: dense); `epochs` is the run's length
    "dense": lambda model, epochs: None,
    "Pufferfish (epoch, RankRatio 1/4)": lambda model, epochs: LMDCompression(
        RankRatio(0.25), trigger="epoch", min_epochs=max(1, round(epochs * 80 / 300)), exclude="*head", metric="weight"
    ),
    "Cuttlefish (stable rank)": lambda model, epochs: LMDCompression(
        StableRank(), trigger="stable_rank", exclude="*head", metric="weight"
    ),
    "‖∇L‖ + EnergyRank(0.7)": lambda model, epochs: LMDCompression(EnergyRank(0.7), exclude="*head", metric="weight"),
    "‖∇L‖ + ErrorBound(0.3)": lambda model, epochs: LMDCompression(ErrorBound(0.3), exclude="*head", metric="weight"),
    BUDGET_RUN: lambda model, epochs: LMDCompression(
        GlobalBudget(params=BUDGET[model]), exclude="*head", metric="weight"
    ),
    "‖∇L‖ + GlobalBudget, data metric": lambda model, epochs: LMDCompression(
        GlobalBudget(params=BUDGET[model]), exclude="*head", metric="data"
    ),
}


def trainer(epochs: int, callbacks: list) -> pl.Trainer:
    return mnist1d.trainer(epochs, callbacks, validate_at_end_only=True)


def nonzero_params(net: torch.nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in net.parameters())


def evaluate(net: pl.LightningModule, data: pl.LightningDataModule) -> tuple[float, float]:
    check = trainer(1, [])
    val = check.validate(net, datamodule=data, verbose=False)[0]["val_acc"]
    test = check.test(net, datamodule=data, verbose=False)[0]["test_acc"]
    return val * 100, test * 100


def outcome(net: pl.LightningModule, data: pl.LightningDataModule, seconds: float) -> dict:
    val, test = evaluate(net, data)
    return {"net": net, "params": nonzero_params(net), "val": val, "test": test, "seconds": seconds}


def fit(
    model: str,
    seed: int,
    epochs: int,
    quick: bool,
    callbacks: Callable[[pl.LightningModule], list],
    width: int | None = None,
) -> dict:
    """Train from `seed` with `callbacks(net)`; the outcome, train time included."""
    pl.seed_everything(seed, verbose=False)
    net, data = build(model, quick, width)
    start = time.perf_counter()
    trainer(epochs, callbacks(net)).fit(net, datamodule=data)
    return outcome(net, data, time.perf_counter() - start)


def one_shot(model: str, dense: dict, quick: bool, metric: str) -> dict:
    """The trained dense model truncated to the budget at once, no fine-tuning; its time includes the dense run's."""
    net, data = copy.deepcopy(dense["net"]), build(model, quick)[1]
    data.setup("fit")
    start = time.perf_counter()
    calibration = list(islice(iter(data.train_dataloader()), 8)) if metric == "data" else None
    compress_(net, GlobalBudget(params=BUDGET[model]), exclude="*head", metric=metric, calibration=calibration)
    return outcome(net, data, dense["seconds"] + time.perf_counter() - start)


def pruned(model: str, seed: int, epochs: int, quick: bool, reference: dict) -> dict:
    """ModelPruning of as many weights as the reference run removed parameters, at the epoch it compressed."""
    at = reference["compressed_epoch"] - 1  # pruning runs at an epoch's end, LMD at the next epoch's start

    def pruning(net: pl.LightningModule) -> list:
        weights = [(t.module, "weight") for t in find_targets(net, None, "*head", None) if t.skip_reason is None]
        prunable = sum(module.weight.numel() for module, _ in weights)
        removed = sum(p.numel() for p in net.parameters()) - reference["params"]
        if not 0 < removed < prunable:
            raise ValueError(f"cannot prune {removed:,} of the {prunable:,} prunable weights to match the reference")
        return [
            ModelPruning(
                "l1_unstructured",
                parameters_to_prune=weights,
                amount=removed / prunable,
                apply_pruning=lambda epoch: epoch == at,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        ]

    return {**fit(model, seed, epochs, quick, pruning), "compressed_epoch": reference["compressed_epoch"]}


def narrowed_width(model: str, target: int) -> int:
    """The width whose model has the parameter count nearest `target` (the count grows with the width)."""
    step = 4 if model == "transformer" else 1  # the transformer's dim must divide by its 4 heads

    def count(units: int) -> int:
        return sum(p.numel() for p in build(model, True, units * step)[0].parameters())

    lo, hi = 1, 4096 // step
    while lo < hi:  # the smallest width with at least `target` parameters
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    best = min((lo - 1, lo) if lo > 1 else (lo,), key=lambda units: abs(count(units) - target))
    return best * step


def latencies(nets: dict[str, torch.nn.Module], model: str, features: int = 40) -> dict[str, float]:
    """Median ms per forward of a batch of LATENCY_BATCH inputs of `features` values, alternating over contenders."""
    x = torch.randn(LATENCY_BATCH, features)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for net in nets.values():
        net.eval()
    with torch.inference_mode():
        for _ in range(5):
            for name, net in nets.items():
                times[name].append(time_it(lambda: net(x), repeats=20, warmup=2) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def run_seed(model: str, seed: int, epochs: int, quick: bool) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    for name, make in TRAINED.items():
        lmd = make(model, epochs)
        runs[name] = fit(model, seed, epochs, quick, lambda net: [] if lmd is None else [lmd])
        runs[name]["compressed_epoch"] = None if lmd is None else lmd.compressed_epoch
        print(model, seed, name, {k: v for k, v in runs[name].items() if k != "net"}, flush=True)
    runs["one-shot SVD after training (weight)"] = one_shot(model, runs["dense"], quick, "weight")
    runs["one-shot SVD after training (data)"] = one_shot(model, runs["dense"], quick, "data")
    reference = runs[BUDGET_RUN]
    runs["ModelPruning (L1, equal params)"] = pruned(model, seed, epochs, quick, reference)
    width = narrowed_width(model, reference["params"])
    runs["small dense (equal params)"] = fit(model, seed, epochs, quick, lambda net: [], width)
    runs["small dense (equal params)"]["width"] = width
    for name, ms in latencies({name: run["net"] for name, run in runs.items()}, model).items():
        runs[name]["latency"] = ms
    return runs


ORDER = (
    "dense",
    "one-shot SVD after training (weight)",
    "one-shot SVD after training (data)",
    "Pufferfish (epoch, RankRatio 1/4)",
    "Cuttlefish (stable rank)",
    "‖∇L‖ + EnergyRank(0.7)",
    "‖∇L‖ + ErrorBound(0.3)",
    BUDGET_RUN,
    "‖∇L‖ + GlobalBudget, data metric",
    "ModelPruning (L1, equal params)",
    "small dense (equal params)",
)


def table(results: dict[str, list[dict]]) -> str:
    dense_params = statistics.mean(r["params"] for r in results["dense"])
    rows = []
    for name in ORDER:
        runs = results[name]
        params = statistics.mean(r["params"] for r in runs)
        epochs = [r.get("compressed_epoch") for r in runs]
        at = "–" if None in epochs else ", ".join(map(str, epochs))
        column = {key: [r[key] for r in runs] for key in ("latency", "val", "test", "seconds")}
        rows.append(
            [
                name,
                f"{int(params):,}",
                f"{dense_params / params:.2f}×",
                mean_std(column["latency"]),
                at,
                mean_std(column["val"]),
                mean_std(column["test"]),
                f"{statistics.mean(column['seconds']):.0f}",
            ]
        )
    header = [
        "contender",
        "params (non-zero)",
        "smaller",
        f"latency ms (batch {LATENCY_BATCH})",
        "switch epoch",
        "val acc %",
        "test acc %",
        "train s",
    ]
    return markdown_table(header, rows, "lrrrrrrr")


def pareto_plot(results: dict[str, list[dict]], model: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = "osD^v<>pPX*h"
    for index, name in enumerate(ORDER):
        runs = results[name]
        test = [r["test"] for r in runs]
        y, yerr = statistics.mean(test), (statistics.stdev(test) if len(test) > 1 else 0.0)
        for ax, key in zip(axes, ("params", "latency")):
            x = statistics.mean(r[key] for r in runs)
            color = f"C{index}" if index < 10 else "black"  # matplotlib's cycle has 10 colours
            ax.errorbar(
                x,
                y,
                yerr=yerr,
                fmt=markers[index % len(markers)],
                color=color,
                capsize=3,
                label=name if key == "params" else None,
            )
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters (non-zero)")
    axes[1].set_xlabel(f"CPU latency, batch {LATENCY_BATCH} (ms)")
    axes[0].set_ylabel("test accuracy (%), mean ± std over seeds")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"MNIST-1D {model}: accuracy vs size and vs speed (up and left is better)")
    fig.legend(loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--models", nargs="+", choices=tuple(BUDGET), default=list(BUDGET))
    extra.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    extra.add_argument(
        "--epochs", type=int, nargs="+", default=None, help="one per model (default: 40 each, as the recipes)"
    )
    extra.add_argument("--out", default="quality", help="result file name: benchmarks/results/<out>.md")
    known, rest = extra.parse_known_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # one line per run is printed below
    args = device_args(__doc__.splitlines()[0], "MLP only, 3 epochs on 1,000 samples, 1 seed", rest)
    models, seeds = (["mlp"], [0]) if args.quick else (known.models, known.seeds)
    if known.epochs and len(known.epochs) != len(models):
        extra.error(f"--epochs takes one value per model: {len(models)} models {models}, got {known.epochs}")
    epochs = dict(zip(models, known.epochs)) if known.epochs else {m: 3 if args.quick else EPOCHS[m] for m in models}
    name = "quality_quick" if args.quick else known.out
    figures = RESULTS / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    sections, raw = [], {}
    for model in models:
        results: dict[str, list[dict]] = {}
        for seed in seeds:
            for contender, run in run_seed(model, seed, epochs[model], args.quick).items():
                results.setdefault(contender, []).append({k: v for k, v in run.items() if k != "net"})
        raw[model] = results
        (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=1))  # every seed's numbers, for re-plotting
        figure = figures / f"{name}_{model}.png"
        pareto_plot(results, model, figure)
        sections.append(
            f"## {model}: {epochs[model]} epochs, seeds {', '.join(map(str, seeds))}\n\n{table(results)}\n\n"
            f"![{model}](figures/{figure.name})"
        )
        body = __doc__.split("\n\n", 2)[2] + "\n" + "\n\n".join(sections)
        title = "Compression quality against the baselines (MNIST-1D)"
        path = write_result(name, title, body, command("bench_quality", argv))
    print(path.read_text())


if __name__ == "__main__":
    main()

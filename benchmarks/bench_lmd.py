"""LMD proper, measured: data-metric truncation and metric-map regularizers at equal parameter budgets.

    python -m benchmarks.bench_lmd [--quick] [--models mlp cnn transformer] [--seeds 0 1 2]

For each MNIST-1D reference model (the recipes' model and optimizer configs) and seed, the dense
model is trained once for `--dense-epochs`; every variant then starts from that same dense state
(a paired comparison), is compressed at once by `LMDCompression(GlobalBudget(params=…),
trigger="epoch", min_epochs=0)` and fine-tuned for `--finetune-epochs`. The budget is the same
for every variant of a model, so they end at (nearly) the same parameter count.

Reported: validation accuracy dense, right after truncation (one-shot, all 400 validation
samples) and after fine-tuning; test accuracy after fine-tuning. Hyper-parameters (λ of each
regularizer) are chosen by the best mean validation accuracy over seeds; test accuracy is shown
for every variant without a hyper-parameter and for the chosen λ only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import pytorch_lightning as pl

from benchmarks.common import command, device_args, markdown_table, write_result
from benchmarks.mnist1d import build, mean_std, trainer
from lmd_lightning import DataMetric, GlobalBudget, Guard, LMDCompression, Regularizer

# Shares of the targeted layers' parameters kept: the recipe's setting, then a harsher one where
# one-shot truncation loses accuracy. The regularizers run at the last budget of each list.
BUDGETS = {"mlp": (0.2, 0.05), "cnn": (0.5, 0.25), "transformer": (0.5,)}

TRUNCATION = {  # variant → LMDCompression keyword arguments
    "weight (Eckart–Young)": {"metric": "weight"},
    "data, independent": {"metric": DataMetric(sequential=False)},
    "data, sequential": {"metric": DataMetric()},
}
REGULARIZERS = {
    "metric maps, no regularizer": {"metric": "weight", "metric_maps": True},
    "maps + identity λ=0.01": {"metric": "weight", "metric_maps": True, "regularizer": Regularizer("identity", 0.01)},
    "maps + identity λ=1": {"metric": "weight", "metric_maps": True, "regularizer": Regularizer("identity", 1.0)},
    "maps + laplacian λ=0.1": {"metric": "weight", "metric_maps": True, "regularizer": Regularizer("laplacian", 0.1)},
    "maps + laplacian λ=1": {"metric": "weight", "metric_maps": True, "regularizer": Regularizer("laplacian", 1.0)},
}


def run_variant(
    model: str, budget: float, dense_state: dict, kwargs: dict, epochs: int, seed: int, quick: bool
) -> dict:
    pl.seed_everything(seed, verbose=False)
    net, data = build(model, quick)
    net.load_state_dict(dense_state)
    lmd = LMDCompression(
        GlobalBudget(params=budget),
        trigger="epoch",
        min_epochs=0,
        exclude="*head",
        monitor="val_acc",
        guard=Guard(batches=1000, sweep_points=0),
        **kwargs,
    )
    start = time.perf_counter()
    fit = trainer(epochs, [lmd])
    fit.fit(net, datamodule=data)
    seconds = time.perf_counter() - start
    val = float(fit.callback_metrics["val_acc"])
    test = fit.test(net, datamodule=data, verbose=False)[0]["test_acc"]
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "dense": lmd.guard_record.before * 100,
        "one_shot": lmd.guard_record.after * 100,
        "val": val * 100,
        "test": test * 100,
        "seconds": seconds,
    }


def dense_state(model: str, epochs: int, seed: int, quick: bool) -> tuple[dict, int]:
    pl.seed_everything(seed, verbose=False)
    net, data = build(model, quick)
    trainer(epochs, []).fit(net, datamodule=data)
    return copy.deepcopy(net.state_dict()), sum(p.numel() for p in net.parameters())


def table(results: dict[str, list[dict]], dense_params: int) -> str:
    """One row per variant; test accuracy only where no λ was chosen, or for the chosen λ."""
    chosen = set()
    for kind in ("identity", "laplacian"):
        candidates = [name for name in results if kind in name]
        if candidates:
            chosen.add(max(candidates, key=lambda name: statistics.mean(r["val"] for r in results[name])))
    rows = []
    for name, runs in results.items():
        col = {key: [r[key] for r in runs] for key in runs[0]}
        tuned = "λ=" in name
        test = mean_std(col["test"]) if not tuned or name in chosen else "(not chosen)"
        rows.append(
            [
                name + (" ✓" if name in chosen else ""),
                f"{int(statistics.mean(col['params'])):,}",
                mean_std(col["dense"]),
                mean_std(col["one_shot"]),
                mean_std(col["val"]),
                test,
                f"{statistics.mean(col['seconds']):.0f}",
            ]
        )
    header = [
        "variant",
        f"params (dense {dense_params:,})",
        "val dense",
        "val one-shot",
        "val fine-tuned",
        "test fine-tuned",
        "fine-tune s",
    ]
    return markdown_table(header, rows, "lrrrrrr")


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--models", nargs="+", choices=tuple(BUDGETS), default=list(BUDGETS))
    extra.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    extra.add_argument("--dense-epochs", type=int, default=20)
    extra.add_argument("--finetune-epochs", type=int, default=20)
    extra.add_argument("--out", default="lmd", help="result file name: benchmarks/results/<out>.md")
    extra.add_argument(
        "--truncation-only",
        nargs="*",
        default=["transformer"],
        help="models that run the truncation variants only (the transformer: ~5 s per epoch here)",
    )
    known, rest = extra.parse_known_args(argv)
    args = device_args(__doc__.splitlines()[0], "MLP only, 2 + 2 epochs on 1,000 samples, 1 seed, 4 variants", rest)
    if args.quick:
        models, seeds, dense_epochs, finetune_epochs = ["mlp"], [0], 2, 2
        variants = {**TRUNCATION, "maps + laplacian λ=1": REGULARIZERS["maps + laplacian λ=1"]}
    else:
        models, seeds, dense_epochs, finetune_epochs = (
            known.models,
            known.seeds,
            known.dense_epochs,
            known.finetune_epochs,
        )
        variants = {**TRUNCATION, **REGULARIZERS}
    sections = []
    for model in models:
        budgets = BUDGETS[model][:1] if args.quick else BUDGETS[model]
        plan = {  # budget → its variants
            budget: TRUNCATION
            if (model in known.truncation_only and not args.quick) or budget != budgets[-1]
            else variants
            for budget in budgets
        }
        results = {budget: {name: [] for name in chosen} for budget, chosen in plan.items()}
        for seed in seeds:
            state, dense_params = dense_state(model, dense_epochs, seed, args.quick)
            for budget, chosen in plan.items():
                for name, kwargs in chosen.items():
                    outcome = run_variant(model, budget, state, kwargs, finetune_epochs, seed, args.quick)
                    results[budget][name].append(outcome)
                    print(model, budget, seed, name, outcome, flush=True)
        for budget in budgets:
            sections.append(
                f"## {model}: GlobalBudget(params={budget}), {dense_epochs} dense + {finetune_epochs} fine-tune "
                f"epochs, seeds {', '.join(map(str, seeds))}\n\n" + table(results[budget], dense_params)
            )
        body = __doc__.split("\n\n", 2)[2] + "\n" + "\n\n".join(sections)  # rewritten after each model
        name = "lmd_quick" if args.quick else known.out
        path = write_result(
            name, "LMD proper: data-metric truncation and metric-map regularizers", body, command("bench_lmd", argv)
        )
    print(path.read_text())


if __name__ == "__main__":
    main()

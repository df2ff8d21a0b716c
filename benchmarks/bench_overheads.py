"""Overheads of compressing: truncation per model (exact vs randomized SVD) and the rank–accuracy sweep.

    python -m benchmarks.bench_overheads [--quick] [--repeats 3]

Truncation: `compress_` of every Linear/Conv2d but the head, each timed from a fresh copy of the
model (median of `--repeats`), under `method="exact"` and `method="randomized"`, for two policies:
RankRatio(0.25), which needs no spectrum (the whole cost is the truncation kernel), and
EnergyRank(0.7), which needs every layer's exact spectrum first (`svdvals`), so only the factors
can be randomized. Models: the MNIST-1D recipes' MLP, CNN and transformer, the 4×2048 MLP of
training_cost.md and a CIFAR-10 ResNet-18 (width 64), freshly initialized (the cost of an SVD does
not depend on training; the error does, and is reported for these random weights only).

Stable-rank trigger: what `trigger="stable_rank"` costs on the same models, `StableRankMonitor.start`
(once per fit, 100 power iterations per layer) and one `update` (once per epoch, 10 warm-started
iterations per layer), median of 5.

Sweep: the callback's rank–accuracy sweep (`sweep_points` settings of EnergyRank's knob, each
compress_ + evaluate + undo) and the accuracy guard's bisection (`search_steps=5`) on the MNIST-1D
MLP trained for 5 epochs (1 in --quick), evaluating on its 400 validation samples, as
`LMDCompression(monitor="val_acc")` does.

The other overheads live in their own files: ‖∇L‖ monitoring per step and the optimizer rebuild in
callback_overhead.md (bench_callback), one large matrix exact vs randomized in svd_speed.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from benchmarks.common import command, device_args, markdown_table, time_it, write_result
from lmd_lightning import EnergyRank, RankRatio, StableRankMonitor, compress_
from lmd_lightning.callback.guard import measure_and_guard
from lmd_lightning.models import CNN1DClassifier, MLPClassifier, ResNetClassifier, TransformerClassifier
from lmd_lightning.truncate.calibration import layer_weight
from lmd_lightning.truncate.targets import find_targets, undo, undo_record

MODELS = {  # name → constructor, at the sizes the recipes and benchmarks use
    "MNIST-1D MLP (3×512)": lambda: MLPClassifier(widths=(512, 512, 512)),
    "MNIST-1D CNN": lambda: CNN1DClassifier(),
    "MNIST-1D transformer": lambda: TransformerClassifier(),
    "MLP 4×2048": lambda: MLPClassifier(widths=(2048,) * 4),
    "ResNet-18 (CIFAR, width 64)": lambda: ResNetClassifier(),
}
QUICK_MODELS = ("MNIST-1D MLP (3×512)", "MNIST-1D CNN")
POLICIES = {"RankRatio(0.25)": RankRatio(0.25), "EnergyRank(0.7)": EnergyRank(0.7)}


def time_compress(base: nn.Module, policy, method: str, repeats: int) -> tuple[float, float, int]:
    """Median seconds of compress_ on fresh copies; the mean relative error and layers truncated of the last."""
    times = []
    for _ in range(repeats):
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = compress_(model, policy, exclude="*head", method=method)
        times.append(time.perf_counter() - start)
    truncated = [layer for layer in report.layers if layer.rank is not None]
    error = statistics.mean(layer.relative_error for layer in truncated) if truncated else 0.0
    return statistics.median(times), error, len(truncated)


def truncation_rows(models: list[str], repeats: int) -> list[list[str]]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = MODELS[name]()
        params = sum(p.numel() for p in base.parameters())
        for policy_name, policy in POLICIES.items():
            exact, err_exact, layers = time_compress(base, policy, "exact", repeats)
            rand, err_rand, _ = time_compress(base, policy, "randomized", repeats)
            rows.append(
                [
                    name,
                    f"{params / 1e6:.2f}M",
                    policy_name,
                    str(layers),
                    f"{exact * 1e3:.0f}",
                    f"{rand * 1e3:.0f}",
                    f"{exact / rand:.2f}×",
                    f"{err_exact:.3f} / {err_rand:.3f}",
                ]
            )
            print(rows[-1], flush=True)
    return rows


def stable_rank_rows(models: list[str]) -> list[list[str]]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = MODELS[name]()
        targets = [t for t in find_targets(base, None, "*head", None) if t.skip_reason is None]
        weights = {t.name: layer_weight(t.module) for t in targets}
        started = StableRankMonitor(patience=10**9)  # never converges, so every update measures
        start = time_it(lambda: StableRankMonitor().start(weights), repeats=5, warmup=1)
        started.start(weights)
        update = time_it(lambda: started.update(weights, 0), repeats=5, warmup=1)
        rows.append([name, str(len(weights)), f"{start * 1e3:.1f}", f"{update * 1e3:.1f}"])
        print(rows[-1], flush=True)
    return rows


def sweep_rows(quick: bool) -> list[list[str]]:
    from benchmarks.mnist1d import build, trainer

    net, data = build("mlp", quick)
    trainer(1 if quick else 5, []).fit(net, datamodule=data)
    batches = list(data.val_dataloader())
    net.eval()

    def evaluate() -> float:
        with torch.no_grad():
            right = sum(int((net(x).argmax(-1) == y).sum()) for x, y in batches)
        return right / sum(len(y) for _, y in batches)

    record = undo_record(net)
    apply = lambda policy: compress_(net, policy, exclude="*head")  # noqa: E731
    rows = []
    start = time.perf_counter()
    evaluate()
    one_eval = time.perf_counter() - start
    for label, points, drop in (("sweep, 8 points", 8, None), ("sweep 8 + guard search (5 steps)", 8, 0.01)):
        start = time.perf_counter()
        outcome = measure_and_guard(EnergyRank(0.7), evaluate, apply, lambda: undo(net, record), drop, "max", 5, points)
        seconds = time.perf_counter() - start
        undo(net, record)
        trials = len(outcome.sweep) + (len(outcome.record.trials) if drop is not None else 0)
        rows.append([label, str(trials), f"{seconds:.2f}", f"{seconds / trials * 1e3:.0f}", f"{one_eval * 1e3:.1f}"])
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--repeats", type=int, default=3)
    known, rest = extra.parse_known_args(argv)
    args = device_args(__doc__.splitlines()[0], "MNIST-1D MLP and CNN only, one repeat", rest)
    models = list(QUICK_MODELS) if args.quick else list(MODELS)
    repeats = 1 if args.quick else known.repeats
    truncation = markdown_table(
        [
            "model",
            "params",
            "policy",
            "layers truncated",
            "exact ms",
            "randomized ms",
            "speed-up",
            "mean rel. error exact / randomized",
        ],
        truncation_rows(models, repeats),
        "llrrrrrr",
    )
    monitor = markdown_table(
        ["model", "layers", "start ms (once)", "update ms (per epoch)"], stable_rank_rows(models), "lrrr"
    )
    sweep = markdown_table(
        ["on the MNIST-1D MLP", "compressions evaluated", "total s", "ms per point", "one evaluation ms"],
        sweep_rows(args.quick),
        "lrrrr",
    )
    body = (
        __doc__.split("\n\n", 2)[2] + f"\n## Truncation, median of {repeats}\n\n{truncation}\n\n"
        f"## The stable-rank trigger\n\n{monitor}\n\n"
        f"## Rank–accuracy sweep and accuracy guard\n\n{sweep}\n"
    )
    path = write_result(
        "overheads_quick" if args.quick else "overheads",
        "Overheads: truncation and the sweep",
        body,
        command("bench_overheads", argv),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()

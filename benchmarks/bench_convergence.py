"""Does ConvergenceMonitor fire when training has converged? Its settings against val-accuracy plateaus.

    python -m benchmarks.bench_convergence [--quick] [--seeds 3] [--epochs 40]

MNIST-1D (features standardised with the train mean/std), the quick start's MLP (40→512→512→512→10),
batch 100 (36 steps per epoch). Two optimizers: Adam lr 1e-3 constant, and SGD lr 0.05 momentum 0.9
with a per-epoch cosine schedule over the run. After every backward the global gradient norm goes to
one ConvergenceMonitor per setting (all fed the same stream) before the optimizer step, as
LMDCompression does. The test split is never touched.

Reference: the first epoch at which the val accuracy, smoothed with a centred 3-epoch mean, comes
within 1 point of its maximum over the run. A monitor that fires during epoch e is compared with the
val accuracy at the end of epoch e (LMDCompression compresses at the start of the next epoch).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from lmd_lightning.convergence import ConvergenceMonitor, grad_norm
from lmd_lightning.data import Split, load_mnist1d
from lmd_lightning.quickstart import mlp

BATCH = 100
DEFAULTS = dict(beta=0.9, window=50, plateau_tol=0.05, patience=3, rel_tol=0.05, min_steps=100)
SETTINGS: list[tuple[str, dict]] = [
    ("defaults", {}),
    ("window=25", {"window": 25}),
    ("window=100", {"window": 100}),
    ("plateau_tol=0.02", {"plateau_tol": 0.02}),
    ("plateau_tol=0.1", {"plateau_tol": 0.1}),
    ("patience=2", {"patience": 2}),
    ("patience=5", {"patience": 5}),
    ("rel_tol=0.1", {"rel_tol": 0.1}),
    ("rel_tol=0.02", {"rel_tol": 0.02}),
]
OPTIMIZERS = ("adam", "sgd")


@dataclass
class Run:
    optimizer: str
    seed: int
    steps_per_epoch: int
    val_acc: list[float] = field(default_factory=list)  # end of each epoch (1-based epoch = index + 1)
    train_loss: list[float] = field(default_factory=list)  # mean over the epoch's batches
    ema: list[float] = field(default_factory=list)  # bias-corrected EMA (beta=0.9) at each epoch end
    norms: list[float] = field(default_factory=list)  # raw ‖∇L‖ of every step, in memory only
    fired: dict[str, tuple[int, str]] = field(default_factory=dict)  # setting → (global step, reason)

    def fire_epoch(self, setting: str) -> int | None:
        """1-based epoch during which the monitor fired, None if it never did."""
        if setting not in self.fired:
            return None
        return self.fired[setting][0] // self.steps_per_epoch + 1

    def smoothed(self) -> list[float]:
        """Centred 3-epoch mean of the val accuracy (2-epoch at the ends)."""
        acc = self.val_acc
        return [statistics.fmean(acc[max(0, i - 1) : i + 2]) for i in range(len(acc))]

    def reference_epoch(self, tol: float = 1.0) -> int:
        smooth = self.smoothed()
        best = max(smooth)
        return next(i for i, a in enumerate(smooth) if a >= best - tol) + 1


def criterion(reason: str) -> str:
    return "plateau" if reason.startswith("‖∇L‖ EMA changed") else "decay"


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Split) -> float:
    model.eval()
    acc = float((model(data.x).argmax(-1) == data.y).float().mean()) * 100
    model.train()
    return acc


def train_run(optimizer: str, seed: int, epochs: int, train: Split, val: Split) -> Run:
    torch.manual_seed(seed)
    model = mlp()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train.y) / BATCH)
    run = Run(optimizer, seed, steps_per_epoch)
    monitors = {name: ConvergenceMonitor(**{**DEFAULTS, **over}) for name, over in SETTINGS}
    # An observer that never fires, checked once per epoch: its EMA is the defaults' EMA at epoch ends.
    observer = ConvergenceMonitor(beta=DEFAULTS["beta"], window=steps_per_epoch, patience=10**9, rel_tol=0.0)
    params = list(model.parameters())
    step = 0
    model.train()
    for _ in range(epochs):
        losses = []
        for idx in torch.randperm(len(train.y), generator=gen).split(BATCH):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = grad_norm(p.grad for p in params)
            for name, monitor in monitors.items():
                if not monitor.converged and monitor.update(norm, step):
                    run.fired[name] = (monitor.converged_step, monitor.reason)
            observer.update(norm, step)
            run.norms.append(float(norm))
            losses.append(float(loss.detach()))
            opt.step()
            step += 1
        if sched is not None:
            sched.step()
        run.train_loss.append(statistics.fmean(losses))
        run.val_acc.append(accuracy(model, val))
        run.ema.append(observer.ema)
    return run


def mean_std(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def settings_table(runs: list[Run]) -> str:
    lines = [
        "| setting | fired | fire epoch | criterion | fire − reference (epochs) | val acc at fire − run max (pts) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name, _ in SETTINGS:
        fired = [r for r in runs if name in r.fired]
        epochs = [r.fire_epoch(name) for r in fired]
        lag = [r.fire_epoch(name) - r.reference_epoch() for r in fired]
        gap = [r.val_acc[r.fire_epoch(name) - 1] - max(r.val_acc) for r in fired]
        kinds = sorted({criterion(r.fired[name][1]) for r in fired})
        label = f"**{name}**" if name == "defaults" else name
        if not fired:
            lines.append(f"| {label} | 0/{len(runs)} | never | — | — | — |")
            continue
        lines.append(
            f"| {label} | {len(fired)}/{len(runs)} | {mean_std(epochs)} ({', '.join(map(str, epochs))}) "
            f"| {'/'.join(kinds)} | {mean_std(lag, '{:+.1f}')} | {mean_std(gap, '{:+.1f}')} |"
        )
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    lines = [
        "| run | max val acc | epoch of max | reference epoch | smoothed acc at reference | val acc, last epoch "
        "| ‖∇L‖ EMA: peak → last epoch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        best = max(r.val_acc)
        ref = r.reference_epoch()
        lines.append(
            f"| {r.optimizer} seed {r.seed} | {best:.2f} | {r.val_acc.index(best) + 1} | {ref} "
            f"| {r.smoothed()[ref - 1]:.2f} | {r.val_acc[-1]:.2f} | {max(r.ema):.3g} → {r.ema[-1]:.3g} |"
        )
    return "\n".join(lines)


def trace_table(runs: list[Run], every: int) -> str:
    """Per-epoch means over seeds: val accuracy, train loss, the EMA of ‖∇L‖ and the raw norm's spread."""
    epochs = len(runs[0].val_acc)
    spe = runs[0].steps_per_epoch
    lines = [
        "| epoch | val acc | train loss | ‖∇L‖ EMA (β=0.9) | raw ‖∇L‖ over the epoch: mean (min–max) |",
        "|---:|---:|---:|---:|---:|",
    ]
    shown = sorted({1, *range(every, epochs + 1, every), epochs})
    for e in shown:
        raw = [n for r in runs for n in r.norms[(e - 1) * spe : e * spe]]
        lines.append(
            f"| {e} | {statistics.fmean(r.val_acc[e - 1] for r in runs):.2f} "
            f"| {statistics.fmean(r.train_loss[e - 1] for r in runs):.3f} "
            f"| {statistics.fmean(r.ema[e - 1] for r in runs):.3g} "
            f"| {statistics.fmean(raw):.3g} ({min(raw):.3g}–{max(raw):.3g}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs: a seconds-long smoke run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    seeds, epochs = (1, 3) if args.quick else (args.seeds, args.epochs)
    torch.set_num_threads(args.threads)

    splits = load_mnist1d()
    mean, std = splits["train"].x.mean(0), splits["train"].x.std(0)
    train, val = (Split((splits[k].x - mean) / std, splits[k].y) for k in ("train", "val"))  # no test split

    start = time.perf_counter()
    runs: dict[str, list[Run]] = {opt: [] for opt in OPTIMIZERS}
    for opt in OPTIMIZERS:
        for seed in range(seeds):
            t = time.perf_counter()
            run = train_run(opt, seed, epochs, train, val)
            runs[opt].append(run)
            print(f"{opt} seed {seed}: max val acc {max(run.val_acc):.2f}, reference epoch {run.reference_epoch()}, "
                  f"defaults fire at epoch {run.fire_epoch('defaults')} ({time.perf_counter() - t:.0f} s)", flush=True)
    elapsed = time.perf_counter() - start

    spe = runs[OPTIMIZERS[0]][0].steps_per_epoch
    body = [
        f"{len(train.y)} train / {len(val.y)} val samples, batch {BATCH} ({spe} steps per epoch), {epochs} epochs, "
        f"seeds {', '.join(map(str, range(seeds)))}; {elapsed:.0f} s in all. Defaults: "
        + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())
        + "; each other row changes one of them. Fire epoch: the 1-based epoch during which the monitor "
        "fired (per seed in brackets); reference: first epoch whose 3-epoch-smoothed val accuracy is within "
        "1 point of the run's smoothed maximum. A negative fire − reference means the monitor fired while "
        "val accuracy was still climbing. Mean ± std over the seeds that fired.",
    ]
    titles = {"adam": "Adam, lr 1e-3 constant", "sgd": "SGD, lr 0.05, momentum 0.9, cosine over the run"}
    for opt in OPTIMIZERS:
        body += [
            f"## {titles[opt]}",
            settings_table(runs[opt]),
            "### Runs",
            runs_table(runs[opt]),
            "### Trace (mean over seeds)",
            trace_table(runs[opt], every=1 if epochs <= 10 else 2),
        ]
    body.append("## Reading\n\n" + READING if not args.quick else "## Reading\n\nSmoke run only: no conclusions.")
    name = "convergence_quick" if args.quick else "convergence"
    command = "python -m benchmarks.bench_convergence" + (" --quick" if args.quick else "")
    path = write_result(name, "ConvergenceMonitor settings vs. val-accuracy plateaus (MNIST-1D MLP)", "\n\n".join(body), command)
    print(path.read_text())


READING = "(to be written after the full run)"


if __name__ == "__main__":
    main()

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

from benchmarks.common import markdown_table, write_result
from lmd_lightning.cli.quickstart import mlp
from lmd_lightning.data import Split, load_mnist1d
from lmd_lightning.monitors.convergence import ConvergenceMonitor, grad_norm

BATCH = 100
# The defaults when this study was made; it moved the library's to patience=5, rel_tol=0.1 (see CURRENT),
# and trigger.md later moved the criterion to "epoch".
DEFAULTS = dict(criterion="step", beta=0.9, window=50, plateau_tol=0.05, patience=3, rel_tol=0.05, min_steps=100)
_now = ConvergenceMonitor()
CURRENT = {key: getattr(_now, key) for key in DEFAULTS}
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
# Beyond the brief's one-at-a-time grid: a smoother EMA (tests how much the plateau criterion relies on
# minibatch noise to stay quiet), a looser decay threshold, and the combination this file recommends.
EXTRA: list[tuple[str, dict]] = [
    ("beta=0.98", {"beta": 0.98}),
    ("rel_tol=0.2", {"rel_tol": 0.2}),
    ("rel_tol=0.1, patience=5", {"rel_tol": 0.1, "patience": 5}),
]
ALL = SETTINGS + EXTRA
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
    streak: dict[str, list[int]] = field(default_factory=dict)  # setting → highest plateau streak per epoch

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


def train_run(optimizer: str, seed: int, epochs: int, train: Split, val: Split, every: int = 1) -> Run:
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
    monitors = {name: ConvergenceMonitor(**{**DEFAULTS, **over}) for name, over in ALL}
    # An observer that never fires, checked once per epoch: its EMA is the defaults' EMA at epoch ends.
    observer = ConvergenceMonitor("step", beta=DEFAULTS["beta"], window=steps_per_epoch, patience=10**9, rel_tol=0.0)
    params = list(model.parameters())
    step = 0
    model.train()
    for _ in range(epochs):
        losses, streak = [], dict.fromkeys(monitors, 0)
        for idx in torch.randperm(len(train.y), generator=gen).split(BATCH):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = grad_norm(p.grad for p in params)
            for name, monitor in monitors.items():
                if step % every == 0 and not monitor.converged and monitor.update(norm, step):
                    run.fired[name] = (monitor.converged_step, monitor.reason)
                streak[name] = max(streak[name], monitor.streak)
            observer.update(norm, step)
            run.norms.append(float(norm))
            losses.append(float(loss.detach()))
            opt.step()
            step += 1
        if sched is not None:
            sched.step()
        for name, value in streak.items():
            run.streak.setdefault(name, []).append(value)
        run.train_loss.append(statistics.fmean(losses))
        run.val_acc.append(accuracy(model, val))
        run.ema.append(observer.ema)
    return run


def mean_std(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {statistics.stdev(values):.1f}"


SETTINGS_HEADER = [
    "setting",
    "fired",
    "fire epoch (per seed)",
    "criterion",
    "fire − reference (epochs)",
    "val acc at fire − run max (pts)",
    "same, 3-epoch smoothed",
    "highest plateau streak before the reference",
]
RUNS_HEADER = [
    "run",
    "max val acc",
    "epoch of max",
    "reference epoch",
    "smoothed acc at reference",
    "val acc, last epoch",
    "‖∇L‖ EMA: peak → last epoch",
]
TRACE_HEADER = ["epoch", "val acc", "train loss", "‖∇L‖ EMA (β=0.9)", "raw ‖∇L‖ over the epoch: mean (min–max)"]


def settings_row(runs: list[Run], name: str, over: dict) -> list[str]:
    patience = {**DEFAULTS, **over}["patience"]
    streaks = [max(r.streak[name][: r.reference_epoch() - 1], default=0) for r in runs]
    streak = f"{', '.join(map(str, streaks))} (of {patience})"
    label = f"**{name}**" if name == "defaults" else name
    fired = [r for r in runs if name in r.fired]
    if not fired:
        return [label, f"0/{len(runs)}", "never", "—", "—", "—", "—", streak]
    epochs = [r.fire_epoch(name) for r in fired]
    lag = [r.fire_epoch(name) - r.reference_epoch() for r in fired]
    gap = [r.val_acc[r.fire_epoch(name) - 1] - max(r.val_acc) for r in fired]
    gap_smooth = [r.smoothed()[r.fire_epoch(name) - 1] - max(r.smoothed()) for r in fired]
    kinds = sorted({criterion(r.fired[name][1]) for r in fired})
    return [
        label,
        f"{len(fired)}/{len(runs)}",
        f"{mean_std(epochs)} ({', '.join(map(str, epochs))})",
        "/".join(kinds),
        mean_std(lag, "{:+.1f}"),
        mean_std(gap, "{:+.1f}"),
        mean_std(gap_smooth, "{:+.1f}"),
        streak,
    ]


def settings_table(runs: list[Run], settings: list[tuple[str, dict]]) -> str:
    rows = [settings_row(runs, name, over) for name, over in settings]
    return markdown_table(SETTINGS_HEADER, rows, "lrrlrrrr")


def runs_row(r: Run) -> list[str]:
    best = max(r.val_acc)
    ref = r.reference_epoch()
    return [
        f"{r.optimizer} seed {r.seed}",
        f"{best:.2f}",
        str(r.val_acc.index(best) + 1),
        str(ref),
        f"{r.smoothed()[ref - 1]:.2f}",
        f"{r.val_acc[-1]:.2f}",
        f"{max(r.ema):.3g} → {r.ema[-1]:.3g}",
    ]


def runs_table(runs: list[Run]) -> str:
    return markdown_table(RUNS_HEADER, [runs_row(r) for r in runs], "lrrrrrr")


def trace_row(runs: list[Run], e: int) -> list[str]:
    spe = runs[0].steps_per_epoch
    raw = [n for r in runs for n in r.norms[(e - 1) * spe : e * spe]]
    return [
        str(e),
        f"{statistics.fmean(r.val_acc[e - 1] for r in runs):.2f}",
        f"{statistics.fmean(r.train_loss[e - 1] for r in runs):.3f}",
        f"{statistics.fmean(r.ema[e - 1] for r in runs):.3g}",
        f"{statistics.fmean(raw):.3g} ({min(raw):.3g}–{max(raw):.3g})",
    ]


def trace_table(runs: list[Run], every: int) -> str:
    """Per-epoch means over seeds: val accuracy, train loss, the EMA of ‖∇L‖ and the raw norm's spread."""
    epochs = len(runs[0].val_acc)
    shown = sorted({1, *range(every, epochs + 1, every), epochs})
    return markdown_table(TRACE_HEADER, [trace_row(runs, e) for e in shown], "rrrrr")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs: a seconds-long smoke run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--every", type=int, default=1, help="feed the monitors every N-th step (every_n_steps)")
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
            run = train_run(opt, seed, epochs, train, val, args.every)
            runs[opt].append(run)
            print(
                f"{opt} seed {seed}: max val acc {max(run.val_acc):.2f}, reference epoch {run.reference_epoch()}, "
                f"defaults fire at epoch {run.fire_epoch('defaults')} ({time.perf_counter() - t:.0f} s)",
                flush=True,
            )
    elapsed = time.perf_counter() - start

    spe = runs[OPTIMIZERS[0]][0].steps_per_epoch
    body = [
        f"{len(train.y)} train / {len(val.y)} val samples, batch {BATCH} ({spe} steps per epoch), {epochs} epochs, "
        f'seeds {", ".join(map(str, range(seeds)))}; {elapsed:.0f} s in all. "defaults" are the study\'s baseline: '
        + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())
        + "; each other row changes one of them. ConvergenceMonitor's defaults now are "
        + ", ".join(f"{k}={v}" for k, v in CURRENT.items())
        + " (the row `rel_tol=0.1, patience=5`), chosen from this study. "
        "Fire epoch: the 1-based epoch during which the monitor "
        "fired (per seed in brackets); reference: first epoch whose 3-epoch-smoothed val accuracy is within "
        "1 point of the run's smoothed maximum. A negative fire − reference means the monitor fired while "
        "val accuracy was still climbing. Mean ± std over the seeds that fired. Highest plateau streak: the "
        "most consecutive plateau checks the monitor saw before the reference epoch, per seed: the margin by "
        "which the plateau criterion stayed quiet while accuracy was still climbing."
    ]
    titles = {"adam": "Adam, lr 1e-3 constant", "sgd": "SGD, lr 0.05, momentum 0.9, cosine over the run"}
    for opt in OPTIMIZERS:
        body += [
            f"## {titles[opt]}",
            settings_table(runs[opt], SETTINGS),
            "Beyond the grid:",
            settings_table(runs[opt], EXTRA),
            "### Runs",
            runs_table(runs[opt]),
            "### Trace (mean over seeds)",
            trace_table(runs[opt], every=1 if epochs <= 10 else 2),
        ]
    if args.quick:
        body.append("## Reading\n\nSmoke run only: no conclusions.")
    elif args.every > 1:
        body.append(
            f"## Reading\n\nThe same study with a norm fed to the monitors every {args.every} steps "
            "(`every_n_steps`), the monitor counting windows and min_steps in optimizer steps. Compare the rows "
            "with convergence.md, where a norm is fed every step; the reading there is about that case."
        )
    else:
        body.append("## Reading\n\n" + READING)
    name = "convergence_quick" if args.quick else "convergence" + (f"_every{args.every}" if args.every > 1 else "")
    command = "python -m benchmarks.bench_convergence" + (" --quick" if args.quick else "")
    command += f" --every {args.every}" if args.every > 1 else ""
    path = write_result(
        name, "ConvergenceMonitor settings vs. val-accuracy plateaus (MNIST-1D MLP)", "\n\n".join(body), command
    )
    print(path.read_text())


READING = """\
Numbers from the tables above (training is deterministic per seed on CPU; a rerun gives the same).

**Defaults: sensible, never early, late under SGD.** In all 6 runs the defaults fired on the *decay*
criterion (`monitor.reason` "‖∇L‖ EMA fell to …% of its peak"); their plateau criterion never fired.
Adam: epoch 24.0 ± 1.0 against a reference of 18.0 (+6.0 ± 2.0 epochs); SGD + cosine: 30.3 ± 0.6
against 19.3 (+11.0 ± 1.0, three quarters into the run). Accuracy had converged by then: the
smoothed val accuracy at the firing epoch is 1.1 (Adam) / 0.3 (SGD) points under its maximum (at the
last epoch: 0.4 / 0.3; Adam's dips ~0.5 point around epochs 22–25). No run fired early, none failed
to fire.

**The plateau criterion is the fragile part.** From epoch 4 to 10 ‖∇L‖ sits flat at ~1.9 (EMA
1.94 → 2.02 for Adam) while val accuracy climbs 50 → 63%: a flat gradient norm is not a sign of
convergence here. It only falls once the training loss goes under ~0.1 (memorisation). The defaults'
plateau check stays quiet only because minibatch noise (β = 0.9 averages ~10 steps) moves the EMA by
more than 5% between checks; even so it reached 2 of its 3 checks before the reference in 3 of 6
runs. Every loosening fires early in some runs, 2–13 epochs before the reference with smoothed
accuracy 1–11 points under its maximum: patience=2 (3 of 6 runs, epochs 6, 7, 7: 6–10 points under),
window=25 (SGD: 3 of 3, epochs 7, 7, 18), plateau_tol=0.1 (epochs 7 and 14), and a smoother EMA,
beta=0.98 (epochs 7, 9, 16). Tightening it (plateau_tol=0.02,
patience=5, window=100) changes nothing, because decay fires first.

**rel_tol sets the timing.** 0.02 fires at 28 (Adam) and 38.7 (SGD, via plateau: under the cosine
schedule the EMA floors at 3.8–4.1% of its peak, so 2% is never reached); 0.05 crosses that floor with
only ~1 point to spare; 0.1 fires at 23.0 ± 1.7 / 23.7 ± 0.6 (+5.0 / +4.3 epochs), never early (the
smallest lag is +2), with accuracy at firing as close to the maximum as the defaults (smoothed −1.0 /
−0.6 points). 0.2 comes closer still (+3.7 / +3.0) but in Adam seed 2 fires exactly at the reference
epoch (19), with no margin left. Closest to the reference without firing early: **rel_tol=0.1**.

**Recommendation.** Change `rel_tol` 0.05 → 0.1: it halves the SGD delay (11 → 4.3 epochs) at no cost in
accuracy and stays clear of the ~4% floor where the EMA settles under cosine SGD. Raise `patience` 3 →
5 as a margin against the near-miss plateau (streak 2 of 3 seen before convergence in 3 of 6 runs):
here it changes no firing epoch ("rel_tol=0.1, patience=5" equals "rel_tol=0.1"), so this rests on the
margin, not on an observed failure of 3. Keep beta=0.9, window=50, plateau_tol=0.05, min_steps=100.
Limits: one small task whose MLP memorises its 3,600 training samples (train loss → 0.001–0.006, ‖∇L‖
EMA falls 24–150×); a 400-sample val set (0.25-point steps, noisy single epochs); checks only every 50 steps
(1.4 epochs). Where ‖∇L‖ does not fall ≥10× (strong regularisation, data too large to memorise) only
the plateau route can fire, and this benchmark does not test it there.
"""


if __name__ == "__main__":
    main()

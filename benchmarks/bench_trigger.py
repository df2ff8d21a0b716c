"""When does each trigger fire, against the epoch at which validation accuracy plateaus?

    python -m benchmarks.bench_trigger [--quick] [--models ...] [--seeds 0 1 2] [--cache DIR]

Models: the MNIST-1D recipes' MLP (40→512×3→10), CNN and transformer (40 epochs each), the
MLP-1024 of the auto-compression issue (40→1024×3→10, 60 epochs) and bench_training_cost's
4×2048 MLP (30 epochs); optimizers: Adam 1e-3 constant, AdamW 1e-3 (weight decay 0.01) and SGD
0.05 with momentum 0.9, both on a per-epoch cosine over the run; batch 100 (36 steps an epoch),
seeds 0, 1, 2. Plain training loops (no Lightning): each run is recorded once, per step the
global ‖g‖ and, from per-sample gradient norms of every Linear/Conv layer (`PerSampleNorms`),
the unbiased ‖∇L‖² and tr Σ; per epoch the val accuracy and Cuttlefish's StableRankMonitor on
the weights. Every ConvergenceMonitor setting is then replayed on the record as LMDCompression
feeds it (`fire_epoch`), so all settings see the same stream. With --cache the records are kept
and reused (about 45 min on one core for all 45). The test split is never touched.

Reference: the first epoch whose val accuracy, smoothed with a centred 3-epoch mean, is within
1 point of the run's smoothed maximum (as in convergence.md). The forced epoch is LMDCompression's
default, 2/3 of the epochs; a run has a plateau when its reference comes no later. A trigger is
on time in a run with a plateau when it fires (or is forced) within [−1, +2] epochs of the
reference; in a run without one when it does not fire before reference − 1. Settings are chosen
on seeds 0 and 1; seed 2 is held out and reported on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table, write_result
from lmd_lightning.data import Split, load_mnist1d
from lmd_lightning.models import CNN1DClassifier, MLPClassifier, TransformerClassifier
from lmd_lightning.monitors.convergence import ConvergenceMonitor, tensor_norms
from lmd_lightning.monitors.noise import PerSampleNorms, noise_estimates
from lmd_lightning.monitors.stable_rank import StableRankMonitor

BATCH = 100
MODELS = {
    "mlp": (lambda: MLPClassifier(widths=(512,) * 3).net, 40),
    "cnn": (lambda: CNN1DClassifier().net, 40),
    "transformer": (lambda: TransformerClassifier().net, 40),
    "mlp1024": (lambda: MLPClassifier(widths=(1024,) * 3).net, 60),
    "mlp2048x4": (lambda: MLPClassifier(widths=(2048,) * 4).net, 30),  # bench_training_cost's model
}
OPTIMIZERS = ("adam", "adamw_cosine", "sgd_cosine")
EVERY = 4  # LMDCompression's every_n_steps default
EPOCH_TOLS = (0.05, 0.1, 0.12, 0.15, 0.2)  # rel_tol of the epoch criterion, chosen on seeds 0–1
NOISE_GRID = [(b, t) for b in (0.9, 0.95) for t in (6.0, 10.0, 15.0)]  # noise_beta, noise_tol; every step
STEP = "step criterion (‖g‖ EMA plateau/decay; the earlier default)"
CUTTLEFISH = "Cuttlefish (stable rank, per epoch)"


def epoch_name(tol: float) -> str:
    return f"epoch criterion, rel_tol={tol:g}"


def noise_name(beta: float, tol: float) -> str:
    return f"noise ratio, noise_tol={tol:g}, noise_beta={beta:g}, every step"


def settings() -> dict[str, tuple[dict, int, bool]]:
    """name → (ConvergenceMonitor arguments, measuring period in steps, whether ρ is fed)."""
    table = {STEP: ({"criterion": "step"}, EVERY, False)}
    table.update({epoch_name(t): ({"criterion": "epoch", "rel_tol": t}, EVERY, False) for t in EPOCH_TOLS})
    table.update(
        {noise_name(b, t): ({"criterion": "step", "noise_tol": t, "noise_beta": b}, 1, True) for b, t in NOISE_GRID}
    )
    return table


def fire_epoch(run: dict, kwargs: dict, every: int, noise: bool) -> int | None:
    """Replay a recorded run through a ConvergenceMonitor as LMDCompression feeds it: the epoch
    (1-based) at whose end it has converged, after which the callback compresses; None if never."""
    monitor = ConvergenceMonitor(**kwargs)
    steps = len(run["norm"]) // run["epochs"]
    for t, norm in enumerate(run["norm"]):
        if t and t % steps == 0 and monitor.end_epoch():  # the callback closes an epoch at the next one's start
            return t // steps
        if t % every:
            continue
        extra = {"ratio": run["signal"][t] * run["samples"] / run["trace"][t]} if noise else {}
        if monitor.update(norm, t, **extra):
            return t // steps + 1
    return run["epochs"] if monitor.end_epoch() else None


def make_optimizer(name: str, params, epochs: int):
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3), None
    if name == "adamw_cosine":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)


def weights(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layers LMDCompression targets by default here: every Linear/Conv but the head."""
    return {
        name: m.weight.detach().flatten(1)
        for name, m in net.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not name.endswith("head")
    }


def train_run(model: str, optimizer: str, seed: int, train: Split, val: Split, epochs: int | None = None) -> dict:
    """One dense run, recorded: per step ‖g‖, the loss and the noise estimates; per epoch val accuracy.

    The monitors are replayed on this record afterwards (`fire_epoch`): they never change the
    training, so every setting sees exactly the stream it would have seen inside the run.
    """
    build, default_epochs = MODELS[model]
    epochs = epochs or default_epochs
    torch.manual_seed(seed)
    net = build()
    opt, sched = make_optimizer(optimizer, net.parameters(), epochs)
    params = list(net.parameters())
    meter = PerSampleNorms.of(net)
    measured = list(meter.parameters())
    n = len(train.y)
    srank = StableRankMonitor()
    srank.start(weights(net))
    record = {"model": model, "optimizer": optimizer, "seed": seed, "epochs": epochs, "samples": n}
    record.update(val_acc=[], norm=[], loss=[], signal=[], trace=[], cuttlefish=None)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(n, generator=generator).split(BATCH):
            meter.arm()
            loss = F.cross_entropy(net(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            per_sample = meter.take()
            meter.disarm()
            grad_sq = tensor_norms(p.grad for p in measured).double().square().sum()
            signal, trace = noise_estimates(grad_sq, per_sample, len(idx)).tolist()
            record["norm"].append(float(torch.linalg.vector_norm(tensor_norms(p.grad for p in params))))
            record["loss"].append(float(loss.detach()))
            record["signal"].append(signal)
            record["trace"].append(trace)
            opt.step()
        if sched is not None:
            sched.step()
        if record["cuttlefish"] is None and srank.update(weights(net), epoch):
            record["cuttlefish"] = epoch + 1
        net.eval()
        with torch.no_grad():
            record["val_acc"].append(float((net(val.x).argmax(-1) == val.y).float().mean()) * 100)
    return record


def smoothed(acc: list[float]) -> list[float]:
    return [statistics.fmean(acc[max(0, i - 1) : i + 2]) for i in range(len(acc))]


def reference(run: dict) -> int:
    smooth = smoothed(run["val_acc"])
    return next(i for i, a in enumerate(smooth) if a >= max(smooth) - 1.0) + 1


def forced(run: dict) -> int:
    return int(run["epochs"] * 2 / 3)  # LMDCompression's max_epochs default: 2/3 of the Trainer's


def outcome(run: dict, setting: str) -> tuple[int, bool, str]:
    """(effective compression epoch, whether it fired itself, verdict)."""
    ref, force = reference(run), forced(run)
    fire = run["fired"].get(setting)
    own = fire is not None and fire <= force
    epoch = fire if own else force
    if ref <= force:
        verdict = "on time" if -1 <= epoch - ref <= 2 else ("early" if epoch < ref - 1 else "late")
    else:
        verdict = "early" if own and fire < ref - 1 else "on time"
    return epoch, own, verdict


def summary_row(runs: list[dict], setting: str) -> list[str]:
    cells = [setting]
    for subset in (lambda r: r["seed"] in (0, 1), lambda r: r["seed"] == 2):
        chosen = [r for r in runs if subset(r)]
        if not chosen:
            cells += ["—", "—", "—"]
            continue
        verdicts = [outcome(r, setting)[2] for r in chosen]
        lags = [outcome(r, setting)[0] - reference(r) for r in chosen if reference(r) <= forced(r)]
        cells += [
            f"{verdicts.count('on time')}/{len(chosen)}",
            str(verdicts.count("early")),
            f"{statistics.fmean(lags):+.1f}" if lags else "—",
        ]
    return cells


def run_row(run: dict, settings: list[str]) -> list[str]:
    ref, force = reference(run), forced(run)
    cells = [f"{run['model']} {run['optimizer']} {run['seed']}", f"{max(run['val_acc']):.1f}", str(ref)]
    cells.append("yes" if ref <= force else f"no (forced {force})")
    for setting in settings:
        epoch, own, verdict = outcome(run, setting)
        cells.append(f"{epoch}{'' if own else ' (forced)'}: {epoch - ref:+d} {verdict}")
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP, 1 seed, 4 epochs: a smoke run")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache", type=Path, default=None, help="keep each run's record here and reuse it")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, seeds, epochs = (["mlp"], [0], 4) if args.quick else (args.models, args.seeds, None)
    splits = load_mnist1d()
    mean, std = splits["train"].x.mean(0), splits["train"].x.std(0).clamp_min(1e-6)
    train, val = (Split((splits[k].x - mean) / std, splits[k].y) for k in ("train", "val"))
    start, runs = time.perf_counter(), []
    for model in models:
        for optimizer in OPTIMIZERS:
            for seed in seeds:
                path = args.cache / f"{model}_{optimizer}_{seed}.json" if args.cache and not args.quick else None
                if path is not None and path.exists():
                    runs.append(json.loads(path.read_text()))
                    continue
                t = time.perf_counter()
                run = train_run(model, optimizer, seed, train, val, epochs)
                print(f"{model} {optimizer} {seed}: {time.perf_counter() - t:.0f} s", flush=True)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(run))
                runs.append(run)
    elapsed = time.perf_counter() - start
    table = settings()
    for run in runs:
        run["fired"] = {name: fire_epoch(run, *spec) for name, spec in table.items()}
        run["fired"][CUTTLEFISH] = run["cuttlefish"]
    names = [STEP, CUTTLEFISH, *(epoch_name(t) for t in EPOCH_TOLS), *(noise_name(*g) for g in NOISE_GRID)]
    rows = [summary_row(runs, name) for name in names]
    header = ["trigger", "on time, seeds 0–1", "early", "mean lag", "on time, seed 2", "early", "mean lag"]
    chosen = _best(runs, [epoch_name(t) for t in EPOCH_TOLS])
    noise = _best(runs, [noise_name(*g) for g in NOISE_GRID])
    shown = [chosen, STEP, CUTTLEFISH, noise]
    body = [
        f"{len(train.y)} train / {len(val.y)} val samples, batch {BATCH}; {len(runs)} runs, {elapsed:.0f} s of "
        "training here (cached runs count 0). Each run is recorded once (per step ‖g‖ and the noise estimates, "
        "per epoch val accuracy) and every trigger is replayed on the record through `ConvergenceMonitor`, fed "
        f"as LMDCompression feeds it (every {EVERY} steps, `end_epoch()` at each epoch boundary; the noise "
        "ratio every step). Mean lag: (compression epoch − reference) over the runs with a plateau.",
        "## Every trigger",
        markdown_table(header, rows, "lrrrrrr"),
        f"Chosen on seeds 0–1 (on time minus twice early, then the smaller |mean lag|): **{chosen}** among the "
        f"epoch criterion's rel_tol, **{noise}** among the noise settings.",
        "## Per run",
        markdown_table(
            ["run", "max val acc", "reference", "plateau by the forced epoch", *shown],
            [run_row(r, shown) for r in runs],
            "lrrl" + "l" * len(shown),
        ),
    ]
    if not args.quick:
        body.append("## Reading\n\n" + READING)
    name = "trigger_quick" if args.quick else "trigger"
    command = "python -m benchmarks.bench_trigger" + (" --quick" if args.quick else "")
    print(write_result(name, "Triggers against the validation plateau", "\n\n".join(body), command).read_text())


def _best(runs: list[dict], names: list[str]) -> str:
    def key(name: str) -> tuple[int, float, str]:
        train = [r for r in runs if r["seed"] in (0, 1)] or runs
        verdicts = [outcome(r, name)[2] for r in train]
        lags = [outcome(r, name)[0] - reference(r) for r in train if reference(r) <= forced(r)]
        return (-(verdicts.count("on time") - 2 * verdicts.count("early")), abs(statistics.fmean(lags or [0])), name)

    return min(names, key=key)


READING = """\
Numbers from the tables above: 45 runs, the MNIST-1D MLP, CNN and transformer (40 epochs, forced at
26), the MLP-1024 (60 epochs, forced at 40) and bench_training_cost's 4×2048 MLP (30 epochs, forced
at 20), each under 3 optimizers × 3 seeds.

**Which runs have a plateau.** 32 of 45 reach their reference by the forced epoch: every MLP,
MLP-1024 and cosine 4×2048 run, the CNN under cosine SGD, the transformer under cosine AdamW and
one cosine-SGD transformer seed, and one of the three constant-Adam 4×2048 seeds. Under a constant
Adam rate the CNN, the transformer and two 4×2048 seeds have none, nor the CNN under cosine AdamW:
there the forced epoch is right, and any trigger that fires before it fires early.

**The epoch criterion** (`ConvergenceMonitor(criterion="epoch")`, rel_tol chosen on seeds 0–1:
0.12) is on time in 33 of 45 runs with 1 early (MLP-1024 AdamW seed 2, whose validation accuracy
rose 2 points after epoch 30). The step criterion, the earlier default, manages 29 with 2 early (also
the CNN under cosine AdamW, seed 1, 6 epochs early). On the selection seeds it is 20/30 against 17/30,
and 13/15 against 12/15 on the held-out seed 2. Its mean lag is one epoch shorter on the MLP
(+3.9 against +5.0), on the 4×2048 (+2.4 against +3.0) and on the MLP-1024 (−0.6 against +0.1). It never fires
on the CNN or the transformer, where the norms do not decay: the forced epoch decides there, as before.

**Cuttlefish's switch** fires at epochs 4–18: 5/45 on time, 38 early.

**The noise ratio** ρ = ‖∇L‖²·N/tr Σ from per-sample gradients does not work as a trigger here.
It measures when the training set's gradients stop agreeing, and the validation plateau comes
before that on the MLPs and after it on the CNN under cosine AdamW. At noise_tol 6 it is late on the
MLPs; at 10 it fires early in 10–11 of 45 runs; at 15 in 28–30.

**Not met.** The issue's goal, every plateau run within [−1, +2], is not met by any trigger: 11
runs stay late under the epoch criterion, most by 3–9 epochs on the MLP whose validation accuracy
plateaus while the training loss is still falling by orders of magnitude. The constant-Adam 4×2048
never fires before the forced epoch 20 under either criterion, so the training-cost run of that
benchmark would not move. **The default is now "epoch"**: the study supports it, and the recipes,
re-measured with both criteria on one machine (recipes_mnist1d.md), held their accuracy within the
spread, the MLP firing at epochs [25, 21, 21] against [25, 22, 22].
"""


if __name__ == "__main__":
    main()

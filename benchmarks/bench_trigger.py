"""When does each trigger fire, against the epoch at which validation accuracy plateaus?

    python -m benchmarks.bench_trigger [--quick] [--models mlp cnn transformer] [--seeds 0 1 2]

Models: the MNIST-1D recipes' MLP (40→512×3→10), CNN and transformer (40 epochs each) and the
MLP-1024 of the auto-compression issue (40→1024×3→10, 60 epochs); optimizers: Adam 1e-3 constant,
AdamW 1e-3 (weight decay 0.01) and SGD 0.05 with momentum 0.9, both on a per-epoch cosine over
the run; batch 100 (36 steps an epoch), seeds 0, 1, 2. Plain training loops (no Lightning), so
that every monitor sees the same stream: after each backward the global ‖g‖ and, from per-sample
gradient norms of every Linear/Conv layer (`PerSampleNorms`), the step's noise ratio
ρ = ‖∇L‖²·N/tr Σ go to one monitor per setting, before the optimizer step, at the rate
LMDCompression feeds them (`every_n_steps`). Cuttlefish's StableRankMonitor sees the weights after
every epoch. The test split is never touched.

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
}
OPTIMIZERS = ("adam", "adamw_cosine", "sgd_cosine")
# (every_n_steps, noise_beta, noise_tol); noise_patience 2 and the monitor's other defaults throughout.
NOISE_GRID = [(n, b, t) for n in (1, 4) for b in (0.8, 0.9, 0.95) for t in (6.0, 10.0, 15.0)]
TODAY = "today's default (‖g‖ EMA plateau/decay, every 4 steps)"
CUTTLEFISH = "Cuttlefish (stable rank, per epoch)"


def noise_name(every: int, beta: float, tol: float) -> str:
    return f"noise_tol={tol:g}, noise_beta={beta:g}, every {every}"


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
    build, default_epochs = MODELS[model]
    epochs = epochs or default_epochs
    torch.manual_seed(seed)
    net = build()
    opt, sched = make_optimizer(optimizer, net.parameters(), epochs)
    params = list(net.parameters())
    meter = PerSampleNorms.of(net)
    measured = list(meter.parameters())
    n = len(train.y)
    monitors = {TODAY: (4, ConvergenceMonitor())}
    for every, beta, tol in NOISE_GRID:
        monitors[noise_name(every, beta, tol)] = (every, ConvergenceMonitor(noise_tol=tol, noise_beta=beta))
    srank = StableRankMonitor()
    srank.start(weights(net))
    fired: dict[str, int] = {}
    record = {"model": model, "optimizer": optimizer, "seed": seed, "epochs": epochs, "val_acc": [], "rho": []}
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        net.train()
        signal = trace = 0.0
        for idx in torch.randperm(n, generator=generator).split(BATCH):
            meter.arm()
            loss = F.cross_entropy(net(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            per_sample = meter.take()
            meter.disarm()
            norm = torch.linalg.vector_norm(tensor_norms(p.grad for p in params))
            grad_sq = tensor_norms(p.grad for p in measured).double().square().sum()
            estimate = noise_estimates(grad_sq, per_sample, len(idx))
            ratio = estimate[0] * n / estimate[1]
            signal, trace = signal + float(estimate[0]), trace + float(estimate[1])
            for name, (every, monitor) in monitors.items():
                if name not in fired and step % every == 0 and monitor.update(norm, step, ratio=ratio):
                    fired[name] = epoch + 1
            opt.step()
            step += 1
        if sched is not None:
            sched.step()
        if CUTTLEFISH not in fired and srank.update(weights(net), epoch):
            fired[CUTTLEFISH] = epoch + 1
        net.eval()
        with torch.no_grad():
            record["val_acc"].append(float((net(val.x).argmax(-1) == val.y).float().mean()) * 100)
        record["rho"].append(signal * n / trace)  # the epoch's ratio of summed estimates, for the trace table
    record["fired"] = fired
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
                print(f"{model} {optimizer} {seed}: {time.perf_counter() - t:.0f} s, fired {run['fired']}", flush=True)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(run))
                runs.append(run)
    elapsed = time.perf_counter() - start
    settings = [TODAY, CUTTLEFISH] + [noise_name(*s) for s in NOISE_GRID]
    rows = [summary_row(runs, s) for s in settings]
    header = ["trigger", "on time, seeds 0–1", "early", "mean lag", "on time, seed 2", "early", "mean lag"]
    ranked = sorted(settings[2:], key=lambda s: (-_score(runs, s), s))
    best = ranked[0]
    body = [
        f"{len(train.y)} train / {len(val.y)} val samples, batch {BATCH}; {len(runs)} runs, {elapsed:.0f} s of "
        "training here (cached runs count 0). Mean lag: (compression epoch − reference) over the runs with a "
        "plateau. Noise settings all use noise_patience=2 and the monitor's other defaults.",
        "## Every trigger",
        markdown_table(header, rows, "lrrrrrr"),
        f"Best noise setting on seeds 0–1 (on time minus twice early): **{best}**.",
        "## Per run: the chosen noise setting against today's default and Cuttlefish",
        markdown_table(
            ["run", "max val acc", "reference", "plateau by the forced epoch", best, TODAY, CUTTLEFISH],
            [run_row(r, [best, TODAY, CUTTLEFISH]) for r in runs],
            "lrrllll",
        ),
    ]
    if not args.quick:
        body.append("## Reading\n\n" + READING)
    name = "trigger_quick" if args.quick else "trigger"
    command = "python -m benchmarks.bench_trigger" + (" --quick" if args.quick else "")
    print(write_result(name, "Triggers against the validation plateau", "\n\n".join(body), command).read_text())


def _score(runs: list[dict], setting: str) -> int:
    verdicts = [outcome(r, setting)[2] for r in runs if r["seed"] in (0, 1)]
    return verdicts.count("on time") - 2 * verdicts.count("early")


READING = """\
Numbers from the tables above (27 runs: MLP, CNN, transformer × 3 optimizers × 3 seeds; the
MLP-1024 rows are not in the table: 8 of its 9 runs finished in this session, the SGD seed 2 did not;
in those 8, today's rule was on time in 7 and ρ (noise_tol=10, noise_beta=0.9, every step) in 3, with
5 early, at epochs 16–21 against references 18–38).

**Which runs have a plateau.** 16 of 27 reach their reference by the forced epoch 26: all nine MLP
runs (reference 14–21), the CNN under cosine SGD (22–25) and the transformer under cosine AdamW (23–25)
and one of its three cosine-SGD seeds (reference 23). Under a constant Adam learning rate neither the CNN (reference
34–36) nor the transformer (29–36) has one, nor the CNN under cosine AdamW (28–33): there the forced
epoch is the right switch, and a trigger that fires before it fires early.

**Today's default** (‖g‖ EMA plateau or decay): 16/27 on time, 1 early (CNN AdamW seed 1, epoch 22
against 28); where it fires it is late on the MLP (+2 to +10 epochs, mean +5.0).

**Cuttlefish's switch** fires at epochs 8–18 in every run: 1/27 on time, 25 early, 8 epochs early on
average. On these models the stable ranks settle long before validation accuracy does.

**The noise-aware ρ.** Measured every step, noise_tol=10 with noise_beta 0.9 or 0.95 was the best
setting on seeds 0–1 (12/18 on time, 2 early, against today's 9/18 and 1); on the held-out seed 2
it was 5–6/9 against today's 7/9. On the MLP it is closer to the plateau than today's rule (mean lag
+3.1 against +5.0 epochs, from epochs 19–23 instead of 21–24), but on the CNN under cosine AdamW it
fires at epochs 14–23, 9–14 epochs before the reference, where validation accuracy is still 2–9
points below its best: ρ falls below 10 there while the model is still learning slowly. Measured every 4th step
(the callback's rate) every setting is earlier still (3–11 early runs of 18). No setting met the
issue's goal (every plateau run within [−1, +2], no early fire) and none beat today's default on the
held-out seed, so **the default stays today's rule and ρ stays opt-in**.

**Limits.** One data set of 3,600 samples; ρ's per-step EMA averages ratios whose noise is large
(single-step estimates of ‖∇L‖² are often negative), and a ratio of EMAs or per-epoch sums, the next
thing to try, was not measured here with the per-sample estimator. The 4×2048 MLP and the training-cost
re-run are not done.
"""


if __name__ == "__main__":
    main()

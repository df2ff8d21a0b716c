"""Overheads of LMDCompression: ‖∇L‖ monitoring per training step, and the swap + optimizer rebuild.

    python -m benchmarks.bench_callback [--quick] [--repeats 5]

Model: the quick start's MNIST-1D MLP (40→512→512→512→10, 551k parameters), batch 100, SGD with
momentum and a cosine schedule, no validation. Both contenders train in this process, in
alternating order, and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import markdown_table, write_result
from lmd_lightning import ConvergenceMonitor, EnergyRank, LMDCompression
from lmd_lightning.callback import surgery
from lmd_lightning.cli.quickstart import mlp
from lmd_lightning.data import load_mnist1d


class MLPModule(pl.LightningModule):
    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.net, self.epochs = mlp(), epochs

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.epochs)}


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (no validation runs)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._start)


def fit(loader: DataLoader, epochs: int, callbacks: list, accelerator: str) -> tuple[float, int]:
    """Median epoch time after the first epoch, and the steps per epoch."""
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=[*callbacks, timer],
    )
    trainer.fit(MLPModule(epochs), loader)
    return statistics.median(timer.times[1:]), trainer.num_training_batches


class AlternatingHook(LMDCompression):
    """Monitoring only, switched on in even epochs and off in odd ones of the same run.

    Comparing epochs of one run removes the run-to-run spread of this shared VM (±10%).
    The wall time spent inside the ‖∇L‖ hook is accumulated too.
    """

    def __init__(self, every_n_steps: int | None) -> None:
        super().__init__(
            EnergyRank(0.7),
            trigger=ConvergenceMonitor(min_steps=10**9),
            min_epochs=10**6,
            every_n_steps=every_n_steps or 1,
        )
        self.null = every_n_steps is None  # a control: never on, to show the noise floor of the comparison
        self.active, self.hook_seconds, self.hook_steps = False, 0.0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self.active = trainer.current_epoch % 2 == 0 and not self.null

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.active:
            start = time.perf_counter()
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.hook_seconds += time.perf_counter() - start
            self.hook_steps += 1


OVERHEAD_HEADER = [
    "‖∇L‖ measured",
    "epoch time, monitoring off",
    "epoch time, monitoring on",
    "end-to-end overhead",
    "time in the hook per step",
    "hook share of a step",
]


def overhead_table(loader: DataLoader, epochs: int, repeats: int, accelerator: str) -> str:
    rows = []
    for every in (None, 1, 4):
        off, on, hook, steps = [], [], [], 0
        for _ in range(repeats):
            callback, timer = AlternatingHook(every), EpochTimer()
            pl.seed_everything(0, verbose=False)
            trainer = pl.Trainer(
                max_epochs=epochs,
                accelerator=accelerator,
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                limit_val_batches=0,
                callbacks=[callback, timer],
            )
            trainer.fit(MLPModule(epochs), loader)
            steps = trainer.num_training_batches
            on += timer.times[2::2]  # even epochs from the third on (the first is warm-up)
            off += timer.times[1::2]
            hook.append(callback.hook_seconds / max(callback.hook_steps, 1))
        a, b, h = statistics.median(off), statistics.median(on), statistics.median(hook)
        label = (
            "never (control: even vs odd epochs)" if every is None else f"every {every} step{'s' if every > 1 else ''}"
        )
        label += " (the default)" if every == 4 else ""
        rows.append(
            [
                label,
                f"{a * 1e3:.1f} ms",
                f"{b * 1e3:.1f} ms",
                f"{100 * (b - a) / a:+.2f}%",
                f"{h * 1e3:.3f} ms",
                f"{100 * h * steps / a:.2f}%",
            ]
        )
    note = (
        f"{steps} steps of batch 100 per epoch. Each row: {repeats} runs of {epochs} epochs with monitoring on in "
        "even epochs and off in odd ones; medians over those epochs (the first is warm-up). Goal: overhead ≤ 2%."
    )
    return markdown_table(OVERHEAD_HEADER, rows, "lrrrrr") + "\n\n" + note


def swap_table(loader: DataLoader, epochs: int, accelerator: str) -> str:
    timings: dict[str, float] = {}
    real_rebuild, real_apply = surgery.rebuild, LMDCompression._apply

    def timed_rebuild(trainer, before):
        start = time.perf_counter()
        out = real_rebuild(trainer, before)
        timings["rebuild"] = time.perf_counter() - start
        return out

    def timed_apply(self, pl_module, policy):
        start = time.perf_counter()
        out = real_apply(self, pl_module, policy)
        timings["compress_"] = time.perf_counter() - start
        return out

    surgery.rebuild, LMDCompression._apply = timed_rebuild, timed_apply
    try:
        fit(
            loader,
            epochs,
            [LMDCompression(EnergyRank(0.7), trigger="epoch", min_epochs=1, exclude="net.6", metric="weight")],
            accelerator,
        )
    finally:
        surgery.rebuild, LMDCompression._apply = real_rebuild, real_apply
    rows = [
        [
            "`compress_` (spectra, ranks, factors, swap) of 3 layers, EnergyRank(0.7)",
            f"{timings['compress_'] * 1e3:.1f} ms",
        ],
        ["optimizer + scheduler rebuild with state carry-over", f"{timings['rebuild'] * 1e3:.2f} ms"],
    ]
    return markdown_table(["step at the swap", "time"], rows, "lr")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    split = load_mnist1d()["train"]
    n = 400 if args.quick else len(split.y)
    loader = DataLoader(TensorDataset(split.x[:n], split.y[:n]), batch_size=100, shuffle=True)
    epochs, repeats = (3, 1) if args.quick else (11, args.repeats)
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    body = "## ‖∇L‖ monitoring overhead\n\n" + overhead_table(loader, epochs, repeats, accelerator)
    body += "\n\n## Swap and optimizer rebuild\n\n" + swap_table(loader, 2, accelerator)
    name = "callback_overhead" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    command = "python -m benchmarks.bench_callback" + (" --quick" if args.quick else "")
    command += " --device cuda" if args.device == "cuda" else ""
    path = write_result(name, "LMDCompression overheads", body, command, device=args.device)
    print(path.read_text())


if __name__ == "__main__":
    main()

"""Memory: peak RSS while training dense vs factored, and parameter + optimizer-state bytes.

    python -m benchmarks.bench_memory [--quick]

Each contender runs in its own fresh process (spawned), so one's allocations cannot hide
another's. It trains an MLP (40 → width × 4 → 10) with Adam (lr 1e-3), batch 100, on random data
(memory does not depend on the values), for two epochs:

- dense: dense in both epochs;
- factored r = width/4 and r = width/16: `LMDCompression(RankRatio(…), trigger="epoch",
  min_epochs=1)` swaps every hidden layer at the start of epoch 1 and rebuilds the optimizer.

Per epoch: parameter, gradient and optimizer-state bytes (at its end); the peak RSS of the epoch's
start (Linux VmHWM since the last epoch's end: for epoch 1 of a factored run, the swap itself with
its SVDs and optimizer rebuild); the RSS once training begins, and the peak RSS within the epoch.
Peaks are reset by writing 5 to /proc/self/clear_refs. Epoch 0 is the dense phase for all; epoch 1
is after the swap. RSS keeps what the allocator holds after a free, so the factored epochs' RSS
can stay at the dense level even though fewer bytes are live: the live bytes are the tensor columns.
"""

from __future__ import annotations

import multiprocessing

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import command, device_args, markdown_table, mib, reset_peak_rss, rss, tensor_bytes, write_result

CONTENDERS = {"dense": None, "factored r = width/4": 0.25, "factored r = width/16": 1 / 16}


class MemoryProbe(pl.Callback):
    """Peak RSS up to each epoch's start (the swap), RSS then, its peak within the epoch, tensor bytes at its end."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []
        self.peak_reset = reset_peak_rss()

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # runs after LMDCompression's swap
        record = {"peak_start": rss("VmHWM")}
        self.peak_reset &= reset_peak_rss()
        self.epochs.append({**record, "rss_start": rss()})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        params = list(pl_module.parameters())
        state = [v for s in trainer.optimizers[0].state.values() for v in s.values()]
        self.epochs[-1].update(
            {
                "params": sum(p.numel() for p in params),
                "param_bytes": tensor_bytes(params),
                "grad_bytes": tensor_bytes(p.grad for p in params),
                "optimizer_bytes": tensor_bytes(state),
                "peak": rss("VmHWM"),
            }
        )
        self.peak_reset &= reset_peak_rss()


def _train(ratio: float | None, width: int, samples: int, out) -> None:
    """Run in a spawned child: train two epochs, send the probe's records back."""
    from lmd_lightning import LMDCompression, RankRatio
    from lmd_lightning.models import MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier(widths=(width,) * 4, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    data = TensorDataset(torch.randn(samples, 40), torch.randint(0, 10, (samples,)))
    probe = MemoryProbe()
    callbacks = (
        []
        if ratio is None
        else [LMDCompression(RankRatio(ratio), trigger="epoch", min_epochs=1, exclude="*head", metric="weight")]
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, probe],
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=100))
    out.put({"epochs": probe.epochs, "peak_reset": probe.peak_reset})


def measure(ratio: float | None, width: int, samples: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_train, args=(ratio, width, samples, queue))
    child.start()
    result = queue.get(timeout=1800)
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the child for ratio={ratio} exited with {child.exitcode}")
    return result


def rows(width: int, samples: int) -> tuple[list[list[str]], bool]:
    table, reset = [], True
    for name, ratio in CONTENDERS.items():
        result = measure(ratio, width, samples)
        reset &= result["peak_reset"]
        for epoch, record in enumerate(result["epochs"]):
            phase = "dense" if epoch == 0 or ratio is None else "after the swap"
            table.append(
                [
                    f"{width}",
                    name,
                    f"{epoch} ({phase})",
                    f"{record['params']:,}",
                    *(
                        mib(record[key])
                        for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "peak_start", "rss_start", "peak")
                    ),
                ]
            )
            print(table[-1], flush=True)
    return table, reset


def main(argv: list[str] | None = None) -> None:
    args = device_args(__doc__.splitlines()[0], "width 256 only, 500 samples", argv)
    widths, samples = ([256], 500) if args.quick else ([2048, 4096], 1000)
    all_rows, reset = [], True
    for width in widths:
        table, ok = rows(width, samples)
        all_rows += table
        reset &= ok
    header = [
        "width",
        "contender",
        "epoch",
        "params",
        "param MiB",
        "grad MiB",
        "optimizer-state MiB",
        "peak RSS at its start MiB",
        "RSS then MiB",
        "peak RSS in it MiB",
    ]
    note = "" if reset else "\n\nNote: /proc/self/clear_refs was not writable: every peak is the process's so far.\n"
    table = markdown_table(header, all_rows, "llrrrrrrrr")
    body = __doc__.split("\n\n", 2)[2] + f"\n{samples} samples per epoch.\n\n" + table + note
    path = write_result(
        "memory_quick" if args.quick else "memory",
        "Memory: dense vs factored training",
        body,
        command("bench_memory", argv),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()

"""An HF GPT-2 character LM on a real corpus, dense against compressed by the callback, same epochs.

Run from the repository root (needs `transformers`, in the dev extra):

    python -m benchmarks.bench_charlm                 # 3 runs × 12 epochs, ~25 min on 2 cores; results/charlm.md
    python -m benchmarks.bench_charlm --seeds 0 1 2   # more seeds
    python -m benchmarks.bench_charlm --quick         # a 1-layer model, 2 short epochs; results/charlm_quick.md

Corpus: the Python standard library's own top-level modules (`<stdlib>/*.py`, found from
`os.__file__`, so it is on every machine with Python and needs no download), read as bytes:
files whose names start with a–m train, n–r validate (the first 256 KiB), s–z test (the first
256 KiB). Held-out files, not held-out lines of the same files. Byte-level vocabulary (256).

Model: `GPT2LMHeadModel(GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=128,
vocab_size=256))` built from its config, in a LightningModule whose batches are HF-style dicts.
AdamW (lr 2e-3, weight decay 0.01), cosine schedule over all steps, batch 16 × 128 bytes, each
epoch 100 steps on random windows (seeded). Validation: 64 fixed windows of the validation text.
Test: every non-overlapping 128-byte window of the test text, once, at the end.

Contenders, from the same seed: dense; `LMDCompression(EnergyRank(0.9))` and
`LMDCompression(GlobalBudget(params=0.3))`, both with the default ‖∇L‖ trigger and
`monitor="val_bpc", mode="min"` (the first-table defaults a user would start from; no knob tuned
here). Reported: parameters, held-out bits per character (validation at the end, test), the
compression epoch, training tokens/s before and after the swap, and inference tokens/s
(forward of 16 × 128 windows, eval, no grad).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from benchmarks.common import command, markdown_table, time_it, write_result
from lmd_lightning import EnergyRank, GlobalBudget, LMDCompression

WINDOW, BATCH, STEPS, EPOCHS = 128, 16, 100, 12
HELD_OUT_BYTES = 256 * 1024
CONTENDERS = {
    "dense": None,
    "callback, EnergyRank(0.9)": lambda: EnergyRank(0.9),
    "callback, GlobalBudget(params=0.3)": lambda: GlobalBudget(params=0.3),
}


def stdlib_corpus() -> dict[str, torch.Tensor]:
    """Bytes of the standard library's top-level modules: train a–m, validation n–r, test s–z."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    for path in files:
        first = path.name[0].lower()
        parts["train" if first < "n" else "val" if first < "s" else "test"].append(path.read_bytes())
    data = {name: b"\n".join(chunks) for name, chunks in parts.items()}
    data["val"], data["test"] = data["val"][:HELD_OUT_BYTES], data["test"][:HELD_OUT_BYTES]
    return {name: torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() for name, raw in data.items()}


class Windows(torch.utils.data.IterableDataset):
    """`steps` batches of random `WINDOW`-byte windows per epoch, as {"input_ids", "labels"} dicts."""

    def __init__(self, text: torch.Tensor, steps: int, batch: int, seed: int) -> None:
        self.text, self.steps, self.batch, self.seed, self.epoch = text, steps, batch, seed, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        for _ in range(self.steps):
            starts = torch.randint(0, len(self.text) - WINDOW, (self.batch,), generator=g)
            ids = torch.stack([self.text[s : s + WINDOW] for s in starts.tolist()])
            yield {"input_ids": ids, "labels": ids}


def fixed_windows(text: torch.Tensor, count: int | None) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping windows from the start of `text` (all of them for None), in batches."""
    n = len(text) // WINDOW if count is None else count
    ids = text[: n * WINDOW].reshape(n, WINDOW)
    return [{"input_ids": chunk, "labels": chunk} for chunk in ids.split(BATCH)]


class CharLM(pl.LightningModule):
    def __init__(self, layers: int, total_steps: int) -> None:
        super().__init__()
        import transformers

        config = transformers.GPT2Config(n_embd=128, n_layer=layers, n_head=4, n_positions=WINDOW, vocab_size=256)
        self.model = transformers.GPT2LMHeadModel(config)
        self.total_steps = total_steps

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_bpc", self.model(**batch).loss / math.log(2), batch_size=len(batch["input_ids"]))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class EpochTimes(pl.Callback):
    """Wall time of each training epoch (the swap happens at an epoch start, so epochs are dense or factored)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self.start)


@torch.no_grad()
def bits_per_char(model: CharLM, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    losses = [float(model.model(**batch).loss) * len(batch["input_ids"]) for batch in batches]
    return sum(losses) / sum(len(batch["input_ids"]) for batch in batches) / math.log(2)


def run_one(name: str, seed: int, corpus: dict[str, torch.Tensor], quick: bool) -> dict:
    layers, epochs, steps = (1, 2, 5) if quick else (4, EPOCHS, STEPS)
    pl.seed_everything(seed, verbose=False)
    model = CharLM(layers, epochs * steps)
    params_before = sum(p.numel() for p in model.parameters())
    train = torch.utils.data.DataLoader(Windows(corpus["train"], steps, BATCH, seed), batch_size=None)
    val = fixed_windows(corpus["val"], 8 if quick else 64)
    times = EpochTimes()
    callbacks: list[pl.Callback] = [times]
    lmd = None
    if CONTENDERS[name] is not None:
        lmd = LMDCompression(CONTENDERS[name](), monitor="val_bpc", mode="min", min_epochs=1, metric="weight")
        callbacks.insert(0, lmd)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, train, torch.utils.data.DataLoader(val, batch_size=None))  # a loader of ready batches
    epoch = lmd.compressed_epochs[0] if lmd is not None and lmd.compressed_epochs else None
    tokens = steps * BATCH * WINDOW
    dense_epochs = times.times[: epoch if epoch is not None else len(times.times)]
    factored_epochs = times.times[epoch:] if epoch is not None else []
    test = fixed_windows(corpus["test"], 16 if quick else None)
    probe = test[0]
    model.eval()
    with torch.no_grad():
        seconds = time_it(lambda: model.model(input_ids=probe["input_ids"]), repeats=3 if quick else 7)
    return {
        "name": name,
        "seed": seed,
        "params_before": params_before,
        "params": sum(p.numel() for p in model.parameters()),
        "val_bpc": bits_per_char(model, val),
        "test_bpc": bits_per_char(model, test),
        "epoch": epoch,
        "failure": None if lmd is None else lmd.failure,
        "train_dense_tps": tokens / statistics.median(dense_epochs[1:] or dense_epochs) if dense_epochs else None,
        "train_factored_tps": tokens / statistics.median(factored_epochs) if factored_epochs else None,
        "infer_tps": probe["input_ids"].numel() / seconds,
    }


def mean_std(values: list[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def table(results: list[dict]) -> str:
    header = [
        "contender",
        "params",
        "val bpc",
        "test bpc",
        "swap epoch",
        "train tok/s dense phase",
        "train tok/s factored phase",
        "inference tok/s",
    ]
    rows = []
    for name in CONTENDERS:
        runs = [r for r in results if r["name"] == name]
        dense_tps = [r["train_dense_tps"] for r in runs if r["train_dense_tps"]]
        factored_tps = [r["train_factored_tps"] for r in runs if r["train_factored_tps"]]
        rows.append(
            [
                name,
                mean_std([r["params"] for r in runs], ",.0f"),
                mean_std([r["val_bpc"] for r in runs], ".3f"),
                mean_std([r["test_bpc"] for r in runs], ".3f"),
                ", ".join(str(r["epoch"]) if r["epoch"] is not None else "—" for r in runs),
                mean_std(dense_tps, ",.0f") if dense_tps else "—",
                mean_std(factored_tps, ",.0f") if factored_tps else "—",
                mean_std([r["infer_tps"] for r in runs], ",.0f"),
            ]
        )
    return markdown_table(header, rows, "lrrrrrrr")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 1-layer model, 2 epochs of 5 steps (CI smoke)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    corpus = stdlib_corpus()
    results = []
    for seed in args.seeds:
        for name in CONTENDERS:
            results.append(run_one(name, seed, corpus, args.quick))
            print(results[-1], flush=True)
    sizes = ", ".join(f"{name} {len(text):,} bytes" for name, text in corpus.items())
    failures = [f"- {r['name']} (seed {r['seed']}): {r['failure']}" for r in results if r["failure"]]
    body = (
        f"Corpus: {Path(os.__file__).parent} (Python {'.'.join(map(str, __import__('sys').version_info[:3]))}), "
        f"{sizes}. Seeds: {args.seeds} (mean ± std over seeds where there are several). Bits per character "
        "are the mean cross-entropy over every predicted byte, in bits.\n\n"
        + table(results)
        + ("\n\nCompression abandoned:\n" + "\n".join(failures) if failures else "")
    )
    name = "charlm_quick" if args.quick else "charlm"
    path = write_result(name, "GPT-2 character LM on the standard library", body, command("bench_charlm", argv))
    print(path.read_text())
    return results


if __name__ == "__main__":
    main()

"""The MNIST-1D recipes' expected results: knob sweeps chosen on validation, dense baselines, 3 seeds.

    python -m benchmarks.bench_recipes [--out DIR] [--aggregate-only]

Runs `lmd-train -m …` for each study below (about 45 minutes on 2 CPU cores), then averages
over seeds with lmd-report's `over_seeds` and writes benchmarks/results/recipes_mnist1d.md.
The knob of each recipe's policy is chosen by the best mean *validation* accuracy; the test
column is reported once, for what was chosen and for the rest.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import write_result
from lmd_lightning.cli.tradeoff import collect, over_seeds

SEEDS = "seed=0,1,2"
COMMON = ("trainer.enable_progress_bar=false", "logger=none")
STUDIES = {  # folder: the multirun's overrides
    "mlp_energy": ("recipe=mnist1d_mlp", "compression.energy=0.5,0.6,0.7,0.8,0.9"),
    "cnn_budget": ("recipe=mnist1d_cnn", "compression.params=0.1,0.25,0.5"),
    "transformer": ("recipe=mnist1d_transformer",),
    "dense": ("recipe=mnist1d_mlp,mnist1d_cnn,mnist1d_transformer", "compression=none"),
}
COLUMNS = ("params", "compression_ratio", "monitor_before", "monitor_after_truncation", "val_acc", "test_acc")


def run(out: Path) -> None:
    lmd_train = str(Path(sys.executable).parent / "lmd-train")
    for folder, overrides in STUDIES.items():
        target = out / folder
        shutil.rmtree(target, ignore_errors=True)
        command = [lmd_train, "-m", *overrides, SEEDS, *COMMON, f"hydra.sweep.dir={target}"]
        subprocess.run(command, check=True)


def _pct(row: dict, key: str) -> str:
    if row.get(key) is None:
        return "—"
    spread = f" ± {100 * row[key + '_std']:.1f}" if f"{key}_std" in row else ""
    return f"{100 * row[key]:.1f}{spread}"


def table(out: Path) -> str:
    lines = [
        "| study | run | seeds | params | ratio | val acc at the swap (dense) | right after truncation "
        "| val acc, final | test acc, final | compressed at epoch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for folder in STUDIES:
        rows, _ = collect(out / folder)
        for row in over_seeds(rows):
            lines.append(
                f"| {folder} | {row['run']} | {row['seeds']} | {row['params']:,} | {row['compression_ratio']:.2f}× "
                f"| {_pct(row, 'monitor_before')} | {_pct(row, 'monitor_after_truncation')} "
                f"| {_pct(row, 'val_acc')} | {_pct(row, 'test_acc')} | {row['compressed_epochs'] or '—'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_recipes"), help="where the runs go")
    parser.add_argument("--aggregate-only", action="store_true", help="only re-read runs already in --out")
    args = parser.parse_args(argv)
    if not args.aggregate_only:
        run(args.out)
    body = (
        "Accuracies in %, mean ± std over seeds 0, 1, 2. MNIST-1D: 3,600 train / 400 val / 1,000 test. "
        "'At the swap' is the dense model's validation accuracy right before truncation; 'right after' is the "
        "truncated model before any fine-tuning. `compressed at epoch` lists each seed's swap epoch (0-based); "
        "the forced epoch is 26 of 40, so an earlier epoch means the ‖∇L‖ monitor fired.\n\n" + table(args.out)
    )
    path = write_result(
        "recipes_mnist1d",
        "MNIST-1D recipes: sweeps, chosen settings, dense baselines",
        body,
        "python -m benchmarks.bench_recipes",
    )
    print(path.read_text())


if __name__ == "__main__":
    main()

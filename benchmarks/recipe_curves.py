"""The figure and latency table of `bench_recipes --set curves`: accuracy against parameters and CPU latency.

Also the cell helpers that bench_recipes' tables share with it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from lmd_lightning.cli.tradeoff import over_seeds, seed_group

__all__ = ["curve_figure", "knob", "latencies_ms", "pct"]

STYLES = {  # one marker per study; lines join a contender's knob settings
    "energy_weight": "o-",
    "budget_loss": "s-",
    "uniform_weight": "v-",
    "pufferfish": "<-",
    "ratio_all_layers": ">:",
    "cuttlefish": "p-",
    "pruning": "x--",
    "small_dense": "h--",
    "auto": "*",
    "auto_loss": "P",
    "dense": "D",
}
ZOOM = 12.0  # points of accuracy the figure shows below its best setting
KNOBS = (
    "compression.params",
    "compression.energy",
    "compression.ratio",
    "compression.multiplier",
    "model.widths",
    "model.channels",
    "model.dim",
    "callbacks.pruning.amount",
)


def pct(row: dict, key: str) -> str:
    """A fraction as a percentage cell, with its spread over seeds where there is one; "—" where missing."""
    if row.get(key) is None:
        return "—"
    spread = f" ± {100 * row[key + '_std']:.1f}" if f"{key}_std" in row else ""
    return f"{100 * row[key]:.1f}{spread}"


def knob(row: dict) -> str:
    """The policy knob among a merged row's overrides (`compression.params=…`, `model.widths=…`, …), or ""."""
    return " ".join(o for o in row["run"].split() if o.startswith(KNOBS))


def latencies_ms(checkpoints: list[str], features: int = 40) -> dict[str, float]:
    """Each checkpoint's model: the median ms per forward of a batch of 256 inputs of `features` values, all timed
    in turn (bench_quality's)."""
    from omegaconf import OmegaConf

    from benchmarks.bench_quality import latencies
    from lmd_lightning.cli.experiment import load_model

    nets = {path: load_model(OmegaConf.create({"ckpt_path": path}))[0] for path in checkpoints}
    return latencies(nets, "mlp", features)


def curve_figure(series: dict[str, list[dict]], path: Path, title: str, features: int = 40) -> str:
    """Validation accuracy against parameters and against CPU latency, one line or marker per study; its table.

    `series` maps a study to its runs' rows (lmd-report's `collect`). Each point is the mean ± std over
    seeds; latency is the mean over seeds of each model's median, measured here on the runs' checkpoints,
    every model timed in turn so that a busy moment hits all alike.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from benchmarks.bench_quality import LATENCY_BATCH
    from lmd_lightning.truncate.report import count_label

    timed = latencies_ms([row["checkpoint"] for rows in series.values() for row in rows], features)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    lines = ["| study | run | params | val acc | latency, ms |", "|---|---|---:|---:|---:|"]
    all_y: list[float] = []
    for index, (name, rows) in enumerate(series.items()):
        merged = over_seeds(rows)
        ms = [statistics.mean(timed[r["checkpoint"]] for r in rows if seed_group(r) == row["run"]) for row in merged]
        y = [100 * row["val_acc"] for row in merged]
        all_y.extend(y)
        err = [100 * row.get("val_acc_std", 0.0) for row in merged]
        for ax, x in zip(axes, ([row["params"] for row in merged], ms)):
            label = name if ax is axes[0] else None
            style = STYLES.get(name, "^-")
            ax.errorbar(x, y, yerr=err, fmt=style, color=f"C{index}", capsize=3, markersize=9, label=label)
        for row, latency in zip(merged, ms):
            lines.append(f"| {name} | {knob(row) or '—'} | {row['params']:,} | {pct(row, 'val_acc')} | {latency:.3f} |")
    lowest, highest = min(all_y), max(all_y)
    if highest - lowest > ZOOM:  # a collapsed setting would squash the curves that matter: zoom on the top
        axes[0].set_ylim(highest - ZOOM, highest + 1)
        fig.text(0.5, 0.02, f"settings below {highest - ZOOM:.0f}% are off the plot; the table lists them", ha="center")
    axes[0].set_xscale("log")
    axes[0].xaxis.set_major_formatter(FuncFormatter(count_label))
    axes[0].xaxis.set_minor_formatter(FuncFormatter(count_label))
    axes[0].set_xlabel("parameters")
    axes[1].set_xlabel(f"CPU latency, batch {LATENCY_BATCH} (ms, {torch.get_num_threads()} threads)")
    axes[0].set_ylabel("validation accuracy (%), mean ± std over 3 seeds")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (up and left is better)")
    fig.legend(loc="lower center", ncol=6, fontsize=8, bbox_to_anchor=(0.5, 0.045))
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "\n".join(lines)

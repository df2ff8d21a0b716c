"""What the callback logs at a compression: scalars to every logger, figures to TensorBoard.

- Every logger (TensorBoard, CSV, …) gets the scalars through `log_metrics`: per-layer rank
  `lmd/rank/<layer>`, `lmd/params`, `lmd/compression_ratio`, `lmd/macs`, `lmd/round`, and the
  monitored metric before and right after truncation.
- A TensorBoard logger also gets the rank–accuracy sweep (as the scalar `lmd/sweep/<monitor>`
  over the parameter count, and as a figure with the chosen point marked), the singular-value
  spectra with the cut marked (a figure, and one histogram per layer), and a custom-scalars layout.
"""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switching
from matplotlib.ticker import FuncFormatter
from torch.utils.tensorboard import SummaryWriter

from lmd_lightning.callback.guard import GuardRecord, SweepPoint
from lmd_lightning.truncate.report import CompressionReport, count_label

__all__ = ["log_compression", "log_final", "log_ladder", "log_layout", "writers"]

MAX_SPECTRA = 12  # layers drawn in the spectra figure; histograms cover all of them


def writers(loggers: list) -> list[SummaryWriter]:
    """The SummaryWriters behind the TensorBoard loggers among `loggers`."""
    return [logger.experiment for logger in loggers if isinstance(getattr(logger, "experiment", None), SummaryWriter)]


def log_layout(loggers: list, monitor: str | None) -> None:
    """Group the lmd/ scalars in TensorBoard's Custom Scalars tab."""
    charts = {
        "ranks": ["Multiline", [r"lmd/rank/.*"]],
        "size": ["Multiline", ["lmd/params", "lmd/macs", "lmd/compression_ratio"]],
        "convergence": ["Multiline", [r"lmd/grad_norm.*"]],
    }
    if monitor is not None:
        charts["metric"] = ["Multiline", ["lmd/metric_before", "lmd/metric_after", monitor]]
        charts["rank-accuracy sweep"] = ["Multiline", [f"lmd/sweep/{monitor}"]]
        charts["ladder"] = ["Multiline", [f"lmd/ladder/{monitor}", "lmd/ladder/dense"]]
    for writer in writers(loggers):
        writer.add_custom_scalars({"lmd": charts})


def _scalars(report: CompressionReport, round_: int, record: GuardRecord | None) -> dict[str, float]:
    scalars = {
        "lmd/round": float(round_),
        "lmd/params": float(report.model_params_after),
        "lmd/macs": float(report.macs_after),
        "lmd/compression_ratio": report.compression_ratio,
    }
    scalars.update({f"lmd/rank/{layer.name}": float(layer.rank) for layer in report.layers if layer.rank is not None})
    if record is not None:
        scalars["lmd/metric_before"], scalars["lmd/metric_after"] = record.before, record.after
    return scalars


def log_compression(
    loggers: list,
    step: int,
    report: CompressionReport,
    round_: int,
    record: GuardRecord | None = None,
    sweep: list[SweepPoint] | None = None,
    monitor: str | None = None,
) -> None:
    """Log one compression round (see the module docstring for what goes where)."""
    scalars = _scalars(report, round_, record)
    for logger in loggers:
        logger.log_metrics(scalars, step)
    for writer in writers(loggers):
        _spectra(writer, report, step)
        if sweep:
            _sweep(writer, sweep, monitor, step, chosen=(report.model_params_after, record.after if record else None))
        writer.flush()


def _spectra(writer: SummaryWriter, report: CompressionReport, step: int) -> None:
    ranks = {layer.name: layer.rank for layer in report.layers}
    for name, s in report.spectra.items():
        writer.add_histogram(f"lmd/singular_values/{name}", s.float(), step)
    names = list(report.spectra)[:MAX_SPECTRA]
    if not names:
        return
    cols, rows = min(3, len(names)), math.ceil(len(names) / min(3, len(names)))
    fig = Figure(figsize=(4 * cols, 3 * rows))
    for index, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, index + 1)
        s = report.spectra[name].float().cpu()
        ax.semilogy(range(1, len(s) + 1), s.clamp_min(1e-12).numpy())
        if ranks.get(name):
            ax.axvline(ranks[name], color="red", linestyle="--", label=f"rank {ranks[name]}")
            ax.legend(loc="upper right")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("i")
        ax.set_ylabel("σᵢ")
    fig.tight_layout()
    writer.add_figure("lmd/spectra", fig, step)


def _sweep(
    writer: SummaryWriter, sweep: list[SweepPoint], monitor: str, step: int, chosen: tuple[int, float | None]
) -> None:
    for point in sorted(sweep, key=lambda p: p.params):
        writer.add_scalar(f"lmd/sweep/{monitor}", point.value, global_step=point.params)
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot([p.params for p in sweep], [p.value for p in sweep], "o-", label="truncated, no fine-tune")
    if chosen[1] is not None:
        ax.plot([chosen[0]], [chosen[1]], "r*", markersize=14, label="chosen")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(count_label))
    ax.xaxis.set_minor_formatter(FuncFormatter(count_label))
    ax.set_xlabel("parameters")
    ax.set_ylabel(monitor)
    ax.legend()
    fig.tight_layout()
    writer.add_figure("lmd/rank_accuracy_sweep", fig, step)


def log_ladder(loggers: list, step: int, ladder: Any, monitor: str) -> None:
    """rounds="auto": each decided rung's scalars to every logger, and the ladder as a TensorBoard figure.

    Scalars: `lmd/ladder/rung`, `lmd/ladder/params`, `lmd/ladder/<monitor>` (validated after the
    rung's fine-tuning), `lmd/ladder/dense`, `lmd/ladder/bar` (what the rung had to hold within
    max_drop: the dense reference or a kept rung's better value) and `lmd/ladder/kept` (1 kept, 0 rolled back).
    """
    rung = next((r for r in reversed(ladder.rungs) if r.decision != "pending"), None)
    if rung is None:
        return
    scalars = {
        "lmd/ladder/rung": float(rung.rung),
        "lmd/ladder/params": float(rung.params),
        f"lmd/ladder/{monitor}": float(rung.value),
        "lmd/ladder/dense": float(ladder.dense),
        "lmd/ladder/bar": float(rung.bar if rung.bar is not None else ladder.dense),
        "lmd/ladder/kept": float(rung.decision == "kept"),
    }
    for logger in loggers:
        logger.log_metrics(scalars, step)
    for writer in writers(loggers):
        writer.add_figure("lmd/ladder", ladder_figure(ladder, monitor), step)
        writer.flush()


def ladder_figure(ladder: Any, monitor: str) -> Figure:
    """The validated metric of every decided rung over its parameters, the dense value and the allowed band."""
    decided = [r for r in ladder.rungs if r.decision != "pending"]
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    dense_params = decided[0].params_before if decided else 1
    bar = ladder.bar
    limit = bar - ladder.max_drop if ladder.mode == "max" else bar + ladder.max_drop
    ax.axhline(ladder.dense, color="gray", label="dense")
    if bar != ladder.dense:
        ax.axhline(bar, color="C2", linestyle="--", label="bar (best kept rung)")
    sign = "−" if ladder.mode == "max" else "+"
    ax.axhline(limit, color="gray", linestyle=":", label=f"allowed now (bar {sign} {ladder.max_drop:g})")
    line = sorted([(dense_params, ladder.dense)] + [(r.params, r.value) for r in decided], reverse=True)
    ax.plot([params for params, _ in line], [value for _, value in line], "-", color="C0")  # by size: bisection
    # tries sizes between a kept and a rejected rung, out of order
    for decision, marker, color in (("kept", "o", "C2"), ("rolled back", "x", "C3")):
        points = [r for r in decided if r.decision == decision]
        if points:
            ax.plot([r.params for r in points], [r.value for r in points], marker, color=color, label=decision)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(count_label))
    ax.xaxis.set_minor_formatter(FuncFormatter(count_label))
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{monitor} after fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_final(trainer: Any, pl_module: Any, callback: Any) -> None:
    """The callback's hyper-parameters with the final metrics on TensorBoard loggers; `hp_metric` gets a real value.

    `hp_metric` is the final monitored metric, or the compression ratio without a monitor,
    in place of the −1 that Lightning writes at the start.
    """
    hparams = {
        "lmd/policy": repr(callback.policy),
        "lmd/trigger": callback.trigger,
        "lmd/rounds": callback.rounds,
        "lmd/min_epochs": callback.min_epochs,
        "lmd/parametrization": callback.parametrization,
        **callback.lmd.hparams(),
        "lmd/compressed_epochs": str(callback.compressed_epochs),
    }
    ratio = callback.compression_ratio
    params = sum(p.numel() for p in pl_module.parameters())
    metrics = {"lmd/final_params": float(params), "lmd/compression_ratio": float(ratio)}
    monitor = callback.monitor
    if monitor is not None and trainer.callback_metrics.get(monitor) is not None:
        metrics[f"lmd/final_{monitor}"] = float(trainer.callback_metrics[monitor])
    metrics["hp_metric"] = metrics.get(f"lmd/final_{monitor}", metrics["lmd/compression_ratio"])
    for logger in trainer.loggers:
        if isinstance(getattr(logger, "experiment", None), SummaryWriter):
            logger.log_hyperparams(hparams, metrics)

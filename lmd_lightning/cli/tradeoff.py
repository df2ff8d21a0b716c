"""lmd-report DIR: the rank/accuracy trade-off of an `lmd-train -m …` multirun, as a table and a figure.

Every job of the multirun wrote `results.json` into its run dir; this reads them, labels each by
its command-line overrides, marks the Pareto front (fewest parameters for the validation
metric: selection happens on validation data, the test column is reported, not chosen on) and
writes `report.md` and `tradeoff.png` into DIR. Runs that differ only in `seed=` are averaged:
each cell is then mean ± standard deviation over the seeds, and the front is drawn on the means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lmd_lightning.truncate.report import count_label

__all__ = ["RESULTS_FILE", "collect", "main", "markdown", "over_seeds", "pareto_front", "plot", "seed_group"]

RESULTS_FILE = "results.json"  # one per lmd-train run dir


def collect(root: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Each run's results under `root`, sorted by parameters, and the overrides all runs share.

    Each row's `run` names what sets it apart from the others:

    its command-line overrides minus the shared ones (in a multirun: the swept values), or its folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"`DIR` must be a folder holding lmd-train runs, got {str(root)!r}")
    rows, overrides = [], []
    for path in sorted(root.rglob(RESULTS_FILE)):
        rows.append(json.loads(path.read_text()))
        listed = path.parent / ".hydra" / "overrides.yaml"
        overrides.append(list(OmegaConf.load(listed)) if listed.is_file() else [])
        rows[-1]["folder"] = str(path.parent.relative_to(root))
    if not rows:
        raise FileNotFoundError(f"no {RESULTS_FILE} under {root}: point lmd-report at an lmd-train run or multirun dir")
    shared = set.intersection(*(set(o) for o in overrides)) if len(rows) > 1 else set()
    for row, own in zip(rows, overrides):
        row["run"] = " ".join(o for o in own if o not in shared) or row["folder"]
    return sorted(rows, key=lambda row: row["params"]), [o for o in overrides[0] if o in shared]


def pareto_front(rows: list[dict[str, Any]], monitor: str, mode: str = "max") -> list[bool]:
    """Whether each run is on the front: no other run is at least as small and at least as good, and better in one."""
    sign = 1.0 if mode == "max" else -1.0

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        better = sign * (a[monitor] - b[monitor])
        return a["params"] <= b["params"] and better >= 0 and (a["params"] < b["params"] or better > 0)

    return [monitor in row and not any(monitor in o and dominates(o, row) for o in rows) for row in rows]


def seed_group(row: dict[str, Any]) -> str:
    """What sets a run apart from the others but its seed: the `run` of its row in `over_seeds`."""
    return " ".join(o for o in row["run"].split() if not o.startswith("seed=")) or "(the shared overrides)"


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that differ only in their `seed=` override merged: numbers averaged, `<key>_std` and `seeds` added.

    `compressed_epochs` lists every seed's epochs; other non-numbers are the first run's.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(seed_group(row), []).append(row)
    merged = []
    for label, group in groups.items():
        row = {**group[0], "run": label, "seeds": len(group)}
        row["compressed_epochs"] = [epoch for r in group for epoch in r.get("compressed_epochs") or []]
        for key in {k for r in group for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}:
            values = [r[key] for r in group if r.get(key) is not None]
            mean = sum(values) / len(values)
            row[key] = round(mean) if key in ("params", "params_before") else mean
            if len(values) > 1 and isinstance(mean, float):
                row[f"{key}_std"] = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        merged.append(row)
    return sorted(merged, key=lambda row: row["params"])


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f} ± {row[key + '_std']:.4f}" if f"{key}_std" in row else f"{value:.4f}"


def markdown(rows: list[dict[str, Any]], monitor: str, front: list[bool]) -> str:
    test = monitor.replace("val_", "test_")
    header = ["run", "seeds", "params", "ratio", f"{monitor} dense", f"{monitor} truncated", monitor, test, "Pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, on_front in zip(rows, front):
        cells = [
            row["run"],
            str(row.get("seeds", 1)),
            f"{row['params']:,}",
            f"{row['compression_ratio']:.2f}×",
            _cell(row, "monitor_before"),
            _cell(row, "monitor_after_truncation"),
            _cell(row, monitor),
            _cell(row, test),
            "✓" if on_front else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], monitor: str, front: list[bool], path: str | Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    params = [r["params"] for r in rows]
    truncated = [
        (r["params"], r["monitor_after_truncation"]) for r in rows if r.get("monitor_after_truncation") is not None
    ]
    if truncated:
        ax.plot(*zip(*truncated), "o", mfc="none", color="tab:blue", alpha=0.6, label="truncated, before fine-tuning")
    ax.errorbar(
        params,
        [r.get(monitor) for r in rows],
        yerr=[r.get(f"{monitor}_std", 0.0) for r in rows],
        fmt="o",
        color="tab:blue",
        capsize=3,
        label="after fine-tuning (± std over seeds)",
    )
    best = [r for r, on in zip(rows, front) if on]
    ax.plot([r["params"] for r in best], [r[monitor] for r in best], "-", color="tab:red", label="Pareto front")
    dense = {(r["params_before"], r["monitor_before"]) for r in rows if r.get("monitor_before") is not None}
    if dense:
        ax.plot(*zip(*sorted(dense)), "s", color="gray", label="dense, before truncation")
    for row in (r for r in rows if r.get(monitor) is not None):
        ax.annotate(
            row["run"], (row["params"], row[monitor]), fontsize=7, alpha=0.8, xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(count_label))
    ax.xaxis.set_minor_formatter(FuncFormatter(count_label))
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("parameters")
    ax.set_ylabel(monitor)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="lmd-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="an lmd-train multirun dir (or any folder holding lmd-train run dirs)")
    parser.add_argument(
        "--monitor", "--metric", default="val_acc", help="validation metric for the Pareto front (default val_acc)"
    )
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="max if higher is better")
    args = parser.parse_args(argv)
    try:
        rows, shared = collect(args.dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    rows = over_seeds(rows)
    if not any(args.monitor in row for row in rows):
        numeric = sorted({k for row in rows for k, v in row.items() if isinstance(v, float)})
        parser.error(f"`--monitor` {args.monitor!r} is in no run; the runs have: {numeric}")
    front = pareto_front(rows, args.monitor, args.mode)
    table = markdown(rows, args.monitor, front)
    if shared:
        table = f"Runs of `lmd-train {' '.join(shared)}` with:\n\n{table}"
    root = Path(args.dir)
    (root / "report.md").write_text(table + "\n")
    plot(rows, args.monitor, front, root / "tradeoff.png")
    print(table)
    print(f"\nwrote {root / 'report.md'} and {root / 'tradeoff.png'}")
    return table

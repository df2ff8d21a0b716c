"""lmd-report DIR: the rank/accuracy trade-off of an `lmd-train -m …` multirun, as a table and a figure.

Every job of the multirun wrote `results.json` into its run dir; this reads them, labels each by
its command-line overrides, marks the Pareto front (fewest parameters for the validation
metric: selection happens on validation data, the test column is reported, not chosen on) and
writes `report.md` and `tradeoff.png` into DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

__all__ = ["RESULTS_FILE", "collect", "main", "markdown", "pareto_front", "plot"]

RESULTS_FILE = "results.json"  # one per lmd-train run dir (kept light: lmd-report imports no torch)


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


def pareto_front(rows: list[dict[str, Any]], metric: str, mode: str = "max") -> list[bool]:
    """Whether each run is on the front: no other run is at least as small and at least as good, and better in one."""
    sign = 1.0 if mode == "max" else -1.0

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        better = sign * (a[metric] - b[metric])
        return a["params"] <= b["params"] and better >= 0 and (a["params"] < b["params"] or better > 0)

    return [metric in row and not any(metric in o and dominates(o, row) for o in rows) for row in rows]


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], metric: str, front: list[bool]) -> str:
    test = metric.replace("val_", "test_")
    header = ["run", "policy", "params", "ratio", f"{metric} dense", f"{metric} truncated", metric, test, "Pareto"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, on_front in zip(rows, front):
        cells = [
            row["run"], row.get("policy", "dense"), f"{row['params']:,}", f"{row['compression_ratio']:.2f}×",
            _cell(row.get("monitor_before")), _cell(row.get("monitor_after_truncation")), _cell(row.get(metric)),
            _cell(row.get(test)), "✓" if on_front else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], metric: str, front: list[bool], path: str | Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    params = [r["params"] for r in rows]
    truncated = [(r["params"], r["monitor_after_truncation"]) for r in rows if r.get("monitor_after_truncation") is not None]
    if truncated:
        ax.plot(*zip(*truncated), "o", mfc="none", color="tab:blue", alpha=0.6, label="truncated, before fine-tuning")
    ax.plot(params, [r.get(metric) for r in rows], "o", color="tab:blue", label="after fine-tuning")
    best = [r for r, on in zip(rows, front) if on]
    ax.plot([r["params"] for r in best], [r[metric] for r in best], "-", color="tab:red", label="Pareto front")
    dense = {(r["params_before"], r["monitor_before"]) for r in rows if r.get("monitor_before") is not None}
    if dense:
        ax.plot(*zip(*sorted(dense)), "s", color="gray", label="dense, before truncation")
    for row in (r for r in rows if r.get(metric) is not None):
        ax.annotate(row["run"], (row["params"], row[metric]), fontsize=7, alpha=0.8, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.tick_params(axis="x", which="both", labelsize=7)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("parameters")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="lmd-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="an lmd-train multirun dir (or any folder holding lmd-train run dirs)")
    parser.add_argument("--metric", default="val_acc", help="validation metric for the Pareto front (default val_acc)")
    parser.add_argument("--mode", choices=("max", "min"), default="max", help="max if higher is better")
    args = parser.parse_args(argv)
    try:
        rows, shared = collect(args.dir)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not any(args.metric in row for row in rows):
        numeric = sorted({k for row in rows for k, v in row.items() if isinstance(v, float)})
        parser.error(f"`--metric` {args.metric!r} is in no run; the runs have: {numeric}")
    front = pareto_front(rows, args.metric, args.mode)
    table = markdown(rows, args.metric, front)
    if shared:
        table = f"Runs of `lmd-train {' '.join(shared)}` with:\n\n{table}"
    root = Path(args.dir)
    (root / "report.md").write_text(table + "\n")
    plot(rows, args.metric, front, root / "tradeoff.png")
    print(table)
    print(f"\nwrote {root / 'report.md'} and {root / 'tradeoff.png'}")
    return table

"""What `compress_` reaches in third-party architectures: the "Works with" table of the README.

Run from the repository root (needs `transformers`, in the dev extra):

    python -m benchmarks.bench_zoo            # all 13 models, writes results/zoo.md (about a minute)
    python -m benchmarks.bench_zoo --quick    # three of them, results/zoo_quick.md (CI smoke test)

Every model of benchmarks/zoo.py, built from a small config with random weights, compressed at
RankRatio(0.25). For each: parameters before and after, the share of the linear-like parameters
(Linear, Conv1d, Conv2d with groups=1, HF Conv1D, attention projections) that ended factored,
which layer kinds were factored, and each reason a layer stayed dense (with the parameters it
holds). Counts, not timings: they depend on the architecture, not on the machine.
"""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict

from benchmarks.common import command, markdown_table, write_result
from benchmarks.zoo import ZOO, build, linear_like
from lmd_lightning import RankRatio, compress_

QUICK = ("gpt2-lm", "nn.Transformer", "conv1d-cnn")
HEADER = ["model", "params dense → factored", "linear-like factored", "factored kinds", "left dense (params): why"]


def _reason(reason: str) -> str:
    """A reason with its layer-specific numbers dropped, so that equal reasons group."""
    if reason.startswith("tied to"):
        return "tied to the token embedding"
    if "is opt-in" in reason:
        return "embedding: opt-in (`include` it)"
    if reason.startswith("grouped conv"):
        return "grouped/depthwise conv"
    return reason.split(":")[0]


def row(name: str) -> list[str]:
    model = build(name)
    held = linear_like(model)
    report = compress_(model, RankRatio(0.25))
    factored = sum(layer.params_before for layer in report.layers if layer.reason is None)
    kinds = Counter(type(model.get_submodule(layer.name)).__name__ for layer in report.layers if layer.reason is None)
    dense: dict[str, int] = defaultdict(int)
    for layer in report.dense:
        dense[_reason(layer.reason)] += layer.params_before
    return [
        name,
        f"{report.model_params_before:,} → {report.model_params_after:,} "
        f"({report.model_params_before / report.model_params_after:.2f}×)",
        f"{100 * factored / sum(held.values()):.1f}%",
        ", ".join(f"{kind.removeprefix('Factored')} ×{count}" for kind, count in sorted(kinds.items())),
        "; ".join(f"{why} ({params:,})" for why, params in sorted(dense.items())) or "none",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    args = parser.parse_args(argv)
    rows = [row(name) for name in (QUICK if args.quick else ZOO)]
    body = (
        "`compress_(model, RankRatio(0.25))` with defaults on each model of benchmarks/zoo.py "
        '(small configs, random weights). "linear-like factored" is the share of the parameters '
        "held by Linear, Conv1d, Conv2d (groups=1), HF Conv1D and attention projections that ended "
        "in factored layers; embeddings, norms, LSTMs and position tables are not linear-like and are "
        "not counted. Tied heads stay dense by design: factoring them would untie them.\n\n"
        + markdown_table(HEADER, rows, "lrrll")
    )
    title = "Third-party architectures: what compress_ factors"
    path = write_result("zoo_quick" if args.quick else "zoo", title, body, command("bench_zoo", argv))
    print(path.read_text())


if __name__ == "__main__":
    main()

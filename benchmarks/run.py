"""Run the benchmark suites: one command for every table in benchmarks/results/.

    python -m benchmarks.run --suite all            # everything: hours on 2 CPU cores (see below)
    python -m benchmarks.run --suite all --quick    # every benchmark's smoke run, minutes (CI runs this)
    python -m benchmarks.run --suite quality overheads

Each benchmark still runs on its own (`python -m benchmarks.bench_quality …`) with more options;
this runs them with their defaults, in order, each in this one process. Full-run durations
measured on the 2-core CPU VM: quality ~45 min, lmd ~60 min, recipes ~45 min, convergence and
parametrization ~15 min each, cost ~10 min, memory ~3 min, scaling ~5 min, the rest ~1 min.
"""

from __future__ import annotations

import argparse
import importlib
import time

from benchmarks.common import RESULTS

SUITES = {  # suite → benchmark modules, in the order they run
    "quality": ("bench_quality",),  # issue 6 item 1: accuracy vs params and latency against the baselines
    "cost": ("bench_training_cost",),  # item 2: wall time to accuracy, dense vs compress + fine-tune
    "overheads": ("bench_callback", "bench_overheads", "bench_svd"),  # item 3: ‖∇L‖, truncation, sweep, rebuild
    "memory": ("bench_memory",),  # item 4: peak RSS, parameter and optimizer-state bytes
    "scaling": ("bench_scaling", "bench_factored"),  # item 5: cost vs layer width
    "lmd": ("bench_lmd",),  # data metric, metric maps and regularizers
    "convergence": ("bench_convergence", "bench_trigger"),  # the ‖∇L‖ monitor's defaults; triggers vs the plateau
    "parametrization": ("bench_parametrization",),  # balanced vs svd factors
    "zoo": ("bench_zoo", "bench_attention", "bench_charlm"),  # third-party: coverage, attention speed, GPT-2 LM
    "allocation": ("bench_allocation",),  # one-shot: the loss metric's allocation against uniform rank
    "recipes": ("bench_recipes",),  # the recipes' expected results (lmd-train multiruns; no quick form)
}
NO_QUICK = {"bench_recipes"}


def run(suites: list[str], quick: bool) -> list[str]:
    """Run the suites' benchmarks; return the result files they wrote."""
    start = time.time()
    modules = [module for suite in suites for module in SUITES[suite]]
    for module in dict.fromkeys(modules):  # each once, in order
        if quick and module in NO_QUICK:
            print(f"== {module}: skipped, it has no --quick form", flush=True)
            continue
        print(f"== {module}{' --quick' if quick else ''}", flush=True)
        began = time.perf_counter()
        importlib.import_module(f"benchmarks.{module}").main(["--quick"] if quick else [])
        print(f"== {module} took {time.perf_counter() - began:.0f} s", flush=True)
    written = [path for path in RESULTS.rglob("*") if path.is_file() and path.stat().st_mtime >= start]
    return sorted(str(path.relative_to(RESULTS.parent)) for path in written)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--suite", nargs="+", default=["all"], choices=("all", *SUITES), help="which suites (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke run (what CI runs)")
    args = parser.parse_args(argv)
    suites = list(SUITES) if "all" in args.suite else args.suite
    written = run(suites, args.quick)
    print("\nwritten:\n" + "\n".join(f"  {path}" for path in written))
    return written


if __name__ == "__main__":
    main()

"""Scaling with layer width: truncation and factored-layer cost, time and memory, 512 … 8192.

    python -m benchmarks.bench_scaling [--quick] [--widths 512 1024 2048 4096 8192]

For a square n×n layer (float32, Gaussian weights) truncated to r = n/8, which keeps a quarter of
its parameters (r·2n / n²):

- truncation: `truncated_svd(W, r)` exact (LAPACK gesdd, O(n³)) and randomized (O(n²·r)), the
  median of 3 runs (1 at n ≥ 4096), and the extra peak RSS one more run needs above what was
  resident (VmHWM after a reset through /proc/self/clear_refs, minus RSS before; memory the
  allocator kept from earlier runs is resident already, so this is a lower bound);
- the layer: nn.Linear vs FactoredLinear (balanced) at batch 256, a training step (forward +
  backward, input gradient included) and an inference forward, median of 10 (5 at n ≥ 4096); the
  parameter bytes of each.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.bench_factored import BATCH, infer_step, train_step
from benchmarks.common import (
    command,
    device_args,
    markdown_table,
    mib,
    reset_peak_rss,
    rss,
    tensor_bytes,
    time_it,
    write_result,
)
from lmd_lightning import FactoredLinear
from lmd_lightning.layers.svd import truncated_svd

WIDTHS = (512, 1024, 2048, 4096, 8192)


def extra_peak(fn) -> int:
    """Bytes of RSS `fn()` needs above what was resident before it (0 where peaks cannot be reset)."""
    if not reset_peak_rss():
        return 0
    before = rss()
    fn()
    return max(0, rss("VmHWM") - before)


def row(n: int) -> dict:
    rank, big = n // 8, n >= 4096
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, n, generator=gen) / n**0.5
    result = {"n": n, "rank": rank}
    for method in ("exact", "randomized"):
        run = lambda: truncated_svd(weight, rank, method=method)  # noqa: E731
        result[f"svd_{method}"] = time_it(run, repeats=1 if big else 3, warmup=0 if big else 1)
        result[f"svd_{method}_mem"] = extra_peak(run)  # after the timed runs: one-time set-up excluded
    dense = nn.Linear(n, n)
    with torch.no_grad():
        dense.weight.copy_(weight)
    factored = FactoredLinear.from_linear(dense, rank)
    x = torch.randn(BATCH, n, generator=gen).requires_grad_(True)
    grad_out = torch.randn(BATCH, n, generator=gen)
    repeats = 5 if big else 10
    for name, layer in (("dense", dense), ("factored", factored)):
        result[f"train_{name}"] = time_it(lambda: train_step(layer, x, grad_out), repeats=repeats, warmup=2)
        result[f"infer_{name}"] = time_it(lambda: infer_step(layer, x.detach()), repeats=repeats, warmup=2)
        result[f"bytes_{name}"] = tensor_bytes(layer.parameters())
    print(result, flush=True)
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def tables(rows: list[dict]) -> str:
    def cells(r: dict, a: str, b: str) -> list[str]:  # a, b and how many times faster b is
        return [_ms(r[a]), _ms(r[b]), f"{r[a] / r[b]:.2f}×"]

    truncation = markdown_table(
        [
            "n (r = n/8)",
            "exact ms",
            "randomized ms",
            "exact / randomized",
            "exact extra peak MiB",
            "randomized extra peak MiB",
        ],
        [
            [
                f"{r['n']} ({r['rank']})",
                *cells(r, "svd_exact", "svd_randomized"),
                mib(r["svd_exact_mem"]),
                mib(r["svd_randomized_mem"]),
            ]
            for r in rows
        ],
        "lrrrrr",
    )
    layer = markdown_table(
        [
            "n (r = n/8)",
            "param MiB dense → factored",
            "train step ms dense",
            "factored",
            "speed-up",
            "inference ms dense",
            "factored",
            "speed-up",
        ],
        [
            [
                f"{r['n']} ({r['rank']})",
                f"{mib(r['bytes_dense'])} → {mib(r['bytes_factored'])}",
                *cells(r, "train_dense", "train_factored"),
                *cells(r, "infer_dense", "infer_factored"),
            ]
            for r in rows
        ],
        "lrrrrrrr",
    )
    growth = ""
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        scale = last["n"] / first["n"]
        grew = {key: last[key] / first[key] for key in ("svd_exact", "svd_randomized", "train_dense")}
        growth = (
            f"\n\nFrom n = {first['n']} to {last['n']} ({scale:.0f}× wider): exact truncation took "
            f"{grew['svd_exact']:.0f}× longer (n³ would be {scale**3:.0f}×), randomized {grew['svd_randomized']:.0f}× "
            f"(n²·r would be {scale**3:.0f}× too, since r = n/8), the dense training step "
            f"{grew['train_dense']:.0f}× (n² would be {scale**2:.0f}×)."
        )
    return f"## Truncation\n\n{truncation}\n\n## The layer, batch {BATCH}\n\n{layer}{growth}\n"


def main(argv: list[str] | None = None) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    known, rest = extra.parse_known_args(argv)
    args = device_args(__doc__.splitlines()[0], "widths 256 and 512", rest)
    widths = [256, 512] if args.quick else known.widths
    body = __doc__.split("\n\n", 2)[2] + "\n" + tables([row(n) for n in widths])
    path = write_result(
        "scaling_quick" if args.quick else "scaling", "Scaling with layer width", body, command("bench_scaling", argv)
    )
    print(path.read_text())


if __name__ == "__main__":
    main()

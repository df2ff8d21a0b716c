"""FactoredLinear vs nn.Linear: forward+backward (training) and forward-only (inference) time.

Run from the repository root:

    python -m benchmarks.bench_factored            # full sizes, writes results/factored_speed.md
    python -m benchmarks.bench_factored --quick    # seconds; CI smoke test, writes factored_speed_quick.md
    python -m benchmarks.bench_factored --device cuda
    python -m benchmarks.bench_factored --threads 1   # optional; the thread count is in the header

A dense (m out, n in) layer costs B·m·n MACs per matmul; the rank-r factored layer costs
B·r·(m+n). Training runs three matmuls per layer (forward, grad of the input, grad of the
weight) on both sides, so the theoretical speed-up is m·n / (r·(m+n)) for forward-only and
forward+backward alike. The input requires grad here (the layer sits inside a network), so the
backward pass computes the input gradient too and the MAC ratio holds exactly.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from benchmarks.common import device_args, markdown_table, time_it, write_result
from lmd_lightning import FactoredLinear

BATCH = 256
# (in_features, out_features, rank)
FULL_SHAPES = [(4096, 4096, 256), (1024, 1024, 128), (768, 3072, 192)]
QUICK_SHAPES = [(256, 256, 32), (128, 512, 16)]
# Shapes the issue sets the efficiency goal for.
GOAL_SHAPES = {(4096, 4096, 256), (768, 3072, 192)}
GOAL_EFFICIENCY = 0.9


def mac_ratio(in_features: int, out_features: int, rank: int) -> float:
    """Dense MACs over factored MACs: m·n / (r·(m+n))."""
    return in_features * out_features / (rank * (in_features + out_features))


def train_step(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """One forward and one backward: gradients of every parameter and of the input.

    torch.autograd.grad returns fresh gradients instead of accumulating into `.grad`, so no
    zeroing is needed between runs. The upstream gradient is a dense tensor, as it would be
    in a network (the gradient of out.sum() is a stride-0 broadcast of ones, which lets some
    kernels take shortcuts a real loss does not allow).
    """
    inputs = [x, *layer.parameters()]
    out = layer(x)
    return torch.autograd.grad(out, inputs, grad_outputs=grad_out)


def infer_step(layer: nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return layer(x)


def bench_shape(in_features: int, out_features: int, rank: int, device: str, repeats: int, warmup: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # nn.Linear's default init
    dense = nn.Linear(in_features, out_features, bias=True).to(device)
    balanced = FactoredLinear.from_linear(dense, rank)  # parametrization="balanced", the default
    svd = FactoredLinear.from_linear(dense, rank, parametrization="svd")
    assert balanced.parametrization == "balanced" and svd.parametrization == "svd"

    x = torch.randn(BATCH, in_features, generator=gen).to(device).requires_grad_(True)
    grad_out = torch.randn(BATCH, out_features, generator=gen).to(device)
    x_infer = x.detach()

    # Sanity: both parametrizations hold the same product, so their outputs agree.
    with torch.no_grad():
        ref = balanced(x_infer)
        gap = float((svd(x_infer) - ref).norm() / ref.norm())
    if gap > 1e-3:
        raise RuntimeError(f"balanced and svd FactoredLinear disagree (relative gap {gap:.2e})")

    row = {"in": in_features, "out": out_features, "rank": rank, "ratio": mac_ratio(in_features, out_features, rank)}
    for name, layer in (("dense", dense), ("balanced", balanced), ("svd", svd)):
        row[f"train_{name}"] = time_it(
            lambda: train_step(layer, x, grad_out), repeats=repeats, warmup=warmup, device=device
        )
        row[f"infer_{name}"] = time_it(
            lambda: infer_step(layer, x_infer), repeats=repeats, warmup=warmup, device=device
        )
    return row


TABLE_HEADER = [
    "shape (in×out)",
    "rank",
    "dense ms",
    "factored ms (balanced)",
    "factored ms (svd)",
    "speed-up (balanced)",
    "speed-up (svd)",
    "MAC ratio m·n/(r·(m+n))",
    "efficiency (balanced)",
    "efficiency (svd)",
]


def table_row(row: dict, kind: str) -> list[str]:
    dense, bal, svd = row[f"{kind}_dense"], row[f"{kind}_balanced"], row[f"{kind}_svd"]
    speed_bal, speed_svd, ratio = dense / bal, dense / svd, row["ratio"]
    return [
        f"{row['in']}×{row['out']}",
        str(row["rank"]),
        f"{dense * 1e3:.3f}",
        f"{bal * 1e3:.3f}",
        f"{svd * 1e3:.3f}",
        f"{speed_bal:.2f}×",
        f"{speed_svd:.2f}×",
        f"{ratio:.2f}×",
        f"{speed_bal / ratio:.2f}",
        f"{speed_svd / ratio:.2f}",
    ]


def table(rows: list[dict], kind: str) -> str:
    return markdown_table(TABLE_HEADER, [table_row(row, kind) for row in rows], "l" + "r" * 9)


def goal_verdict(rows: list[dict]) -> str:
    goal_rows = [r for r in rows if (r["in"], r["out"], r["rank"]) in GOAL_SHAPES]
    if not goal_rows:
        return (
            f"Goal (efficiency ≥ {GOAL_EFFICIENCY} for forward+backward at 4096×4096 r=256 and 768×3072 r=192): "
            "not evaluated (those shapes are not in this run)."
        )
    parts, met = [], True
    for r in goal_rows:
        eff = r["train_dense"] / r["train_balanced"] / r["ratio"]
        met &= eff >= GOAL_EFFICIENCY
        parts.append(f"{r['in']}×{r['out']} r={r['rank']}: {eff:.2f}")
    verdict = "MET" if met else "NOT MET"
    return (
        f"Goal (efficiency ≥ {GOAL_EFFICIENCY} for forward+backward, balanced parametrization, "
        f"at 4096×4096 r=256 and 768×3072 r=192): **{verdict}** ({'; '.join(parts)})."
    )


def main(argv: list[str] | None = None) -> None:
    args = device_args(__doc__.splitlines()[0], "tiny shapes and few repeats (smoke test)", argv)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    repeats, warmup = (3, 1) if args.quick else (15, 3)
    rows = [bench_shape(i, o, r, args.device, repeats, warmup) for i, o, r in shapes]

    notes = (
        f"float32, batch {BATCH}, bias on, median of {repeats} runs after {warmup} warm-up runs "
        f"(benchmarks.common.time_it). Factored layers built with `FactoredLinear.from_linear(linear, rank)` "
        f'(`parametrization="balanced"`, the default) and with `parametrization="svd"`.\n'
        "speed-up = dense ms / factored ms; efficiency = speed-up / MAC ratio (1.0 means the factored layer "
        "runs as fast as its MAC count allows)."
    )
    body = "\n\n".join(
        [
            notes,
            "## Forward + backward (training)\n\n"
            "One forward pass and `torch.autograd.grad` of the output (dense random upstream gradient) with "
            "respect to the input and every parameter.\n\n" + table(rows, "train"),
            goal_verdict(rows),
            "## Forward only (inference, `torch.inference_mode`)\n\n" + table(rows, "infer"),
        ]
    )
    name = "factored_speed" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    command = " ".join(["python -m benchmarks.bench_factored", *(argv if argv is not None else sys.argv[1:])])
    title = "FactoredLinear vs nn.Linear speed" + (" (quick smoke run)" if args.quick else "")
    path = write_result(name, title, body, command, device=args.device)
    print(path.read_text())
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""Exact vs randomized truncated SVD (`lmd_lightning.layers.svd.truncated_svd`): time and accuracy.

Run from the repository root:

    python -m benchmarks.bench_svd            # 4096×4096 at r=256, writes results/svd_speed.md
    python -m benchmarks.bench_svd --quick    # 512×512 at r=32, seconds; CI smoke test, svd_speed_quick.md
    python -m benchmarks.bench_svd --device cuda
    python -m benchmarks.bench_svd --threads 1   # optional; the thread count is in the header

Two test matrices, float32, fixed seeds:
- power law: W = Q1·diag(σ)·Q2ᵀ with σᵢ = i^-0.5 and Q1, Q2 orthogonal (QR of Gaussian matrices);
- Gaussian: i.i.d. N(0, 1/n) entries (flat spectrum, the hard case for randomized SVD).

The randomized factors' error is measured directly, ‖W − U·diag(s)·Vᵀ‖_F / ‖W‖_F in float64, and
compared with the Eckart–Young optimum √(Σ_{i>r} σᵢ²) / ‖W‖_F taken from the exact spectrum.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from benchmarks.common import device_args, markdown_table, time_it, write_result
from lmd_lightning.layers.svd import Factors, truncated_svd

SEED = 0
TIME_RATIO_GOAL = 10.0  # exact time / randomized time
GAP_GOAL = 0.01  # err_rand / err_opt − 1


def orthogonal(n: int, gen: torch.Generator) -> Tensor:
    """A random n×n orthogonal matrix: Q of the QR of a Gaussian matrix."""
    return torch.linalg.qr(torch.randn(n, n, generator=gen)).Q


def power_law_matrix(n: int, seed: int = SEED) -> Tensor:
    """Q1·diag(σ)·Q2ᵀ with σᵢ = i^-0.5 (i = 1…n), float32 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    q1, q2 = orthogonal(n, gen), orthogonal(n, gen)
    sigma = torch.arange(1, n + 1, dtype=torch.float32).pow(-0.5)
    return (q1 * sigma) @ q2.mT


def gaussian_matrix(n: int, seed: int = SEED) -> Tensor:
    """i.i.d. N(0, 1/n) entries, float32 on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=gen) / n**0.5


def relative_error(matrix: Tensor, factors: Factors) -> float:
    """‖W − U·diag(s)·Vᵀ‖_F / ‖W‖_F, in float64."""
    w = matrix.double()
    approx = (factors.U.double() * factors.s.double()) @ factors.V.double().mT
    return float(torch.linalg.matrix_norm(w - approx) / torch.linalg.matrix_norm(w))


def compare(matrix: Tensor, rank: int, device: str, exact_runs: tuple[int, int], rand_runs: tuple[int, int]) -> dict:
    """Time exact and randomized truncation of `matrix` and measure the randomized error.

    exact_runs and rand_runs are (repeats, warmup) for benchmarks.common.time_it.
    """
    matrix = matrix.to(device)
    last: dict[str, Factors] = {}

    def run(method: str) -> None:
        last[method] = truncated_svd(matrix, rank, method=method)

    t_exact = time_it(lambda: run("exact"), repeats=exact_runs[0], warmup=exact_runs[1], device=device)
    t_rand = time_it(lambda: run("randomized"), repeats=rand_runs[0], warmup=rand_runs[1], device=device)
    exact, rand = last["exact"], last["randomized"]
    auto = truncated_svd(matrix, rank)  # method="auto": record what it picks (untimed)

    norm = float(torch.linalg.matrix_norm(matrix.double()))
    err_opt = exact.error / norm  # Eckart–Young, √(Σ_{i>r} σᵢ²) from the exact spectrum
    err_rand = relative_error(matrix, rand)
    err_exact = relative_error(matrix, exact)  # sanity: the exact factors reach the optimum
    if abs(err_exact - err_opt) > 1e-4 * max(err_opt, 1e-12) + 1e-6:
        print(f"warning: exact factors' measured error {err_exact:.6g} differs from the optimum {err_opt:.6g}")
    return {
        "shape": tuple(matrix.shape),
        "rank": rank,
        "t_exact": t_exact,
        "t_rand": t_rand,
        "rand_method": rand.method,  # "exact" here means the randomized kernel did not converge and fell back
        "auto_method": auto.method,
        "err_opt": err_opt,
        "err_rand": err_rand,
        "gap": err_rand / err_opt - 1 if err_opt > 0 else 0.0,
    }


def fmt_time(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def randomized_cell(row: dict) -> str:
    cell = fmt_time(row["t_rand"])
    return cell if row["rand_method"] == "randomized" else cell + " (fell back to exact)"


MAIN_HEADER = [
    "matrix",
    "shape",
    "rank",
    "exact",
    "randomized",
    "time ratio (goal ≥ 10×)",
    "`auto` picks",
    "optimum rel. error (Eckart–Young)",
    "randomized rel. error (measured)",
    "relative gap (goal ≤ 1%)",
]
SCALING_HEADER = ["width", "rank", "exact", "randomized", "time ratio", "`auto` picks", "relative gap"]


def main_row(label: str, r: dict) -> list[str]:
    m, n = r["shape"]
    return [
        label,
        f"{m}×{n}",
        str(r["rank"]),
        fmt_time(r["t_exact"]),
        randomized_cell(r),
        f"{r['t_exact'] / r['t_rand']:.1f}×",
        r["auto_method"],
        f"{r['err_opt']:.6f}",
        f"{r['err_rand']:.6f}",
        f"{100 * r['gap']:.3f}%",
    ]


def scaling_row(r: dict) -> list[str]:
    return [
        str(r["shape"][0]),
        str(r["rank"]),
        fmt_time(r["t_exact"]),
        randomized_cell(r),
        f"{r['t_exact'] / r['t_rand']:.1f}×",
        r["auto_method"],
        f"{100 * r['gap']:.3f}%",
    ]


def main_table(rows: list[tuple[str, dict]]) -> str:
    return markdown_table(MAIN_HEADER, [main_row(label, r) for label, r in rows], "llrrrrlrrr")


def scaling_table(rows: list[dict]) -> str:
    return markdown_table(SCALING_HEADER, [scaling_row(r) for r in rows], "rrrrrlr")


def verdict(rows: list[tuple[str, dict]], quick: bool) -> str:
    lines = []
    for label, r in rows:
        ratio = r["t_exact"] / r["t_rand"]
        time_ok = ratio >= TIME_RATIO_GOAL
        gap_ok = r["gap"] <= GAP_GOAL and r["rand_method"] == "randomized"
        lines.append(
            f"- {label}: time ratio {ratio:.1f}× ({'met' if time_ok else 'NOT met'}, goal ≥ {TIME_RATIO_GOAL:.0f}×); "
            f"relative gap {100 * r['gap']:.3f}% ({'met' if gap_ok else 'NOT met'}, goal ≤ {100 * GAP_GOAL:.0f}%)"
        )
    head = "Goals" + (
        " (quick run at a small size: for information only, the goals are set for 4096×4096)" if quick else ""
    )
    return head + ":\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = device_args(__doc__.splitlines()[0], "512×512 at r=32 and tiny scaling widths (smoke test)", argv)
    device = args.device

    if args.quick:
        size, rank, widths = 512, 32, (128, 256)
        exact_runs, rand_runs, scale_runs = (3, 1), (3, 1), (3, 1)
    else:
        size, rank, widths = 4096, 256, (512, 1024, 2048)
        # An exact 4096² SVD takes tens of seconds on a small CPU: time it once, without warm-up.
        exact_runs = (1, 0) if device == "cpu" else (3, 1)
        rand_runs, scale_runs = (5, 1), (3, 1)

    main_rows = [
        ("power law σᵢ ∝ i^-0.5", compare(power_law_matrix(size), rank, device, exact_runs, rand_runs)),
        ("Gaussian", compare(gaussian_matrix(size), rank, device, exact_runs, rand_runs)),
    ]
    scale_rows = [compare(power_law_matrix(w), w // 16, device, scale_runs, scale_runs) for w in widths]

    def runs(r: tuple[int, int]) -> str:
        return f"median of {r[0]} run{'s' if r[0] > 1 else ''} after {r[1]} warm-up run{'s' if r[1] != 1 else ''}"

    notes = (
        f'float32, seed {SEED}. `truncated_svd(W, r, method="exact")` vs `method="randomized"` '
        f"(`benchmarks.common.time_it`). Exact: {runs(exact_runs)}"
        + (
            " (a single run with no warm-up: the exact SVD takes tens of seconds at this size on a CPU)"
            if exact_runs == (1, 0)
            else ""
        )
        + f'; randomized: {runs(rand_runs)}. `auto` picks is the `.method` of an untimed `method="auto"` call.\n'
        "Optimum rel. error = √(Σ_{i>r} σᵢ²)/‖W‖_F from the exact spectrum; randomized rel. error = "
        "‖W − U·diag(s)·Vᵀ‖_F/‖W‖_F measured directly in float64; relative gap = err_rand/err_opt − 1."
    )
    body = "\n\n".join(
        [
            notes,
            f"## {size}×{size} at rank {rank}\n\n" + main_table(main_rows),
            verdict(main_rows, args.quick),
            f"## Scaling (power-law matrices, square, rank = width/16, {runs(scale_runs)} for both)\n\n"
            + scaling_table(scale_rows),
        ]
    )
    name = "svd_speed" + ("_quick" if args.quick else "") + ("_cuda" if device == "cuda" else "")
    command = " ".join(["python -m benchmarks.bench_svd", *(argv if argv is not None else sys.argv[1:])])
    title = "Exact vs randomized truncated SVD" + (" (quick smoke run)" if args.quick else "")
    path = write_result(name, title, body, command, device=device)
    print(path.read_text())
    print(f"written to {path}")


if __name__ == "__main__":
    main()

"""Benchmarks in their --quick form: they run and write their tables (timings are never asserted)."""

from __future__ import annotations

import pytest

from benchmarks import bench_lmd, bench_training_cost
from benchmarks.common import RESULTS


@pytest.mark.slow
def test_training_cost_quick_writes_its_table() -> None:
    bench_training_cost.main(["--quick"])
    text = (RESULTS / "training_cost_quick.md").read_text()
    assert "torch " in text and "threads:" in text  # the machine header
    rows = [line for line in text.splitlines() if line.startswith("| dense") or line.startswith("| compress")]
    assert len(rows) == 2
    dense, compressed = (row.split("|")[2].strip().replace(",", "") for row in rows)
    assert int(compressed) < int(dense) == 7434  # 40→64→64→10: the compressed run really is smaller


@pytest.mark.slow
def test_lmd_quick_writes_its_table() -> None:
    bench_lmd.main(["--quick"])
    text = (RESULTS / "lmd_quick.md").read_text()
    assert "torch " in text and "threads:" in text
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in text.splitlines() if line.startswith("| ")}
    assert {"weight (Eckart–Young)", "data, independent", "data, sequential", "maps + laplacian λ=1 ✓"} <= set(rows)
    params = {name: int(cells[0].strip().replace(",", "")) for name, cells in rows.items() if name != "variant"}
    # the same GlobalBudget(params=0.2) for every variant: each ends near 20% of the 546k targeted parameters
    assert all(100_000 < count < 125_000 for count in params.values()), params

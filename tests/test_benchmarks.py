"""Benchmarks in their --quick form: they run and write their tables (timings are never asserted)."""

from __future__ import annotations

import pytest

from benchmarks import bench_training_cost
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

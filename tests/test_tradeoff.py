"""lmd-report's pieces: the Pareto front, run labels from Hydra's overrides, the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmd_lightning.cli.tradeoff import collect, main, markdown, over_seeds, pareto_front


def run(params: int, acc: float | None) -> dict:
    row = {"params": params, "params_before": 1000, "compression_ratio": 1000 / params, "monitor_before": 0.8}
    return row if acc is None else {**row, "val_acc": acc}


def test_pareto_front() -> None:
    rows = [run(100, 0.70), run(200, 0.75), run(300, 0.74), run(400, 0.75), run(500, 0.90), run(600, None)]
    assert pareto_front(rows, "val_acc") == [True, True, False, False, True, False]
    assert pareto_front(rows, "val_acc", mode="min") == [True, False, False, False, False, False]
    assert pareto_front([run(100, 0.7), run(100, 0.7)], "val_acc") == [True, True]  # ties dominate neither


def write_run(folder: Path, overrides: list[str], params: int, acc: float) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "results.json").write_text(json.dumps({**run(params, acc), "policy": "EnergyRank(energy=0.5)"}))


def test_collect_labels_runs_by_what_differs(tmp_path: Path) -> None:
    write_run(tmp_path / "0", ["compression.energy=0.9", "data=synthetic"], 300, 0.8)
    write_run(tmp_path / "1", ["compression.energy=0.5", "data=synthetic"], 100, 0.7)
    rows, shared = collect(tmp_path)
    assert [(r["run"], r["params"]) for r in rows] == [("compression.energy=0.5", 100), ("compression.energy=0.9", 300)]
    assert shared == ["data=synthetic"]
    table = markdown(rows, "val_acc", pareto_front(rows, "val_acc"))
    assert table.splitlines()[2].startswith("| compression.energy=0.5 | 1 | 100 | 10.00× | 0.8000")
    assert table.count("✓") == 2
    main([str(tmp_path)])
    assert (tmp_path / "report.md").read_text().startswith("Runs of `lmd-train data=synthetic` with:")
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_are_averaged_with_their_spread(tmp_path: Path) -> None:
    write_run(tmp_path / "0", ["compression.energy=0.5", "seed=0"], 100, 0.70)
    write_run(tmp_path / "1", ["compression.energy=0.5", "seed=1"], 102, 0.74)
    write_run(tmp_path / "2", ["compression.energy=0.9", "seed=0"], 300, 0.80)
    rows = over_seeds(collect(tmp_path)[0])
    assert [(r["run"], r["seeds"], r["params"]) for r in rows] == [
        ("compression.energy=0.5", 2, 101),
        ("compression.energy=0.9", 1, 300),
    ]
    assert rows[0]["val_acc"] == pytest.approx(0.72) and rows[0]["val_acc_std"] == pytest.approx(0.02 * 2**0.5)
    assert "val_acc_std" not in rows[1]
    assert "| 0.7200 ± 0.0283 |" in markdown(rows, "val_acc", pareto_front(rows, "val_acc"))


def test_errors_name_what_is_wrong(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="`DIR` must be a folder"):
        collect(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no results.json under"):
        collect(tmp_path)
    write_run(tmp_path / "0", [], 100, 0.7)
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main([str(tmp_path), "--monitor", "test_f1"])
    assert "`--monitor` 'test_f1' is in no run; the runs have: ['compression_ratio', 'monitor_before', 'val_acc']" in (
        capsys.readouterr().err
    )

"""The plain-PyTorch quick start on a short schedule, and the README/CI contract."""

from __future__ import annotations

import re
from pathlib import Path

from lmd_lightning.cli import quickstart

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_compresses_and_reports(capsys) -> None:
    results = quickstart.main(["--epochs", "3", "--finetune-epochs", "1", "--energy", "0.7"])
    out = capsys.readouterr().out
    assert "whole model" in out and "fine-tuned" in out
    assert set(results) == {f"{m}_{s}" for m in ("dense", "one-shot", "fine-tuned") for s in ("val", "test")}
    assert results["dense_val"] > 20.0  # 10 classes: chance is 10%
    ratio = float(re.search(r"([\d.]+)× fewer parameters", out).group(1))
    assert ratio > 1.5  # 3 epochs leave the spectrum flatter than the full 30


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)[0].splitlines()
    assert len(commands) == 2, "the README starts with exactly two commands"
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci
    lint = ci.index(".venv/bin/ruff check . && .venv/bin/ruff format --check .")
    assert lint < ci.index(commands[1]), "the linter runs before the tests"
    pin = re.search(r"ruff==[\d.]+", (ROOT / "pyproject.toml").read_text()).group()
    assert f"pip install {pin} &&" in ci, "CI lints with the ruff the dev extra pins"
    assert "torch==2.13.0" in commands[0] and "torch==2.13.0" in commands[1]
    assert commands[0].endswith(".venv/bin/lmd-train"), "the main command runs the default recipe"

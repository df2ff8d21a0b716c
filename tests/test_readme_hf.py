"""The README's Hugging Face walkthrough runs as it is written (config → compress_ → checkpoint → restore → export)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def walkthrough() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### A Hugging Face model, from config to an exported file", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_hugging_face_walkthrough_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compile(walkthrough(), "README.md (Hugging Face walkthrough)", "exec"), {})
    out = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn  Conv1D" in out  # GPT-2's projections are reached
    assert "`lm_head` shares the factors of `transformer.wte` (tied='joint')" in out
    assert "exported_program → gpt2_lmd.pt2: verified" in out
    assert (tmp_path / "gpt2_lmd.pt").exists() and (tmp_path / "gpt2_lmd.pt2").exists()

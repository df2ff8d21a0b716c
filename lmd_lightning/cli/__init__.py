"""The lmd-* commands and what they run: experiment wiring, export, lmd-report, the quick start.

The console scripts point at `lmd_lightning.cli:<command>`; the commands live in `commands.py` and
load (with Hydra) on first use, so `python -m lmd_lightning.cli.quickstart` imports no Hydra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["analyze", "export", "finetune", "report", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lmd_lightning.cli import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'lmd_lightning.cli' has no attribute {name!r}")

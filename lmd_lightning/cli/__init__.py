"""The lmd-* commands and what they run: experiment wiring, export, lmd-report, the quick start.

The console scripts point at `lmd_lightning.cli:<command>`; the commands live in `commands.py`.
"""

from lmd_lightning.cli.commands import analyze, export, finetune, report, train

__all__ = ["analyze", "export", "finetune", "report", "train"]

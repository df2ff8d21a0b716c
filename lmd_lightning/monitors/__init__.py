"""When to compress: framework-free monitors fed by the training loop. Torch only."""

from lmd_lightning.monitors.convergence import ConvergenceMonitor
from lmd_lightning.monitors.stable_rank import StableRankMonitor

__all__ = ["ConvergenceMonitor", "StableRankMonitor"]

"""LMD-specific mathematics: metric-map regularizers and the per-layer analysis. Torch only."""

from lmd_lightning.lmd.analysis import Analysis, analyze
from lmd_lightning.lmd.regularize import Regularizer

__all__ = ["Analysis", "Regularizer", "analyze"]

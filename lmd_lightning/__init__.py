"""lmd_lightning: training-time low-rank compression by Layer Matrix Decomposition.

Dense layers are truncated by SVD (Eckart–Young) once training has converged, swapped for
factored U·S·Vᵀ modules, and fine-tuned. The torch-only parts import no Lightning: the names
that need it (the callback and the checkpoint loaders) are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from lmd_lightning.layers import FactoredConv2d, FactoredLinear
from lmd_lightning.lmd import Regularizer
from lmd_lightning.monitors import ConvergenceMonitor, StableRankMonitor
from lmd_lightning.truncate import (
    CompressionReport,
    DataMetric,
    EffectiveRank,
    EnergyRank,
    ErrorBound,
    FixedRank,
    GlobalBudget,
    LayerReport,
    LossMetric,
    ModelCheckError,
    RankPolicy,
    RankRatio,
    StableRank,
    UniformRank,
    add_metric_maps_,
    compress_,
    fold_,
    restore_factored_,
)

__version__ = "0.1.0"

# Lightning-side names: imported when first asked for, so `from lmd_lightning import compress_` needs no Lightning.
_LAZY = {
    "Guard": "lmd_lightning.callback.guard",
    "LMDCheckpointMixin": "lmd_lightning.callback.checkpoint",
    "LMDCompression": "lmd_lightning.callback.lmd_compression",
    "load_compressed": "lmd_lightning.callback.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmd_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "CompressionReport",
    "ConvergenceMonitor",
    "DataMetric",
    "EffectiveRank",
    "EnergyRank",
    "ErrorBound",
    "FactoredConv2d",
    "FactoredLinear",
    "FixedRank",
    "GlobalBudget",
    "Guard",
    "LMDCheckpointMixin",
    "LMDCompression",
    "LayerReport",
    "LossMetric",
    "ModelCheckError",
    "RankPolicy",
    "RankRatio",
    "Regularizer",
    "StableRank",
    "UniformRank",
    "StableRankMonitor",
    "__version__",
    "add_metric_maps_",
    "compress_",
    "fold_",
    "load_compressed",
    "restore_factored_",
]

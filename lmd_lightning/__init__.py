"""lmd_lightning: training-time low-rank compression by Layer Matrix Decomposition.

Dense Linear and Conv2d layers are truncated by SVD (Eckart–Young) once training has
converged, swapped for factored U·S·Vᵀ modules, and fine-tuned.
"""

from lmd_lightning.calibration import DataMetric
from lmd_lightning.callback import LMDCompression
from lmd_lightning.checkpoint import LMDCheckpointMixin, load_compressed
from lmd_lightning.compress import compress_, restore_factored_
from lmd_lightning.convergence import ConvergenceMonitor
from lmd_lightning.factored import FactoredLinear
from lmd_lightning.factored_conv import FactoredConv2d
from lmd_lightning.maps import add_metric_maps_, fold_
from lmd_lightning.policies import (
    EffectiveRank,
    EnergyRank,
    ErrorBound,
    FixedRank,
    GlobalBudget,
    RankPolicy,
    RankRatio,
    StableRank,
)
from lmd_lightning.regularize import Regularizer
from lmd_lightning.report import CompressionReport, LayerReport
from lmd_lightning.stable_rank import StableRankMonitor

__version__ = "0.1.0"

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
    "LMDCheckpointMixin",
    "LMDCompression",
    "LayerReport",
    "RankPolicy",
    "RankRatio",
    "Regularizer",
    "StableRank",
    "StableRankMonitor",
    "__version__",
    "add_metric_maps_",
    "compress_",
    "fold_",
    "load_compressed",
    "restore_factored_",
]

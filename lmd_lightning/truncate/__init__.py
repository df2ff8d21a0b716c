"""Where and how much to cut: rank policies, target finding, `compress_` / `restore_factored_`, the
report, data-metric calibration, and metric maps on a whole model. Torch only; builds on `layers`.
"""

from lmd_lightning.truncate.budget import GlobalBudget, UniformRank
from lmd_lightning.truncate.calibration import DataMetric
from lmd_lightning.truncate.check import ModelCheckError
from lmd_lightning.truncate.compress import compress_
from lmd_lightning.truncate.loss_metric import LossMetric
from lmd_lightning.truncate.maps import add_metric_maps_, fold_
from lmd_lightning.truncate.policies import (
    EffectiveRank,
    EnergyRank,
    ErrorBound,
    FixedRank,
    RankPolicy,
    RankRatio,
    StableRank,
)
from lmd_lightning.truncate.report import CompressionReport, LayerReport
from lmd_lightning.truncate.restore import restore_factored_

__all__ = [
    "CompressionReport",
    "DataMetric",
    "LossMetric",
    "EffectiveRank",
    "EnergyRank",
    "ErrorBound",
    "FixedRank",
    "GlobalBudget",
    "LayerReport",
    "ModelCheckError",
    "RankPolicy",
    "RankRatio",
    "StableRank",
    "UniformRank",
    "add_metric_maps_",
    "compress_",
    "fold_",
    "restore_factored_",
]

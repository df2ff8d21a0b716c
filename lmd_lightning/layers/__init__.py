"""Factored modules, one per layer kind, and the SVD kernels they are built from. Torch only.

Imports nothing from the package's other subpackages (only `lmd_lightning.checks`).
"""

from lmd_lightning.layers.base import PARAMETRIZATIONS, FactoredModule
from lmd_lightning.layers.conv import FactoredConv2d
from lmd_lightning.layers.linear import FactoredLinear
from lmd_lightning.layers.svd import METHODS, Factors, SVDFailedError, singular_values, truncated_svd

__all__ = [
    "METHODS",
    "PARAMETRIZATIONS",
    "FactoredConv2d",
    "FactoredLinear",
    "FactoredModule",
    "Factors",
    "SVDFailedError",
    "singular_values",
    "truncated_svd",
]

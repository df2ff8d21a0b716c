"""Factored modules, one per layer kind, and the SVD kernels they are built from. Torch only.

Imports nothing from the package's other subpackages (only `lmd_lightning.checks`). Importing it
registers every layer kind (registry.py): Linear, Conv1d, Conv2d, Hugging Face Conv1D, Embedding,
and the split of nn.MultiheadAttention into separate projections.
"""

from lmd_lightning.layers.attention import FactoredMultiheadAttention
from lmd_lightning.layers.base import PARAMETRIZATIONS, FactoredModule
from lmd_lightning.layers.conv import FactoredConv1d, FactoredConv2d, FactoredConvNd
from lmd_lightning.layers.embedding import FactoredEmbedding
from lmd_lightning.layers.hf_conv1d import FactoredHFConv1D
from lmd_lightning.layers.linear import FactoredLinear
from lmd_lightning.layers.registry import KINDS, SPLITS, kind_of, register_kind, register_split
from lmd_lightning.layers.svd import METHODS, Factors, SVDFailedError, singular_values, truncated_svd

__all__ = [
    "KINDS",
    "METHODS",
    "PARAMETRIZATIONS",
    "SPLITS",
    "FactoredConv1d",
    "FactoredConv2d",
    "FactoredConvNd",
    "FactoredEmbedding",
    "FactoredHFConv1D",
    "FactoredLinear",
    "FactoredModule",
    "FactoredMultiheadAttention",
    "Factors",
    "SVDFailedError",
    "kind_of",
    "register_kind",
    "register_split",
    "singular_values",
    "truncated_svd",
]

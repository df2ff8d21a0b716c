"""FactoredHFConv1D: Hugging Face's `Conv1D` (GPT-2, OpenAI GPT, ImageGPT, ...) held as thin factors.

Despite its name, `transformers.pytorch_utils.Conv1D` is a linear layer whose weight is stored
transposed, as (in, out) = (nx, nf): y = x·W + b. The truncated matrix is the same (out, in)
map as nn.Linear's, so this kind is FactoredLinear with Conv1D's attribute names and weight
layout. Nothing here imports transformers: the kind is registered by name and only `to_dense`,
which builds a Conv1D again, imports it (it is loaded already when a model holds one).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from lmd_lightning.layers.base import FactoredModule, Parametrization, copy_requires_grad
from lmd_lightning.layers.linear import FactoredLinear
from lmd_lightning.layers.registry import register_kind

__all__ = ["HF_CONV1D", "FactoredHFConv1D"]

HF_CONV1D = "transformers.pytorch_utils.Conv1D"


@register_kind
class FactoredHFConv1D(FactoredLinear):
    """y = x·V·diag(s)·Uᵀ + b for a Hugging Face `Conv1D(nf, nx)`; `.weight` reads as (nx, nf)."""

    dense_name = HF_CONV1D

    def __init__(
        self,
        nf: int,
        nx: int,
        rank: int,
        bias: bool = True,
        parametrization: Parametrization = "balanced",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        metric_maps: bool = False,
    ) -> None:
        super().__init__(nx, nf, rank, bias, parametrization, device, dtype, metric_maps)
        self.nf, self.nx = nf, nx
        self.weight_shape = (nx, nf)  # Conv1D's layout

    @property
    def weight(self) -> Tensor:
        """Conv1D's (nx, nf) weight, built from the factors when read (see FactoredModule.weight)."""
        return self.dense_weight().mT

    @weight.setter
    def weight(self, value: Tensor) -> None:
        FactoredModule.weight.fset(self, value)

    @classmethod
    def dense_matrix(cls, dense: nn.Module) -> Tensor:
        return dense.weight.detach().mT  # (nf, nx) = (out, in)

    @classmethod
    def like(cls, module, rank, bias, parametrization, metric_maps=False) -> FactoredHFConv1D:
        like = module.U if isinstance(module, FactoredModule) else module.weight
        return cls(module.nf, module.nx, rank, bias, parametrization, like.device, like.dtype, metric_maps)

    def to_dense(self) -> nn.Module:
        """A transformers Conv1D computing the same map."""
        module_name, _, class_name = HF_CONV1D.rpartition(".")
        conv1d = getattr(importlib.import_module(module_name), class_name)
        dense = conv1d(self.nf, self.nx).to(device=self.U.device, dtype=self.U.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().mT)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
            else:
                dense.bias.zero_()
        copy_requires_grad(self, dense)
        return dense

    to_linear = FactoredLinear.to_dense  # an nn.Linear computing the same map

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._common_repr()}"

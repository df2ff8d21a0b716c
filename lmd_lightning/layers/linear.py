"""FactoredLinear: an nn.Linear held as thin factors, y = x·V·diag(s)·Uᵀ + b."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.layers.base import (
    FactoredModule,
    Parametrization,
    check_layer_type,
    copy_requires_grad,
    qualified_name,
)
from lmd_lightning.layers.registry import register_kind
from lmd_lightning.layers.svd import Factors

__all__ = ["FactoredLinear"]


@register_kind
class FactoredLinear(FactoredModule):
    """y = x·V·diag(s)·Uᵀ + b as two thin matmuls: (B, in) → (B, r) → (B, out)."""

    dense_name = qualified_name(nn.Linear)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        parametrization: Parametrization = "balanced",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        metric_maps: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_shape = (out_features, in_features)  # nn.Linear's
        self._init_parameters(out_features, in_features, rank, bias, parametrization, device, dtype, metric_maps)

    def forward(self, x: Tensor) -> Tensor:
        z = F.linear(x, self.V.mT)  # (..., r)
        return F.linear(z, self.scaled_U(), self.bias)  # (..., out)

    @classmethod
    def like(cls, module, rank, bias, parametrization, metric_maps=False) -> FactoredLinear:
        like = module.U if isinstance(module, FactoredModule) else module.weight
        return cls(
            module.in_features, module.out_features, rank, bias, parametrization, like.device, like.dtype, metric_maps
        )

    @classmethod
    def from_factors(
        cls, factors: Factors, bias: Tensor | None = None, parametrization: Parametrization = "balanced"
    ) -> FactoredLinear:
        """A layer holding `factors` (and a copy of `bias`), on their device and in their dtype."""
        (out_features, rank), in_features = factors.U.shape, factors.V.shape[0]
        layer = cls(
            in_features, out_features, rank, bias is not None, parametrization, factors.U.device, factors.U.dtype
        )
        return layer.filled_(factors, bias)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int, parametrization: Parametrization = "balanced", method: str = "auto"
    ) -> FactoredLinear:
        """The best rank-`rank` factored copy of `linear` (Eckart–Young), same device, dtype, requires_grad."""
        check_layer_type(linear, nn.Linear, "linear")
        return cls.from_dense(linear, rank, parametrization, method)

    def to_dense(self) -> nn.Linear:
        """A dense nn.Linear computing the same map (weight = U·diag(s)·Vᵀ)."""
        dense = nn.Linear(self.in_features, self.out_features, self.bias is not None, self.U.device, self.U.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        copy_requires_grad(self, dense)
        return dense

    to_linear = to_dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._common_repr()}"

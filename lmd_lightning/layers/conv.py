"""Factored convolutions: a k-wide conv into r channels, then a 1-wide conv into `out` channels.

The weight (out, in, *kernel) is read as the matrix (out, in·∏kernel) and truncated by SVD
(LMD.md section 2). Vᵀ, reshaped to (r, in, *kernel), is the first conv; U·diag(s) is the
pointwise second one. FactoredConv1d replaces nn.Conv1d, FactoredConv2d nn.Conv2d; both share
FactoredConvNd, which holds everything but the number of spatial dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmd_lightning.checks import check_choice
from lmd_lightning.layers.base import (
    FactoredModule,
    Parametrization,
    check_layer_type,
    check_rank,
    copy_requires_grad,
    qualified_name,
)
from lmd_lightning.layers.registry import register_kind
from lmd_lightning.layers.svd import Factors

__all__ = ["FactoredConv1d", "FactoredConv2d", "FactoredConvNd", "conv_matrix", "reversed_padding"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_matrix(weight: Tensor) -> Tensor:
    """(out, in, *kernel) → (out, in·∏kernel), the matrix that is truncated."""
    return weight.reshape(weight.shape[0], -1)


def reversed_padding(padding: str | tuple[int, ...], kernel_size, dilation) -> list[int]:
    """F.pad's (left, right) pairs, last spatial dimension first, for a non-zero padding mode."""
    if padding == "valid":
        return [0, 0] * len(kernel_size)
    if padding == "same":
        pads = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [p for p in reversed(padding) for _ in range(2)]


def _tuple(value: int | tuple[int, ...], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


class FactoredConvNd(FactoredModule):
    """y = conv₁(conv_k(x, Vᵀ), U·diag(s)) + b: (B, in, *S) → (B, r, *S') → (B, out, *S')."""

    dims: ClassVar[int]
    dense_type: ClassVar[type[nn.Module]]
    _conv: ClassVar[Callable[..., Tensor]]  # F.conv1d / F.conv2d: (x, weight, bias, stride, padding, dilation)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        rank: int,
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        parametrization: Parametrization = "balanced",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        metric_maps: bool = False,
    ) -> None:
        super().__init__()
        check_choice(padding_mode, "padding_mode", PADDING_MODES)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise ValueError(f"`padding` must be 'same', 'valid', an int or a tuple, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, self.dims)
        self.weight_shape = (out_channels, in_channels, *self.kernel_size)  # the dense conv's
        self.stride = _tuple(stride, self.dims)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, self.dims)
        self.dilation = _tuple(dilation, self.dims)
        self.padding_mode = padding_mode
        fan_in = in_channels * math.prod(self.kernel_size)
        self._init_parameters(out_channels, fan_in, rank, bias, parametrization, device, dtype, metric_maps)

    @classmethod
    def _padded(cls, module: nn.Module, x: Tensor) -> tuple[Tensor, str | tuple[int, ...] | int]:
        """The input padded as a non-zero padding mode pads it, and the padding left for the conv."""
        if module.padding_mode == "zeros":
            return x, module.padding
        pads = reversed_padding(module.padding, module.kernel_size, module.dilation)
        return F.pad(x, pads, mode=module.padding_mode), 0

    def forward(self, x: Tensor) -> Tensor:
        first = self.V.mT.reshape(self.rank, self.in_channels, *self.kernel_size)  # (r, in, *kernel)
        x, padding = self._padded(self, x)
        z = self._conv(x, first, None, self.stride, padding, self.dilation)  # (B, r, *S')
        second = self.scaled_U().reshape(self.out_channels, self.rank, *([1] * self.dims))  # (out, r, 1, …)
        return self._conv(z, second, self.bias, 1, 0, 1)  # (B, out, *S')

    @classmethod
    def like(cls, module, rank, bias, parametrization, metric_maps=False) -> FactoredConvNd:
        like = module.U if isinstance(module, FactoredModule) else module.weight
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            rank,
            module.stride,
            module.padding,
            module.dilation,
            bias,
            module.padding_mode,
            parametrization,
            like.device,
            like.dtype,
            metric_maps,
        )

    @classmethod
    def dense_skip_reason(cls, dense: nn.Module) -> str | None:
        if dense.groups != 1:
            return f"grouped conv (groups={dense.groups}) stays dense: its weight is not one (out, fan_in) matrix"
        return None

    def to_dense(self) -> nn.Module:
        """A dense conv computing the same map."""
        dense = self.dense_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.U.device,
            dtype=self.U.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().reshape_as(dense.weight))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        copy_requires_grad(self, dense)
        return dense

    # ---- calibration: patches as rows ----

    @classmethod
    def input_rows(cls, module: nn.Module, x: Tensor) -> Tensor:
        """The unfolded (in·∏kernel) patches the conv multiplies, one row per output position."""
        if x.dim() == cls.dims + 1:  # unbatched
            x = x.unsqueeze(0)
        x, padding = cls._padded(module, x)
        if cls.dims == 1:  # unfold is 2-D only: a 1-D conv is a (1, k) 2-D conv
            x, padding = x.unsqueeze(2), padding if isinstance(padding, str) else (0, *_tuple(padding, 1))
            kernel, dilation, stride = (1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if isinstance(padding, str):  # "same"/"valid" with zeros: pad explicitly, as the conv does
            x = F.pad(x, reversed_padding(padding, kernel, dilation))
            padding = 0
        patches = F.unfold(x, kernel, dilation, padding, stride)  # (B, in·∏kernel, L)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    @classmethod
    def output_rows(cls, module: nn.Module, y: Tensor) -> Tensor:
        if y.dim() == cls.dims + 1:
            y = y.unsqueeze(0)
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])  # rows in unfold's (b, position) order

    @classmethod
    def dense_forward(cls, module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
        bias = None if module.bias is None else module.bias.to(x.dtype)
        kernel = weight.to(x.dtype).reshape(weight.shape[0], module.in_channels, *module.kernel_size)
        x, padding = cls._padded(module, x)
        return cls._conv(x, kernel, bias, module.stride, padding, module.dilation)

    def extra_repr(self) -> str:
        geometry = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.dilation != (1,) * self.dims:
            geometry += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            geometry += f", padding_mode={self.padding_mode}"
        return f"{self.in_channels}, {self.out_channels}, {geometry}, {self._common_repr()}"


@register_kind
class FactoredConv1d(FactoredConvNd):
    """nn.Conv1d factored: a k-wide conv into r channels, then a 1-wide conv into `out` (audio, sequences)."""

    dims = 1
    dense_type = nn.Conv1d
    dense_name = qualified_name(nn.Conv1d)
    _conv = staticmethod(F.conv1d)


@register_kind
class FactoredConv2d(FactoredConvNd):
    """nn.Conv2d factored: a k×k conv into r channels, then a 1×1 conv into `out` channels."""

    dims = 2
    dense_type = nn.Conv2d
    dense_name = qualified_name(nn.Conv2d)
    _conv = staticmethod(F.conv2d)

    @classmethod
    def from_factors(
        cls,
        factors: Factors,
        like: nn.Conv2d | FactoredConv2d,
        bias: Tensor | None = None,
        parametrization: Parametrization = "balanced",
    ) -> FactoredConv2d:
        """A layer holding `factors`, with the geometry (kernel, stride, padding, …) of `like`."""
        return cls.like(like, factors.rank, bias is not None, parametrization).filled_(factors, bias)

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, rank: int, parametrization: Parametrization = "balanced", method: str = "auto"
    ) -> FactoredConv2d:
        """The best rank-`rank` factored copy of `conv`; grouped convs are refused."""
        check_layer_type(conv, nn.Conv2d, "conv")
        if conv.groups != 1:
            raise ValueError(f"`conv` has groups={conv.groups}; grouped and depthwise convs cannot be factored")
        check_rank(rank, *conv_matrix(conv.weight.detach()).shape)
        return cls.from_dense(conv, rank, parametrization, method)

    to_conv2d = FactoredConvNd.to_dense

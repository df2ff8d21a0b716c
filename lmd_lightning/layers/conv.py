"""FactoredConv2d: a k×k conv into r channels, then a 1×1 conv into `out` channels.

The weight (out, in, kh, kw) is read as the matrix (out, in·kh·kw) and truncated by SVD
(LMD.md section 2). Vᵀ, reshaped to (r, in, kh, kw), is the k×k conv; U·diag(s) is the 1×1 conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from lmd_lightning.checks import check_choice
from lmd_lightning.layers.base import FactoredModule, Parametrization, check_layer_type, check_rank, copy_requires_grad
from lmd_lightning.layers.svd import Factors, truncated_svd

__all__ = ["FactoredConv2d", "conv_matrix", "reversed_padding"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def conv_matrix(weight: Tensor) -> Tensor:
    """(out, in, kh, kw) → (out, in·kh·kw), the matrix that is truncated."""
    return weight.reshape(weight.shape[0], -1)


def reversed_padding(padding: str | tuple[int, int], kernel_size, dilation) -> list[int]:
    """F.pad's (left_w, right_w, top_h, bottom_h) for a non-zero padding mode."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        pads = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    return [padding[1], padding[1], padding[0], padding[0]]


class FactoredConv2d(FactoredModule):
    """y = conv1x1(conv_k×k(x, Vᵀ), U·diag(s)) + b: (B, in, H, W) → (B, r, H', W') → (B, out, H', W')."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
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
            raise ValueError(f"`padding` must be 'same', 'valid', an int or a pair, got {padding!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.weight_shape = (out_channels, in_channels, *self.kernel_size)  # nn.Conv2d's
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.padding_mode = padding_mode
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._init_parameters(out_channels, fan_in, rank, bias, parametrization, device, dtype, metric_maps)

    def forward(self, x: Tensor) -> Tensor:
        r, (kh, kw) = self.rank, self.kernel_size
        first = self.V.mT.reshape(r, self.in_channels, kh, kw)  # (r, in, kh, kw)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, reversed_padding(self.padding, self.kernel_size, self.dilation), mode=self.padding_mode)
            padding = 0
        z = F.conv2d(x, first, None, self.stride, padding, self.dilation)  # (B, r, H', W')
        second = self.scaled_U()[:, :, None, None]  # (out, r, 1, 1)
        return F.conv2d(z, second, self.bias)  # (B, out, H', W')

    @classmethod
    def from_factors(
        cls,
        factors: Factors,
        like: nn.Conv2d | FactoredConv2d,
        bias: Tensor | None = None,
        parametrization: Parametrization = "balanced",
    ) -> FactoredConv2d:
        """A layer holding `factors`, with the geometry (kernel, stride, padding, …) of `like`."""
        layer = cls(
            like.in_channels,
            like.out_channels,
            like.kernel_size,
            factors.rank,
            like.stride,
            like.padding,
            like.dilation,
            bias is not None,
            like.padding_mode,
            parametrization,
            factors.U.device,
            factors.U.dtype,
        )
        layer.load_factors_(factors)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_conv2d(
        cls, conv: nn.Conv2d, rank: int, parametrization: Parametrization = "balanced", method: str = "auto"
    ) -> FactoredConv2d:
        """The best rank-`rank` factored copy of `conv`; grouped convs are refused."""
        check_layer_type(conv, nn.Conv2d, "conv")
        if conv.groups != 1:
            raise ValueError(f"`conv` has groups={conv.groups}; grouped and depthwise convs cannot be factored")
        matrix = conv_matrix(conv.weight.detach())
        check_rank(rank, *matrix.shape)
        factors = truncated_svd(matrix, rank, method=method)
        bias = conv.bias.detach() if conv.bias is not None else None
        layer = cls.from_factors(factors, conv, bias, parametrization)
        copy_requires_grad(conv, layer)
        return layer

    def to_conv2d(self) -> nn.Conv2d:
        """A dense nn.Conv2d computing the same map."""
        kw = {"device": self.U.device, "dtype": self.U.dtype}
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            **kw,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight().reshape_as(dense.weight))
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        copy_requires_grad(self, dense)
        return dense

    def extra_repr(self) -> str:
        geometry = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.dilation != (1, 1):
            geometry += f", dilation={self.dilation}"
        if self.padding_mode != "zeros":
            geometry += f", padding_mode={self.padding_mode}"
        return f"{self.in_channels}, {self.out_channels}, {geometry}, {self._common_repr()}"

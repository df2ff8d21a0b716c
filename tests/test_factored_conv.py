from __future__ import annotations

import pytest
import torch
from torch import nn

from lmd_lightning import FactoredConv2d
from lmd_lightning.layers.conv import conv_matrix
from lmd_lightning.layers.svd import eckart_young_error

GEOMETRIES = [
    {"kernel_size": 3},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 5), "padding": (1, 2)},
    {"kernel_size": 3, "dilation": 2, "padding": 2},
    {"kernel_size": 3, "padding": "same"},
    {"kernel_size": (2, 4), "padding": "same", "dilation": (2, 1)},
    {"kernel_size": 3, "padding": "valid", "bias": False},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": (1, 2), "padding_mode": "circular"},
    {"kernel_size": (3, 2), "padding": "same", "padding_mode": "replicate"},
    {"kernel_size": 1},
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_full_rank_round_trip(geometry: dict, parametrization: str) -> None:
    conv = nn.Conv2d(4, 6, **geometry)
    full = min(6, 4 * conv.kernel_size[0] * conv.kernel_size[1])
    layer = FactoredConv2d.from_conv2d(conv, full, parametrization=parametrization)
    x = torch.randn(2, 4, 11, 9)
    expected = conv(x)
    got = layer(x)
    assert got.shape == expected.shape
    assert float((got - expected).detach().norm() / expected.detach().norm()) < 1e-5
    back = layer.to_conv2d()
    torch.testing.assert_close(back.weight, conv.weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back(x), expected, atol=1e-5, rtol=1e-4)
    assert (back.stride, back.padding, back.dilation, back.padding_mode) == (
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.padding_mode,
    )


def test_structure_is_kxk_into_rank_then_1x1() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1, dtype=torch.float64)
    layer = FactoredConv2d.from_conv2d(conv, 5)
    assert layer.rank == 5 and layer.V.shape == (8 * 9, 5) and layer.U.shape == (16, 5)
    error = float(torch.linalg.matrix_norm(layer.dense_weight().detach() - conv_matrix(conv.weight.detach())))
    s = torch.linalg.svdvals(conv_matrix(conv.weight.detach()))
    assert error == pytest.approx(eckart_young_error(s, 5), rel=1e-9)
    # Truncated, the factored conv equals the dense conv with the truncated weight.
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    dense_r = nn.Conv2d(8, 16, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        dense_r.weight.copy_(layer.dense_weight().reshape_as(conv.weight))
        dense_r.bias.copy_(conv.bias)
    torch.testing.assert_close(layer(x), dense_r(x))


def test_truncate_and_singular_values() -> None:
    layer = FactoredConv2d.from_conv2d(nn.Conv2d(3, 12, 3, dtype=torch.float64), 10)
    before = layer.dense_weight().detach()
    spectrum = torch.linalg.svdvals(before)
    torch.testing.assert_close(layer.singular_values(), spectrum[:10])
    layer.truncate_(3)
    assert layer.rank == 3
    error = float(torch.linalg.matrix_norm(layer.dense_weight().detach() - before))
    assert error == pytest.approx(eckart_young_error(spectrum, 3), rel=1e-9)
    assert layer(torch.randn(1, 3, 5, 5, dtype=torch.float64)).shape == (1, 12, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_requires_grad_and_gradients(dtype: torch.dtype) -> None:
    conv = nn.Conv2d(3, 8, 3, dtype=dtype)
    layer = FactoredConv2d.from_conv2d(conv, 4, parametrization="svd")
    assert {p.dtype for p in layer.parameters()} == {dtype}
    layer(torch.randn(2, 3, 6, 6, dtype=dtype)).float().square().sum().backward()
    assert all(p.grad is not None and float(p.grad.float().abs().sum()) > 0 for p in layer.parameters())


def test_grouped_conv_is_refused() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        FactoredConv2d.from_conv2d(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_repr_and_invalid_arguments() -> None:
    layer = FactoredConv2d.from_conv2d(nn.Conv2d(3, 8, 3, stride=2, padding_mode="reflect", padding=1), 4)
    assert "3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), padding_mode=reflect, rank=4" in repr(layer)
    with pytest.raises(ValueError, match="`padding_mode` must be one of"):
        FactoredConv2d(3, 8, 3, 2, padding_mode="mirror")
    with pytest.raises(ValueError, match="`padding` must be"):
        FactoredConv2d(3, 8, 3, 2, padding="full")
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[1, 8\]"):
        FactoredConv2d.from_conv2d(nn.Conv2d(3, 8, 3), 9)
    with pytest.raises(TypeError, match="`conv` must be"):
        FactoredConv2d.from_conv2d(nn.Linear(3, 3), 1)

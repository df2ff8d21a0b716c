from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lmd_lightning import FactoredConv2d, FactoredLinear, FixedRank, compress_
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.layers.svd import eckart_young_error
from tests.conftest import matrix_with_spectrum


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
@pytest.mark.parametrize(("in_f", "out_f"), [(7, 5), (5, 7), (16, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_round_trip(parametrization: str, in_f: int, out_f: int, bias: bool) -> None:
    dense = nn.Linear(in_f, out_f, bias=bias)
    layer = FactoredLinear.from_linear(dense, min(in_f, out_f), parametrization=parametrization)
    x = torch.randn(9, 3, in_f)
    assert _rel(layer(x), dense(x)) < 1e-5
    back = layer.to_linear()
    torch.testing.assert_close(back.weight, dense.weight, atol=1e-5, rtol=1e-5)
    assert (back.bias is None) == (not bias)
    assert type(back) is nn.Linear


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_truncation_is_eckart_young_and_spectrum_is_exact(parametrization: str) -> None:
    s = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    dense = nn.Linear(10, 8, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(matrix_with_spectrum(s, 8, 10))
    layer = FactoredLinear.from_linear(dense, 4, parametrization=parametrization)
    assert layer.rank == 4
    torch.testing.assert_close(layer.singular_values(), s[:4].double())
    error = float(torch.linalg.matrix_norm(layer.dense_weight() - dense.weight).detach())
    assert error == pytest.approx(eckart_young_error(s, 4), rel=1e-9)
    # Balanced holds U·√s and V·√s: both factors carry the same column norms.
    if parametrization == "balanced":
        torch.testing.assert_close(layer.U.norm(dim=0), layer.V.norm(dim=0))
        assert layer.s is None
    else:
        torch.testing.assert_close(layer.s.detach(), s[:4].double())


def test_singular_values_after_training_steps() -> None:
    layer = FactoredLinear.from_linear(nn.Linear(12, 9, dtype=torch.float64), 5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):
        layer(torch.randn(4, 12, dtype=torch.float64)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    expected = torch.linalg.svdvals(layer.dense_weight().detach())[:5]
    torch.testing.assert_close(layer.singular_values(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_truncate_in_place(parametrization: str) -> None:
    layer = FactoredLinear.from_linear(nn.Linear(20, 15), 10, parametrization=parametrization)
    before = layer.dense_weight().detach()
    spectrum = torch.linalg.svdvals(before)
    out = layer.truncate_(4)
    assert out is layer and layer.rank == 4
    assert layer.U.shape == (15, 4) and layer.V.shape == (20, 4)
    error = float(torch.linalg.matrix_norm(layer.dense_weight().detach() - before))
    assert error == pytest.approx(eckart_young_error(spectrum, 4), rel=1e-4)
    with pytest.raises(ValueError, match=r"`new_rank` must be an int in \[1, 4\]"):
        layer.truncate_(5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_device_and_requires_grad_preserved(dtype: torch.dtype) -> None:
    dense = nn.Linear(16, 12, dtype=dtype)
    dense.weight.requires_grad_(False)
    layer = FactoredLinear.from_linear(dense, 6)
    assert {p.dtype for p in layer.parameters()} == {dtype}
    assert {p.device for p in layer.parameters()} == {dense.weight.device}
    assert not layer.U.requires_grad and not layer.V.requires_grad and layer.bias.requires_grad
    assert layer.to_linear().weight.requires_grad is False
    assert layer(torch.randn(3, 16, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_gradients_reach_every_factor(parametrization: str) -> None:
    layer = FactoredLinear.from_linear(nn.Linear(8, 6), 3, parametrization=parametrization)
    layer(torch.randn(5, 8)).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    names = {name for name, _ in layer.named_parameters()}
    assert names == ({"U", "V", "bias"} | ({"s"} if parametrization == "svd" else set()))


class ShapeLog(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [
            tuple(t.shape) for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)
        ]
        return out


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_forward_uses_thin_matmuls_not_the_dense_weight(parametrization: str) -> None:
    """No tensor of the dense weight's shape (6, 8) is made: only (2, 3) and (2, 6) activations and r-wide factors."""
    layer = FactoredLinear.from_linear(nn.Linear(8, 6), 3, parametrization=parametrization)
    with ShapeLog() as log:
        y = layer(torch.randn(2, 8))
    assert y.shape == (2, 6) and (2, 3) in log.shapes and (2, 6) in log.shapes
    assert (6, 8) not in log.shapes and (8, 6) not in log.shapes, log.shapes
    with ShapeLog() as log:
        layer.dense_weight()  # the log does see a dense product when one is made
    assert (6, 8) in log.shapes


def test_constructor_init_has_linear_scale() -> None:
    layer = FactoredLinear(256, 256, 32)
    std = float(layer.dense_weight().std())
    assert std == pytest.approx((1 / (3 * 256)) ** 0.5, rel=0.1)


def test_extra_repr_and_state_dict_keys() -> None:
    layer = FactoredLinear.from_linear(nn.Linear(10, 4, bias=False), 2, parametrization="svd")
    assert "in_features=10, out_features=4, rank=2, bias=False, parametrization=svd" in repr(layer)
    assert set(layer.state_dict()) == {"U", "s", "V"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"`rank` must be an int in \[1, 4\]"),
        ({"rank": 5}, r"`rank` must be an int in \[1, 4\]"),
        ({"rank": 2.0}, r"`rank`"),
        ({"rank": 2, "parametrization": "lora"}, r"`parametrization` must be one of"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FactoredLinear.from_linear(nn.Linear(4, 6), **kwargs)
    with pytest.raises(ValueError, match=match):
        FactoredLinear(4, 6, **kwargs)


def test_from_linear_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="`linear` must be a torch.nn.modules.linear.Linear"):
        FactoredLinear.from_linear(nn.Conv2d(2, 2, 1), 1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_reads_the_dense_product_in_the_dense_layers_shape(kind: str) -> None:
    """`.weight` for outside readers: the dense layer's shape, dtype and device, the product's value, gradients."""
    torch.manual_seed(0)
    dense = nn.Linear(8, 6, dtype=torch.float64) if kind == "linear" else nn.Conv2d(3, 5, 3, dtype=torch.float64)
    layer = FactoredLinear.from_linear(dense, 3) if kind == "linear" else FactoredConv2d.from_conv2d(dense, 2)
    weight = layer.weight
    assert (weight.shape, weight.dtype, weight.device) == (dense.weight.shape, dense.weight.dtype, dense.weight.device)
    back = layer.to_linear() if kind == "linear" else layer.to_conv2d()
    torch.testing.assert_close(weight, back.weight)
    weight.sum().backward()  # read in someone's computation, it trains the factors
    assert layer.U.grad is not None and layer.V.grad is not None and float(layer.U.grad.abs().sum()) > 0
    with pytest.raises(AttributeError, match=r"\.weight is read-only: it is the product of the factors"):
        layer.weight = torch.zeros_like(weight)
    assert "weight" not in dict(layer.named_parameters()) and "weight" not in layer.state_dict()


def test_a_training_step_never_builds_a_dense_weight(monkeypatch) -> None:
    """Forward and backward of factored Linear and Conv2d layers: no dense product, no `.weight` read."""
    built = []
    original = FactoredModule.dense_weight
    monkeypatch.setattr(FactoredModule, "dense_weight", lambda self: built.append(self) or original(self))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    compress_(model, FixedRank(2))
    assert isinstance(model[0], FactoredConv2d) and isinstance(model[3], FactoredLinear)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ShapeLog() as log:
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert built == []
    assert (8, 3, 3, 3) not in log.shapes and (10, 288) not in log.shapes and (8, 27) not in log.shapes
    model[3].weight  # noqa: B018 - the counter does see a read
    assert built == [model[3]]

"""Metric maps I_dist / O_dist on factored layers, fold_, and checkpoints with and without them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmd_lightning import FactoredConv2d, FactoredLinear, FixedRank, compress_, restore_factored_
from lmd_lightning.truncate.maps import add_metric_maps_, fold_, metric_map_layers


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def trained_maps(layer, steps: int = 5, seed: int = 0):
    """Move every parameter, maps included, away from the canonical form with a few SGD steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    shape = (8, layer.in_features) if isinstance(layer, FactoredLinear) else (4, layer.in_channels, 7, 7)
    for _ in range(steps):
        x = torch.randn(*shape, generator=gen, dtype=layer.U.dtype)
        (layer(x).sin().mean() * layer.rank).backward()
        opt.step()
        opt.zero_grad()
    return layer


def make(kind: str, parametrization: str, dtype=torch.float32):
    torch.manual_seed(1)
    if kind == "linear":
        return FactoredLinear(20, 12, 6, parametrization=parametrization, metric_maps=True, dtype=dtype)
    return FactoredConv2d(3, 10, 3, 5, padding=1, parametrization=parametrization, metric_maps=True, dtype=dtype)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_maps_start_at_identity_and_leave_the_output_unchanged(kind, parametrization):
    torch.manual_seed(0)
    layer = make(kind, parametrization)
    assert layer.has_metric_maps
    torch.testing.assert_close(layer.I_dist.detach(), torch.eye(5 if kind == "conv" else 6))
    torch.testing.assert_close(layer.O_dist.detach(), torch.eye(5 if kind == "conv" else 6))
    plain = make(kind, parametrization)
    plain.I_dist = plain.O_dist = None
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "dist" not in k})
    x = torch.randn(4, 20) if kind == "linear" else torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), plain(x))


def test_forward_is_U_O_diag_s_I_Vt():
    torch.manual_seed(2)
    layer = FactoredLinear(9, 7, 4, parametrization="svd", metric_maps=True, dtype=torch.float64)
    with torch.no_grad():
        layer.I_dist.copy_(torch.randn(4, 4, dtype=torch.float64))
        layer.O_dist.copy_(torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(5, 9, dtype=torch.float64)
    W = layer.U @ layer.O_dist @ torch.diag(layer.s) @ layer.I_dist @ layer.V.mT
    torch.testing.assert_close(layer(x), x @ W.mT + layer.bias)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_fold_keeps_the_output_and_restores_the_canonical_form(kind, parametrization):
    layer = trained_maps(make(kind, parametrization))
    assert not torch.allclose(layer.I_dist, torch.eye(layer.rank), atol=1e-3)  # the maps did move
    assert not torch.allclose(layer.O_dist, torch.eye(layer.rank), atol=1e-3)  # both of them
    x = torch.randn(6, 20) if kind == "linear" else torch.randn(2, 3, 8, 8)
    before = layer(x).detach()
    layer.fold_()
    assert not layer.has_metric_maps and {"I_dist", "O_dist"}.isdisjoint(dict(layer.named_parameters()))
    assert _rel(layer(x), before) < 1e-5
    U, V = layer.U.detach().double(), layer.V.detach().double()
    if parametrization == "svd":
        s = layer.s.detach().double()
    else:  # balanced: U·√s, V·√s, so the column norms are √s on both sides
        s = U.norm(dim=0) ** 2
        torch.testing.assert_close(U.norm(dim=0), V.norm(dim=0), rtol=1e-5, atol=1e-6)
        U, V = U / s.sqrt(), V / s.sqrt()
    eye = torch.eye(layer.rank, dtype=torch.float64)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=1e-5)
    torch.testing.assert_close(V.mT @ V, eye, rtol=0, atol=1e-5)
    assert bool((s[:-1] >= s[1:]).all())


def test_fold_is_a_no_op_without_maps():
    layer = FactoredLinear(8, 6, 3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.fold_() is layer
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_truncating_a_layer_with_maps_keeps_the_product_and_resets_the_maps():
    layer = trained_maps(make("linear", "balanced", torch.float64))
    W = layer.dense_weight().detach()
    layer.truncate_(3)
    torch.testing.assert_close(layer.I_dist.detach(), torch.eye(3, dtype=torch.float64))
    expected = torch.linalg.svdvals(W)[:3]
    torch.testing.assert_close(layer.singular_values(), expected)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.conv, self.fc2 = nn.Linear(12, 16), nn.Conv2d(1, 6, 3, padding=1), nn.Linear(16 + 6 * 16, 5)

    def forward(self, x):
        conv = self.conv(x[:, :4].reshape(-1, 1, 2, 2).repeat(1, 1, 2, 2)).flatten(1)
        return self.fc2(torch.cat([torch.relu(self.fc1(x)), conv], 1))


def test_compress_with_metric_maps_and_model_level_fold():
    torch.manual_seed(3)
    model = Net()
    compress_(model, FixedRank(3), metric_maps=True)
    assert set(metric_map_layers(model)) == {"fc1", "conv", "fc2"}
    for layer in metric_map_layers(model).values():
        trained_maps(layer) if isinstance(layer, FactoredLinear) else None
        with torch.no_grad():
            layer.O_dist.add_(0.1 * torch.randn_like(layer.O_dist))
    x = torch.randn(5, 12)
    before = model(x).detach()
    assert fold_(model) == ["fc1", "conv", "fc2"]
    assert metric_map_layers(model) == {}
    assert _rel(model(x), before) < 1e-5


def test_add_metric_maps_errors_and_selection():
    model = Net()
    with pytest.raises(ValueError, match="found no factored layer: compress the model first"):
        add_metric_maps_(model)
    compress_(model, FixedRank(3), include=["fc1", "conv"])
    with pytest.raises(ValueError, match="metric maps need a factored layer, but `fc2` is a dense Linear"):
        add_metric_maps_(model, include="fc2")
    assert add_metric_maps_(model, exclude="conv") == ["fc1"]
    assert model.fc1.has_metric_maps and not model.conv.has_metric_maps
    with pytest.raises(TypeError, match="`metric_maps` must be a bool"):
        FactoredLinear(4, 4, 2, metric_maps="yes")
    with pytest.raises(TypeError, match="`metric_maps` must be a bool"):
        compress_(Net(), FixedRank(2), metric_maps=1)


@pytest.mark.parametrize("with_maps", [True, False])
def test_checkpoints_round_trip_through_restore_factored(with_maps):
    torch.manual_seed(4)
    model = Net()
    compress_(model, FixedRank(3), include=["fc1", "conv"], metric_maps=with_maps)
    for layer in metric_map_layers(model).values():
        with torch.no_grad():
            layer.I_dist.add_(0.2)
    state = model.state_dict()
    assert ("fc1.I_dist" in state) == with_maps
    fresh = Net()
    assert sorted(restore_factored_(fresh, state)) == ["conv", "fc1"]
    fresh.load_state_dict(state)  # strict
    assert fresh.fc1.has_metric_maps == with_maps and isinstance(fresh.fc2, nn.Linear)
    x = torch.randn(3, 12)
    torch.testing.assert_close(fresh(x), model(x))
    # a model that already has the other structure is rebuilt to the checkpoint's
    other = Net()
    compress_(other, FixedRank(3), include=["fc1", "conv"], metric_maps=not with_maps)
    restore_factored_(other, state)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), model(x))


def test_metric_maps_reach_factored_layers_left_at_their_rank():
    model = Net()
    compress_(model, FixedRank(3), include=["fc1", "conv"])
    report = compress_(model, FixedRank(5), metric_maps=True)  # fc1/conv stay at 3; fc2 at rank 5 would not save
    assert model.fc1.has_metric_maps and model.conv.has_metric_maps and isinstance(model.fc2, nn.Linear)
    assert model.fc1.rank == 3
    layers = {layer.name: layer for layer in report.layers}
    assert layers["fc1"].params_after == sum(p.numel() for p in model.fc1.parameters())  # maps counted

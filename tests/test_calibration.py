"""metric="data": truncation in the metric of each layer's calibration inputs (LMD.md section 5)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lmd_lightning import DataMetric, EnergyRank, FactoredConv2d, FactoredLinear, FixedRank, compress_
from lmd_lightning.truncate.calibration import layer_rows


def correlated_inputs(p: int, n: int, seed: int = 0) -> torch.Tensor:
    """p inputs in n dims with a strongly anisotropic covariance (as activations are)."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return torch.randn(p, n, generator=gen, dtype=torch.float64) @ mixing.mT


def single(layer: nn.Module) -> nn.Sequential:
    return nn.Sequential(layer)


def best_in_metric(W: torch.Tensor, X: torch.Tensor, rank: int, delta: float) -> torch.Tensor:
    """argmin over rank-r Ŵ of ‖(W − Ŵ)Xᵀ‖²/p + δ‖W − Ŵ‖², by a Cholesky route independent of the code's."""
    C = X.mT @ X / X.shape[0]
    C = C + delta * torch.eye(C.shape[0], dtype=C.dtype)
    L = torch.linalg.cholesky(C)  # C = L·Lᵀ
    U, s, Vh = torch.linalg.svd(W @ L)
    return (U[:, :rank] * s[:rank]) @ Vh[:rank] @ torch.linalg.inv(L)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((W - W_hat) @ X.mT))


def test_independent_equals_closed_form_optimum():
    torch.manual_seed(0)
    layer = nn.Linear(24, 16, dtype=torch.float64)
    X = correlated_inputs(400, 24)
    W = layer.weight.detach().clone()
    model = single(layer)
    damping = 0.01
    compress_(
        model,
        FixedRank(5),
        metric=DataMetric(batches=None, damping=damping, sequential=False),
        calibration=X.split(100),
    )
    delta = damping * float((X.mT @ X / 400).diagonal().mean())
    expected = best_in_metric(W, X, 5, delta)
    assert isinstance(model[0], FactoredLinear) and model[0].rank == 5
    torch.testing.assert_close(model[0].dense_weight().detach(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_never_worse_than_plain_truncation_on_calibration_outputs(seed, rank):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    X = correlated_inputs(300, 30, seed)
    data, plain = (single(nn.Linear(30, 20, dtype=torch.float64)) for _ in range(2))
    for model in (data, plain):
        model[0].weight.data.copy_(W)
    compress_(plain, FixedRank(rank))
    compress_(data, FixedRank(rank), metric=DataMetric(batches=None, damping=0.0, sequential=False), calibration=[X])
    data_error = output_error(W, data[0].dense_weight().detach(), X)
    plain_error = output_error(W, plain[0].dense_weight().detach(), X)
    assert data_error <= plain_error * (1 + 1e-9)
    assert data_error < plain_error  # and, on anisotropic inputs, strictly better


def layer_and_inputs(seed: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A float64 30→20 layer in a container, a copy of its weight, and 300 anisotropic inputs."""
    torch.manual_seed(seed)
    model = single(nn.Linear(30, 20, dtype=torch.float64))
    return model, model[0].weight.detach().clone(), correlated_inputs(300, 30, seed)


def test_report_error_is_the_relative_output_error_on_calibration_data():
    model, W, X = layer_and_inputs(1)
    report = compress_(model, FixedRank(6), metric=DataMetric(damping=0.0, sequential=False), calibration=[X])
    measured = output_error(W, model[0].dense_weight().detach(), X) / float(torch.linalg.matrix_norm(W @ X.mT))
    assert report.layers[0].relative_error == pytest.approx(measured, rel=1e-6)


def test_policies_see_the_spectrum_of_W_R():
    model, W, X = layer_and_inputs(2)
    report = compress_(model, EnergyRank(0.9), metric=DataMetric(damping=0.0, sequential=False), calibration=[X])
    C = X.mT @ X / 300
    expected = torch.linalg.svdvals(W @ torch.linalg.cholesky(C))
    torch.testing.assert_close(report.spectra["0"].double(), expected, rtol=1e-8, atol=1e-10)
    energy = expected.square().cumsum(0) / expected.square().sum()
    assert report.layers[0].rank == int((energy < 0.9).sum()) + 1


def test_rank_deficient_inputs_with_and_without_damping():
    torch.manual_seed(3)
    X = correlated_inputs(200, 6) @ torch.randn(6, 30, dtype=torch.float64)  # 30-dim inputs of rank 6
    for damping in (0.0, 0.01):
        layer = nn.Linear(30, 20, dtype=torch.float64)
        W = layer.weight.detach().clone()
        model = single(layer)
        compress_(model, FixedRank(4), metric=DataMetric(damping=damping, sequential=False), calibration=[X])
        W_hat = model[0].dense_weight().detach()
        assert torch.isfinite(W_hat).all()
        assert output_error(W, W_hat, X) < output_error(
            W, (lambda u, s, vh: (u[:, :4] * s[:4]) @ vh[:4])(*torch.linalg.svd(W)), X
        )


def test_conv_rows_reproduce_the_convolution():
    torch.manual_seed(4)
    for kwargs in ({"padding": 1}, {"stride": 2, "dilation": 2}, {"padding": "same", "padding_mode": "reflect"}):
        conv = nn.Conv2d(3, 8, 3, **kwargs)
        x = torch.randn(2, 3, 9, 9)
        rows = layer_rows(conv, x)  # (B·H'·W', in·k·k)
        y = conv(x)
        flat = rows @ conv.weight.reshape(8, -1).mT + conv.bias
        torch.testing.assert_close(flat.reshape(2, -1, 8).transpose(1, 2).reshape_as(y), y, rtol=1e-5, atol=1e-5)


def test_conv_data_metric_beats_plain_on_calibration_outputs():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 12, 3, padding=1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 1, 10, 10, generator=gen, dtype=torch.float64).expand(16, 4, 10, 10) * torch.tensor(
        [1.0, 0.5, 0.1, 0.05], dtype=torch.float64
    )[:, None, None] + 0.01 * torch.randn(16, 4, 10, 10, generator=gen, dtype=torch.float64)
    data, plain = single(conv), single(nn.Conv2d(4, 12, 3, padding=1, dtype=torch.float64))
    plain[0].load_state_dict(conv.state_dict())
    y = conv(x).detach()
    compress_(plain, FixedRank(3))
    compress_(data, FixedRank(3), metric=DataMetric(damping=0.0, sequential=False), calibration=[x])
    assert isinstance(data[0], FactoredConv2d)
    with torch.no_grad():
        data_error, plain_error = float((data(x) - y).norm()), float((plain(x) - y).norm())
    assert data_error < 0.9 * plain_error


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 24, dtype=torch.float64)
        self.fc2 = nn.Linear(24, 12, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def test_sequential_second_layer_is_fitted_to_dense_outputs_on_truncated_inputs():
    torch.manual_seed(6)
    model = TwoLayer()
    W1, W2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    X = correlated_inputs(500, 16, 6)
    dense_hidden = torch.tanh(model.fc1(X)).detach()
    compress_(model, FixedRank(4), metric=DataMetric(damping=0.0, sequential=True), calibration=X.split(250))
    # layer 1 sees the dense inputs: its sequential fit is the independent optimum
    torch.testing.assert_close(model.fc1.dense_weight().detach(), best_in_metric(W1, X, 4, 0.0), rtol=1e-7, atol=1e-9)
    # layer 2: argmin ‖W2·X_dᵀ − Ŵ·X̃ᵀ‖ over rank 4, with X̃ from the truncated layer 1
    X_tilde = torch.tanh(model.fc1(X)).detach()
    W_ls = torch.linalg.lstsq(X_tilde, dense_hidden @ W2.mT).solution.mT  # unconstrained least squares
    expected = best_in_metric(W_ls, X_tilde, 4, 0.0)
    torch.testing.assert_close(model.fc2.dense_weight().detach(), expected, rtol=1e-6, atol=1e-8)


def test_sequential_beats_independent_end_to_end_here():
    """A regression check on one fixed case, not a theorem: compensating layer 1's error helps layer 2."""
    X = correlated_inputs(500, 16, 7)
    errors = {}
    for sequential in (False, True):
        torch.manual_seed(7)
        model = TwoLayer()
        y = model(X).detach()
        compress_(model, FixedRank(3), metric=DataMetric(damping=0.0, sequential=sequential), calibration=[X])
        errors[sequential] = float((model(X) - y).norm())
    assert errors[True] < errors[False]


def test_already_factored_layers_shrink_in_the_data_metric():
    torch.manual_seed(8)
    model = TwoLayer()
    X = correlated_inputs(300, 16, 8)
    compress_(model, FixedRank(8))
    W = model.fc1.dense_weight().detach().clone()
    compress_(model, FixedRank(3), include="fc1", metric=DataMetric(damping=0.0, sequential=False), calibration=[X])
    assert model.fc1.rank == 3
    torch.testing.assert_close(model.fc1.dense_weight().detach(), best_in_metric(W, X, 3, 0.0), rtol=1e-6, atol=1e-8)


def test_batches_limits_the_calibration_passes():
    calls = []
    model = TwoLayer()
    compress_(
        model,
        FixedRank(3),
        metric=DataMetric(batches=2, sequential=False, forward=lambda m, batch: calls.append(1) or m(batch)),
        calibration=correlated_inputs(400, 16).split(50),
    )
    assert len(calls) == 2


def test_tuple_and_dict_batches():
    model, X = TwoLayer(), correlated_inputs(100, 16)
    compress_(model, FixedRank(3), metric="data", calibration=[(X, torch.zeros(100))])
    assert model.fc1.rank == 3

    class Keywords(TwoLayer):
        def forward(self, inputs):
            return super().forward(inputs)

    model = Keywords()
    compress_(model, FixedRank(3), metric="data", calibration=[{"inputs": X}])
    assert model.fc2.rank == 3


def test_modes_and_hooks_are_restored():
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 8)).double()
    model.train()
    model[1].eval()  # a submodule's own mode survives
    compress_(model, FixedRank(2), metric="data", calibration=[correlated_inputs(64, 16)])
    assert model.training and not model[1].training and model[2].training
    assert all(not m._forward_hooks for m in model.modules())


def test_layers_not_reached_by_calibration_stay_dense_with_a_reason():
    class Branchy(TwoLayer):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(16, 16, dtype=torch.float64)

    model = Branchy()
    report = compress_(model, FixedRank(3), metric="data", calibration=[correlated_inputs(64, 16)])
    assert isinstance(model.unused, nn.Linear)
    assert {layer.name: layer.reason for layer in report.layers}[
        "unused"
    ] == "received no input in the calibration passes"
    assert model.fc1.rank == 3


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"metric": "data"}, ValueError, "`metric='data'` needs `calibration`"),
        ({"metric": "activations", "calibration": []}, ValueError, r"`metric` must be one of \('weight', 'data'\)"),
        ({"calibration": [torch.zeros(2, 16)]}, ValueError, "`calibration` is only used with metric='data'"),
        ({"metric": "data", "calibration": []}, ValueError, "yielded no batch"),
        ({"metric": "data", "calibration": ["text"]}, TypeError, "cannot feed a calibration batch of type str"),
    ],
)
def test_misconfiguration(kwargs, error, match):
    model = TwoLayer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        compress_(model, FixedRank(3), **kwargs)
    assert isinstance(model.fc1, nn.Linear) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batches": 0}, "`batches` must be None or an int >= 1, got 0"),
        ({"damping": -1.0}, "`damping` must be a finite number >= 0, got -1.0"),
        ({"damping": float("nan")}, "`damping` must be a finite number >= 0"),
        ({"sequential": "yes"}, "`sequential` must be a bool"),
        ({"forward": 3}, "`forward` must be callable"),
    ],
)
def test_data_metric_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DataMetric(**kwargs)


def test_non_finite_calibration_inputs_refused_before_any_change():
    model = TwoLayer()
    X = correlated_inputs(64, 16)
    X[3, 2] = float("nan")
    with pytest.raises(ValueError, match="layer `fc1` received non-finite calibration inputs"):
        compress_(model, FixedRank(3), metric="data", calibration=[X])
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)


def test_forward_failure_mid_calibration_leaves_the_model_untouched():
    model = TwoLayer()
    seen = []

    def flaky(m, batch):
        seen.append(1)
        if len(seen) > 3:  # fails during the sequential passes, after the first layer was fitted
            raise RuntimeError("loader broke")
        return m(batch)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="loader broke"):
        compress_(model, FixedRank(3), metric=DataMetric(forward=flaky), calibration=[correlated_inputs(64, 16)])
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())


def test_float32_model_works_and_returns_float32_factors():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    X = correlated_inputs(128, 16).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compress_(model, FixedRank(4), metric="data", calibration=[X])
    assert model[0].U.dtype == torch.float32 and model[2].rank == 4
    assert torch.isfinite(model(X)).all()


def test_sequential_conv_stack_with_damping_beats_plain_end_to_end():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).double()
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(24, 1, 8, 8, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 0.3, 0.05], dtype=torch.float64
    )[:, None, None] + 0.02 * torch.randn(24, 3, 8, 8, generator=gen, dtype=torch.float64)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).double()
    plain.load_state_dict(model.state_dict())
    y = model(x).detach()
    compress_(plain, FixedRank(4))
    compress_(model, FixedRank(4), metric=DataMetric(damping=0.01), calibration=x.split(8))
    with torch.no_grad():
        assert float((model(x) - y).norm()) < 0.8 * float((plain(x) - y).norm())


def test_sequential_whitening_failure_leaves_that_layer_dense():
    """Dead inputs after the first truncation (all-zero) with damping 0: that layer stays dense, the rest goes on."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU output is 0
    X = correlated_inputs(64, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_(model, FixedRank(2), metric=DataMetric(damping=0.0), calibration=[X])
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert isinstance(model[0], FactoredLinear) and isinstance(model[2], nn.Linear)
    assert reasons["2"].startswith("calibration metric failed")


def test_a_random_forward_sees_the_same_draws_in_every_pass() -> None:
    """A step that draws noise: every pass draws the same, so the fit does not depend on the global random state."""

    def noisy(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch + 0.3 * torch.randn_like(batch))

    def fitted(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12))
        data = [torch.randn(64, 12) for _ in range(2)]
        torch.manual_seed(seed)  # whatever the global state, the calibration draws the same noise
        compress_(model, FixedRank(4), metric=DataMetric(forward=noisy), calibration=data)
        return model[2].dense_weight().detach()

    torch.testing.assert_close(fitted(1), fitted(2), rtol=0, atol=0)

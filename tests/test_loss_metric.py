"""metric=LossMetric(loss=fn): truncation in the loss's K-FAC metric (LMD.md section 5b)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmd_lightning import FixedRank, GlobalBudget, compress_
from lmd_lightning.truncate.loss_metric import LossMetric
from lmd_lightning.truncate.policies import LayerSpectrum


def sqrtm(C: torch.Tensor) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(C)
    return (Q * lam.clamp_min(0).sqrt()) @ Q.mT


def damped(C: torch.Tensor, damping: float) -> torch.Tensor:
    return C + damping * float(C.diagonal().mean()) * torch.eye(C.shape[0], dtype=C.dtype)


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    T = torch.randn(256, 6, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(10, 6, dtype=torch.float64))
    batches = [(X[i : i + 64], T[i : i + 64]) for i in range(0, 256, 64)]
    return model, batches, X, T


def mse(model: nn.Module, batch) -> torch.Tensor:
    x, t = batch
    return F.mse_loss(model(x), t)


def test_loss_metric_truncation_equals_the_closed_form() -> None:
    model, batches, X, T = regression()
    W = model[0].weight.detach().clone()
    # by hand: C_x over inputs, C_g over per-row output gradients of each batch's mean-reduced loss
    Cx = X.mT @ X / X.shape[0]
    Cg = torch.zeros(6, 6, dtype=torch.float64)
    for x, t in batches:
        y = model(x).detach().requires_grad_()
        (grad,) = torch.autograd.grad(F.mse_loss(y, t), y)
        rows = grad * x.shape[0]
        Cg += rows.mT @ rows
    Cg /= X.shape[0]
    Sx, Sg = sqrtm(damped(Cx, 0.01)), sqrtm(damped(Cg, 0.01))
    U, s, Vh = torch.linalg.svd(Sg @ W @ Sx)
    expected = torch.linalg.solve(Sg, (U[:, :3] * s[:3]) @ Vh[:3]) @ torch.linalg.inv(Sx)
    report = compress_(model, FixedRank(3), metric=LossMetric(loss=mse, batches=None), calibration=batches)
    torch.testing.assert_close(model[0].dense_weight().detach(), expected, rtol=1e-8, atol=1e-10)
    # the report's error is in the loss metric: ‖T − T_r‖ / ‖T‖ with T = C_g^{1/2}·W·C_x^{1/2}
    assert report.layers[0].relative_error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-6)


def test_at_a_fitted_layer_it_beats_plain_truncation_on_the_loss() -> None:
    """K-FAC models the loss near a minimum: on a least-squares fit with i.i.d. noise, its rank-2 layer fits better."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(512, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, 10, dtype=torch.float64)
    W_true = torch.randn(6, 10, generator=g, dtype=torch.float64)
    T = X @ W_true.mT + 0.1 * torch.randn(512, 6, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(10, 6, bias=False, dtype=torch.float64))
    with torch.no_grad():  # the least-squares fit: the loss's gradient is zero there
        model[0].weight.copy_(torch.linalg.lstsq(X, T).solution.mT)
    plain = nn.Sequential(nn.Linear(10, 6, bias=False, dtype=torch.float64))
    plain.load_state_dict(model.state_dict())
    batches = [(X[i : i + 128], T[i : i + 128]) for i in range(0, 512, 128)]
    compress_(model, FixedRank(2), metric=LossMetric(loss=mse, batches=None), calibration=batches)
    compress_(plain, FixedRank(2))
    with torch.no_grad():
        assert float(F.mse_loss(model(X), T)) < 0.8 * float(F.mse_loss(plain(X), T))


def test_global_budget_spends_comparable_loss_costs_across_layers() -> None:
    """In the loss's metric a layer whose components cost little loss is cut more; relative errors would cut alike."""
    s = torch.linspace(1.0, 0.1, 32, dtype=torch.float64)

    def layers(comparable: bool) -> list[LayerSpectrum]:
        return [
            LayerSpectrum("cheap", (32, 32), s, 32, 64, 32 * 32, comparable=comparable),
            LayerSpectrum("costly", (32, 32), 10 * s, 32, 64, 32 * 32, comparable=comparable),
        ]

    relative = GlobalBudget(params=0.25).choose(layers(False))
    loss = GlobalBudget(params=0.25).choose(layers(True))
    assert relative[0] == relative[1]  # the same relative spectrum: the same rank
    assert loss[0] < loss[1] and sum(loss) <= sum(relative) + 1  # the cheap layer gives more


def test_the_calibration_leaves_gradients_modes_and_embeddings_alone() -> None:
    model = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(24, 4))
    model.train()
    model[2].weight.grad = torch.ones(4, 24)
    batches = [(torch.randint(0, 20, (8, 3)), torch.randint(0, 4, (8,))) for _ in range(2)]

    def ce(m: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    report = compress_(model, FixedRank(2), include=["0", "2"], metric=LossMetric(loss=ce), calibration=batches)
    reasons = {layer.name: layer.reason for layer in report.layers}
    assert reasons["0"] == "LossMetric does not apply to Embedding: its inputs are indices, not features"
    assert model.training and model[2].rank == 2


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match=r"LossMetric `loss` must be callable as loss\(model, batch\)"):
        LossMetric(loss=3)
    with pytest.raises(ValueError, match=r"LossMetric `damping` must be"):
        LossMetric(loss=mse, damping=-1.0)
    with pytest.raises(ValueError, match=r"`metric=LossMetric\(\.\.\.\)` needs `calibration`"):
        compress_(nn.Sequential(nn.Linear(4, 4)), FixedRank(2), metric=LossMetric(loss=mse))

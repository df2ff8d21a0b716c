"""metric=LossMetric(loss=fn): truncation in the loss's K-FAC metric (LMD.md section 5b)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lmd_lightning import FixedRank, GlobalBudget, LMDCompression, compress_
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
    with pytest.raises(ValueError, match=r"LossMetric `max_dim` must be"):
        LossMetric(loss=mse, max_dim=0)
    with pytest.raises(ValueError, match=r"`metric=LossMetric\(loss=None\)`: compress_ needs the loss"):
        compress_(nn.Sequential(nn.Linear(4, 4)), FixedRank(2), metric=LossMetric(), calibration=[torch.ones(2, 4)])


def by_hand(W: torch.Tensor, Cx: torch.Tensor, Cg: torch.Tensor, rank: int, damping: float = 0.01) -> torch.Tensor:
    """Ŵ = C_g^{-1/2}·(C_g^{1/2}·W·C_x^{1/2})_r·C_x^{-1/2}, every C damped by a share of its mean diagonal."""
    Sx = sqrtm(damped(Cx, damping)) if Cx.dim() == 2 else torch.diag((Cx + damping * Cx.mean()).sqrt())
    Sg = sqrtm(damped(Cg, damping)) if Cg.dim() == 2 else torch.diag((Cg + damping * Cg.mean()).sqrt())
    U, s, Vh = torch.linalg.svd(Sg @ W @ Sx)
    return torch.linalg.solve(Sg, (U[:, :rank] * s[:rank]) @ Vh[:rank]) @ torch.linalg.inv(Sx)


def test_a_conv_is_measured_on_its_unfolded_inputs_per_sample() -> None:
    """A Conv1d: C_x over its (in·k) patches, C_g = N·Σ_positions g·gᵀ per batch of N samples (K-FAC's sum)."""
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv1d(3, 5, kernel_size=3, padding=1, dtype=torch.float64)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(5 * 12, 4, dtype=torch.float64))
    batches = [
        (torch.randn(16, 3, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
        for _ in range(3)
    ]
    W = conv.weight.detach().reshape(5, 9).clone()
    Cx, rows, Cg = torch.zeros(9, 9, dtype=torch.float64), 0, torch.zeros(5, 5, dtype=torch.float64)
    for x, t in batches:
        patches = F.unfold(x[..., None], (3, 1), padding=(1, 0)).mT.reshape(-1, 9)  # (N·positions, in·k)
        Cx += patches.mT @ patches
        rows += patches.shape[0]
        y = conv(x).detach().requires_grad_()
        (grad,) = torch.autograd.grad(F.cross_entropy(model[2](model[1](y)), t), y)
        per_position = grad.transpose(1, 2).reshape(-1, 5)
        Cg += x.shape[0] * per_position.mT @ per_position
    expected = by_hand(W, Cx / rows, Cg / len(batches), 2)

    def ce(m: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    compress_(model, FixedRank(2), include="0", metric=LossMetric(loss=ce, batches=None), calibration=batches)
    torch.testing.assert_close(model[0].dense_weight().detach().reshape(5, 9), expected, rtol=1e-7, atol=1e-9)


def test_a_side_wider_than_max_dim_keeps_only_its_diagonal() -> None:
    model, batches, X, T = regression(3)
    W = model[0].weight.detach().clone()
    Cg = torch.zeros(6, 6, dtype=torch.float64)
    for x, t in batches:
        y = model(x).detach().requires_grad_()
        (grad,) = torch.autograd.grad(F.mse_loss(y, t), y)
        Cg += x.shape[0] * grad.mT @ grad
    Cx = X.square().mean(0)  # fan_in 10 > max_dim 8: the diagonal of C_x; out 6: the full C_g
    expected = by_hand(W, Cx, Cg / len(batches), 2)
    compress_(model, FixedRank(2), metric=LossMetric(loss=mse, batches=None, max_dim=8), calibration=batches)
    torch.testing.assert_close(model[0].dense_weight().detach(), expected, rtol=1e-8, atol=1e-10)
    full = regression(3)[0]
    compress_(full, FixedRank(2), metric=LossMetric(loss=mse, batches=None), calibration=batches)
    assert not torch.allclose(full[0].dense_weight(), model[0].dense_weight(), atol=1e-4)  # the diagonal differs


def test_the_callback_default_truncates_in_the_loss_of_its_training_step() -> None:
    """The callback's default metric="loss": compress_'s factors with the step's loss on the first 8 batches."""
    from tests.lightning_models import LitMLP, loaders, trainer
    from tests.test_callback import StateAt

    pl.seed_everything(0, verbose=False)
    before, after = StateAt(2), StateAt(2)
    lmd = LMDCompression(FixedRank(6), trigger="epoch", min_epochs=2, exclude="net.4")
    train, val = loaders()
    trainer(3, [before, lmd, after]).fit(LitMLP(max_epochs=3), train, val)
    assert lmd.data_metric == LossMetric()
    dense = LitMLP()
    dense.load_state_dict(before.state)
    settings = LossMetric(loss=lambda m, batch: F.cross_entropy(m(batch[0]), batch[1]))
    compress_(dense, FixedRank(6), exclude="net.4", metric=settings, calibration=train)
    for key in ("net.0.U", "net.0.V", "net.2.U", "net.2.V"):
        torch.testing.assert_close(after.state[key], dense.state_dict()[key], rtol=1e-5, atol=1e-6)
    plain = LitMLP()
    plain.load_state_dict(before.state)
    compress_(plain, FixedRank(6), exclude="net.4")
    assert not torch.allclose(plain.net[2].dense_weight(), dense.net[2].dense_weight(), atol=1e-3)  # not Eckart–Young


def test_a_training_step_without_a_loss_leaves_the_model_dense_and_says_why() -> None:
    from tests.lightning_models import LitMLP, loaders, trainer

    class NoLoss(LitMLP):
        def training_step(self, batch, batch_idx):
            if not self.training:  # calibration runs the step in eval mode
                return None
            return {"logits": self(batch[0]), "loss": F.cross_entropy(self(batch[0]), batch[1])}

    lmd = LMDCompression(FixedRank(6), trigger="epoch", min_epochs=1, exclude="net.4")
    train, val = loaders()
    with pytest.warns(UserWarning, match="compression failed"):
        trainer(2, [lmd]).fit(NoLoss(max_epochs=2), train, val)
    assert not lmd.compressed and "metric='loss' needs `training_step` to return the loss" in lmd.failure
    assert "got NoneType" in lmd.failure


def test_the_guards_trials_share_one_calibration_run() -> None:
    """The sweep and the guard's search undo every trial: the loss moments are measured once, not once a trial."""
    from lmd_lightning import EnergyRank, Guard
    from tests.lightning_models import LitMLP, loaders, trainer

    class Counting(LitMLP):
        calibration_steps = 0

        def training_step(self, batch, batch_idx):
            if not self.training:  # calibration runs the step in eval mode
                type(self).calibration_steps += 1
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    lmd = LMDCompression(
        EnergyRank(0.9),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        monitor="val_acc",
        guard=Guard(max_drop=0.05, batches=1, search_steps=2, sweep_points=3),
    )
    train, val = loaders()
    trainer(2, [lmd]).fit(Counting(max_epochs=2), train, val)
    assert lmd.compressed and len(lmd.guard_record.trials) + len(lmd.sweep) >= 5
    assert Counting.calibration_steps == 8  # LossMetric's 8 batches, once

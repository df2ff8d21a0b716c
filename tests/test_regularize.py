"""LMD-guided regularization of the metric maps: formulas, gradients, and the callback's application."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lmd_lightning import FactoredConv2d, FactoredLinear, FixedRank, Guard, LMDCompression, Regularizer
from lmd_lightning.lmd.regularize import identity_penalty, knn_graph, laplacian_penalty, smoothness
from tests.lightning_models import LitMLP, loaders, trainer


def two_clusters(p: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in two far-apart clusters, and which cluster each is in."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(p) % 2
    points = torch.randn(p, 3, generator=gen, dtype=torch.float64) * 0.1 + 10.0 * labels[:, None]
    return points, labels


def test_knn_graph_is_symmetric_without_self_loops_and_splits_far_clusters():
    points, labels = two_clusters()
    A = knn_graph(points, 3)
    assert torch.equal(A, A.mT) and float(A.diagonal().abs().sum()) == 0.0
    assert bool((A.sum(1) >= 3).all())
    assert float(A[labels[:, None] != labels[None, :]].sum()) == 0.0  # no edge between the clusters


def test_laplacian_term_is_zero_for_codes_constant_on_components_and_positive_otherwise():
    points, labels = two_clusters()
    A = knn_graph(points, 3)
    constant_per_cluster = torch.stack([labels.double() * 2.0 - 1.0, 3.0 + 0 * labels.double()], 1)  # (p, 2)
    assert float(smoothness(constant_per_cluster, A)) == pytest.approx(0.0, abs=1e-12)
    varying = constant_per_cluster + torch.linspace(0, 1, 20, dtype=torch.float64)[:, None]
    value = float(smoothness(varying, A))
    assert 0.0 < value <= 2.0
    # scale invariant, and equal to ½Σ Aᵢⱼ‖zᵢ − zⱼ‖² / Σ dᵢ‖zᵢ‖² computed directly
    assert float(smoothness(7.0 * varying, A)) == pytest.approx(value, rel=1e-12)
    diffs = (varying[:, None, :] - varying[None, :, :]).square().sum(-1)
    direct = 0.5 * float((A * diffs).sum()) / float((A.sum(1) * varying.square().sum(1)).sum())
    assert value == pytest.approx(direct, rel=1e-12)


def layer_with_moved_maps(kind: str = "linear", parametrization: str = "svd") -> FactoredLinear | FactoredConv2d:
    torch.manual_seed(0)
    if kind == "linear":
        layer = FactoredLinear(6, 5, 3, parametrization=parametrization, metric_maps=True, dtype=torch.float64)
    else:
        layer = FactoredConv2d(
            2, 5, 3, 3, padding=1, parametrization=parametrization, metric_maps=True, dtype=torch.float64
        )
    with torch.no_grad():
        layer.I_dist.add_(0.3 * torch.randn(3, 3, dtype=torch.float64))
        layer.O_dist.add_(0.3 * torch.randn(3, 3, dtype=torch.float64))
    return layer


def grads_of(value: torch.Tensor, layer: nn.Module) -> dict[str, bool]:
    value.backward()
    return {name: p.grad is not None and bool(p.grad.abs().sum() > 0) for name, p in layer.named_parameters()}


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_identity_penalty_value_and_gradients(parametrization):
    layer = layer_with_moved_maps(parametrization=parametrization)
    eye = torch.eye(3, dtype=torch.float64)
    expected = float((layer.I_dist - eye).square().sum() + (layer.O_dist - eye).square().sum().detach())
    value = identity_penalty(layer)
    assert float(value) == pytest.approx(expected)
    reached = grads_of(value, layer)
    assert {name for name, hit in reached.items() if hit} == {"I_dist", "O_dist"}


@pytest.mark.parametrize("parametrization", ["balanced", "svd"])
def test_orthogonality_is_zero_at_the_canonical_form_and_reaches_U_and_V(parametrization):
    layer = FactoredLinear.from_linear(nn.Linear(6, 5, dtype=torch.float64), 3, parametrization=parametrization)
    layer.add_metric_maps_()
    assert float(identity_penalty(layer, orthogonality=True)) == pytest.approx(0.0, abs=1e-20)
    with torch.no_grad():
        layer.U.mul_(1.5)
    reached = grads_of(identity_penalty(layer, orthogonality=True), layer)
    assert reached["U"] and reached["V"] and not reached["bias"]


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_laplacian_penalty_gradients_reach_only_the_maps(kind):
    layer = layer_with_moved_maps(kind)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64) if kind == "conv" else torch.randn(30, 6, dtype=torch.float64)
    from lmd_lightning.truncate.calibration import layer_rows

    rows = layer_rows(layer, x)
    y = layer(x).detach()
    out_rows = y.flatten(2).transpose(1, 2).reshape(-1, 5) if kind == "conv" else y
    value = laplacian_penalty(layer, rows, out_rows, k=4)
    assert 0.0 < float(value) <= 4.0  # two quotients, each in [0, 2]
    reached = grads_of(value, layer)
    assert {name for name, hit in reached.items() if hit} == {"I_dist", "O_dist"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sparsity"}, r"`regularizer` must be one of \('identity', 'laplacian'\)"),
        ({"lmd_lambda": -0.1}, r"`lmd_lambda` must be a finite number >= 0, got -0.1"),
        ({"lmd_lambda": float("inf")}, r"`lmd_lambda` must be a finite number >= 0"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be an int >= 1, got 0"),
        ({"points": 2}, r"`points` must be an int >= 3, got 2"),
        ({"k": 200}, r"`k` \(200\) must be smaller than `points` \(128\)"),
        ({"kind": "laplacian", "orthogonality": True}, "orthogonality=True` goes with kind='identity' only"),
    ],
)
def test_regularizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Regularizer(**kwargs)


def test_callback_misconfiguration():
    with pytest.raises(
        ValueError, match=r"`regularizer`='laplacian' acts on the metric maps: it needs metric_maps=True"
    ):
        LMDCompression(FixedRank(4), regularizer="laplacian")
    with pytest.raises(
        ValueError, match=r"`regularizer` must be one of \('identity', 'laplacian'\), a Regularizer or None, got 'l2'"
    ):
        LMDCompression(FixedRank(4), metric_maps=True, regularizer="l2")
    with pytest.raises(ValueError, match="`lmd_lambda` must be a finite number >= 0, got -1"):
        LMDCompression(FixedRank(4), metric_maps=True, regularizer=Regularizer(lmd_lambda=-1))
    with pytest.raises(TypeError, match="`metric_maps` must be a bool, got 'yes'"):
        LMDCompression(FixedRank(4), metric_maps="yes")


class Snapshot(pl.Callback):
    """Every parameter after the last epoch, before the callback folds the maps (it runs first)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def fit_with(regularizer, accumulate: int = 1, fold_maps: bool = False, metric_maps: bool = True):
    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=3, optimizer="adamw", lr=3e-3)
    train, val = loaders()
    snap = Snapshot()
    lmd = LMDCompression(
        FixedRank(8),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        metric_maps=metric_maps,
        regularizer=regularizer,
        fold_maps=fold_maps,
    )
    t = trainer(3, [snap, lmd], accumulate_grad_batches=accumulate)
    t.fit(model, train, val)
    return model, snap.state, t, lmd


@pytest.mark.parametrize("kind", ["identity", "laplacian"])
def test_lambda_zero_trains_bit_identically_to_no_regularizer_and_still_logs(kind):
    _, plain, _, _ = fit_with(None)
    _, measured, t, _ = fit_with(Regularizer(kind=kind, lmd_lambda=0.0))
    assert plain.keys() == measured.keys() and "net.0.I_dist" in plain
    assert all(torch.equal(plain[k], measured[k]) for k in plain)
    assert f"lmd/reg/{kind}_epoch" in t.callback_metrics
    if kind == "laplacian":
        assert float(t.callback_metrics["lmd/reg/laplacian_epoch"]) > 0


def test_identity_prior_keeps_the_maps_near_identity_in_training():
    _, plain, _, _ = fit_with(None)
    _, strong, _, _ = fit_with(Regularizer(kind="identity", lmd_lambda=10.0))
    eye = torch.eye(8)
    # the identity prior keeps the maps much closer to 1 than unregularized fine-tuning does
    for key in ("net.0.I_dist", "net.2.O_dist"):
        assert float((strong[key] - eye).norm()) < 0.5 * float((plain[key] - eye).norm())


def test_gradient_accumulation_divides_the_penalty():
    """One accumulated step of 2 batches adds the same penalty gradient as one unaccumulated step."""
    from lmd_lightning.lmd.regularize import RegularizerRun

    layer = layer_with_moved_maps()
    run = RegularizerRun(Regularizer(kind="identity", lmd_lambda=1.0))
    layers = {"fc": layer}
    for _ in range(2):
        run.add_gradients(layers, scale=0.5, loss_scale=None, reduce=lambda g: g)
    accumulated = layer.I_dist.grad.clone()
    layer.I_dist.grad = None
    run.add_gradients(layers, scale=1.0, loss_scale=None, reduce=lambda g: g)
    torch.testing.assert_close(accumulated, layer.I_dist.grad)
    layer.I_dist.grad = None
    run.add_gradients(layers, scale=1.0, loss_scale=torch.tensor(1024.0, dtype=torch.float64), reduce=lambda g: g)
    torch.testing.assert_close(layer.I_dist.grad, 1024.0 * accumulated)


def test_maps_fold_at_the_end_of_training_unless_disabled():
    model, before_fold, _, _ = fit_with(Regularizer(kind="identity"), fold_maps=True)
    assert "net.0.I_dist" in before_fold and not model.net[0].has_metric_maps
    x = torch.randn(16, 32)
    reference = LitMLP()
    from lmd_lightning import restore_factored_

    restore_factored_(reference, before_fold)
    reference.load_state_dict(before_fold)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    kept, _, _, _ = fit_with(Regularizer(kind="identity"), fold_maps=False)
    assert kept.net[0].has_metric_maps


def test_accumulated_training_with_the_laplacian_runs_and_logs():
    _, state, t, lmd = fit_with(Regularizer(kind="laplacian", lmd_lambda=1.0, every_n_steps=2), accumulate=2)
    assert lmd.compressed and "net.0.I_dist" in state
    assert 0.0 < float(t.callback_metrics["lmd/reg/laplacian_epoch"]) <= 4.0


def test_bf16_mixed_with_data_metric_and_laplacian():
    """Calibration and penalty run under the trainer's bf16 autocast; moments stay float64, maps float32."""
    from lmd_lightning import DataMetric

    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=2, optimizer="adamw", lr=3e-3)
    train, val = loaders()
    lmd = LMDCompression(
        FixedRank(8),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        metric=DataMetric(batches=2),
        metric_maps=True,
        regularizer=Regularizer("laplacian", lmd_lambda=1.0, points=32, k=4),
        fold_maps=False,
    )
    t = trainer(2, [lmd], precision="bf16-mixed")
    t.fit(model, train, val)
    assert lmd.compressed and lmd.failure is None and model.net[0].rank == 8
    assert model.net[0].I_dist.dtype == torch.float32 and bool(torch.isfinite(model.net[0].I_dist).all())
    assert not torch.equal(model.net[0].I_dist.detach(), torch.eye(8))  # trained
    assert 0.0 < float(t.callback_metrics["lmd/reg/laplacian_epoch"]) <= 4.0


def test_callback_passes_accumulation_and_no_loss_scale_to_the_penalty(monkeypatch):
    from lmd_lightning.lmd.regularize import RegularizerRun

    seen = []
    original = RegularizerRun.add_gradients

    def spy(self, layers, scale, loss_scale, reduce):
        seen.append((scale, loss_scale, sorted(layers)))
        return original(self, layers, scale, loss_scale, reduce)

    monkeypatch.setattr(RegularizerRun, "add_gradients", spy)
    fit_with(Regularizer(kind="identity", every_n_steps=3), accumulate=2)
    assert seen and {entry[0] for entry in seen} == {0.5} and {entry[1] for entry in seen} == {None}
    assert seen[0][2] == ["net.0", "net.2"]
    # 13 batches per epoch, accumulated by 2: 7 optimizer steps per epoch (the 7th of one batch). The maps
    # exist from epoch 1 on (steps 7–20); every 3rd step is 9, 12, 15 and 18, each of two micro-batches.
    assert len(seen) == 8


def test_laplacian_gradients_go_through_one_reduce():
    from lmd_lightning.lmd.regularize import RegularizerRun

    layer = layer_with_moved_maps()
    run = RegularizerRun(Regularizer(kind="laplacian", lmd_lambda=1.0, points=20, k=4))
    x = torch.randn(30, 6, dtype=torch.float64)
    calls = []

    def once(reduce_factor):
        run.arm({"fc": layer})
        layer.train()
        layer(x)
        layer.I_dist.grad = layer.O_dist.grad = None
        run.generator = torch.Generator().manual_seed(0)  # the same rows both times
        run._rows.clear()
        layer(x)
        run.add_gradients({"fc": layer}, 1.0, None, lambda g: calls.append(g.numel()) or reduce_factor * g)
        return layer.I_dist.grad.clone(), layer.O_dist.grad.clone()

    single, doubled = once(1.0), once(2.0)
    assert calls == [18, 18]  # one flat buffer: 3×3 + 3×3
    torch.testing.assert_close(doubled[0], 2 * single[0])
    torch.testing.assert_close(doubled[1], 2 * single[1])


def test_fold_at_the_end_survives_non_finite_maps():
    class Poison(pl.Callback):
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net[0].I_dist.fill_(float("nan"))

    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=2)
    train, val = loaders()
    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=1, exclude="net.4", metric_maps=True)
    t = trainer(2, [Poison(), lmd])
    with pytest.warns(UserWarning, match="metric maps were left unfolded. ValueError: cannot fold"):
        t.fit(model, train, val)
    assert model.net[0].has_metric_maps and model.net[2].has_metric_maps  # nothing half-folded
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}


def test_fold_at_the_end_rebuilds_the_optimizer_over_the_folded_parameters():
    model, _, t, _ = fit_with(Regularizer(kind="identity"), fold_maps=True)
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()} and not model.net[0].has_metric_maps


def test_guard_with_data_metric_and_maps_leaves_no_hooks_and_keeps_maps():
    from lmd_lightning import DataMetric, EnergyRank

    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=2)
    train, val = loaders()
    lmd = LMDCompression(
        EnergyRank(0.95),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        metric=DataMetric(batches=2),
        metric_maps=True,
        fold_maps=False,
        monitor="val_acc",
        guard=Guard(max_drop=0.05, search_steps=2, sweep_points=2),
    )
    trainer(2, [lmd]).fit(model, train, val)
    assert lmd.compressed and lmd.failure is None and len(lmd.guard_record.trials) >= 2
    factored = [m for m in model.modules() if isinstance(m, FactoredLinear)]
    assert factored and all(m.has_metric_maps for m in factored)
    assert all(not m._forward_hooks for m in model.modules())

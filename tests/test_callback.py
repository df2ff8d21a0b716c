from __future__ import annotations

import contextlib

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lmd_lightning import (
    ConvergenceMonitor,
    DataMetric,
    EnergyRank,
    FactoredLinear,
    FixedRank,
    GlobalBudget,
    LMDCompression,
    RankRatio,
    compress_,
)
from tests.lightning_models import LitMLP, loaders, trainer


class Recorder(pl.Callback):
    """Records the LR and the head's optimizer state at every step and epoch start."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.head_state: dict[int, dict] = {}
        self.swap_epoch_state: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        state = trainer.optimizers[0].state.get(pl_module.net[4].weight, {})
        self.head_state[trainer.current_epoch] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}


def fit(callbacks: list, max_epochs: int = 6, **hparams) -> tuple[LitMLP, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=max_epochs, **hparams)
    train, val = loaders()
    t = trainer(max_epochs, callbacks)
    t.fit(model, train, val)
    return model, t


def test_epoch_trigger_swaps_exactly_at_min_epochs() -> None:
    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=2, exclude="net.4")
    model, t = fit([lmd], max_epochs=4)
    assert isinstance(model.net[0], FactoredLinear) and isinstance(model.net[2], FactoredLinear)
    assert isinstance(model.net[4], nn.Linear)
    assert lmd.compressed and lmd.compressed_epoch == 2
    assert lmd.ranks == {"net.0": 8, "net.2": 8}
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}  # the optimizer holds the new factors


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "interval"),
    [("sgd", "cosine", "epoch"), ("sgd", "step", "step"), ("adamw", "cosine", "step"), ("adamw", "step", "epoch")],
)
def test_optimizer_state_and_schedule_carry_over(optimizer: str, scheduler: str, interval: str) -> None:
    hparams = dict(optimizer=optimizer, scheduler=scheduler, interval=interval, lr=0.05 if optimizer == "sgd" else 3e-3)
    dense_rec = Recorder()
    fit([dense_rec], **hparams)
    rec = Recorder()
    lmd = LMDCompression(RankRatio(0.25), trigger="epoch", min_epochs=3, exclude="net.4")
    fit([lmd, rec], **hparams)
    assert lmd.compressed_epoch == 3
    # The schedule continues: the LR at every step equals the uncompressed run's.
    assert rec.lrs == pytest.approx(dense_rec.lrs, rel=1e-12)
    assert len(set(rec.lrs)) > 2
    # The surviving head's state is carried over: the state seen at the start of epoch 3 (after
    # the swap) is the one the optimizer built during epochs 0–2, not a fresh one.
    before_swap = dense_rec.head_state[3]  # same trajectory up to the swap
    after_swap = rec.head_state[3]
    key = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    torch.testing.assert_close(after_swap[key], before_swap[key])
    if optimizer == "adamw":
        assert float(after_swap["step"]) == float(before_swap["step"]) == 3 * 13


def test_grad_norm_trigger_fires_before_the_forced_epoch() -> None:
    monitor = ConvergenceMonitor(criterion="step", window=5, patience=2, plateau_tol=0.2, min_steps=10)
    lmd = LMDCompression(EnergyRank(0.9), trigger=monitor, min_epochs=1, exclude="net.4")
    fit([lmd], max_epochs=9)
    assert lmd.compressed and "‖∇L‖ EMA" in lmd.reports[0]["trigger"]
    assert 1 <= lmd.compressed_epoch < 6  # forced epoch would be 2/3 of 9 = 6
    assert not monitor.converged  # reset after the round, ready for the next one


class RecordingMonitor(ConvergenceMonitor):
    """The default epoch criterion, recording each closed epoch's mean and the epoch count it had then."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.means: list[float] = []

    def end_epoch(self) -> bool:
        converged = super().end_epoch()
        if self.last_epoch_mean is not None and len(self.means) < self.epochs:
            self.means.append(self.last_epoch_mean)
        return converged


def test_epoch_criterion_fires_in_the_epoch_its_means_predict() -> None:
    """On this small model ‖g‖ grows for five epochs; rel_tol=0.99 fires at the first epoch mean below the peak."""
    monitor = RecordingMonitor(criterion="epoch", min_steps=0, rel_tol=0.99)
    lmd = LMDCompression(EnergyRank(0.9), trigger=monitor, min_epochs=1, exclude="net.4")
    fit([lmd], max_epochs=12)
    means = monitor.means
    predicted = next(e + 1 for e in range(len(means)) if means[e] <= 0.99 * max(means[: e + 1]))
    assert lmd.compressed and lmd.reports[0]["trigger"].startswith("epoch-mean ‖g‖")
    assert lmd.compressed_epoch == predicted and 1 < predicted < 8  # the forced epoch is 2/3 of 12
    assert len(means) == predicted  # decided at the start of the epoch after, then reset for the next round


def test_forced_epoch_when_the_monitor_never_fires() -> None:
    lmd = LMDCompression(FixedRank(8), trigger=ConvergenceMonitor(min_steps=10**9), exclude="net.4")
    fit([lmd], max_epochs=6)
    assert lmd.compressed_epoch == 4  # 2/3 of 6
    lmd = LMDCompression(FixedRank(8), trigger=ConvergenceMonitor(min_steps=10**9), max_epochs=2, exclude="net.4")
    fit([lmd], max_epochs=6)
    assert lmd.compressed_epoch == 2


def test_failed_compression_leaves_the_dense_model_training(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("configure_optimizers exploded")

    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=1, exclude="net.4")
    monkeypatch.setattr("lmd_lightning.callback.surgery._carry_optimizer", broken)
    with pytest.warns(UserWarning, match="compression failed, training continues dense"):
        model, t = fit([lmd], max_epochs=3)
    assert not lmd.compressed and "configure_optimizers exploded" in lmd.failure
    assert all(type(m) is nn.Linear for m in model.net if isinstance(m, nn.Module) and hasattr(m, "in_features"))
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}


class Manual(LitMLP):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_is_refused() -> None:
    train, val = loaders()
    with pytest.raises(ValueError, match="needs automatic optimization"):
        trainer(1, [LMDCompression(FixedRank(2))]).fit(Manual(scheduler="none"), train, val)


class NothingToCompress(LitMLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(40))  # no layer of a kind that can be factored


def test_model_without_candidates_raises_listing_modules() -> None:
    train, val = loaders()
    with pytest.raises(ValueError, match=r"no layer it can factor \(.*\); the modules are: \['net', 'net.0'\]"):
        trainer(1, [LMDCompression(FixedRank(2))]).fit(NothingToCompress(), train, val)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"policy": "energy"}, TypeError, r"`policy` must be a RankPolicy"),
        ({"trigger": "loss"}, ValueError, r"`trigger` must be one of \('grad_norm', 'epoch', 'stable_rank'\)"),
        ({"min_epochs": -1}, ValueError, r"`min_epochs` must be an int >= 0, got -1"),
        ({"max_epochs": 1.5}, ValueError, r"`max_epochs` must be None or an int >= 0, got 1.5"),
        ({"min_epochs": 5, "max_epochs": 3}, ValueError, r"`max_epochs` \(3\) must be >= `min_epochs` \(5\)"),
        ({"every_n_steps": 0}, ValueError, r"`every_n_steps` must be an int >= 1, got 0"),
        ({"parametrization": "lora"}, ValueError, r"`parametrization` must be one of"),
        ({"method": "fast"}, ValueError, r"`method` must be one of"),
        (
            {"metric": "inputs"},
            ValueError,
            r"`metric` must be one of \('loss', 'data', 'weight'\), a DataMetric or a LossMetric, got 'inputs'",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LMDCompression(**{"policy": FixedRank(2), **kwargs})


def test_rounds_shrink_iteratively_on_schedule() -> None:
    lmd = LMDCompression(EnergyRank(0.64), trigger="epoch", rounds=2, min_epochs=1, exclude="net.4")
    model, _ = fit([lmd], max_epochs=6)
    assert lmd.compressed_epochs == [1, 4]  # first at min_epochs, last at 2/3 of max_epochs
    first, second = ({la["name"]: la for la in report["layers"]} for report in lmd.reports)
    assert "energy=0.8)" in lmd.reports[0]["policy"] and "energy=0.8)" in lmd.reports[1]["policy"]  # √0.64
    assert first["net.0"]["rank"] is not None
    assert second["net.0"]["kind"] == "FactoredLinear" and second["net.0"]["rank"] < first["net.0"]["rank"]
    assert model.net[0].rank == second["net.0"]["rank"]


def test_rounds_forced_when_the_monitor_never_fires() -> None:
    lmd = LMDCompression(RankRatio(0.25), trigger=ConvergenceMonitor(min_steps=10**9), rounds=2, exclude="net.4")
    model, _ = fit([lmd], max_epochs=6)
    assert lmd.compressed_epochs == [2, 4]
    assert model.net[2].rank == 16  # the last round reaches the policy's target, 0.25 · 64


def test_rounds_need_a_knob() -> None:
    with pytest.raises(ValueError, match=r"`rounds`=2 needs a policy with a knob"):
        LMDCompression(FixedRank(4), rounds=2)
    with pytest.raises(ValueError, match=r"`rounds` must be an int >= 1, got 0"):
        LMDCompression(EnergyRank(0.9), rounds=0)


@pytest.mark.slow
def test_end_to_end_four_times_smaller_within_one_point_of_dense() -> None:
    def run(callbacks: list) -> tuple[float, pl.Trainer]:
        pl.seed_everything(0, verbose=False)
        model = LitMLP(width=256, max_epochs=12)
        train, val = loaders()
        t = trainer(12, callbacks)
        t.fit(model, train, val)
        return float(t.callback_metrics["val_acc"]), t

    dense_acc, _ = run([])
    lmd = LMDCompression(GlobalBudget(params=0.2), exclude="net.4")
    compressed_acc, _ = run([lmd])
    totals = lmd.reports[0]["totals"]
    assert totals["params_before"] / totals["params_after"] >= 4.0  # the dense layers it targeted
    assert compressed_acc >= dense_acc - 0.01


def test_per_layer_norms_and_ema_are_logged() -> None:
    monitor = ConvergenceMonitor(window=5, min_steps=10**9)
    lmd = LMDCompression(FixedRank(8), trigger=monitor, per_layer_norms=True, min_epochs=5, every_n_steps=1)
    _, t = fit([lmd], max_epochs=2)
    metrics = t.callback_metrics
    assert float(metrics["lmd/grad_norm_ema"]) == pytest.approx(lmd.convergence.ema)
    layers = {k.removeprefix("lmd/grad_norm/"): float(v) for k, v in metrics.items() if k.startswith("lmd/grad_norm/")}
    assert set(layers) == {"net.0", "net.2", "net.4"}
    # The layer norms of the last step compose to that step's global norm.
    last = lmd.convergence.latest_layer_norms
    total = sum(float(v) ** 2 for v in last.values()) ** 0.5
    assert total == pytest.approx(lmd.convergence._buffer[(lmd.convergence.calls - 1) % 5].item(), rel=1e-5)
    with pytest.raises(TypeError, match="`per_layer_norms` must be a bool"):
        LMDCompression(FixedRank(8), per_layer_norms="yes")


class GroupedByKind(LitMLP):
    """Builds one param group per module type: the count changes when Linear becomes FactoredLinear."""

    def configure_optimizers(self):
        kinds: dict[type, list] = {}
        for module in self.modules():
            params = list(module.parameters(recurse=False))
            if params:
                kinds.setdefault(type(module), []).extend(params)
        return torch.optim.SGD([{"params": p} for p in kinds.values()], lr=0.05, momentum=0.9)


def test_changed_param_group_count_rolls_back_instead_of_a_wrong_lr() -> None:
    lmd = LMDCompression(FixedRank(8), trigger="epoch", min_epochs=1, include=["net.0"])
    train, val = loaders()
    with pytest.warns(UserWarning, match="parameter groups after the swap, 1 before"):
        trainer(2, [lmd]).fit(GroupedByKind(max_epochs=2), train, val)
    assert not lmd.compressed and "parameter groups" in lmd.failure


class StateAt(pl.Callback):
    """The model's state dict at the start of one epoch (before or after LMDCompression, by list order)."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.state = epoch, None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_data_metric_calibrates_on_the_first_training_batches() -> None:
    settings = DataMetric(batches=3, damping=0.05)
    before, after = StateAt(2), StateAt(2)
    lmd = LMDCompression(FixedRank(6), trigger="epoch", min_epochs=2, exclude="net.4", metric=settings)
    model, _ = fit([before, lmd, after], max_epochs=3)
    assert lmd.data_metric == settings and isinstance(model.net[2], FactoredLinear)
    # the same truncation by hand: the dense model at epoch 2, the loader's first 3 batches
    dense = LitMLP()
    dense.load_state_dict(before.state)
    train, _ = loaders()
    compress_(dense, FixedRank(6), exclude="net.4", metric=settings, calibration=train)
    for key in ("net.0.U", "net.0.V", "net.2.U", "net.2.V"):
        torch.testing.assert_close(after.state[key], dense.state_dict()[key], rtol=1e-5, atol=1e-6)
    plain = LitMLP()
    plain.load_state_dict(before.state)
    compress_(plain, FixedRank(6), exclude="net.4")
    assert not torch.allclose(plain.net[2].dense_weight(), dense.net[2].dense_weight(), atol=1e-3)  # a different fit


class FirstBatches(pl.Callback):
    """The first training batch of every epoch (its first feature column identifies the order)."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.seen.append(batch[0][:, 0].clone())


@pytest.mark.parametrize("forked", [True, False])
def test_calibration_leaves_a_shuffled_loaders_order_alone(forked: bool, monkeypatch) -> None:
    """A loader shuffled by the global RNG sees the same batches whether or not metric="data" read from it."""
    if not forked:  # the check can fail: without the RNG fork, the calibration's draws shift the order
        monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: contextlib.nullcontext())

    def first_batches(metric: str) -> list[torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        train, val = loaders()
        shuffled = torch.utils.data.DataLoader(train.dataset, batch_size=128, shuffle=True)  # global RNG
        lmd = LMDCompression(FixedRank(6), trigger="epoch", min_epochs=2, exclude="net.4", metric=metric)
        record = FirstBatches()
        trainer(4, [lmd, record]).fit(LitMLP(max_epochs=4), shuffled, val)
        assert lmd.compressed_epochs == [2]
        return record.seen

    plain, calibrated = first_batches("weight"), first_batches("data")
    assert len(plain) == 4 and not torch.equal(plain[0], plain[1])  # it does reshuffle every epoch
    same = all(torch.equal(a, b) for a, b in zip(plain, calibrated))
    assert same is forked

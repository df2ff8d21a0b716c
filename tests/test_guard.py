from __future__ import annotations

import csv
import logging

import pytest
import pytorch_lightning as pl
import torch

from lmd_lightning import (
    ConvergenceMonitor,
    EnergyRank,
    ErrorBound,
    FixedRank,
    GlobalBudget,
    Guard,
    LMDCompression,
    RankRatio,
)
from lmd_lightning.callback.guard import GuardRecord, SweepPoint, Trial, search_knob
from lmd_lightning.truncate.report import CompressionReport
from tests.lightning_models import LitMLP, loaders, trainer


class FakeModel:
    """The metric falls linearly as the policy compresses harder: metric = quality(knob)."""

    def __init__(self, quality) -> None:
        self.quality, self.current, self.applied = quality, None, []

    def apply(self, policy) -> CompressionReport:
        self.current = policy
        self.applied.append(policy.knob_value)
        return CompressionReport([], 100, 50, repr(policy))

    def undo(self) -> None:
        self.current = None

    def evaluate(self) -> float:
        return 1.0 if self.current is None else self.quality(self.current)


def run(policy, quality, max_drop: float, mode: str = "max", steps: int = 5):
    fake = FakeModel(quality)
    return search_knob(policy, fake.evaluate, fake.apply, fake.undo, max_drop, mode, steps), fake


def test_moves_towards_aggressive_when_the_drop_is_much_smaller() -> None:
    result, _ = run(EnergyRank(0.95), lambda p: p.energy + 0.05, max_drop=0.2 + 1e-12)
    # metric = energy + 0.05 ≥ 0.8 ⇔ energy ≥ 0.75; five halvings of [0.95, 0.3] land within 0.0203 above.
    assert 0.75 <= result.policy.energy <= 0.75 + 0.65 / 2**5
    assert result.before == 1.0 and result.trials[0].setting == 0.95 and result.trials[1].setting == 0.3
    assert all(t.accepted == (t.drop <= 0.2 + 1e-12) for t in result.trials)


def test_moves_towards_mild_when_the_user_setting_fails() -> None:
    result, _ = run(GlobalBudget(params=0.1), lambda p: 1.0 - (1.0 - p.params) / 2, max_drop=0.25)
    # drop = (1 − f)/2 ≤ 0.25 ⇔ f ≥ 0.5
    assert 0.5 <= result.policy.params <= 0.5 + 0.89 / 2**5


def test_keeps_the_users_setting_when_its_drop_is_not_much_smaller() -> None:
    result, fake = run(ErrorBound(0.3), lambda p: 1.0 - p.eps / 2, max_drop=0.2)  # drop 0.15 > 0.1
    assert result.policy == ErrorBound(0.3) and fake.applied == [0.3]


def test_dense_when_even_the_mildest_setting_fails() -> None:
    result, fake = run(RankRatio(0.2), lambda p: 0.0, max_drop=0.1)
    assert result.policy is None and fake.applied == [0.2, 0.999]


@pytest.mark.parametrize("passes", [True, False])
def test_policies_without_a_knob_are_accepted_or_refused(passes: bool) -> None:
    result, _ = run(FixedRank(4), lambda p: 1.0 if passes else 0.0, max_drop=0.1)
    assert result.policy == (FixedRank(4) if passes else None) and len(result.trials) == 1


def test_min_mode_for_losses() -> None:
    result, _ = run(EnergyRank(0.9), lambda p: 1.0 + (1.0 - p.energy), max_drop=0.05, mode="min")
    assert 0.95 - 1e-9 <= result.policy.energy <= 0.9999


def fit_with(callback: LMDCompression, max_epochs: int = 4):
    pl.seed_everything(0, verbose=False)
    model = LitMLP(max_epochs=max_epochs)
    train, val = loaders()
    trainer(max_epochs, [callback]).fit(model, train, val)
    return model


def test_guard_in_training_records_before_after_and_respects_the_drop(caplog: pytest.LogCaptureFixture) -> None:
    lmd = LMDCompression(
        EnergyRank(0.9),
        trigger="epoch",
        min_epochs=2,
        exclude="net.4",
        monitor="val_acc",
        guard=Guard(max_drop=0.03, batches=1),
    )
    with caplog.at_level(logging.INFO, logger="lmd_lightning"):
        fit_with(lmd)
    unchanged = [r.getMessage() for r in caplog.records if r.name == "lmd_lightning" and "unchanged" in r.getMessage()]
    dense = [layer["name"] for layer in lmd.reports[0]["layers"] if layer["rank"] is None]
    assert len(unchanged) == len(dense)  # once, from the applied compression; the trials stay quiet
    record = lmd.guard_record
    assert lmd.compressed and record.trials and record.knob == "energy"
    assert record.before - record.after <= 0.03
    assert 0.5 < record.final <= 1.0  # the validation metric after fine-tuning
    chosen = record.chosen
    accepted = [t.setting for t in record.trials if t.accepted]
    assert chosen in accepted
    assert lmd.reports[0]["policy"].startswith("EnergyRank") and f"energy={chosen}" in lmd.reports[0]["policy"]


def test_unlogged_monitor_raises_at_the_first_validation() -> None:
    lmd = LMDCompression(EnergyRank(0.9), monitor="val_accuracy", guard=Guard(max_drop=0.01))
    with pytest.raises(
        KeyError, match=r"'val_accuracy' was not logged in validation; available: \['train_loss', 'val_acc'\]"
    ):
        fit_with(lmd, max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"guard": Guard(max_drop=0.01)}, ValueError, r"Guard `max_drop`=0.01 needs `monitor`"),
        ({"monitor": 3, "guard": Guard(max_drop=0.01)}, TypeError, "`monitor` must be the name"),
        ({"mode": "up"}, ValueError, r"`mode` must be 'max' or 'min', got 'up'"),
        ({"guard": {"max_drop": 0.01}}, TypeError, r"`guard` must be a Guard or None, got \{'max_drop': 0.01\}"),
        ({"max_drop": 0.01}, TypeError, r"LMDCompression got unexpected keyword arguments \['max_drop'\]"),
    ],
)
def test_invalid_guard_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LMDCompression(EnergyRank(0.9), **kwargs)


def test_guard_keeping_the_model_dense_finishes_training() -> None:
    lmd = LMDCompression(
        FixedRank(1),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        monitor="val_acc",
        guard=Guard(max_drop=0.0, batches=1),
    )
    model = fit_with(lmd, max_epochs=3)
    assert not lmd.compressed and lmd.failure.startswith("accuracy guard")
    assert lmd.guard_record.after is None and len(lmd.guard_record.trials) == 1
    assert type(model.net[0]) is torch.nn.Linear


class TwoLoaders(LitMLP):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())


class FrozenNorm(LitMLP):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.norm = torch.nn.BatchNorm1d(32)

    def forward(self, x):
        return self.net(self.norm(x))

    def on_train_start(self) -> None:
        self.norm.eval()  # the user keeps this one in eval mode for the whole run


def test_monitor_with_two_validation_loaders_uses_lightnings_names() -> None:
    """Loader 1 has the labels shifted, so its accuracy differs from loader 0's: the guard must read loader 1's."""

    class Logged(pl.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking and trainer.current_epoch == 0:
                self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_acc")}

    pl.seed_everything(0, verbose=False)
    lmd = LMDCompression(
        EnergyRank(0.9),
        trigger="epoch",
        min_epochs=1,
        exclude="net.4",
        monitor="val_acc/dataloader_idx_1",
        guard=Guard(max_drop=1.0, batches=1),
    )
    train, val = loaders()
    x, y = val.dataset.tensors
    shifted = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (y + 1) % 4), batch_size=256)
    logged = Logged()
    trainer(2, [lmd, logged]).fit(TwoLoaders(max_epochs=2), train, [val, shifted])
    # The dense model at the start of epoch 1 is the one epoch 0 validated; one batch is the whole set.
    first, second = logged.metrics["val_acc/dataloader_idx_0"], logged.metrics["val_acc/dataloader_idx_1"]
    assert abs(first - second) > 0.01  # the two loaders disagree, so reading the wrong one (or their mean) fails
    assert lmd.compressed and lmd.guard_record.before == pytest.approx(second, abs=1e-6)


def test_guard_evaluation_gives_back_each_submodules_mode() -> None:
    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.norm_training = pl_module.norm.training

    pl.seed_everything(0, verbose=False)
    probe = Probe()
    lmd = LMDCompression(EnergyRank(0.9), trigger="epoch", min_epochs=1, exclude="net.4", monitor="val_acc")
    train, val = loaders()
    trainer(2, [lmd, probe]).fit(FrozenNorm(max_epochs=2), train, val)
    assert lmd.compressed and probe.norm_training is False


def test_guard_record_and_sweep_go_through_the_callbacks_state() -> None:
    lmd = LMDCompression(EnergyRank(0.9), monitor="val_acc", guard=Guard(max_drop=0.03))
    lmd._guarding.record = GuardRecord(0.9, "energy", 0.8, after=0.88, trials=[Trial(0.8, 0.88, 0.02, 1234, True)])
    lmd._guarding.sweep = [SweepPoint(0.5, 0.7, 900), SweepPoint(0.9, 0.89, 2000)]
    state = lmd.state_dict()
    assert state["guard"] == {
        "before": 0.9,
        "knob": "energy",
        "chosen": 0.8,
        "after": 0.88,
        "final": None,
        "trials": [{"setting": 0.8, "value": 0.88, "drop": 0.02, "params": 1234, "accepted": True}],
    }
    fresh = LMDCompression(EnergyRank(0.9), monitor="val_acc", guard=Guard(max_drop=0.03))
    fresh.load_state_dict(state)
    assert fresh.guard_record == lmd.guard_record and fresh.sweep == lmd.sweep


def test_checkpoint_state_of_version_0_1_still_loads() -> None:
    """0.1 kept the guard as a plain dict: "knob" held the chosen setting, trials named the value "metric"."""
    old = {
        "compressed_epochs": [2],
        "reports": [],
        "failure": None,
        "convergence": ConvergenceMonitor().state_dict(),
        "guard": {
            "before": 0.9,
            "after": 0.85,
            "knob": 0.7,
            "final": 0.91,
            "trials": [{"knob": 0.7, "metric": 0.85, "drop": 0.05, "params": 99, "accepted": True}],
        },
        "sweep": [{"knob": 0.5, "metric": 0.6, "params": 50}],
    }
    lmd = LMDCompression(EnergyRank(0.9), monitor="val_acc")
    lmd.load_state_dict(old)
    assert lmd.guard_record == GuardRecord(0.9, None, 0.7, 0.85, 0.91, [Trial(0.7, 0.85, 0.05, 99, True)])
    assert lmd.sweep == [SweepPoint(0.5, 0.6, 50)] and lmd.compressed_epochs == [2]


def test_guard_evaluations_are_invisible_to_early_stopping_and_loggers(tmp_path) -> None:
    """Several one-shot evaluations at other accuracies run inside LMDCompression's epoch-start hook;
    probes right before and right after that hook see the same `callback_metrics` and EarlyStopping
    state, and the logger gets no trial's value."""
    from pytorch_lightning.callbacks import EarlyStopping
    from pytorch_lightning.loggers import CSVLogger

    class Probe(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 2:
                self.seen = (dict(trainer.callback_metrics), float(stop.best_score), stop.wait_count)

    pl.seed_everything(0, verbose=False)
    lmd = LMDCompression(
        EnergyRank(0.5),
        trigger="epoch",
        min_epochs=2,
        exclude="net.4",
        metric="weight",  # EnergyRank of weight energy: the trials reach different ranks
        monitor="val_acc",
        guard=Guard(max_drop=0.5, batches=1, search_steps=3, sweep_points=4),
    )
    stop, before, after = EarlyStopping("val_acc", mode="max", patience=100), Probe(), Probe()
    train, val = loaders()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer(3, [before, lmd, after, stop], logger=logger).fit(LitMLP(max_epochs=3), train, val)
    values = [t.value for t in lmd.guard_record.trials] + [p.value for p in lmd.sweep]
    assert lmd.compressed_epochs == [2] and len(values) >= 6
    assert len(set(values) - {lmd.guard_record.before}) >= 3  # the trials measured other accuracies
    assert after.seen == before.seen and float(before.seen[0]["val_acc"]) == pytest.approx(lmd.guard_record.before)
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    assert len([row for row in rows if row.get("val_acc")]) == 3  # one per validation epoch, no trial's

"""rounds="auto": the validated ladder, its roll-back, what it logs, and its resumption from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lmd_lightning import ErrorBound, FactoredLinear, FixedRank, GlobalBudget, Guard, LMDCompression, RankRatio
from lmd_lightning.callback.ladder import Ladder, LadderPlan
from tests.lightning_models import LitMLP, loaders, trainer

MIN_PARAMS = 2000  # SizeGated's score is 1 while the model keeps at least this many parameters


class SizeGated(LitMLP):
    """LitMLP whose validation also logs `size_score`: 1 at ≥ `min_params` parameters, else 0.

    With monitor="size_score" the ladder's decisions are known in advance: a rung is kept exactly
    when it leaves at least `min_params` parameters.
    """

    min_params = MIN_PARAMS

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("size_score", float(sum(p.numel() for p in self.parameters()) >= self.min_params))


def ladder_callback(**kwargs) -> LMDCompression:
    options = dict(
        trigger="epoch", min_epochs=2, exclude="net.4", monitor="size_score", guard=Guard(max_drop=0.5), rounds="auto"
    )
    return LMDCompression(GlobalBudget(params=0.1), **{**options, **kwargs})


class AtEpochStart(pl.Callback):
    """After LMDCompression in the list: each epoch start's weights, optimizer momenta and learning rate."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.momenta: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, float] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch, opt = trainer.current_epoch, trainer.optimizers[0]
        self.states[epoch] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        names = {p: n for n, p in pl_module.named_parameters()}
        self.momenta[epoch] = {names[p]: s["momentum_buffer"].clone() for p, s in opt.state.items() if p in names}
        self.lrs[epoch] = opt.param_groups[0]["lr"]


def run_ladder(
    epochs: int = 12, callbacks: tuple = (), min_params: int = MIN_PARAMS, **fit_kwargs
) -> tuple[LMDCompression, AtEpochStart, SizeGated]:
    pl.seed_everything(0, verbose=False)
    lmd, probe = ladder_callback(), AtEpochStart()
    model = SizeGated(max_epochs=epochs)
    model.min_params = min_params
    train, val = loaders()
    trainer(epochs, [lmd, probe, *callbacks], **fit_kwargs).fit(model, train, val)
    return lmd, probe, model


def test_the_plan_follows_the_trainers_epochs() -> None:
    plan = LadderPlan.derive(start=10, max_epochs=30)  # the hand ladder: 5 rungs of 3 epochs
    assert (plan.rung_epochs, plan.rungs, plan.final_from) == (3, 5, 25)
    plan = LadderPlan.derive(start=2, max_epochs=12)
    assert (plan.rung_epochs, plan.rungs, plan.final_from) == (2, 4, 10)
    plan = LadderPlan.derive(start=8, max_epochs=12)
    assert (plan.rung_epochs, plan.rungs, plan.final_from) == (1, 3, 11)  # one epoch of final fine-tune left


def test_the_reference_averages_the_trigger_with_the_two_dense_epochs_before() -> None:
    ladder = Ladder(max_drop=0.01)
    for epoch, value in enumerate([0.70, 0.80, 0.84, 0.82, 0.83]):
        ladder.observe(epoch, value)
    # at t₀ = 5 the model measured is the one epoch 4 validated: epochs 2 and 3 join the measurement
    ladder.start(5, 20, dense=0.83, kept=None)
    assert ladder.dense == pytest.approx((0.84 + 0.82 + 0.83) / 3) and ladder.dense_at_trigger == 0.83
    twice = Ladder(max_drop=0.01)  # validation twice in an epoch (val_check_interval < 1): the epoch's last counts
    for epoch, value in [(2, 0.5), (2, 0.6), (3, 0.7), (3, 0.8)]:
        twice.observe(epoch, value)
    assert twice.recent == [(2, 0.6), (3, 0.8)]
    fresh = Ladder(max_drop=0.01)  # no loop values (validation every few epochs, or partial): the measurement alone
    fresh.start(5, 20, dense=0.83, kept=None)
    assert fresh.dense == 0.83


def test_a_rung_is_judged_on_its_last_validations_without_its_first_epoch() -> None:
    ladder = Ladder(max_drop=0.01)
    for epoch, value in enumerate([0.80, 0.82, 0.81]):
        ladder.observe(epoch, value)
    ladder.start(3, 40, dense=0.81, kept=None)  # reference (0.80 + 0.82 + 0.81) / 3 = 0.81
    ladder.add(3, 0.5, params=100, params_before=200)
    # the rung trains epochs 3–8: the loop validates each; epoch 3 is its recovery from the cut
    for epoch, value in zip(range(3, 9), [0.60, 0.79, 0.83, 0.82, 0.81, 0.79]):
        ladder.observe(epoch, value)
    # validated at epoch 9's start (the model epoch 8 left: 0.79, alone below the bar of 0.80); epochs 6 and 7
    # join it, and epoch 8's loop value, of the same model, is not counted twice
    assert not ladder.passes(0.79) and ladder.decide(9, 0.79)
    rung = ladder.rungs[-1]
    assert rung.value == pytest.approx((0.82 + 0.81 + 0.79) / 3) and rung.averaged == 3
    assert (rung.last, rung.validated_epoch, rung.decision) == (0.79, 9, "kept")
    # a rung of two epochs: its first is left out, so the measurement alone decides
    ladder.add(9, 0.5, params=50, params_before=200)
    ladder.observe(9, 0.95)
    ladder.observe(10, 0.78)
    assert not ladder.decide(11, 0.78)
    assert (ladder.rungs[-1].value, ladder.rungs[-1].averaged) == (0.78, 1)
    # a rung of three: the epoch after its first joins the measurement
    ladder.add(11, 0.5, params=50, params_before=200)
    for epoch, value in [(11, 0.50), (12, 0.82), (13, 0.80)]:
        ladder.observe(epoch, value)
    assert ladder.decide(14, 0.80) and ladder.rungs[-1].value == pytest.approx(0.81)


def test_rungs_are_kept_within_the_drop_in_the_monitors_direction() -> None:
    ladder = Ladder(max_drop=0.01, mode="max", dense=0.90)
    assert ladder.passes(0.895) and ladder.passes(0.95) and not ladder.passes(0.885)
    ladder = Ladder(max_drop=0.1, mode="min", dense=2.0)
    assert ladder.passes(2.05) and not ladder.passes(2.2)


def test_the_bar_rises_to_a_kept_rung_that_beat_the_dense_reference() -> None:
    ladder = Ladder(max_drop=0.01)
    ladder.start(7, 40, dense=0.80, kept=None)  # an early trigger: the dense model is still improving
    ladder.add(7, 0.5, params=100, params_before=200)
    assert ladder.decide(13, 0.85) and ladder.rungs[0].bar == 0.80 and ladder.bar == 0.85
    ladder.add(13, 0.5, params=50, params_before=200)
    # 0.835 is within a point of the dense reference but not of the kept rung: rolled back
    assert not ladder.decide(19, 0.835) and ladder.rungs[1].bar == 0.85
    ladder.add(19, 0.5, params=70, params_before=200)
    assert ladder.decide(25, 0.845) and ladder.bar == 0.85  # kept, lower than the bar: the bar stays
    restored = Ladder(max_drop=0.01)
    restored.load_state_dict(ladder.state_dict())
    assert [rung.bar for rung in restored.rungs] == [0.80, 0.85, 0.85] and restored.bar == 0.85
    from lmd_lightning.callback.climb import _bar_name  # what the rung's log line names as its bar

    assert [_bar_name(ladder, rung) for rung in ladder.rungs] == ["dense reference", "bar (rung 1's)", "bar (rung 1's)"]
    loss = Ladder(max_drop=0.1, mode="min")  # mode="min": the lowest value is the bar
    loss.start(7, 40, dense=2.0, kept=None)
    loss.add(7, 0.5, params=100, params_before=200)
    assert loss.decide(13, 1.5) and loss.bar == 1.5 and not loss.passes(1.65) and loss.passes(1.55)


def test_the_positions_climb_by_steps_then_bisect_after_a_roll_back() -> None:
    ladder = Ladder(max_drop=0.01)
    ladder.start(10, 30, dense=0.9, kept=None)
    assert (ladder.plan.rungs, ladder.plan.rung_epochs) == (5, 3)
    positions = []
    for epoch, value in zip(range(10, 28, 3), [0.9, 0.9, 0.5, 0.9, 0.5, 0.9]):
        ladder.add(epoch, None, params=100, params_before=200)
        positions.append((ladder.rungs[-1].at, ladder.rungs[-1].of))
        ladder.decide(epoch + 3, value)
        if not ladder.more(epoch + 3):
            break
    # kept 1/5, 2/5; 3/5 rolled back, so 5/10 between them: kept; then 11/20 between 5/10 and 6/10: rolled back
    assert positions == [(1, 5), (2, 5), (3, 5), (5, 10), (11, 20)]
    assert [r.decision for r in ladder.rungs] == ["kept", "kept", "rolled back", "kept", "rolled back"]
    assert (ladder.kept_at, ladder.scale, ladder.bounded) == (10, 20, True)
    assert ladder.next_position() == (21, 40) and len(ladder.rungs) == 5  # no slot left
    # the policy of a position: GlobalBudget keeps the share's root of what is left, so 21/40 after 10/20 is half
    # a step; ErrorBound the same in energy 1 − eps²; RankRatio's ratio is absolute: 21/40 of the way to it
    assert ladder.policy(GlobalBudget(params=0.05)).params == pytest.approx(0.05 ** (1 / 40))
    assert 1 - ladder.policy(ErrorBound(0.6)).eps ** 2 == pytest.approx((1 - 0.36) ** (1 / 40))
    assert ladder.policy(RankRatio(0.2)).ratio == pytest.approx(1 - 0.8 * 21 / 40)
    top = Ladder(max_drop=0.01)  # every rung kept: the last one is the policy itself
    top.start(0, 8, dense=0.9, kept=None)
    for epoch in range(top.plan.rungs):
        top.add(epoch, None, params=100, params_before=200)
        top.decide(epoch + 1, 0.9)
    assert (top.kept_at, top.scale) == (top.plan.rungs, top.plan.rungs) and not top.more(top.plan.rungs)


def test_a_checkpoint_from_before_bisection_resumes_on_full_steps() -> None:
    ladder = Ladder(max_drop=0.01)
    ladder.start(2, 12, dense=0.9, kept=None)
    for epoch, value in [(2, 0.9), (4, 0.5)]:
        ladder.add(epoch, None, params=100, params_before=200)
        ladder.decide(epoch + 2, value)
    old = ladder.state_dict()
    for key in ("kept_at", "scale", "bounded"):
        del old[key]
    for rung in old["rungs"]:
        del rung["at"], rung["of"]
    resumed = Ladder(max_drop=0.01)
    resumed.load_state_dict(old)
    assert [(r.at, r.of) for r in resumed.rungs] == [(1, 4), (2, 4)]
    assert (resumed.kept_at, resumed.scale, resumed.bounded) == (1, 4, True) and resumed.next_position() == (3, 8)


def test_the_ladder_keeps_rungs_while_the_metric_holds_and_rolls_back_those_that_do_not() -> None:
    lmd, probe, model = run_ladder()
    rungs = lmd.ladder
    assert [r.epoch for r in rungs] == [2, 4, 6, 8]
    assert [r.decision for r in rungs] == ["kept", "kept", "rolled back", "rolled back"]
    assert all(r.params >= MIN_PARAMS for r in rungs[:2]) and all(r.params < MIN_PARAMS for r in rungs[2:])
    # rung 4 bisects the step that failed: half of rung 3's step from rung 2, GlobalBudget(0.1) over 4 rungs
    assert rungs[0].params > rungs[1].params > rungs[3].params > rungs[2].params
    assert [r.setting for r in rungs] == pytest.approx([0.1**0.25] * 3 + [0.1**0.125])
    assert [(r.at, r.of) for r in rungs] == [(1, 4), (2, 4), (3, 4), (5, 8)]
    assert [r.value for r in rungs] == [1.0, 1.0, 0.0, 0.0] and lmd.dense_value == 1.0
    assert [r.validated_epoch for r in rungs] == [4, 6, 8, 10]
    # the model ends on rung 2: its ranks, its parameter count
    rung2 = lmd.reports[1]
    assert lmd.ranks == {layer["name"]: layer["rank"] for layer in rung2["layers"] if layer["rank"] is not None}
    assert sum(p.numel() for p in model.parameters()) == rungs[1].params
    assert isinstance(model.net[0], FactoredLinear) and model.net[0].rank == lmd.ranks["net.0"]
    assert [r["ladder"]["decision"] for r in lmd.reports] == ["kept", "kept", "rolled back", "rolled back"]
    assert lmd.compression_ratio == pytest.approx(rungs[0].params_before / rungs[1].params)


def test_a_bisected_rung_that_holds_is_kept_and_the_model_ends_on_it() -> None:
    lmd, probe, model = run_ladder(min_params=1500)  # rung 3 (1,252 parameters) fails, its half step holds
    rungs = lmd.ladder
    assert [r.decision for r in rungs] == ["kept", "kept", "rolled back", "kept"]
    assert rungs[2].params < 1500 <= rungs[3].params < rungs[1].params
    assert lmd._ladder.kept.rung == 4 and (lmd._ladder.kept_at, lmd._ladder.scale) == (5, 8)
    # rung 4 was cut from rung 2 as kept at epoch 6, not from the rejected rung 3
    assert sum(p.numel() for p in model.parameters()) == rungs[3].params
    standing = {layer["name"]: layer["rank"] for layer in lmd.reports[3]["layers"] if layer["rank"] is not None}
    assert lmd.ranks == standing
    assert lmd.reports[3]["layers"][0]["rank_before"] == lmd.reports[1]["layers"][0]["rank"]


def test_a_roll_back_restores_the_kept_weights_and_momenta_and_the_schedule_runs_on() -> None:
    lmd, probe, _ = run_ladder()
    # rung 2 was kept at the start of epoch 6 (after its fine-tuning), rung 3 applied right after;
    # at epoch 8 rung 3 is rolled back and rung 4 cut from rung 2; at epoch 10 rung 4 is rolled back, and
    # no slot is left: the weights and momenta are those kept at epoch 6
    kept = lmd._ladder.kept
    assert kept.rung == 2
    assert probe.states[10].keys() == kept.state.keys()
    for key, value in kept.state.items():
        torch.testing.assert_close(probe.states[10][key], value, rtol=0, atol=0)
    assert probe.momenta[10].keys() == kept.optimizers[0].keys() and probe.momenta[10]
    for name, state in kept.optimizers[0].items():
        torch.testing.assert_close(probe.momenta[10][name], state["momentum_buffer"], rtol=0, atol=0)
    # the kept copy is rung 2 as validated: the structure at epoch 6 had rung 3's smaller ranks
    assert probe.states[6]["net.0.U"].shape[1] < kept.state["net.0.U"].shape[1]
    # the cosine schedule (by epoch) follows the Trainer's epochs, roll-back or not
    dense = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.zeros(1)], lr=0.05), T_max=12)
    expected = []
    for _ in range(12):
        expected.append(dense.get_last_lr()[0])
        dense.optimizer.step()
        dense.step()
    assert [probe.lrs[e] for e in range(12)] == pytest.approx(expected)


@pytest.mark.parametrize(("killed", "position"), [(7, (2, 4, False)), (9, (2, 4, True))])
def test_a_run_killed_mid_ladder_resumes_with_the_kept_rung(tmp_path: Path, killed: int, position: tuple) -> None:
    """Killed at epoch 7 (rung 2 kept, rung 3 pending) or 9 (rung 3 rolled back, the bisecting rung 4 pending),
    resumed from the checkpoint of the epoch before: the same run."""
    uninterrupted, _, whole = run_ladder()

    class Kill(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == killed:
                raise RuntimeError("killed")

    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with pytest.raises(RuntimeError, match="killed"):
        run_ladder(callbacks=(checkpoints, Kill()), enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    ladder = next(state for key, state in saved["callbacks"].items() if key.startswith("LMDCompression"))["ladder"]
    assert saved["epoch"] == killed - 1 and ladder["kept"]["rung"] == 2 and ladder["rungs"][-1]["decision"] == "pending"
    assert (ladder["kept_at"], ladder["scale"], ladder["bounded"]) == position
    pl.seed_everything(0, verbose=False)
    resumed, model = ladder_callback(), SizeGated(max_epochs=12)
    train, val = loaders()
    fit = trainer(12, [resumed, ModelCheckpoint(dirpath=tmp_path / "again")], enable_checkpointing=True)
    fit.fit(model, train, val, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed._ladder.kept.rung == 2
    assert [r.decision for r in resumed.ladder] == ["kept", "kept", "rolled back", "rolled back"]
    assert resumed.ladder == uninterrupted.ladder
    assert resumed.ranks == uninterrupted.ranks
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_every_rung_is_logged(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    run_ladder(logger=logger)
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0}).Reload()
    kept = [event.value for event in events.Scalars("lmd/ladder/kept")]
    params = [event.value for event in events.Scalars("lmd/ladder/params")]
    assert kept == [1.0, 1.0, 0.0, 0.0] and params[0] > params[1] > params[3] > params[2]
    assert [event.value for event in events.Scalars("lmd/ladder/size_score")] == [1.0, 1.0, 0.0, 0.0]
    assert "lmd/ladder" in events.Tags()["images"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": None, "guard": None}, r"rounds='auto' .* needs `monitor` .* got monitor=None, max_drop=None"),
        (
            {"guard": Guard()},
            r"needs `monitor` .* and guard=Guard\(max_drop=\.\.\.\); got monitor='size_score', max_drop=None",
        ),
        ({"policy": FixedRank(4)}, r"rounds='auto' climbs the policy's knob in rungs; FixedRank\(.*\) has none"),
        ({"trigger": "stable_rank"}, r"rounds='auto': the stable-rank trigger switches once"),
        ({"tied": "joint"}, r"rounds='auto' cannot roll back a tied='joint' pair"),
        ({"rounds": "Auto"}, r"`rounds` must be a positive int or 'auto', got 'Auto'"),
    ],
)
def test_bad_ladders_are_refused_at_construction(kwargs: dict, message: str) -> None:
    options = dict(trigger="epoch", monitor="size_score", guard=Guard(max_drop=0.01), rounds="auto")
    policy = kwargs.pop("policy", GlobalBudget(params=0.1))
    with pytest.raises(ValueError, match=message):
        LMDCompression(policy, **{**options, **kwargs})


def test_a_trainer_without_max_epochs_is_refused_at_setup() -> None:
    train, val = loaders()
    fit = trainer(-1, [ladder_callback()], max_steps=20)
    with pytest.raises(ValueError, match=r"rounds='auto'\) times its rungs by the Trainer's epochs: set max_epochs"):
        fit.fit(SizeGated(), train, val)


def test_a_failed_roll_back_leaves_the_rejected_rung_training_and_says_why(monkeypatch) -> None:
    import lmd_lightning.callback.climb as callback_module  # where the roll-back looks restore_structure_ up

    def broken(model, state_dict):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(callback_module, "restore_structure_", broken)
    with pytest.warns(UserWarning, match=r"roll-back failed: RuntimeError: disk on fire; the rejected rung trains on"):
        lmd, probe, model = run_ladder()
    assert [r.decision for r in lmd.ladder] == ["kept", "kept", "roll-back failed"]
    assert (lmd._ladder.kept_at, lmd._ladder.scale) == (3, 4) and lmd._ladder.finished  # where the model stands
    # the model is rung 3, whole and training: its ranks, its parameter count, its weights changing after the failure
    assert sum(p.numel() for p in model.parameters()) == lmd.ladder[2].params
    assert lmd.ranks == {
        layer["name"]: layer["rank"] for layer in lmd.reports[2]["layers"] if layer["rank"] is not None
    }
    assert not torch.equal(probe.states[9]["net.0.U"], probe.states[11]["net.0.U"])
    assert lmd.failure.startswith("roll-back failed")

"""rounds="auto" inside a fit: the ladder's Lightning side, mixed into LMDCompressionBase.

ladder.py decides (plan, reference, keep or roll back); these methods measure, copy, compress and
roll back through the callback's own `_compress`, `surgery` and `restore_structure_`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytorch_lightning as pl

from lmd_lightning.callback import surgery
from lmd_lightning.callback.ladder import Kept, Ladder, Rung
from lmd_lightning.truncate.policies import RankPolicy
from lmd_lightning.truncate.restore import restore_structure_
from lmd_lightning.truncate.targets import undo, undo_record

__all__ = ["LadderSteps"]


class LadderSteps:
    """The callback's rounds="auto" methods; `self` is an LMDCompressionBase (its `_ladder`, `_compress`, …)."""

    _ladder: Ladder | None
    reports: list[dict[str, Any]]
    failure: str | None

    def _check_auto(self, policy: RankPolicy, tied: str) -> Ladder:
        guard = self.guard
        if self.monitor is None or guard.max_drop is None:
            raise ValueError(
                "rounds='auto' keeps each rung only if the validation metric holds: it needs `monitor` (a metric "
                f"validation_step logs) and guard=Guard(max_drop=...); got monitor={self.monitor!r}, "
                f"max_drop={guard.max_drop!r}"
            )
        if policy.knob is None:
            raise ValueError(
                f"rounds='auto' climbs the policy's knob in rungs; {policy!r} has none (use EnergyRank, RankRatio, "
                "ErrorBound or GlobalBudget)"
            )
        if self._watch.kind == "stable_rank":
            raise ValueError("rounds='auto': the stable-rank trigger switches once; use trigger='grad_norm' or 'epoch'")
        if tied == "joint":
            raise ValueError("rounds='auto' cannot roll back a tied='joint' pair yet; use tied='dense'")
        return Ladder(max_drop=guard.max_drop, mode=self.mode)

    def _evaluate_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The monitored metric on every validation batch (not the guard's first few)."""
        return surgery.evaluate(trainer, pl_module, self.monitor, max_batches=None)

    def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule, rung: int) -> Kept:
        state = {key: value.detach().to("cpu", copy=True) for key, value in pl_module.state_dict().items()}
        return Kept(rung, state, surgery.optimizer_states(trainer, pl_module))

    def _climb(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """At an epoch start: the first rung once the trigger fires, then validate, keep and climb, or roll back."""
        ladder, epoch = self._ladder, trainer.current_epoch
        if ladder.finished or self.failure is not None:
            return
        if not ladder.started:
            if self._due(epoch):
                dense = self._evaluate_all(trainer, pl_module)
                ladder.start(epoch, trainer.max_epochs, dense, self._keep(trainer, pl_module, 0))
                plan = ladder.plan
                self._info(
                    f"LMDCompression ladder: dense {self.monitor} {dense:.4f} (reference {ladder.dense:.4f}, with the "
                    f"epochs before); up to {plan.rungs} rungs of at most "
                    f"{plan.rung_epochs} epochs from epoch {epoch}, final fine-tune from epoch {plan.final_from} at "
                    f"the latest"
                )
                if self.trigger != "epoch" and not self._watch.monitor.converged:
                    self._info(
                        "LMDCompression ladder: started at the forced epoch, before the trigger saw convergence; "
                        "a dense model that is still improving sets a reference below what it would reach"
                    )
                self._compress(trainer, pl_module)
                ladder.finished = ladder.pending is None  # the first rung failed: dense, and said why
            return
        if ladder.validation_due(epoch, self.convergence.converged):
            self._validate_rung(trainer, pl_module)

    def _validate_rung(self, trainer: pl.Trainer, pl_module: pl.LightningModule, last: bool = False) -> None:
        ladder, epoch = self._ladder, trainer.current_epoch
        value = self._evaluate_all(trainer, pl_module)
        kept = ladder.decide(epoch, value)
        rung = ladder.rungs[-1]
        if not kept and not self._roll_back(trainer, pl_module):
            ladder.roll_back_failed()
        self.reports[-1]["ladder"] = dataclasses.asdict(rung)
        self._info(
            f"LMDCompression ladder: rung {rung.rung} ({rung.params:,} params, {rung.smaller:.2f}× smaller) "
            f"{self.monitor} {rung.value:.4f} after fine-tuning (mean of its last {rung.averaged} validations; "
            f"{value:.4f} now), {_bar_name(ladder, rung)} {rung.bar:.4f}: {rung.decision}"
        )
        if kept:
            ladder.kept = self._keep(trainer, pl_module, rung.rung)
        if trainer.loggers:
            from lmd_lightning.callback import logs

            logs.log_ladder(trainer.loggers, trainer.global_step, ladder, self.monitor)
        if rung.decision in ("kept", "rolled back") and not last and ladder.more(epoch):
            self._compress(trainer, pl_module)  # the next step, or half of one after a roll-back (ladder.py)
            ladder.finished = ladder.pending is None  # that rung failed: the kept one trains on
        else:
            ladder.finished = True
        if ladder.finished and not last:
            standing = rung if rung.decision == "roll-back failed" else ladder.best
            where = "the dense model" if standing is None else f"rung {standing.rung}"
            self._info(f"LMDCompression ladder: done; {where} trains for the rest of the run")

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Back to the last kept rung: its structure, weights and optimizer moments; the LR schedule runs on.

        If that fails, the model and optimizers stay as they were (the rejected rung, which trains on), a
        warning says why, and False is returned.
        """
        kept, before, record = self._ladder.kept, surgery.snapshot(trainer), undo_record(pl_module)
        state = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}
        try:
            restore_structure_(pl_module, kept.state)
            pl_module.load_state_dict(kept.state)
            surgery.rebuild(trainer, before)
            surgery.load_optimizer_states(trainer, pl_module, kept.optimizers)
        except Exception as err:
            undo(pl_module, record)
            pl_module.load_state_dict(state)
            surgery.restore(trainer, before)
            self.failure = f"roll-back failed: {type(err).__name__}: {err}"
            self._warn(f"LMDCompression ladder: {self.failure}; the rejected rung trains on")
            return False
        self.convergence.reset()
        where = "the dense model" if kept.rung == 0 else f"rung {kept.rung}"
        self._info(f"LMDCompression ladder: rolled back to {where}")
        return True


def _bar_name(ladder: Ladder, rung: Rung) -> str:
    """What the rung was held to: the dense reference, or the value of an earlier kept rung that beat it."""
    if rung.bar == ladder.dense:
        return "dense reference"
    holders = [kept.rung for kept in ladder.rungs if kept.decision == "kept" and kept.value == rung.bar]
    return f"bar (rung {holders[0]}'s)" if holders else "bar"

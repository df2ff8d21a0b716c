"""rounds="auto": compress in rungs, fine-tune and validate each, keep the last rung that holds the metric.

Framework-free: the callback hands in the epochs, the measured values and the model's state; this
module decides. The ladder, for a Trainer of E epochs whose trigger fires at epoch t₀:

- R = E − t₀ epochs are left. A rung fine-tunes for at most k = max(1, round(R/6)) epochs
  (less when ‖∇L‖ re-converges first, at least one epoch); the last max(1, R//4) epochs are kept
  for the final fine-tune, so n = max(1, (R − max(1, R//4)) // k) rungs fit before it. With
  E = 30 and t₀ = 10: five rungs of three epochs, then five epochs of final fine-tuning.
- While every rung holds, rung j applies `policy.for_round(j, n)` to the model the last kept rung
  left (in general the rung at position a/b applies `for_round(a, b)`): each keeps the
  n-th root of the policy's share, so rung n reaches the policy, the most aggressive setting
  allowed (GlobalBudget(params=0.05), n = 5: 55%, 30%, 16%, 9%, 5% of the dense parameters), and
  the ladder stops there.
- The dense metric is measured on the whole validation set at t₀; the dense reference
  is its mean with the validation loop's values at the end of the two epochs before (when the
  loop validated those epochs on every batch), so that one lucky or unlucky epoch of a dense model
  that fluctuates from epoch to epoch does not set the bar. Each rung's metric is measured on the
  whole validation set after its fine-tuning and averaged the same way, with the loop's values at
  the end of the rung's own epochs before, leaving out its first epoch (the model recovering from
  the cut): min(3, k − 1) values for a rung of k epochs. A dense MLP at a constant Adam learning
  rate moves by 1–3 points of validation accuracy from one epoch to the next on MNIST-1D (3,200
  validation samples), so one epoch's value decides little against a one-point bar.
- The bar is the best value validated so far: the dense reference, or a kept rung's value where
  that is higher (lower for mode="min"). The dense model measured at t₀ has not finished
  training, and a kept rung fine-tuned for longer shows what the run reaches by then: a trigger
  that fires early (scikit-learn's digits: epoch 7 of 40, 1.7 points below dense's final accuracy)
  would otherwise let every rung fall to a bar the dense model has long passed. A rung
  within `max_drop` of the bar is kept:
  its weights and optimizer state are copied (to the CPU, and into checkpoints) and the next rung
  starts. A rung that is not is rolled back to the last kept one.
- After the first roll-back the limit lies between the kept setting and the rejected one, so the
  rung slots left bisect it: each next rung takes half the step from the kept rung towards the
  closest rejected one (in the policy's own scale: the share of what is left, geometrically), so
  that a ladder of four rungs at about 2×, 4×, 8× that fails at 8× tries about 5.7× with its
  last. Rung j of the climb sits at position j/n of the way from dense to the policy; a bisection
  doubles the denominator. The last kept rung trains for the rest of the run.
- The LR schedule follows the Trainer's epochs throughout: a roll-back restores weights and
  optimizer moments, not the schedule's position, so the final fine-tune anneals as planned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lmd_lightning.truncate.policies import RankPolicy

__all__ = ["AUTO", "DECISIONS", "REFERENCE_EPOCHS", "Kept", "Ladder", "LadderPlan", "Rung"]

AUTO = "auto"
REFERENCE_EPOCHS = 3  # dense validations averaged into the reference: t₀ and the two epochs before
DECISIONS = ("pending", "kept", "rolled back", "roll-back failed")


@dataclass(frozen=True)
class LadderPlan:
    """The ladder's timing, fixed when the trigger fires (see the module docstring)."""

    start: int  # t₀: the epoch of the first rung
    rung_epochs: int  # k: the most epochs a rung fine-tunes before it is validated
    rungs: int  # n: rungs that fit before the final fine-tune
    last_epoch: int  # E: the Trainer's max_epochs

    @classmethod
    def derive(cls, start: int, max_epochs: int) -> LadderPlan:
        left = max(max_epochs - start, 1)
        k = max(1, round(left / 6))
        final = max(1, left // 4)
        return cls(start, k, max(1, (left - final) // k), max_epochs)

    @property
    def final_from(self) -> int:
        """The epoch from which no new rung starts: the final fine-tune."""
        return self.start + self.rungs * self.rung_epochs


@dataclass
class Rung:
    """One rung: compressed at `epoch` to `params`, validated at `validated_epoch` to `value`."""

    rung: int  # 1-based
    epoch: int
    setting: float | None  # the knob of the policy applied in this rung (a share of what the last rung left)
    params: int  # the model's parameters after this rung's truncation
    params_before: int  # the dense model's
    value: float | None = None  # what was decided on: `last` averaged with the rung's loop values before
    validated_epoch: int | None = None
    decision: str = "pending"
    last: float | None = None  # the full validation at `validated_epoch` alone
    averaged: int = 1  # validations in `value`
    at: int = 0  # its position between dense (0) and the policy (`of`): at/of of the way, see the module docstring
    of: int = 0
    bar: float | None = None  # what it had to hold within max_drop: the dense reference or a kept rung's value

    @property
    def smaller(self) -> float:
        return self.params_before / max(self.params, 1)


@dataclass
class Kept:
    """A copy of the last kept state: the model's state dict and each optimizer's per-parameter state by name."""

    rung: int  # 0: the dense model
    state: dict[str, Tensor]
    optimizers: list[dict[str, dict[str, Any]]]


@dataclass
class Ladder:
    """The ladder's state; `state_dict()` holds everything a resumed run needs, the kept copy included."""

    max_drop: float
    mode: str = "max"
    plan: LadderPlan | None = None
    dense: float | None = None  # the reference: the dense metric at t₀ averaged with the loop's two epochs before
    dense_at_trigger: float | None = None  # the dense metric measured at t₀ alone
    recent: list[tuple[int, float]] = field(default_factory=list)  # (epoch, value) of full dense validations
    rungs: list[Rung] = field(default_factory=list)
    kept: Kept | None = None
    finished: bool = False
    kept_at: int = 0  # the last kept rung's position: kept_at/scale of the way from dense to the policy
    scale: int = 0
    bounded: bool = False  # a rung was rolled back: the limit lies between kept_at and kept_at + 1 (of scale)

    @property
    def started(self) -> bool:
        return self.plan is not None

    @property
    def pending(self) -> Rung | None:
        return self.rungs[-1] if self.rungs and self.rungs[-1].decision == "pending" else None

    def observe(self, epoch: int, value: float) -> None:
        """The validation loop's value of the monitor at an epoch's end (all batches): the last of each epoch."""
        kept = [pair for pair in self.recent if pair[0] != epoch]
        self.recent = [*kept[-(REFERENCE_EPOCHS - 1) :], (epoch, value)]

    def _averaged(self, epoch: int, value: float, since: int, count: int) -> tuple[float, int]:
        """`value` (measured at `epoch`'s start) averaged with the loop's values of epochs in [since, epoch − 1).

        The loop's value at epoch − 1 is of the model just measured: not counted twice. At most `count` in all.
        """
        window = [seen_value for seen, seen_value in self.recent if since <= seen < epoch - 1]
        earlier = window[max(0, len(window) - count + 1) :]
        return (sum(earlier) + value) / (len(earlier) + 1), len(earlier) + 1

    def start(self, epoch: int, max_epochs: int, dense: float, kept: Kept) -> None:
        """At t₀: the plan, the reference (see the module docstring) and the dense copy to roll back to."""
        self.plan, self.kept = LadderPlan.derive(epoch, max_epochs), kept
        self.scale = self.plan.rungs  # the climb's positions are j/n
        self.dense_at_trigger = dense
        self.dense = self._averaged(epoch, dense, since=0, count=REFERENCE_EPOCHS)[0]

    def next_position(self) -> tuple[int, int]:
        """(at, of) of the next rung: one step on while climbing, half a step once a rung was rolled back."""
        return (2 * self.kept_at + 1, 2 * self.scale) if self.bounded else (self.kept_at + 1, self.scale)

    def policy(self, policy: RankPolicy) -> RankPolicy:
        """The policy of the next rung, applied to the model the last kept rung left."""
        return policy.for_round(*self.next_position())

    def add(self, epoch: int, setting: float | None, params: int, params_before: int) -> Rung:
        at, of = self.next_position()
        rung = Rung(len(self.rungs) + 1, epoch, setting, params, params_before, at=at, of=of)
        self.rungs.append(rung)
        return rung

    def validation_due(self, epoch: int, converged: bool) -> bool:
        """At this epoch's start: has the pending rung fine-tuned long enough (or re-converged)?"""
        rung = self.pending
        if rung is None:
            return False
        trained = epoch - rung.epoch
        if trained < 1:
            return False
        return trained >= self.plan.rung_epochs or converged or epoch >= self.plan.last_epoch - 1

    @property
    def bar(self) -> float:
        """The best value validated so far: the dense reference, or a kept rung's where that is better."""
        values = [self.dense] + [rung.value for rung in self.rungs if rung.decision == "kept"]
        return max(values) if self.mode == "max" else min(values)

    def passes(self, value: float) -> bool:
        bar = self.bar
        drop = bar - value if self.mode == "max" else value - bar
        return drop <= self.max_drop

    def decide(self, epoch: int, value: float) -> bool:
        """Record the pending rung's validated value; True if it is kept."""
        rung = self.pending
        # the rung's first epoch is left out: the model is still recovering from the cut there
        count = min(REFERENCE_EPOCHS, max(1, epoch - rung.epoch - 1))
        rung.value, rung.averaged = self._averaged(epoch, value, since=rung.epoch + 1, count=count)
        rung.last, rung.validated_epoch, rung.bar = value, epoch, self.bar
        rung.decision = "kept" if self.passes(rung.value) else "rolled back"
        kept = rung.decision == "kept"
        self.kept_at, self.scale = (rung.at if kept else rung.at - 1), rung.of
        self.bounded = self.bounded or not kept
        return kept

    def roll_back_failed(self) -> None:
        """The pending rung's roll-back failed: the model stays on it, and so does the position."""
        rung = self.rungs[-1]
        rung.decision, self.kept_at, self.scale = "roll-back failed", rung.at, rung.of

    def more(self, epoch: int) -> bool:
        """Whether another rung starts at `epoch` (after a decided one): a rung slot is left.

        The climb reaches the policy itself (position n/n) only with its n-th rung, the last slot.
        """
        return len(self.rungs) < self.plan.rungs and epoch < self.plan.final_from

    @property
    def best(self) -> Rung | None:
        """The last kept rung (None: the dense model)."""
        kept = [rung for rung in self.rungs if rung.decision == "kept"]
        return kept[-1] if kept else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "max_drop": self.max_drop,
            "mode": self.mode,
            "plan": None if self.plan is None else dataclasses.asdict(self.plan),
            "dense": self.dense,
            "dense_at_trigger": self.dense_at_trigger,
            "recent": [list(pair) for pair in self.recent],
            "rungs": [dataclasses.asdict(rung) for rung in self.rungs],
            # the copy itself, not a deep copy of it (asdict would copy every tensor at every checkpoint)
            "kept": None
            if self.kept is None
            else {field.name: getattr(self.kept, field.name) for field in dataclasses.fields(self.kept)},
            "finished": self.finished,
            "kept_at": self.kept_at,
            "scale": self.scale,
            "bounded": self.bounded,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plan = None if state["plan"] is None else LadderPlan(**state["plan"])
        self.dense, self.finished = state["dense"], state["finished"]
        self.dense_at_trigger = state["dense_at_trigger"]
        self.recent = [(int(epoch), float(value)) for epoch, value in state["recent"]]
        self.rungs = [Rung(**rung) for rung in state["rungs"]]
        self.kept = None if state["kept"] is None else Kept(**state["kept"])
        if "kept_at" in state:
            self.kept_at, self.scale, self.bounded = state["kept_at"], state["scale"], state["bounded"]
        elif self.plan is not None:  # saved before bisection: every rung was a full step, none after a roll-back
            for rung in self.rungs:
                rung.at, rung.of = rung.rung, self.plan.rungs
            self.kept_at, self.scale = sum(rung.decision == "kept" for rung in self.rungs), self.plan.rungs
            self.bounded = any(rung.decision != "kept" and rung.decision != "pending" for rung in self.rungs)

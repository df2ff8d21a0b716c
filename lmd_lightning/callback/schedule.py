"""When compression rounds happen: the earliest epoch, the forced deadlines, one round per epoch.

Framework-free. Round k (1-based) of R:
- trigger "epoch": at epoch min_epochs + ⌊(last − min_epochs)·(k−1)/(R−1)⌋ (the first at min_epochs);
- trigger "grad_norm": as soon as ‖∇L‖ has converged, and by min_epochs + ⌊(last − min_epochs)·k/R⌋
  at the latest, so the last round is forced at `last`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmd_lightning.checks import check_int
from lmd_lightning.truncate.policies import RankPolicy

__all__ = ["Schedule", "check_rounds", "default_last_epoch"]


def check_rounds(policy: RankPolicy, stable_rank: bool, rounds: int, min_epochs: int, max_epochs: int | None) -> None:
    """The callback's schedule arguments, and whether `policy` (and the trigger) can be spread over `rounds`."""
    check_int(min_epochs, "min_epochs", 0)
    check_int(max_epochs, "max_epochs", 0, optional=True)
    if max_epochs is not None and max_epochs < min_epochs:
        raise ValueError(f"`max_epochs` ({max_epochs}) must be >= `min_epochs` ({min_epochs})")
    check_int(rounds, "rounds", 1)
    if rounds > 1 and policy.knob is None:
        raise ValueError(f"`rounds`={rounds} needs a policy with a knob to spread over rounds; {policy!r} has none")
    if rounds > 1:
        policy.for_round(rounds, rounds)  # raises for a policy that cannot be spread over rounds
    if rounds > 1 and stable_rank:
        raise ValueError(f"`rounds`={rounds}: the stable-rank trigger switches once; use rounds=1")


def default_last_epoch(min_epochs: int, trainer_max_epochs: int | None) -> int | None:
    """Two thirds of the run: late enough for training to have gone somewhere, a third left to fine-tune."""
    if trainer_max_epochs is None or trainer_max_epochs < 0:
        return None
    return max(min_epochs, (2 * trainer_max_epochs) // 3)


@dataclass(frozen=True)
class Schedule:
    min_epochs: int  # no round before this epoch
    last: int | None  # the epoch by which the last round is forced; None: never forced
    rounds: int = 1
    by_epoch: bool = False  # trigger="epoch": rounds at fixed epochs, the monitor is ignored

    def deadline(self, k: int) -> int | None:
        """The epoch by which round k happens (the exact epoch when `by_epoch`)."""
        if self.by_epoch:
            if self.rounds == 1:
                return self.min_epochs
            span = self.last - self.min_epochs if self.last is not None else self.rounds - 1
            return self.min_epochs + span * (k - 1) // (self.rounds - 1)
        if self.last is None:
            return None
        return self.min_epochs + (self.last - self.min_epochs) * k // self.rounds

    def due(self, epoch: int, done: list[int], converged: bool) -> bool:
        """Should the next round run at the start of `epoch`, given the epochs of rounds `done`?"""
        if len(done) >= self.rounds or epoch < self.min_epochs or (done and epoch <= done[-1]):
            return False
        deadline = self.deadline(len(done) + 1)
        reached = deadline is not None and epoch >= deadline
        return reached if self.by_epoch else converged or reached

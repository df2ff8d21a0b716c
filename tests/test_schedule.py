from __future__ import annotations

import pytest

from lmd_lightning.callback.schedule import Schedule, default_last_epoch


def test_default_last_epoch_is_two_thirds_of_the_run() -> None:
    assert default_last_epoch(1, 30) == 20
    assert default_last_epoch(1, 6) == 4
    assert default_last_epoch(5, 6) == 5  # never before min_epochs
    assert default_last_epoch(1, None) is None and default_last_epoch(1, -1) is None


def test_single_round_by_epoch_happens_exactly_at_min_epochs() -> None:
    schedule = Schedule(min_epochs=3, last=20, by_epoch=True)
    assert [e for e in range(30) if schedule.due(e, [], converged=True)] == list(range(3, 30))
    assert not schedule.due(2, [], converged=True)
    assert not schedule.due(5, [3], converged=True)  # done: one round only


@pytest.mark.parametrize(("rounds", "expected"), [(2, [1, 4]), (3, [1, 2, 4]), (4, [1, 2, 3, 4])])
def test_rounds_by_epoch_spread_to_last(rounds: int, expected: list[int]) -> None:
    schedule = Schedule(min_epochs=1, last=4, rounds=rounds, by_epoch=True)
    assert [schedule.deadline(k) for k in range(1, rounds + 1)] == expected


def test_grad_norm_rounds_fire_on_convergence_or_by_their_deadline() -> None:
    schedule = Schedule(min_epochs=1, last=10, rounds=2)
    assert [schedule.deadline(k) for k in (1, 2)] == [5, 10]
    assert schedule.due(2, [], converged=True) and not schedule.due(2, [], converged=False)
    assert schedule.due(5, [], converged=False)  # forced
    assert not schedule.due(2, [2], converged=True)  # one round per epoch
    assert schedule.due(3, [2], converged=True) and not schedule.due(3, [2], converged=False)
    assert schedule.due(10, [2], converged=False) and not schedule.due(11, [2, 10], converged=True)
    assert not Schedule(min_epochs=1, last=None).due(100, [], converged=False)  # never forced

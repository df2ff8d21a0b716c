"""The accuracy guard: search a policy's knob for the most compressive one-shot-safe setting.

Weight-space knobs are poor proxies for accuracy (a LeNet-300-100 layer needs rank ~180 of 300
to keep 90% of its weight energy, yet rank 20 loses 0.5 points one-shot), so the guard measures
the monitored validation metric right before truncation and right after it, before any
fine-tuning, and bisects the knob (energy, eps, ratio, budget) between the user's setting and
the mild or aggressive end of its range. Framework-free: the caller supplies the callables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lmd_lightning.policies import RankPolicy
from lmd_lightning.report import CompressionReport

__all__ = ["GuardOutcome", "GuardResult", "check_guard_arguments", "measure_and_guard", "search_knob", "sweep_knob"]


def _check_int(value: Any, arg: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{arg}` must be an int >= {low}, got {value!r}")


def check_guard_arguments(
    monitor: str | None, max_accuracy_drop: float | None, mode: str, guard_batches: int, search_steps: int
) -> None:
    """Validate the guard's arguments as LMDCompression takes them."""
    if max_accuracy_drop is not None and monitor is None:
        raise ValueError(f"`max_accuracy_drop`={max_accuracy_drop!r} needs `monitor`, the metric it guards")
    if monitor is not None and not isinstance(monitor, str):
        raise TypeError(f"`monitor` must be the name of a logged validation metric, got {monitor!r}")
    number = isinstance(max_accuracy_drop, (int, float)) and not isinstance(max_accuracy_drop, bool)
    if max_accuracy_drop is not None and not (number and max_accuracy_drop >= 0):
        raise ValueError(f"`max_accuracy_drop` must be a number >= 0, got {max_accuracy_drop!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}")
    _check_int(guard_batches, "guard_batches", 1)
    _check_int(search_steps, "search_steps", 0)


@dataclass
class GuardResult:
    policy: RankPolicy | None  # the setting to apply; None keeps the model dense
    before: float  # the metric on the dense model
    trials: list[dict[str, Any]] = field(default_factory=list)  # knob, metric, drop, params, accepted


def search_knob(
    policy: RankPolicy,
    evaluate: Callable[[], float],
    apply: Callable[[RankPolicy], CompressionReport],
    undo: Callable[[], None],
    max_drop: float,
    mode: str = "max",
    steps: int = 5,
) -> GuardResult:
    """Most compressive knob whose one-shot drop of the metric stays within `max_drop`.

    `apply(p)` compresses the live model with policy `p`, `undo()` puts the dense layers back,
    `evaluate()` measures the metric. `mode="max"`: higher is better (accuracy); "min": lower is
    better (loss). If the user's setting already passes with at most half the allowed drop, the
    search moves towards the aggressive end; if it fails, towards the mild end; if even the
    mildest setting fails, the result keeps the model dense (`policy=None`).
    """
    result = GuardResult(policy=None, before=evaluate())

    def passes(candidate: RankPolicy) -> bool:
        report = apply(candidate)
        value = evaluate()
        undo()
        drop = result.before - value if mode == "max" else value - result.before
        result.trials.append({
            "knob": candidate.knob_value, "metric": value, "drop": drop,
            "params": report.model_params_after, "accepted": drop <= max_drop,
        })
        return drop <= max_drop

    if not passes(policy):
        if policy.knob is None or not passes(policy.with_knob(policy.knob_range[0])):
            return result
        good, bad = policy.knob_range[0], policy.knob_value
    elif policy.knob is None or result.trials[-1]["drop"] > max_drop / 2:
        result.policy = policy
        return result
    elif passes(policy.with_knob(policy.knob_range[1])):
        result.policy = policy.with_knob(policy.knob_range[1])
        return result
    else:
        good, bad = policy.knob_value, policy.knob_range[1]
    for _ in range(steps):
        middle = (good + bad) / 2
        good, bad = (middle, bad) if passes(policy.with_knob(middle)) else (good, middle)
    result.policy = policy.with_knob(good)
    return result


def sweep_knob(
    policy: RankPolicy,
    evaluate: Callable[[], float],
    apply: Callable[[RankPolicy], CompressionReport],
    undo: Callable[[], None],
    points: int,
) -> list[dict[str, Any]]:
    """The rank–accuracy trade-off: the metric right after truncation at `points` knob values.

    The knob runs evenly from the mild to the aggressive end of its range; nothing is trained.
    """
    if policy.knob is None or points < 2:
        return []
    mild, aggressive = policy.knob_range
    rows = []
    for i in range(points):
        candidate = policy.with_knob(mild + (aggressive - mild) * i / (points - 1))
        report = apply(candidate)
        rows.append({"knob": candidate.knob_value, "metric": evaluate(), "params": report.model_params_after})
        undo()
    return rows


@dataclass
class GuardOutcome:
    policy: RankPolicy | None  # the policy to apply; None keeps the model dense
    guard: dict[str, Any]  # before, after (filled in by the caller), knob, trials
    sweep: list[dict[str, Any]]
    knob: str | None = None

    def describe(self, metric: str) -> list[str]:
        """One line per trial of the guard's search."""
        return [
            f"{self.knob or 'policy'}={t['knob']} → {metric} {t['metric']:.4f} (drop {t['drop']:+.4f}, "
            f"{t['params']:,} params){'' if t['accepted'] else ' rejected'}"
            for t in self.guard["trials"]
        ]


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def measure_and_guard(
    policy: RankPolicy,
    evaluate: Callable[[], float],
    apply: Callable[[RankPolicy], CompressionReport],
    undo: Callable[[], None],
    max_drop: float | None,
    mode: str,
    steps: int,
    sweep_points: int,
) -> GuardOutcome:
    """The sweep, the metric before truncation and, when `max_drop` is set, the guard's search.

    While the trials run, the "lmd_lightning" logger drops INFO records: each trial's per-layer
    "unchanged" lines would contradict the compression finally applied; `describe` reports them.
    """
    with _quiet(logging.getLogger("lmd_lightning")):
        sweep = sweep_knob(policy, evaluate, apply, undo, sweep_points)
        if max_drop is None:
            guard = {"before": evaluate(), "after": None, "knob": policy.knob_value, "trials": []}
            return GuardOutcome(policy, guard, sweep, policy.knob)
        result = search_knob(policy, evaluate, apply, undo, max_drop, mode, steps)
    chosen = None if result.policy is None else result.policy.knob_value
    guard = {"before": result.before, "after": None, "knob": chosen, "trials": result.trials}
    return GuardOutcome(result.policy, guard, sweep, policy.knob)

"""The accuracy guard: search a policy's knob for the most compressive one-shot-safe setting.

Weight-space knobs are poor proxies for accuracy (a LeNet-300-100 layer needs rank ~180 of 300
to keep 90% of its weight energy, yet rank 20 loses 0.5 points one-shot), so the guard measures
the monitored validation metric right before truncation and right after it, before any
fine-tuning, and bisects the knob (energy, eps, ratio, budget) between the user's setting and
the mild or aggressive end of its range. Framework-free: the caller supplies the callables.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from lmd_lightning.checks import check_int, check_number
from lmd_lightning.truncate.policies import RankPolicy
from lmd_lightning.truncate.report import CompressionReport

__all__ = [
    "GUARD_KEYWORDS",
    "MODES",
    "Guard",
    "GuardOutcome",
    "GuardRecord",
    "GuardResult",
    "SweepPoint",
    "Trial",
    "check_monitor",
    "guard_from_keywords",
    "measure_and_guard",
    "search_knob",
    "sweep_from_dicts",
    "sweep_knob",
]

MODES = ("max", "min")


@dataclass(frozen=True)
class Guard:
    """How `LMDCompression` measures its `monitor` around a truncation, and the accuracy guard.

    Every measurement reads the first `batches` validation batches per loader again, so keep the
    validation loader unshuffled.
    """

    # None: measure and sweep only; a number: bisect the knob so that the one-shot drop stays within it
    max_drop: float | None = None
    batches: int = 10  # validation batches per loader for each measurement
    search_steps: int = 5  # bisection steps of the guard's search
    sweep_points: int = 8  # settings of the policy's knob in the rank–accuracy sweep; 0 or 1: no sweep

    def __post_init__(self) -> None:
        if self.max_drop is not None:
            check_number(self.max_drop, "max_drop", 0, owner="Guard")
        check_int(self.batches, "batches", 1, owner="Guard")
        check_int(self.search_steps, "search_steps", 0, owner="Guard")
        check_int(self.sweep_points, "sweep_points", 0, owner="Guard")


# Keywords of version 0.1 that now live in `Guard`: old name → Guard field.
GUARD_KEYWORDS = {
    "max_accuracy_drop": "max_drop",
    "guard_batches": "batches",
    "search_steps": "search_steps",
    "sweep_points": "sweep_points",
}


def guard_from_keywords(guard: Guard | None, old: dict[str, Any], monitor: str | None) -> Guard:
    """`guard`, with the 0.1 keywords folded in (with a deprecation warning, validated as 0.1 did)."""
    if guard is not None and not isinstance(guard, Guard):
        raise TypeError(f"`guard` must be a Guard or None, got {guard!r}")
    if not old:
        return guard or Guard()
    if guard not in (None, Guard()):  # a default Guard (Hydra's config builds one) takes the old keywords
        raise ValueError(f"pass either `guard` or the deprecated keywords {sorted(old)}, not both")
    drop = old.get("max_accuracy_drop")
    if drop is not None and monitor is None:
        raise ValueError(f"`max_accuracy_drop`={drop!r} needs `monitor`, the metric it guards")
    if drop is not None:
        check_number(drop, "max_accuracy_drop", 0)
    for name, low in (("guard_batches", 1), ("search_steps", 0), ("sweep_points", 0)):
        if name in old:
            check_int(old[name], name, low)
    warnings.warn(
        f"LMDCompression({', '.join(f'{name}=...' for name in old)}) is deprecated; pass "
        f"guard=Guard({', '.join(f'{GUARD_KEYWORDS[name]}=...' for name in old)})",
        DeprecationWarning,
        stacklevel=3,
    )
    return dataclasses.replace(guard or Guard(), **{GUARD_KEYWORDS[name]: value for name, value in old.items()})


def check_monitor(monitor: str | None, mode: str, guard: Guard) -> None:
    """Validate the callback's `monitor` and `mode` together with its `guard`."""
    if guard.max_drop is not None and monitor is None:
        raise ValueError(f"Guard `max_drop`={guard.max_drop!r} needs `monitor`, the metric it guards")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise TypeError(f"`monitor` must be the name of a logged validation metric, got {monitor!r}")
    if mode not in MODES:
        raise ValueError(f"`mode` must be 'max' or 'min', got {mode!r}")


@dataclass
class Trial:
    """One setting the guard tried: the knob's `setting`, the monitored `value` right after truncation."""

    setting: float | None
    value: float
    drop: float  # how much worse than before truncation (in the direction of `mode`)
    params: int  # the model's parameters at this setting
    accepted: bool


@dataclass
class SweepPoint:
    """One point of the rank–accuracy sweep: the monitored `value` at a knob `setting`, no training."""

    setting: float | None
    value: float
    params: int


@dataclass
class GuardRecord:
    """The monitored metric around one compression, and every trial of the guard's search."""

    before: float  # on the dense model
    knob: str | None = None  # the policy's knob ("energy", "fraction", …); None for a policy without one
    chosen: float | None = None  # the setting applied; None: kept dense, or no knob
    after: float | None = None  # right after truncation, before fine-tuning
    final: float | None = None  # after fine-tuning, at the end of training
    trials: list[Trial] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuardRecord:
        """Read `to_dict()`'s output, or the plain dict that checkpoints of version 0.1 hold."""
        if "chosen" not in data:  # 0.1: "knob" held the chosen setting, trials named it "knob" and the value "metric"
            trials = [Trial(t["knob"], t["metric"], t["drop"], t["params"], t["accepted"]) for t in data["trials"]]
            return cls(data["before"], None, data["knob"], data["after"], data.get("final"), trials)
        return cls(**{**data, "trials": [Trial(**t) for t in data["trials"]]})


def sweep_from_dicts(rows: list[dict[str, Any]]) -> list[SweepPoint]:
    """`SweepPoint`s from their dicts, or from the 0.1 rows ({"knob", "metric", "params"})."""
    return [SweepPoint(r.get("setting", r.get("knob")), r.get("value", r.get("metric")), r["params"]) for r in rows]


@dataclass
class GuardResult:
    policy: RankPolicy | None  # the setting to apply; None keeps the model dense
    before: float  # the metric on the dense model
    trials: list[Trial] = field(default_factory=list)


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
        result.trials.append(Trial(candidate.knob_value, value, drop, report.model_params_after, drop <= max_drop))
        return drop <= max_drop

    if not passes(policy):
        if policy.knob is None or not passes(policy.with_knob(policy.knob_range[0])):
            return result
        good, bad = policy.knob_range[0], policy.knob_value
    elif policy.knob is None or result.trials[-1].drop > max_drop / 2:
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
) -> list[SweepPoint]:
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
        rows.append(SweepPoint(candidate.knob_value, evaluate(), report.model_params_after))
        undo()
    return rows


@dataclass
class GuardOutcome:
    policy: RankPolicy | None  # the policy to apply; None keeps the model dense
    record: GuardRecord  # `after` and `final` are filled in by the caller
    sweep: list[SweepPoint]

    def describe(self, monitor: str) -> list[str]:
        """One line per trial of the guard's search."""
        return [
            f"{self.record.knob or 'policy'}={t.setting} → {monitor} {t.value:.4f} (drop {t.drop:+.4f}, "
            f"{t.params:,} params){'' if t.accepted else ' rejected'}"
            for t in self.record.trials
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
            return GuardOutcome(policy, GuardRecord(evaluate(), policy.knob, policy.knob_value), sweep)
        result = search_knob(policy, evaluate, apply, undo, max_drop, mode, steps)
    chosen = None if result.policy is None else result.policy.knob_value
    return GuardOutcome(result.policy, GuardRecord(result.before, policy.knob, chosen, trials=result.trials), sweep)


class GuardRun:
    """The monitored metric inside a fit: the sweep and the guard's search at each compression.

    Framework-free like the rest of this module: the callback hands in how to evaluate, apply and
    undo. `record` and `sweep` belong to the latest compression and go into checkpoints.
    """

    def __init__(self, monitor: str | None, mode: str, guard: Guard) -> None:
        check_monitor(monitor, mode, guard)
        self.monitor, self.mode, self.guard = monitor, mode, guard
        self.record: GuardRecord | None = None
        self.sweep: list[SweepPoint] = []
        self._logged = False  # the monitor was seen among the logged metrics once

    def check_logged(self, logged: Iterable[str]) -> None:
        """At the first real validation: a `monitor` that validation does not log is an error, listing what it logs."""
        if self.monitor is None or self._logged:
            return
        if self.monitor not in logged:
            raise KeyError(
                f"LMDCompression `monitor` metric {self.monitor!r} was not logged in validation; "
                f"available: {sorted(logged)}"
            )
        self._logged = True

    def choose(
        self,
        policy: RankPolicy,
        evaluate: Callable[[], float],
        apply: Callable[[RankPolicy], CompressionReport],
        undo: Callable[[], None],
        info: Callable[[str], None],
    ) -> RankPolicy | None:
        """The policy to apply (None: stay dense); measures the sweep, and searches when `max_drop` is set."""
        if self.monitor is None:
            return policy
        g = self.guard
        outcome = measure_and_guard(
            policy, evaluate, apply, undo, g.max_drop, self.mode, g.search_steps, g.sweep_points
        )
        self.record, self.sweep = outcome.record, outcome.sweep
        for line in outcome.describe(self.monitor):
            info(f"LMDCompression guard: {line}")
        return outcome.policy

    def state_dict(self) -> dict[str, Any]:
        return {
            "guard": None if self.record is None else self.record.to_dict(),
            "sweep": [dataclasses.asdict(point) for point in self.sweep],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.record = None if state["guard"] is None else GuardRecord.from_dict(state["guard"])
        self.sweep = sweep_from_dicts(state["sweep"])

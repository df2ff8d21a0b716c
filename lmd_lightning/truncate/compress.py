"""compress_: the functional core. Works with no Lightning at all (`restore.py` rebuilds checkpoints).

`compress_` runs in two phases so that a failure can never leave a half-swapped model:
1. plan: read every targeted weight, compute spectra, choose ranks, compute all factors;
   non-finite weights raise here, before anything has changed. With metric="data" the
   calibration passes run here too, with forward hooks only (calibration.py);
2. apply: swap the new modules in (and shrink already-factored ones).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from lmd_lightning.checks import check_bool, check_choice, check_module
from lmd_lightning.layers.base import PARAMETRIZATIONS, FactoredModule, copy_requires_grad
from lmd_lightning.layers.registry import kind_of, split_of
from lmd_lightning.layers.svd import METHODS, Factors, SVDFailedError, check_finite, singular_values, truncated_svd
from lmd_lightning.truncate.calibration import Calibration, DataMetric, layer_weight
from lmd_lightning.truncate.check import check_step
from lmd_lightning.truncate.data_metric import LayerMoments, data_factors, data_spectrum
from lmd_lightning.truncate.loss_metric import LossMetric, LossMoments, loss_factors, loss_moments, loss_spectrum
from lmd_lightning.truncate.policies import LayerSpectrum, RankPolicy
from lmd_lightning.truncate.report import CompressionReport, LayerReport
from lmd_lightning.truncate.targets import (
    TIED,
    FilterFn,
    Patterns,
    Target,
    disable_fused_fast_paths,
    find_targets,
    merge_unchanged_splits_,
    shared_factors,
    split_composites_,
    swap_module,
    undo,
    undo_record,
)

__all__ = ["JOINT_WITH_MAPS", "compress_"]

JOINT_WITH_MAPS = (
    "`metric_maps=True` cannot be combined with tied='joint': a head and its embedding share one set "
    "of factors, and separate metric maps would untie them"
)

log = logging.getLogger("lmd_lightning")


@dataclass
class _Plan:
    """Phase-1 result for one layer: its report and, if it changes, the factors to apply."""

    target: Target
    report: LayerReport
    matrix: Tensor | None = None  # (out, fan_in), dense layers only
    followers: list[LayerReport] = field(default_factory=list)  # heads sharing this layer's factors
    spectrum: LayerSpectrum | None = None
    factors: Factors | None = None


def _param_count(module: nn.Module, recurse: bool = False) -> int:
    """Parameters that exist: lazy modules' uninitialised ones count as none."""
    return sum(p.numel() for p in module.parameters(recurse=recurse) if not isinstance(p, UninitializedParameter))


def _start_plan(target: Target) -> _Plan:
    module = target.module
    weight = None if isinstance(module, FactoredModule) else getattr(module, "weight", None)  # no product built
    if isinstance(weight, UninitializedParameter):  # lazy: no shape yet
        report = LayerReport(
            target.name, type(module).__name__, (), 0, None, None, 0, 0, 0, 0, reason=target.skip_reason
        )
        return _Plan(target, report)
    if isinstance(module, FactoredModule):
        out_dim, fan_in, rank = module.U.shape[0], module.V.shape[0], module.rank
        shape = tuple(module.weight_shape)
        matrix, macs = None, rank * (out_dim + fan_in)
    else:
        shape, rank = tuple(module.weight.shape), None
        kind = kind_of(module)
        matrix = kind.dense_matrix(module)  # (out, fan_in), a view of the weight
        out_dim, fan_in = matrix.shape
        macs = out_dim * fan_in
    params = _param_count(module)
    report = LayerReport(
        name=target.name,
        kind=type(module).__name__,
        shape=shape,
        full_rank=min(out_dim, fan_in),
        rank_before=rank,
        rank=rank,
        params_before=params,
        params_after=params,
        macs_before=macs,
        macs_after=macs,
        reason=target.skip_reason,
    )
    plan = _Plan(target, report, matrix)
    for follower in target.followers:
        head = _start_plan(Target(follower.name, follower.module)).report
        bias = getattr(follower.module, "bias", None)
        head.params_before = head.params_after = 0 if bias is None else bias.numel()  # table: at the embedding
        plan.followers.append(head)
    return plan


def _spectrum(plan: _Plan, needs_spectrum: bool, moments: LayerMoments | LossMoments | None) -> LayerSpectrum | None:
    """The policy's view of one layer; None (layer left dense) when its SVD fails.

    With `moments` (metric="data") the spectrum is that of W·R, the layer in its inputs' metric;
    with LossMoments that of R_gᵀ·W·R_x, the layer in the loss's metric.
    """
    module, report = plan.target.module, plan.report
    s = None
    if needs_spectrum:
        try:
            if isinstance(moments, LossMoments):
                s = loss_spectrum(layer_weight(module), moments, report.name)
                s = s[: module.rank] if plan.matrix is None else s
            elif moments is not None:
                s = data_spectrum(layer_weight(module), moments, report.name)
                s = s[: module.rank] if plan.matrix is None else s  # a factored layer's product has its rank
            else:
                s = module.singular_values() if plan.matrix is None else singular_values(plan.matrix, report.name)
            s = s.cpu()  # policies run many small reductions: cheaper on the host
        except SVDFailedError as err:
            _leave_dense(report, f"SVD failed: {err}")
            return None
    out_dim, fan_in = (module.U.shape[0], module.V.shape[0]) if plan.matrix is None else plan.matrix.shape
    max_rank = module.rank if plan.matrix is None else min(out_dim, fan_in)
    bias = getattr(module, "bias", None)
    bias = 0 if bias is None else bias.numel()
    comparable = isinstance(moments, LossMoments)  # σ̃² in loss units: the same scale in every layer
    return LayerSpectrum(
        report.name, (out_dim, fan_in), s, max_rank, out_dim + fan_in, report.macs_before, bias, comparable
    )


def _leave_dense(report: LayerReport, reason: str) -> None:
    report.reason = reason
    warnings.warn(f"lmd_lightning: layer `{report.name}` left unchanged: {reason}", stacklevel=2)


def _changes(plan: _Plan, rank: int) -> bool:
    """Whether truncating to `rank` changes the layer; if not, the report says why."""
    report, module = plan.report, plan.target.module
    out_dim, fan_in = plan.spectrum.shape
    if plan.matrix is None and rank >= module.rank:
        report.reason = f"already factored at rank {module.rank} <= chosen {rank}"
        return False
    if plan.matrix is not None and rank * (out_dim + fan_in) >= out_dim * fan_in:
        report.reason = (
            f"rank {rank} does not save: break-even is r < m·n/(m+n) = {out_dim * fan_in / (out_dim + fan_in):.1f}"
        )
        return False
    return True


def _plan_factors(plan: _Plan, rank: int, method: str, moments: LayerMoments | LossMoments | None = None) -> None:
    """Compute one layer's factors at its chosen rank (nothing applied yet); `moments`: metric="data"."""
    report, spectrum, module = plan.report, plan.spectrum, plan.target.module
    out_dim, fan_in = spectrum.shape
    try:
        if isinstance(moments, LossMoments):
            factors = loss_factors(layer_weight(module), moments, rank, method, report.name)
        elif moments is not None:
            factors = data_factors(layer_weight(module), moments, rank, method, report.name)
        elif plan.matrix is None:
            factors = module.truncated_factors(rank)
        else:
            factors = truncated_svd(plan.matrix, rank, method=method, spectrum=spectrum.s, name=report.name)
    except (SVDFailedError, torch.linalg.LinAlgError) as err:
        _leave_dense(report, f"SVD failed: {err}")
        return
    plan.factors = factors
    report.rank, report.method = factors.rank, factors.method
    report.relative_error, report.energy = factors.relative_error, factors.energy
    report.macs_after = factors.rank * (out_dim + fan_in)


def _apply(model: nn.Module, plan: _Plan, parametrization: str) -> None:
    module, factors = plan.target.module, plan.factors
    if isinstance(module, FactoredModule):
        module.load_factors_(factors)  # resets any metric maps to the identity
        new = module
    else:
        new = kind_of(module).from_dense_factors(module, factors, parametrization)
        swap_module(model, module, new)
    plan.report.params_after = _param_count(new)
    for follower, report in zip(plan.target.followers, plan.followers):
        _share(model, follower.module, new, report, plan.report)


def _share(model: nn.Module, head: nn.Module, source: FactoredModule, report: LayerReport, joint: LayerReport) -> None:
    """Make a tied head compute with `source`'s factors (tied="joint"): swapped in, or re-shared after a shrink."""
    if not isinstance(head, FactoredModule):
        shared = kind_of(head).like(head, source.rank, head.bias is not None, source.parametrization)
        with torch.no_grad():
            if head.bias is not None:
                shared.bias.copy_(head.bias)
        copy_requires_grad(head, shared)
        swap_module(model, head, shared)
        head = shared
    head.share_factors_(source)
    report.rank, report.method = joint.rank, joint.method
    report.relative_error, report.energy = joint.relative_error, joint.energy
    report.macs_after = joint.macs_after


def _validate(
    model: nn.Module, policy: RankPolicy, parametrization: str, method: str, metric, calibration
) -> DataMetric | LossMetric | None:
    check_module(model)
    if split_of(model) is not None:
        raise TypeError(f"`model` is itself a {type(model).__name__}; wrap it in a container (nn.Sequential(model))")
    if not isinstance(policy, RankPolicy):
        raise TypeError(
            f"`policy` must be a RankPolicy (FixedRank, RankRatio, EnergyRank, ErrorBound, EffectiveRank, "
            f"GlobalBudget), got {policy!r}"
        )
    check_choice(parametrization, "parametrization", PARAMETRIZATIONS)
    check_choice(method, "method", METHODS)
    if isinstance(metric, LossMetric):
        if calibration is None:
            raise ValueError("`metric=LossMetric(...)` needs `calibration`: an iterable of batches for its loss")
        if metric.loss is None:
            raise ValueError(
                "`metric=LossMetric(loss=None)`: compress_ needs the loss, LossMetric(loss=fn) with fn(model, batch) "
                "returning the batch's scalar loss (loss=None is LMDCompression's: its training_step's loss)"
            )
        return metric
    settings = DataMetric.of(metric)
    if settings is not None and calibration is None:
        raise ValueError(
            "`metric='data'` needs `calibration`: an iterable of batches (e.g. a DataLoader) to measure each "
            "layer's inputs on"
        )
    if settings is None and calibration is not None:
        raise ValueError(f"`calibration` is only used with metric='data', got metric={metric!r}")
    return settings


class _DataPlans:
    """metric="data": the calibration run, each layer's moments and the forward order."""

    def __init__(self, model: nn.Module, plans: list[_Plan], calibration, settings: DataMetric) -> None:
        self.model, self.settings = model, settings
        self.run = calibration if isinstance(calibration, Calibration) else Calibration(calibration, settings)
        modules = [plan.target.module for plan in plans]
        moments, rows, order = self.run.input_moments(model, modules)
        self.order = {module: index for index, module in enumerate(order)}
        self.independent: dict[nn.Module, LayerMoments] = {}
        for plan in plans:
            module, name = plan.target.module, plan.report.name
            if module not in moments:
                plan.report.reason = "received no input in the calibration passes"
                continue
            if not bool(torch.isfinite(moments[module]).all()):
                raise ValueError(
                    f"layer `{name}` received non-finite calibration inputs (NaN or inf); refusing to truncate"
                )
            try:
                self.independent[module] = LayerMoments.independent(moments[module], rows[module], settings.damping)
            except (torch.linalg.LinAlgError, ValueError) as err:
                _leave_dense(plan.report, f"calibration metric failed: {err}")

    def plan_all(self, plans: list[_Plan], ranks: list[int], method: str) -> None:
        if not self.settings.sequential:
            for plan, rank in zip(plans, ranks):
                if _changes(plan, rank):
                    _plan_factors(plan, rank, method, self.independent[plan.target.module])
            return
        replaced: dict[nn.Module, Tensor] = {}  # layers already fitted → their Ŵ, used in later passes
        for plan, rank in sorted(zip(plans, ranks), key=lambda pair: self.order[pair[0].target.module]):
            if not _changes(plan, rank):
                continue
            module = plan.target.module
            dense, cross, trunc, rows = self.run.paired_moments(self.model, module, replaced)
            try:
                moments = LayerMoments.paired(dense, cross, trunc, rows, self.settings.damping)
            except (torch.linalg.LinAlgError, ValueError) as err:  # e.g. all-zero inputs with damping 0
                _leave_dense(plan.report, f"calibration metric failed: {err}")
                continue
            _plan_factors(plan, rank, method, moments)
            if plan.factors is not None:
                f = plan.factors
                replaced[module] = (f.U * f.s) @ f.V.mT


def _call(model: nn.Module, example: Any) -> Any:
    """The model on an example input: a tensor, a tuple of positional arguments, a dict of keywords (with grad)."""
    if isinstance(example, Mapping):
        return model(**example)
    return model(*example) if isinstance(example, tuple) else model(example)


def _compress(
    model: nn.Module,
    policy: RankPolicy,
    *,
    targets: tuple[Patterns, Patterns, FilterFn | None, str],
    parametrization: str,
    method: str,
    data: tuple[DataMetric | LossMetric | None, Any],
    metric_maps: bool,
    check: Any,
) -> tuple[list[_Plan], list[_Plan], list[str]]:
    """Both phases of `compress_` on validated arguments; the caller undoes everything if this raises."""
    splits = split_composites_(model)  # nn.MultiheadAttention → separate projections, same function
    found = find_targets(model, *targets)
    if metric_maps:
        shared = shared_factors(model)
        for target in found:
            if target.name in shared:
                raise ValueError(
                    f"`metric_maps=True`: `{target.name}` shares its factors with `{shared[target.name]}` "
                    "(tied='joint'), and separate metric maps would untie them"
                )
    plans = [_start_plan(target) for target in found]
    active = [plan for plan in plans if plan.report.reason is None]
    for plan in active:
        tensors = plan.target.module.parameters(recurse=False) if plan.matrix is None else [plan.matrix]
        for tensor in tensors:
            check_finite(tensor.detach(), plan.report.name)
    settings, calibration = data
    if settings is not None:
        name = "LossMetric" if isinstance(settings, LossMetric) else "metric='data'"
        for plan in active:
            if not kind_of(plan.target.module).data_metric:
                plan.report.reason = (
                    f"{name} does not apply to {plan.report.kind}: its inputs are indices, not features"
                )
        active = [plan for plan in active if plan.report.reason is None]
    moments = None  # metric="data": the calibration run (sequential fits need it again)
    per_layer: dict[nn.Module, Any] = {}  # each layer's moments in its metric
    if isinstance(settings, LossMetric):
        run = calibration if isinstance(calibration, Calibration) else None  # the callback's: DDP sums, precision
        modules = [plan.target.module for plan in active]
        # by layer name: the guard's next trial undoes to the same weights, but splits attention anew
        key = ("loss", settings, *(plan.report.name for plan in active))
        cached = run.memo.get(key) if run is not None else None
        if cached is not None:
            per_layer = {plan.target.module: cached[plan.report.name] for plan in active}
        else:
            per_layer = loss_moments(
                model,
                modules,
                calibration if run is None else run.batches,
                settings,
                reduce=None if run is None else run.reduce,
                context=None if run is None else run.context,
            )
            if run is not None:  # one entry: the latest model's
                run.memo = {key: {plan.report.name: per_layer[plan.target.module] for plan in active}}
        for plan in active:
            if isinstance(per_layer[plan.target.module], str):
                plan.report.reason = per_layer[plan.target.module]
    elif settings is not None:
        moments = _DataPlans(model, active, calibration, settings)
        per_layer = moments.independent
    active = [plan for plan in active if plan.report.reason is None]
    for plan in active:
        plan.spectrum = _spectrum(plan, policy.needs_spectrum, per_layer.get(plan.target.module))
    active = [plan for plan in active if plan.spectrum is not None]
    ranks = policy.choose([plan.spectrum for plan in active])
    if moments is not None:
        moments.plan_all(active, ranks, method)
    else:
        for plan, rank in zip(active, ranks):
            if _changes(plan, rank):
                _plan_factors(plan, rank, method, per_layer.get(plan.target.module))
    for plan in active:
        if plan.factors is not None:
            _apply(model, plan, parametrization)
    if metric_maps:  # every targeted factored layer carries maps, also one left at its rank
        for plan in plans:
            current = model.get_submodule(plan.target.name)
            if isinstance(current, FactoredModule):
                current.add_metric_maps_()
                plan.report.params_after = _param_count(current)
    merge_unchanged_splits_(model, splits)
    notes = [f"fused fast path disabled in `{name}`" for name in disable_fused_fast_paths(model)]
    for plan in plans:
        for head in plan.followers:
            if isinstance(model.get_submodule(head.name), FactoredModule):
                notes.append(f"`{head.name}` shares the factors of `{plan.report.name}` (tied='joint')")
            else:
                head.reason = f"tied to `{plan.report.name}`, which stays as it is: {plan.report.reason}"
    if check is not None:
        check_step(model, lambda: _call(model, check))
    return plans, active, notes


def compress_(
    model: nn.Module,
    policy: RankPolicy,
    *,
    include: Patterns = None,
    exclude: Patterns = None,
    filter_fn: FilterFn | None = None,
    parametrization: str = "balanced",
    method: str = "auto",
    metric: str | DataMetric | LossMetric = "weight",
    calibration: Iterable[Any] | None = None,
    metric_maps: bool = False,
    check: Any = None,
    tied: str = "dense",
) -> CompressionReport:
    """Truncate the model's dense layers by SVD in place, with ranks from `policy`.

    Layers of every registered kind are candidates: nn.Linear, nn.Conv1d, nn.Conv2d (groups=1),
    Hugging Face Conv1D, the q/k/v/out projections of nn.MultiheadAttention (split into a
    FactoredMultiheadAttention when any of them is factored), and nn.Embedding when `include`
    names it. Layers sharing a parameter with another module (a tied head) stay dense.

    `include`/`exclude` are globs over fully-qualified module names (`"encoder.*"`);
    `filter_fn(name, module)` can veto a layer. Already-factored layers are shrunk, never grown.
    `metric="weight"` keeps the best rank-r weight (Eckart–Young); `metric="data"` (or a
    `DataMetric` with its settings) the best rank-r layer for the inputs it receives on the
    `calibration` batches (on the model's device), fitted layer by layer (LMD.md section 5);
    `metric=LossMetric(loss=fn)` the best rank-r layer in the loss's K-FAC metric (section 5b),
    with spectra in loss units that `GlobalBudget` compares across layers.
    `metric_maps=True` gives every targeted factored layer (new or not) learnable r×r I_dist and O_dist
    at the identity (LMD Eq. 4); `fold_` merges them back. Shrinking a layer resets its maps.
    `check`: an example input (a tensor, a tuple of positional arguments or a dict of keywords).
    After the swap the model runs one forward and backward on it, leaving no trace; if that raises,
    every layer goes back as it was and ModelCheckError names the failing module.
    `tied`: a layer sharing its weight with another (a head tied to the token embedding) stays
    dense with "dense" (the default); with "joint" an embedding and its tied heads are factored
    together, sharing one set of factors U·diag(s)·Vᵀ (exact: the head computes x·Wᵀ, the
    embedding looks rows of W up), with the embedding's rank. Not with `metric_maps`.
    Returns a CompressionReport; every layer left dense carries its reason.
    """
    settings = _validate(model, policy, parametrization, method, metric, calibration)
    check_bool(metric_maps, "metric_maps")
    check_choice(tied, "tied", TIED)
    if tied == "joint" and metric_maps:
        raise ValueError(JOINT_WITH_MAPS)
    params_before = _param_count(model, recurse=True)
    record = undo_record(model)
    try:
        plans, active, notes = _compress(
            model,
            policy,
            targets=(include, exclude, filter_fn, tied),
            parametrization=parametrization,
            method=method,
            data=(settings, calibration),
            metric_maps=metric_maps,
            check=check,
        )
    except BaseException:
        undo(model, record)  # nothing half-done survives: not a failed SVD, a bad pattern or a failed check
        raise
    spectra = {plan.report.name: plan.spectrum.s for plan in active if plan.spectrum.s is not None}
    report = CompressionReport(
        [report for plan in plans for report in (plan.report, *plan.followers)],
        params_before,
        _param_count(model, recurse=True),
        repr(policy),
        notes,
        spectra,
    )
    for layer in report.dense:
        log.info("lmd_lightning: `%s` unchanged: %s", layer.name, layer.reason)
    return report

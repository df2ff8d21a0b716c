"""Truncation in the data's metric (LMD.md section 5): the best rank-r layer for the inputs it sees.

For a layer with weight W (out, fan_in) and calibration inputs X (p, fan_in), let
C = XᵀX/p + δI = R·Rᵀ. Then Ŵ = (W·R)_r·R⁺ minimizes ‖(W − Ŵ)·Xᵀ‖²/p + δ‖W − Ŵ‖²_F over all
rank-r matrices: Eckart–Young applied to W·R. The damping δ (a share of C's mean diagonal)
keeps Ŵ close to W in directions the data does not visit, and makes C invertible.

Sequential calibration (the default) goes layer by layer in forward order. Each layer sees the
inputs X̃ produced by the already-truncated layers before it and is fitted to the dense
outputs W·X_dᵀ on the dense inputs:
    minimize ‖W·X_dᵀ − Ŵ·X̃ᵀ‖²/p + δ‖W − Ŵ‖²_F,  rank Ŵ ≤ r.
With C̃ = X̃ᵀX̃/p + δI = R·Rᵀ and the cross moment M = X_dᵀX̃/p, the unconstrained minimizer is
W_ls = W·(M + δI)·C̃⁻¹, the objective is const + ‖(Ŵ − W_ls)·R‖²_F, and so Ŵ = (W_ls·R)_r·R⁺ with
W_ls·R = W·(M + δI)·R⁺ᵀ. With X̃ = X_d this is the independent form above.

Everything is accumulated as float64 moments (fan_in × fan_in per layer), never as stored rows;
conv inputs are unfolded into their (in·∏kernel) patches (each layer kind says how). This module runs the calibration
passes; data_metric.py holds the linear algebra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lmd_lightning.checks import check_bool, check_callable, check_int, check_number
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.layers.registry import kind_of
from lmd_lightning.truncate.check import cuda_devices, eager

if TYPE_CHECKING:
    from lmd_lightning.truncate.loss_metric import LossMetric

__all__ = [
    "Calibration",
    "DataMetric",
    "METRICS",
    "samples_in",
    "default_forward",
    "dense_forward",
    "layer_rows",
    "layer_weight",
    "output_rows",
]

METRICS = ("weight", "data")
ROW_CHUNK = 8192  # rows of unfolded inputs turned into float64 at a time
CALIBRATION_SEED = 0  # every calibration pass starts from this random state

Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run `model` on a batch: a tensor as is, a tuple/list's first item (the inputs), a mapping as keywords."""
    if torch.is_tensor(batch):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(
        f"cannot feed a calibration batch of type {type(batch).__name__} to the model; pass "
        "DataMetric(forward=fn) with fn(model, batch) running the forward pass"
    )


def samples_in(batch: Any) -> int:
    """The number of samples in a batch: the first dimension of its first tensor (1 if it has none)."""
    if torch.is_tensor(batch):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        return next((samples_in(item) for item in batch if torch.is_tensor(item) or isinstance(item, (list, tuple))), 1)
    return 1


@dataclass(frozen=True)
class DataMetric:
    """Settings of `metric="data"`: truncate each layer in the metric of its calibration inputs.

    Args:
        batches: calibration batches read from the data (the callback takes them from the
            training loader; `compress_` from its `calibration` iterable). None: all of them.
        damping: δ as a share of the mean diagonal of XᵀX/p (> 0 keeps C invertible and Ŵ near W
            in directions the data never visits; 0 works in C's eigenbasis, a pseudo-inverse).
        sequential: fit layers in forward order on the inputs of the already-truncated layers
            before them (error-compensating, LMD.md section 5); False calibrates each layer on
            the dense model's inputs independently.
        forward: `forward(model, batch)` runs one batch. Default: in the callback, the module's own
            `training_step`; in `compress_`, `default_forward`.

    Policies see the spectrum of W·R with R from the dense model's inputs, so `EnergyRank` keeps a
    share of the layer's output energy on the data and `ErrorBound` bounds its relative output
    error. Memory: one fan_in × fan_in float64 matrix per layer (two more for the layer being
    fitted in sequential mode). Time: one pass over the batches, plus two per layer if sequential.
    """

    batches: int | None = 8
    damping: float = 0.01
    sequential: bool = True
    forward: Forward | None = None

    def __post_init__(self) -> None:
        check_int(self.batches, "batches", 1, optional=True, owner="DataMetric")
        check_number(self.damping, "damping", 0, finite=True, owner="DataMetric")
        check_bool(self.sequential, "sequential", owner="DataMetric")
        if self.forward is not None:
            check_callable(self.forward, "forward", "forward(model, batch)", owner="DataMetric")

    @staticmethod
    def of(metric: str | DataMetric) -> DataMetric | None:
        """None for metric="weight", the settings for "data" or a DataMetric; ValueError otherwise."""
        if isinstance(metric, DataMetric):
            return metric
        if metric == "weight":
            return None
        if metric == "data":
            return DataMetric()
        raise ValueError(f"`metric` must be one of {METRICS} or a DataMetric, got {metric!r}")


# ---- layer inputs as rows of the (out, fan_in) matrix's input space (each kind says how) ----


def _kind(module: nn.Module) -> type[FactoredModule]:
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a layer kind lmd_lightning can factor")
    return kind


def layer_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as (rows, fan_in): flattened for Linear, unfolded patches for convs."""
    return _kind(module).input_rows(module, x)


def output_rows(module: nn.Module, y: Tensor) -> Tensor:
    """The layer's output as (rows, out), in the same row order as `layer_rows` of its input."""
    return _kind(module).output_rows(module, y)


def dense_forward(module: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's output with its weight replaced by the dense (out, fan_in) `weight`."""
    return _kind(module).dense_forward(module, x, weight)


def _add_moment(total: Tensor, a: Tensor, b: Tensor) -> None:
    for start in range(0, a.shape[0], ROW_CHUNK):
        total += a[start : start + ROW_CHUNK].double().mT @ b[start : start + ROW_CHUNK].double()


# ---- running the calibration data ----


class Calibration:
    """The calibration batches and how to run them, with hooks, in eval mode and without grad.

    `reduce(tensor)` sums a tensor over processes (DDP: every process must compute the same
    factors from the moments of all processes' batches); `context()` wraps each forward pass
    (the trainer's precision context).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        settings: DataMetric | LossMetric,
        reduce: Callable[[Tensor], Tensor] | None = None,
        context: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.forward = getattr(settings, "forward", None) or default_forward  # a LossMetric has its own loss
        self.reduce = reduce or (lambda tensor: tensor)
        self.context = context or nullcontext
        # per-layer results a compression may compute again on the same, unchanged model (the callback's
        # guard trials undo each swap): filled by compress_, dropped with this run
        self.memo: dict[Any, Any] = {}
        self.batches = []
        for batch in batches:
            self.batches.append(batch)
            if settings.batches is not None and len(self.batches) >= settings.batches:
                break  # before fetching one more
        if not self.batches:
            raise ValueError(
                f"metric={settings!r} needs calibration data, but the calibration iterable yielded no batch"
            )

    @contextmanager
    def _running(self, model: nn.Module, hooks: Mapping[nn.Module, Callable]) -> Iterator[None]:
        modes = {module: module.training for module in model.modules()}
        self._devices = cuda_devices(model)  # once per run, not per pass
        handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
        model.eval()
        try:
            with torch.no_grad(), eager():
                yield
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.train(training)

    def input_moments(
        self, model: nn.Module, modules: list[nn.Module]
    ) -> tuple[dict[nn.Module, Tensor], dict[nn.Module, int], list[nn.Module]]:
        """Σ xxᵀ over every row each module receives, row counts, and the order modules first ran in."""
        moments: dict[nn.Module, Tensor] = {}
        counts: dict[nn.Module, int] = {}
        order: list[nn.Module] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            rows = layer_rows(module, args[0].detach())
            if module not in moments:
                moments[module] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
                counts[module] = 0
                order.append(module)
            _add_moment(moments[module], rows, rows)
            counts[module] += rows.shape[0]

        self.run(model, {module: hook for module in modules})
        for module in order:
            moments[module] = self.reduce(moments[module])
            counts[module] = int(
                self.reduce(torch.tensor(float(counts[module]), dtype=torch.float64, device=moments[module].device))
            )
        return moments, counts, order

    def run(self, model: nn.Module, hooks: Mapping[nn.Module, Callable]) -> None:
        """One pass over every batch with forward `hooks` on the given modules (eval mode, no grad)."""
        with self._running(model, hooks):
            for batch in self.batches:
                self._run(model, batch)

    def _run(self, model: nn.Module, batch: Any) -> None:
        """One pass, with the random state forked and seeded alike for every pass.

        A step that draws random numbers (noise, masking, timesteps) then sees the same draws in
        the dense and in the truncated pass of a batch, so their moments pair up, and training's
        own random state is left as it was.
        """
        with torch.random.fork_rng(devices=self._devices), self.context():
            torch.manual_seed(CALIBRATION_SEED)
            self.forward(model, batch)

    def paired_moments(
        self, model: nn.Module, module: nn.Module, replaced: Mapping[nn.Module, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Moments of `module`'s dense inputs X_d and of X̃, its inputs once `replaced` layers use their Ŵ.

        Returns (X_dᵀX_d, X_dᵀX̃, X̃ᵀX̃, rows), summed over the batches.
        """
        captured: list[Tensor] = []
        substitute = True

        def capture(mod: nn.Module, args: tuple, output: Any) -> None:
            captured.append(layer_rows(mod, args[0].detach()))

        def replace(mod: nn.Module, args: tuple, output: Any) -> Any:
            return dense_forward(mod, args[0], replaced[mod]) if substitute else None

        hooks: dict[nn.Module, Callable] = {mod: replace for mod in replaced}
        hooks[module] = capture
        dense_dense = cross = trunc = None
        rows = 0
        with self._running(model, hooks):
            for batch in self.batches:
                substitute = False
                self._run(model, batch)
                dense = torch.cat(captured)
                captured.clear()
                substitute = True
                self._run(model, batch)
                tilde = torch.cat(captured)
                captured.clear()
                if dense.shape != tilde.shape:
                    raise RuntimeError(
                        f"calibration: a layer received inputs of shape {tuple(dense.shape)} from the dense model but "
                        f"{tuple(tilde.shape)} once earlier layers were truncated; "
                        "the forward pass must be deterministic"
                    )
                if dense_dense is None:
                    n = dense.shape[1]
                    dense_dense, cross, trunc = (
                        torch.zeros(n, n, dtype=torch.float64, device=dense.device) for _ in range(3)
                    )
                _add_moment(dense_dense, dense, dense)
                _add_moment(cross, dense, tilde)
                _add_moment(trunc, tilde, tilde)
                rows += dense.shape[0]
        total = self.reduce(torch.tensor(float(rows), dtype=torch.float64, device=dense_dense.device))
        return self.reduce(dense_dense), self.reduce(cross), self.reduce(trunc), int(total)


def layer_weight(module: nn.Module) -> Tensor:
    """The (out, fan_in) matrix a layer computes, dense or factored."""
    if isinstance(module, FactoredModule):
        return module.dense_weight().detach()
    return _kind(module).dense_matrix(module)

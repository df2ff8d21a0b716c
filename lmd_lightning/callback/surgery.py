"""The only module that touches Lightning internals: what a Lightning upgrade may break is here.

- `check_supported`: strategies and modes the callback can handle, refused clearly otherwise;
- `gradient_unscale_factor`: the AMP scale still on the gradients at `on_before_optimizer_step`;
- `loss_scale`: the AMP scale on the loss's gradients after backward (for the regularizer's);
- `rebuild`: after a module swap, re-run the user's `configure_optimizers`, carry the optimizer
  state of every surviving parameter over, continue the LR schedule, and re-wrap DDP;
- `restore`: go back to the optimizers from before a swap that failed;
- `evaluate`: the user's validation metric on a few batches, outside Lightning's loops;
- `calibration`: training batches for metric="data" and "loss", on the device, summed over processes;
- `check_training_step`: one training step of the swapped model on a real batch, leaving no trace;
- `optimizer_states` / `load_optimizer_states`: per-parameter optimizer state by parameter name,
  copied to the CPU and put back (the rounds="auto" ladder's roll-back).
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import pytorch_lightning as pl
import torch

from lmd_lightning.truncate.calibration import Calibration, DataMetric, default_forward, samples_in
from lmd_lightning.truncate.check import check_step
from lmd_lightning.truncate.loss_metric import LossMetric

__all__ = [
    "Snapshot",
    "calibration",
    "check_supported",
    "check_training_step",
    "evaluate",
    "gradient_unscale_factor",
    "lightning_of",
    "loss_scale",
    "rebuild",
    "restore",
    "snapshot",
]


def lightning_of(trainer: pl.Trainer) -> ModuleType:
    """`pytorch_lightning` or `lightning.pytorch`: the package this trainer comes from."""
    unified = type(trainer).__module__.split(".")[0] == "lightning"
    return importlib.import_module("lightning.pytorch" if unified else "pytorch_lightning")


def _is_ddp(trainer: pl.Trainer) -> bool:
    return isinstance(trainer.strategy, lightning_of(trainer).strategies.DDPStrategy)


def check_supported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise at setup for what cannot work, rather than failing at the swap."""
    strategy, L = trainer.strategy, lightning_of(trainer)
    if isinstance(strategy, (L.strategies.FSDPStrategy, L.strategies.DeepSpeedStrategy)):
        raise ValueError(
            f"LMDCompression does not support {type(strategy).__name__} yet: sharded weights must be gathered "
            "before truncation and re-sharded after it. Use a single device or strategy='ddp'."
        )
    if not isinstance(strategy, (L.strategies.SingleDeviceStrategy, L.strategies.DDPStrategy)):
        raise ValueError(f"LMDCompression supports single-device and DDP strategies, got {type(strategy).__name__}")
    # WeightAveraging (EMA) exists from Lightning 2.6 on.
    averaging_types = tuple(
        t for t in (L.callbacks.StochasticWeightAveraging, getattr(L.callbacks, "WeightAveraging", None)) if t
    )
    averaging = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, averaging_types)]
    if averaging:
        raise ValueError(
            f"LMDCompression cannot run with {averaging}: the averaged copy of the model keeps the dense layers, "
            "so it no longer matches the model after the swap. Remove the weight-averaging callback, or average "
            "only during a later fine-tuning run started from the compressed checkpoint."
        )
    if not pl_module.automatic_optimization:
        raise ValueError(
            "LMDCompression needs automatic optimization (`automatic_optimization = True`): with manual optimization "
            "it cannot rebuild your optimizers after the swap or measure ‖∇L‖ once per optimizer step."
        )


def gradient_unscale_factor(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """1/scale when gradients are still AMP-scaled at `on_before_optimizer_step`, else None.

    Lightning unscales before that hook, except for optimizers that unscale inside `step()`
    (fused Adam/AdamW/SGD): for those the gradients the callback sees are still multiplied by
    the GradScaler's scale.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    return scaler._scale.reciprocal() if scaler._scale is not None else None


def loss_scale(trainer: pl.Trainer) -> float | None:
    """The AMP GradScaler's current scale (what the loss's gradients are multiplied by), or None without one."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler.get_scale() if scaler is not None else None


@dataclass(frozen=True)
class Snapshot:
    """The optimizers and scheduler configs before a swap, to carry over or to go back to."""

    optimizers: list
    lr_scheduler_configs: list


def snapshot(trainer: pl.Trainer) -> Snapshot:
    return Snapshot(list(trainer.strategy.optimizers), list(trainer.strategy.lr_scheduler_configs))


def _rewrap_ddp(trainer: pl.Trainer) -> None:
    strategy = trainer.strategy
    if _is_ddp(trainer):
        strategy.model = strategy.lightning_module  # unwrap: the old wrapper holds the old parameters
        strategy.configure_ddp()


def restore(trainer: pl.Trainer, before: Snapshot) -> None:
    """Go back to the optimizers of `before` (after the modules themselves were put back)."""
    trainer.strategy.optimizers = before.optimizers
    trainer.strategy.lr_scheduler_configs = before.lr_scheduler_configs
    _rewrap_ddp(trainer)


def _carry_optimizer(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Copy per-parameter state of surviving parameters and the groups' hyper-parameters."""
    carried = 0
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]
                carried += 1
    for old_group, new_group in zip(old.param_groups, new.param_groups):
        new_group.update({key: value for key, value in old_group.items() if key != "params"})
    return carried


def rebuild(trainer: pl.Trainer, before: Snapshot) -> dict[str, Any]:
    """Re-create optimizers and schedulers after a module swap, keeping what survived.

    `before` is the `snapshot` taken before the swap. Returns counts for the log. Raises
    RuntimeError when `configure_optimizers` now returns a different number of optimizers or
    schedulers; the caller then puts the modules back and calls `restore`.
    """
    _rewrap_ddp(trainer)
    trainer.strategy.setup_optimizers(trainer)
    after = snapshot(trainer)
    if len(before.optimizers) != len(after.optimizers) or len(before.lr_scheduler_configs) != len(
        after.lr_scheduler_configs
    ):
        raise RuntimeError(
            f"configure_optimizers returned {len(after.optimizers)} optimizers / {len(after.lr_scheduler_configs)} "
            f"schedulers after the swap, {len(before.optimizers)} / {len(before.lr_scheduler_configs)} before"
        )
    for old, new in zip(before.optimizers, after.optimizers):
        if len(old.param_groups) != len(new.param_groups):
            raise RuntimeError(
                f"configure_optimizers built {len(new.param_groups)} parameter groups after the swap, "
                f"{len(old.param_groups)} before: their learning rates could not be carried over"
            )
    carried = sum(_carry_optimizer(old, new) for old, new in zip(before.optimizers, after.optimizers))
    for old, new in zip(before.lr_scheduler_configs, after.lr_scheduler_configs):
        new.scheduler.load_state_dict(old.scheduler.state_dict())
    return {"carried_states": carried, "schedulers": len(after.lr_scheduler_configs)}


def _loaders(trainer: pl.Trainer) -> list:
    loaders = trainer.val_dataloaders
    if loaders is None:
        raise ValueError("LMDCompression's accuracy guard needs validation data: pass val_dataloaders to fit()")
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


@contextmanager
def _logging_to(pl_module: pl.LightningModule, log: Any, log_dict: Any) -> Iterator[None]:
    """`self.log` / `self.log_dict` replaced for the duration, so nothing reaches loggers or callbacks."""
    pl_module.log, pl_module.log_dict = log, log_dict  # instance attributes shadow the methods
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict


@contextmanager
def _silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """Logging held back for steps that are not part of training (the check step, calibration).

    Metric objects logged in the meantime (torchmetrics) are reset at the end, so that the batches
    seen here leave no trace in the epoch's values.
    """
    stateful: dict[int, Any] = {}

    def hold(name: Any, value: Any = None, *args: Any, **kwargs: Any) -> None:
        values = name.values() if isinstance(name, Mapping) else [value]
        stateful.update({id(v): v for v in values if hasattr(v, "compute") and hasattr(v, "reset")})

    try:
        with _logging_to(pl_module, hold, hold):
            yield
    finally:
        for metric in stateful.values():
            metric.reset()


@torch.no_grad()
def evaluate(trainer: pl.Trainer, pl_module: pl.LightningModule, metric: str, max_batches: int | None) -> float:
    """Mean of `metric` as the user's `validation_step` logs it, over at most `max_batches` per loader (None: all).

    `self.log`/`self.log_dict` are intercepted for the duration, so nothing reaches the loggers,
    the progress bar or callbacks such as EarlyStopping. Values are weighted by batch size and,
    under DDP, averaged over all processes.
    """
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    stateful: dict[str, Any] = {}  # torchmetrics objects: they accumulate, computed once at the end
    size, suffix = 1, ""  # the current batch's size; "/dataloader_idx_N" with several loaders, as Lightning names

    def capture(name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if hasattr(value, "compute"):
            stateful[name + suffix] = value
            return
        weight = batch_size or size
        sums[name + suffix] += float(value) * weight
        weights[name + suffix] += weight

    def capture_dict(values: Mapping[str, Any], *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        for name, value in values.items():
            capture(name, value, batch_size=batch_size)

    modes, loaders = {module: module.training for module in pl_module.modules()}, _loaders(trainer)
    pl_module.eval()
    try:
        with _logging_to(pl_module, capture, capture_dict):
            for index, loader in enumerate(loaders):
                extra = {"dataloader_idx": index} if len(loaders) > 1 else {}
                suffix = f"/dataloader_idx_{index}" if len(loaders) > 1 else ""
                for batch_idx, batch in enumerate(loader):
                    if max_batches is not None and batch_idx >= max_batches:
                        break
                    size = samples_in(batch)
                    batch = trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))
                    trainer.strategy.validation_step(batch, batch_idx, **extra)  # precision context, DDP path
    finally:
        for module, training in modes.items():  # each submodule's own mode, as Lightning does
            module.train(training)
    values = {name: float(obj.compute()) for name, obj in stateful.items()}
    for obj in stateful.values():
        obj.reset()  # leave no trace in the real validation epoch
    if metric in values:
        return values[metric]
    if metric not in sums:
        raise KeyError(
            f"`monitor` metric {metric!r} is not logged by validation_step; it logs: {sorted({*sums, *values})}"
        )
    totals = torch.tensor([sums[metric], weights[metric]], dtype=torch.float64, device=pl_module.device)
    totals = trainer.strategy.reduce(totals, reduce_op="sum")
    return float(totals[0] / totals[1])


def _first_loader(loaders: Any) -> Any:
    """The training loader, or the first of several (a list, tuple or mapping of loaders)."""
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    elif isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ValueError(
            "metric='data' needs training batches to calibrate on, but the trainer has no train_dataloader"
        )
    return loaders


def _training_batches(trainer: pl.Trainer, count: int | None) -> list[Any]:
    """The first `count` training batches (all for None), on the device and in the precision's input type."""
    batches = []
    with torch.random.fork_rng(devices=[]):  # a shuffled loader draws from the global RNG: leave training's order alone
        for batch in _first_loader(trainer.train_dataloader):
            batches.append(trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch)))
            if count is not None and len(batches) >= count:
                break
    return batches


def check_training_step(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """One `training_step` and backward on the first training batch, leaving no trace (`check_step`).

    Logging is held back for the step. Decided alike on every process: if the step fails on any of
    them, every process raises, so that all go back to the dense model together.
    """

    def step() -> Any:
        with trainer.precision_plugin.train_step_context():
            return pl_module.training_step(batch, 0)

    error: Exception | None = None
    try:
        (batch,) = _training_batches(trainer, 1)
        with _silenced(pl_module):
            check_step(pl_module, step)
    except Exception as err:  # caught here so that every process reaches the decision below
        error = err
    failed_somewhere = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
    if error is not None:
        raise error
    if failed_somewhere:
        raise RuntimeError("the compressed model fails a training step on another process")


def _step_forward(pl_module: pl.LightningModule) -> Any:
    """`forward(model, batch)` for calibration: the module's own `training_step` (`calibration` holds logging back).

    The step knows its batch's structure (several tensors, dicts, HF BatchEncoding) and how its
    forward is called (`forward(inputs, target)`), so calibration needs no `DataMetric(forward=...)`.
    Under manual optimization the step also steps optimizers, so there the batch's first item is
    fed to the model as before (`default_forward`).
    """
    if not pl_module.automatic_optimization:
        return default_forward

    def forward(_model: Any, batch: Any) -> None:
        pl_module.training_step(batch, 0)

    return forward


def _step_loss(pl_module: pl.LightningModule) -> Any:
    """`loss(model, batch)` for the loss metric: the loss the module's own `training_step` returns."""

    def loss(_model: Any, batch: Any) -> torch.Tensor:
        output = pl_module.training_step(batch, 0)
        value = output.get("loss") if isinstance(output, Mapping) else output
        if not torch.is_tensor(value):
            raise TypeError(
                "metric='loss' needs `training_step` to return the loss (a Tensor, or a dict with a 'loss' Tensor), "
                f"got {type(output).__name__}; pass metric='data' or LossMetric(loss=fn) instead"
            )
        return value

    return loss


def calibration(trainer: pl.Trainer, settings: DataMetric | LossMetric) -> tuple[DataMetric | LossMetric, Calibration]:
    """The settings to truncate with, and the first `settings.batches` training batches (all for None) on the device.

    Without `settings.forward` (DataMetric) or `settings.loss` (LossMetric) each batch runs through
    the module's own `training_step` (in eval mode, logging held back; without gradients for the
    data metric, with a backward of the step's loss for the loss metric). Passes run under the
    trainer's precision context; moments are summed over DDP processes so that every process
    computes the same factors.
    """
    pl_module = trainer.lightning_module
    if isinstance(settings, LossMetric):
        if settings.loss is None:
            settings = replace(settings, loss=_step_loss(pl_module))
    elif settings.forward is None:
        settings = replace(settings, forward=_step_forward(pl_module))

    @contextmanager
    def context() -> Iterator[None]:
        with trainer.precision_plugin.forward_context(), _silenced(pl_module):
            yield

    return settings, Calibration(
        _training_batches(trainer, settings.batches),
        settings,
        reduce=lambda tensor: trainer.strategy.reduce(tensor, reduce_op="sum"),
        context=context,
    )


def _to(value: Any, device: Any) -> Any:
    return value.detach().to(device, copy=True) if torch.is_tensor(value) else value


def mean_over_processes(trainer: pl.Trainer, value: float) -> float:
    """`value` averaged over the DDP processes (itself on one device)."""
    tensor = torch.tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op="mean"))


def optimizer_states(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, dict[str, Any]]]:
    """Each optimizer's per-parameter state, keyed by parameter name, copied to the CPU."""
    names = {param: name for name, param in pl_module.named_parameters()}
    return [
        {names[p]: {key: _to(value, "cpu") for key, value in opt.state[p].items()} for p in opt.state if p in names}
        for opt in trainer.strategy.optimizers
    ]


def load_optimizer_states(
    trainer: pl.Trainer, pl_module: pl.LightningModule, states: list[dict[str, dict[str, Any]]]
) -> int:
    """Put `optimizer_states`' copies back on the parameters of those names; returns how many.

    A tensor shaped like its parameter goes to the parameter's device; a scalar (Adam's `step`)
    stays on the CPU unless its group is `capturable` or `fused`, as torch's optimizers keep it.
    """
    names = {id(param): name for name, param in pl_module.named_parameters()}
    loaded = 0
    for opt, saved in zip(trainer.strategy.optimizers, states):
        for group in opt.param_groups:
            on_device = bool(group.get("capturable")) or bool(group.get("fused"))
            for param in group["params"]:
                name = names.get(id(param))
                if name is None or name not in saved:
                    continue
                opt.state[param] = {
                    key: _to(value, param.device if on_device or (torch.is_tensor(value) and value.dim()) else "cpu")
                    for key, value in saved[name].items()
                }
                loaded += 1
    return loaded

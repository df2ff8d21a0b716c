"""What the Hydra commands run: build the objects a config names, train or fine-tune, summarise.

`commands.py` only finds the configs and hands the composed `DictConfig` to `train`, `finetune` or
`export` here. Tests call these directly with a config from Hydra's compose API (overriding
`paths.output_dir`, which otherwise names Hydra's run dir).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback

from lmd_lightning.callback.checkpoint import load_factored_state, read_checkpoint
from lmd_lightning.callback.lmd_compression import LMDCompression
from lmd_lightning.cli.tradeoff import RESULTS_FILE
from lmd_lightning.truncate.restore import restore_factored_

__all__ = ["CONFIG_KEY", "ConfigError", "RecordConfig", "analyze", "export", "finetune", "load_model", "train"]

CONFIG_KEY = "lmd_config"  # where lmd-train keeps its config (interpolations unresolved) in each checkpoint


class ConfigError(ValueError):
    """A config value the run cannot use; the commands print it as one line, without a traceback."""


class RecordConfig(Callback):
    """Writes the run's config into every checkpoint, so that the model can be rebuilt from the file alone.

    Interpolations stay unresolved: `${trainer.max_epochs}` in a scheduler follows the fine-tuning
    run's own trainer, not the training run's.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def train(cfg: DictConfig) -> dict[str, Any]:
    """lmd-train: dense training, compression at convergence, fine-tuning, one test; returns the results."""
    _check_run(cfg)
    resume = _read_checkpoint(cfg.ckpt_path, "ckpt_path") if cfg.ckpt_path is not None else None
    if resume is not None:
        recorded = resume.get(CONFIG_KEY, {}).get("model", {}).get("_target_")
        if recorded not in (None, cfg.model._target_):
            raise ConfigError(f"`ckpt_path` holds a {recorded}, but the config builds a {cfg.model._target_}")
    return _fit(cfg, cfg.model, cfg.data, resume, source=None)


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """lmd-finetune: rebuild a (compressed) checkpoint's model and train it further, compressing again if asked."""
    _check_run(cfg)
    checkpoint = _read_checkpoint(_required(cfg, "ckpt_path"), "ckpt_path")
    model_cfg, data_cfg = _recorded(cfg, checkpoint, "model"), _recorded(cfg, checkpoint, "data")
    return _fit(cfg, model_cfg, data_cfg, None, source=checkpoint["state_dict"])


def load_model(cfg: DictConfig) -> tuple[pl.LightningModule, DictConfig, DictConfig | None]:
    """The checkpoint's model, factored layers rebuilt, in eval mode; its model config and data config (or None)."""
    checkpoint = _read_checkpoint(_required(cfg, "ckpt_path"), "ckpt_path")
    model_cfg = _recorded(cfg, checkpoint, "model")
    # Inference needs no optimizer, and its config may interpolate keys only a training run has.
    unused = {key: None for key in ("optimizer", "scheduler") if key in model_cfg}
    model = _build("model", model_cfg, **unused)
    load_factored_state(model, checkpoint["state_dict"])
    return model.eval(), model_cfg, _recorded(cfg, checkpoint, "data", required=False)


def export(cfg: DictConfig) -> Any:
    """lmd-export: write a deployable copy of a checkpoint's model, verified against it on a batch."""
    from lmd_lightning.cli.exporter import SUFFIXES, check_destination, export_model

    if cfg.verify_on not in ("data", "example"):
        raise ConfigError(f"`verify_on` must be 'data' or 'example', got {cfg.verify_on!r}")
    ckpt_path = _required(cfg, "ckpt_path")
    if cfg.format not in SUFFIXES:
        raise ConfigError(f"`format` must be one of {tuple(SUFFIXES)}, got {cfg.format!r}")
    output = check_destination(cfg.output or Path(ckpt_path).with_suffix(SUFFIXES[cfg.format]), cfg.format, "output")
    model, model_cfg, data_cfg = load_model(cfg)
    batch = _example_batch(model, data_cfg if cfg.verify_on == "data" else None)
    # state_dict is verified by loading it into a fresh model built from the same config
    rebuild = (
        (lambda: _build("model", model_cfg, optimizer=None, scheduler=None)) if cfg.format == "state_dict" else None
    )
    result = export_model(
        model, output, cfg.format, batch, atol=cfg.atol, rtol=cfg.rtol, rebuild=rebuild, fold=cfg.fold
    )
    print(result)
    return result


def analyze(cfg: DictConfig) -> Any:
    """lmd-analyze: per-layer spectra, ranks and the intrinsic dimension of the layers' inputs."""
    from lmd_lightning.lmd.analysis import analyze as run_analysis
    from lmd_lightning.lmd.analysis import log_tensorboard

    for key, low in (("batches", 1), ("max_points", 3)):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < low:
            raise ConfigError(f"`{key}` must be an int >= {low}, got {cfg[key]!r}")
    model, _, data_cfg = load_model(cfg)
    calibration = None
    if data_cfg is not None:
        datamodule = _build("data", data_cfg)
        datamodule.prepare_data()
        datamodule.setup("fit")
        calibration = datamodule.train_dataloader()
    result = run_analysis(model, calibration, batches=cfg.batches, max_points=cfg.max_points)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(result.table())
    print(f"\nJSON:        {result.write_json(out / 'analysis.json')}")
    if cfg.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {log_tensorboard(result, out / 'tensorboard')}")
    if calibration is None:
        print("(no data recorded or given: weights only; add +data=NAME for the inputs' intrinsic dimension)")
    return result


def _check_run(cfg: DictConfig) -> None:
    for key, kind in (("seed", int), ("test", bool)):
        if isinstance(cfg[key], bool) is not (kind is bool) or not isinstance(cfg[key], kind):
            raise ConfigError(f"`{key}` must be {'true or false' if kind is bool else 'an int'}, got {cfg[key]!r}")
    strategy = str(cfg.trainer.get("strategy", ""))
    if strategy.startswith("ddp") and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(  # Lightning's DDP launcher re-runs the command line, -m and all, in each process
            f"`trainer.strategy`={strategy!r} cannot run inside a multirun (-m): run each setting separately"
        )


def _required(cfg: DictConfig, key: str) -> Any:
    if OmegaConf.is_missing(cfg, key) or cfg[key] is None:
        raise ConfigError(f"`{key}` is required: e.g. {key}=outputs/train/<date_time>/checkpoints/last.ckpt")
    return cfg[key]


def _read_checkpoint(path: Any, key: str) -> dict[str, Any]:
    try:
        return read_checkpoint(path, arg=key)
    except ValueError as err:  # a file that is no Lightning checkpoint: a config error, in one line
        raise ConfigError(str(err)) from err


def _recorded(cfg: DictConfig, checkpoint: dict[str, Any], key: str, required: bool = True) -> DictConfig | None:
    """What lmd-train recorded under `key` in the checkpoint, with the command line's `+key…=…` merged over it.

    The result is set into `cfg`, so its interpolations resolve against this run's config.
    """
    recorded = checkpoint.get(CONFIG_KEY, {}).get(key)
    given = cfg.get(key)
    if recorded is None and (given is None or "_target_" not in given):
        if not required:
            return None
        raise ConfigError(
            f"`ckpt_path`={cfg.ckpt_path} was not written by lmd-train, so it does not say which {key} it holds: "
            f"add `+{key}=NAME` (one of the configs/{key}/ options) and its settings, e.g. `+{key}.…=…`"
        )
    with open_dict(cfg):
        cfg[key] = OmegaConf.merge(recorded or {}, given or {})
    return cfg[key]


def _build(key: str, node: DictConfig, **kwargs: Any) -> Any:
    """instantiate(node), with our own argument errors raised as ConfigError naming the config key."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ if isinstance(err.__cause__, (ValueError, TypeError)) else err
        raise ConfigError(f"`{key}`: {cause}") from err


def _example_batch(model: pl.LightningModule, data_cfg: DictConfig | None) -> torch.Tensor:
    """The first validation batch of the run's data, or the model's `example_input_array` without data."""
    if data_cfg is None:
        if getattr(model, "example_input_array", None) is None:
            raise ConfigError("no data to verify on and no `example_input_array` on the model: give `+data=NAME`")
        return model.example_input_array
    datamodule = _build("data", data_cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))[0]


def _fit(
    cfg: DictConfig, model_cfg: DictConfig, data_cfg: DictConfig, resume: dict | None, source: dict | None
) -> dict[str, Any]:
    """Train `model_cfg` on `data_cfg`: from `source` weights (lmd-finetune), resuming `resume` (lmd-train)."""
    compression = _compression(cfg)  # first: a bad policy fails before any data is generated
    extra = _callbacks(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    model = _build("model", model_cfg)
    if source is not None:
        load_factored_state(model, source)
    if resume is not None:
        restore_factored_(model, resume["state_dict"])  # the structure only: Lightning loads the weights
    datamodule = _build("data", data_cfg)
    loggers = [_build("logger", cfg.logger)] if cfg.get("logger") else []
    checkpoint = _build("checkpoint", cfg.checkpoint) if cfg.get("checkpoint") else None
    record = RecordConfig(OmegaConf.to_container(cfg, resolve=False))  # model and data as _recorded merged them
    callbacks = [c for c in (compression, checkpoint) if c is not None] + [record] + extra
    trainer: pl.Trainer = _build("trainer", cfg.trainer, callbacks=callbacks, logger=loggers or False)
    params_before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path if resume is not None else None)
    fit_seconds = time.perf_counter() - start  # training, compression and validation: the cost to compare
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    if cfg.test:
        metrics |= {k: float(v) for k, v in trainer.test(model, datamodule=datamodule, verbose=False)[0].items()}
    results = _results(cfg, model, params_before, metrics, compression, checkpoint, loggers)
    results["fit_seconds"] = fit_seconds
    if trainer.is_global_zero:
        output = Path(cfg.paths.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        (output / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        _summarise(results, output / RESULTS_FILE)
    return results


def _compression(cfg: DictConfig) -> LMDCompression | None:
    """The callback, or None for compression=none; policy and trigger are built alone first for clear errors."""
    if cfg.compression is None:
        data_metric = OmegaConf.select(cfg, "metric._target_") == "lmd_lightning.DataMetric"  # loss: the default
        lmd_options = [
            key for key, on in (("regularizer", cfg.get("regularizer") is not None), ("metric", data_metric)) if on
        ]
        if lmd_options:  # they act through the callback, which compression=none does not add
            raise ConfigError(
                f"{' and '.join(f'`{key}`' for key in lmd_options)} need{'s' if len(lmd_options) == 1 else ''} the "
                "LMDCompression callback, which "
                "compression=none leaves out: pick a compression (e.g. compression=fixed compression.rank=R, "
                "which keeps factored layers at their rank when R is at least theirs)"
            )
        return None
    _build("compression", cfg.compression)
    if not isinstance(cfg.trigger, str):
        _build("trigger", cfg.trigger)
    return _build("callback", cfg.callback)


def _callbacks(cfg: DictConfig) -> list[Callback]:
    """The `callbacks` dict's Lightning callbacks, by name (`+callbacks=pruning`, `+callbacks.NAME._target_=…`)."""
    nodes = cfg.get("callbacks")
    if nodes is None:
        return []
    if not isinstance(nodes, DictConfig):
        raise ConfigError(f"`callbacks` must map names to callback configs, got {OmegaConf.to_yaml(nodes).strip()!r}")
    built = []
    for name, node in nodes.items():
        callback = _build(f"callbacks.{name}", node)
        if not isinstance(callback, Callback):
            raise ConfigError(f"`callbacks.{name}` built a {type(callback).__name__}, not a Lightning Callback")
        built.append(callback)
    return built


def _results(
    cfg: DictConfig,
    model: pl.LightningModule,
    params_before: int,
    metrics: dict[str, float],
    compression: LMDCompression | None,
    checkpoint: Any,
    loggers: list,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "task": cfg.task_name,
        "params_before": params_before,
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero_params": sum(int(p.count_nonzero()) for p in model.parameters()),  # what pruning leaves
        **metrics,
        "checkpoint": (checkpoint.best_model_path or None) if checkpoint is not None else None,
        "log_dir": loggers[0].log_dir if loggers else None,
    }
    results["compression_ratio"] = results["params_before"] / max(results["params"], 1)
    if compression is not None:
        guards = [report["guard"] or {} for report in compression.reports] or [{}]
        results |= {
            "policy": _short(compression.policy),
            "compressed_epochs": compression.compressed_epochs,
            "ranks": compression.ranks,
            "failure": compression.failure,
            "monitor": compression.monitor,
            # before the first round and right after the last: with rounds > 1 these are different models
            "monitor_before": guards[0].get("before", compression.dense_value),
            "monitor_after_truncation": guards[-1].get("after"),
            "ladder": [dataclasses.asdict(rung) for rung in compression.ladder],
            "reports": compression.reports,
        }
    return results


def _short(policy: Any) -> str:
    """`EnergyRank(energy=0.9)`: the policy with only the fields that differ from their defaults."""
    fields = [
        f
        for f in dataclasses.fields(policy)
        if f.default is dataclasses.MISSING or getattr(policy, f.name) != f.default
    ]
    return f"{type(policy).__name__}({', '.join(f'{f.name}={getattr(policy, f.name)!r}' for f in fields)})"


def _summarise(results: dict[str, Any], path: Path) -> None:
    """The dense-vs-compressed table (the CompressionReport itself was logged by the callback)."""
    metric = results.get("monitor") or "val_acc"
    test = metric.replace("val_", "test_")
    rows = [
        (
            "before" if results["task"] == "train" else "checkpoint",
            results["params_before"],
            results.get("monitor_before"),
            None,
        )
    ]
    if results.get("monitor_after_truncation") is not None:
        rows.append(("truncated, no fine-tune", results["params"], results["monitor_after_truncation"], None))
    for rung in results.get("ladder") or []:  # rounds="auto": each rung after its fine-tuning
        rows.append((f"rung {rung['rung']}, {rung['decision']}", rung["params"], rung["value"], None))
    rows.append(("final", results["params"], results.get(metric), results.get(test)))
    print(f"\n{'model':<26}{'params':>12}{metric:>12}{test:>12}")
    for name, params, val, test_value in rows:
        cells = "".join(f"{'—':>12}" if v is None else f"{v:>12.4f}" for v in (val, test_value))
        print(f"{name:<26}{params:>12,}{cells}")
    ratio = results["compression_ratio"]
    print(f"\n{ratio:.2f}× fewer parameters." if ratio > 1.0 else "\nThe parameter count did not change.")
    nonzero = results["nonzero_params"]
    if nonzero < results["params"]:
        print(f"{nonzero:,} of them are nonzero ({results['params'] / max(nonzero, 1):.2f}× fewer).")
    if results.get("failure"):
        print(f"Compression was abandoned: {results['failure']}")
    if results["log_dir"]:
        print(f"TensorBoard: tensorboard --logdir {results['log_dir']}")
    if results["checkpoint"]:
        print(f"Checkpoint:  {results['checkpoint']}")
    print(f"Results:     {path}")

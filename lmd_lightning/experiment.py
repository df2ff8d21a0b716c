"""What the Hydra commands run: build the objects a config names, train or fine-tune, summarise.

`cli.py` only finds the configs and hands the composed `DictConfig` to `train`, `finetune` or
`export` here, so tests can call these directly with a config from Hydra's compose API.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from lmd_lightning.callback import LMDCompression
from lmd_lightning.checkpoint import load_factored_state
from lmd_lightning.report import CompressionReport

__all__ = ["CONFIG_KEY", "RESULTS_FILE", "RecordConfig", "export", "finetune", "load_model", "train"]

log = logging.getLogger("lmd_lightning")
CONFIG_KEY = "lmd_config"  # where lmd-train keeps its composed config inside each checkpoint
RESULTS_FILE = "results.json"  # one per run dir; lmd-report aggregates them


class RecordConfig(Callback):
    """Writes the run's resolved config into every checkpoint, so the model can be rebuilt from it alone."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config


def train(cfg: DictConfig) -> dict[str, Any]:
    """lmd-train: dense training, compression at convergence, fine-tuning, one test; returns the results."""
    return _fit(cfg, model_cfg=cfg.model, data_cfg=cfg.data, state_dict=None)


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """lmd-finetune: rebuild a (compressed) checkpoint's model and train it further, compressing again if asked."""
    checkpoint = _read_checkpoint(cfg.ckpt_path)
    model_cfg, data_cfg = _recorded(cfg, checkpoint, "model"), _recorded(cfg, checkpoint, "data")
    return _fit(cfg, model_cfg=model_cfg, data_cfg=data_cfg, state_dict=checkpoint["state_dict"])


def load_model(cfg: DictConfig) -> tuple[pl.LightningModule, DictConfig, DictConfig | None]:
    """The checkpoint's model with its factored layers rebuilt, in eval mode; its model and data configs."""
    checkpoint = _read_checkpoint(cfg.ckpt_path)
    model_cfg = _recorded(cfg, checkpoint, "model")
    model = instantiate(model_cfg, _convert_="all")
    load_factored_state(model, checkpoint["state_dict"])
    data_cfg = cfg.get("data") or OmegaConf.create(checkpoint.get(CONFIG_KEY, {})).get("data")
    return model.eval(), model_cfg, data_cfg


def export(cfg: DictConfig) -> Any:
    """lmd-export: write a deployable copy of a checkpoint's model, verified against it on a batch."""
    from lmd_lightning.export import FORMATS, export_model

    if cfg.format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}, got {cfg.format!r}")
    model, model_cfg, data_cfg = load_model(cfg)
    batch = _example_batch(model, data_cfg)
    suffix = {"torchscript": ".ts.pt", "onnx": ".onnx", "state_dict": ".pt", "exported_program": ".pt2"}[cfg.format]
    output = Path(cfg.output) if cfg.output else Path(cfg.ckpt_path).with_suffix(suffix)
    # state_dict is verified by loading it into a fresh model of the same config
    rebuild = (lambda: instantiate(model_cfg, _convert_="all")) if cfg.format == "state_dict" else None
    result = export_model(model, output, cfg.format, batch, atol=cfg.atol, rtol=cfg.rtol, rebuild=rebuild)
    print(result)
    return result


def _read_checkpoint(path: str | None) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"`ckpt_path` must name a checkpoint file, got {path!r}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} holds no 'state_dict'; is it a Lightning checkpoint? keys: {sorted(checkpoint)}")
    return checkpoint


def _recorded(cfg: DictConfig, checkpoint: dict[str, Any], key: str) -> DictConfig:
    """`cfg[key]` if given on the command line (+model=…), else what lmd-train recorded in the checkpoint."""
    if cfg.get(key) is not None:
        return cfg[key]
    recorded = checkpoint.get(CONFIG_KEY, {}).get(key)
    if recorded is None:
        raise ValueError(
            f"{cfg.ckpt_path} was not written by lmd-train, so it does not say which {key} it holds: "
            f"add `+{key}=NAME` (one of the configs/{key}/ files) and its settings, e.g. `+{key}.…=…`"
        )
    return OmegaConf.create(recorded)


def _example_batch(model: pl.LightningModule, data_cfg: DictConfig | None) -> torch.Tensor:
    """The first validation batch of the run's data, or the model's example input when no data is known."""
    if data_cfg is None:
        if getattr(model, "example_input_array", None) is None:
            raise ValueError("no data config and no `example_input_array` on the model: give `+data=NAME`")
        return model.example_input_array
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("validate")
    return next(iter(datamodule.val_dataloader()))[0]


def _fit(
    cfg: DictConfig, model_cfg: DictConfig, data_cfg: DictConfig, state_dict: dict[str, Any] | None
) -> dict[str, Any]:
    pl.seed_everything(cfg.seed, workers=True)
    compression = instantiate(cfg.callback) if cfg.compression is not None else None  # validates it up front
    model = instantiate(model_cfg, _convert_="all")
    if state_dict is not None:
        load_factored_state(model, state_dict)
    datamodule = instantiate(data_cfg)
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    record = OmegaConf.to_container(cfg, resolve=True) | {"model": OmegaConf.to_container(model_cfg, resolve=True)}
    record["data"] = OmegaConf.to_container(data_cfg, resolve=True)
    checkpoint = instantiate(cfg.checkpoint) if cfg.get("checkpoint") else None
    callbacks = [c for c in (compression, checkpoint) if c is not None] + [RecordConfig(record)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    params_before = sum(p.numel() for p in model.parameters())
    resume = cfg.get("ckpt_path") if state_dict is None else None  # lmd-finetune's ckpt_path is its source
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    if cfg.test:
        metrics |= {k: float(v) for k, v in trainer.test(model, datamodule=datamodule, verbose=False)[0].items()}
    results = _results(cfg, model, params_before, metrics, compression, checkpoint, loggers)
    if trainer.is_global_zero:
        _summarise(results, compression)
        (Path(cfg.paths.output_dir) / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    return results


def _results(
    cfg: DictConfig, model: pl.LightningModule, params_before: int, metrics: dict[str, float],
    compression: LMDCompression | None, checkpoint: Any, loggers: list,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "task": cfg.task_name, "params_before": params_before,
        "params": sum(p.numel() for p in model.parameters()), **metrics,
        "checkpoint": (checkpoint.best_model_path or None) if checkpoint is not None else None,
        "log_dir": loggers[0].log_dir if loggers else None,
    }
    results["compression_ratio"] = results["params_before"] / max(results["params"], 1)
    if compression is not None:
        guard = compression.guard or {}
        results |= {
            "policy": _short(compression.policy), "compressed_epochs": compression.compressed_epochs,
            "ranks": compression.ranks, "failure": compression.failure, "monitor": compression.metric,
            "monitor_before": guard.get("before"), "monitor_after_truncation": guard.get("after"),
            "reports": compression.reports,
        }
    return results


def _short(policy: Any) -> str:
    """`EnergyRank(energy=0.9)`: the policy with only the fields that differ from their defaults."""
    fields = [f for f in dataclasses.fields(policy) if f.default is dataclasses.MISSING or getattr(policy, f.name) != f.default]
    return f"{type(policy).__name__}({', '.join(f'{f.name}={getattr(policy, f.name)!r}' for f in fields)})"


def _summarise(results: dict[str, Any], compression: LMDCompression | None) -> None:
    if compression is not None and compression.reports:
        print(CompressionReport.from_dict(compression.reports[-1]))
    elif compression is not None:
        print(f"The model stayed dense: {compression.failure or 'compression never became due'}")
    metric = results.get("monitor") or "val_acc"
    rows = [("before", results["params_before"], results.get("monitor_before"), None)]
    if results.get("monitor_after_truncation") is not None:
        rows.append(("truncated, no fine-tune", results["params"], results["monitor_after_truncation"], None))
    rows.append(("final", results["params"], results.get(metric), results.get(metric.replace("val_", "test_"))))
    print(f"\n{'model':<26}{'params':>12}{metric:>12}{metric.replace('val_', 'test_'):>12}")
    for name, params, val, test in rows:
        cells = "".join(f"{'—':>12}" if v is None else f"{v:>12.4f}" for v in (val, test))
        print(f"{name:<26}{params:>12,}{cells}")
    print(f"\n{results['compression_ratio']:.2f}× fewer parameters.")
    if results["log_dir"]:
        print(f"TensorBoard: tensorboard --logdir {results['log_dir']}")
    if results["checkpoint"]:
        print(f"Checkpoint:  {results['checkpoint']}")

"""Every Hydra config group composes and instantiates, and its keys mirror the Python it targets."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

import lmd_lightning
from lmd_lightning import (
    ConvergenceMonitor,
    DataMetric,
    EnergyRank,
    Guard,
    LMDCompression,
    LossMetric,
    RankPolicy,
    Regularizer,
    StableRank,
    StableRankMonitor,
)
from lmd_lightning.cli.commands import config_dir, recipe_dir, register_recipes

GROUPS = ("model", "data", "compression", "trigger", "trainer", "logger", "callback", "checkpoint", "paths")


# The recipe of lmd-train's tests unless they name one: the default, mnist1d_auto, climbs a ladder on
# 20,000 samples; the one-shot mnist1d_mlp exercises the rest of the machinery on 4,000.
ONE_SHOT_RECIPE = "recipe=mnist1d_mlp"


def compose_config(
    name: str = "train", overrides: tuple[str, ...] = (), output_dir: Path | None = None, default: bool = False
) -> DictConfig:
    """The composed config; for `train`, with ONE_SHOT_RECIPE unless `overrides` name a recipe or `default`."""
    register_recipes()
    extra = [f"paths.output_dir={output_dir}"] if output_dir else ["paths.output_dir=unused"]
    named = default or name != "train" or any(override.startswith("recipe=") for override in overrides)
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose(name, overrides=[*([] if named else [ONE_SHOT_RECIPE]), *overrides, *extra])


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir() / group).glob("*.yaml"))


def test_config_tree_ships_with_the_package() -> None:
    assert set(GROUPS) <= {path.name for path in config_dir().iterdir() if path.is_dir()}
    assert {"train.yaml", "finetune.yaml", "export.yaml"} <= {path.name for path in config_dir().glob("*.yaml")}
    assert options("model") == ["cnn1d", "lenet300", "mlp", "mlp_digits", "resnet18", "transformer"]
    assert options("data") == ["cifar10", "digits", "mnist", "mnist1d", "mnist1d_large", "synthetic"]
    assert options("compression") == [
        "budget",
        "budget_quarter",
        "energy",
        "energy_floor",
        "energy_half",
        "error_bound",
        "fixed",
        "ladder",
        "none",
        "ratio",
        "stable_rank",
        "uniform",
        "uniform_floor",
    ]
    assert options("trigger") == ["epoch", "grad_norm", "stable_rank"]
    assert options("callbacks") == ["pruning"]
    assert options("trainer") == ["cpu", "ddp", "gpu"]
    assert options("logger") == ["csv", "none", "tensorboard"]
    recipes = {"mnist1d_mlp", "mnist1d_cnn", "mnist1d_transformer", "cifar10_resnet", "mnist_lenet300", "digits_mlp"}
    assert recipes <= {path.stem for path in recipe_dir().glob("*.yaml")}


def test_the_default_recipe_is_the_auto_ladder() -> None:
    """lmd-train's default, mnist1d_auto: rounds="auto" down to EnergyRank(0.4) at most, AdamW + cosine, 60 epochs."""
    cfg = compose_config(default=True)
    assert cfg.compression._target_ == "lmd_lightning.EnergyRank" and cfg.compression.energy == 0.4  # energy_floor
    assert cfg.data.num_samples == 20000 and cfg.data.val_fraction == 0.2
    assert cfg.model._target_.endswith("MLPClassifier") and cfg.data._target_.endswith("MNIST1DDataModule")
    assert cfg.trigger._target_ == "lmd_lightning.ConvergenceMonitor" and cfg.trainer.accelerator == "cpu"
    assert cfg.trigger.criterion == "epoch" and cfg.trigger.rel_tol is None  # None: the criterion's 0.12
    assert cfg.trainer.max_epochs == 60 and cfg.model.optimizer._target_ == "torch.optim.AdamW"
    model = instantiate(cfg.model, _convert_="all")
    schedule = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR) and schedule.T_max == 60
    callback = instantiate(cfg.callback)
    assert callback.rounds == "auto" and callback.guard.max_drop == 0.01 and callback.monitor == "val_acc"
    assert callback.data_metric is None and callback.policy == EnergyRank(0.4)  # the weight metric
    assert cfg == compose_config(overrides=("recipe=mnist1d_auto",))


def test_the_one_shot_recipe_of_the_tests() -> None:
    cfg = compose_config()
    assert cfg.compression._target_ == "lmd_lightning.EnergyRank" and cfg.compression.energy == 0.5  # energy_half
    assert cfg.model.optimizer._partial_ is True and cfg.trainer.max_epochs == 40
    assert instantiate(cfg.callback).rounds == 1


@pytest.mark.parametrize("option", options("model"))
def test_model_configs_instantiate(option: str) -> None:
    cfg = compose_config(overrides=(f"model={option}",))
    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, pl.LightningModule)
    out = model(model.example_input_array)
    assert out.shape == (2, cfg.model.num_classes)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert type(optimizer) is get_class(cfg.model.optimizer._target_)
    assert optimizer.defaults["lr"] == cfg.model.optimizer.lr


@pytest.mark.parametrize("option", options("data"))
def test_data_configs_instantiate(option: str) -> None:
    cfg = compose_config(overrides=(f"data={option}",))
    datamodule = instantiate(cfg.data)  # no download: that happens in prepare_data
    assert isinstance(datamodule, pl.LightningDataModule) and datamodule.num_classes == 10
    assert datamodule.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("option", [o for o in options("compression") if o != "none"])
def test_compression_configs_mirror_the_policy_dataclasses(option: str) -> None:
    cfg = compose_config(overrides=(f"compression={option}",))
    policy = instantiate(cfg.compression)
    assert isinstance(policy, RankPolicy)
    fields = {field.name for field in dataclasses.fields(policy)}
    assert set(cfg.compression) - {"_target_"} == fields  # key for key
    for key in fields:
        assert getattr(policy, key) == cfg.compression[key]
    callback = instantiate(cfg.callback)
    assert isinstance(callback, LMDCompression) and callback.policy == policy


def test_metric_configs() -> None:
    assert instantiate(compose_config().callback).data_metric is None  # weight: what the default recipe sets
    cfg = compose_config(overrides=("metric=loss", "metric.max_dim=512"))
    assert set(cfg.metric) - {"_target_"} == {field.name for field in dataclasses.fields(LossMetric)} - {"loss"}
    assert instantiate(cfg.callback).data_metric == LossMetric(batches=8, damping=0.01, max_dim=512)
    cfg = compose_config(overrides=("metric=data", "metric.damping=0.1"))
    fields = {field.name for field in dataclasses.fields(DataMetric)} - {"forward"}  # a callable, not config
    assert set(cfg.metric) - {"_target_"} == fields
    callback = instantiate(cfg.callback)
    assert callback.data_metric == DataMetric(batches=8, damping=0.1, sequential=True)


@pytest.mark.parametrize("option", ["identity", "laplacian"])
def test_regularizer_configs_mirror_the_dataclass_and_switch_maps_on(option: str) -> None:
    assert instantiate(compose_config().callback).regularizer is None  # no regularizer by default
    cfg = compose_config(overrides=(f"regularizer={option}",))
    assert set(cfg.regularizer) - {"_target_"} == {field.name for field in dataclasses.fields(Regularizer)}
    callback = instantiate(cfg.callback)
    assert callback.metric_maps and callback.regularizer == instantiate(cfg.regularizer)
    assert callback.regularizer.kind == option


def test_callback_and_trigger_configs_mirror_their_signatures() -> None:
    cfg = compose_config()
    callback_args = set(inspect.signature(LMDCompression.__init__).parameters) - {"self", "filter_fn", "deprecated"}
    assert set(cfg.callback) - {"_target_"} == callback_args  # filter_fn is a Python callable, not config
    assert set(cfg.callback.guard) - {"_target_"} == {f.name for f in dataclasses.fields(Guard)}
    monitor_args = set(inspect.signature(ConvergenceMonitor.__init__).parameters) - {"self"}
    assert set(cfg.trigger) - {"_target_"} == monitor_args
    callback = instantiate(cfg.callback)
    assert isinstance(callback.convergence, ConvergenceMonitor) and callback.trigger == "grad_norm"
    assert callback.convergence.window == cfg.trigger.window and callback.exclude == "*head"
    assert callback.guard == Guard() and callback.monitor == "val_acc"
    guarded = instantiate(compose_config(overrides=("callback.guard.max_drop=0.02",)).callback)
    assert guarded.guard == Guard(max_drop=0.02)
    by_epoch = instantiate(compose_config(overrides=("trigger=epoch",)).callback)
    assert by_epoch.trigger == "epoch"
    cuttlefish = compose_config(overrides=("trigger=stable_rank", "compression=stable_rank", "trigger.tol=0.05"))
    stable_rank_args = set(inspect.signature(StableRankMonitor.__init__).parameters) - {"self"}
    assert set(cuttlefish.trigger) - {"_target_"} == stable_rank_args
    callback = instantiate(cuttlefish.callback)
    assert callback.trigger == "stable_rank" and callback.stable_ranks.tol == 0.05
    assert callback.policy == StableRank()


def test_compression_none_means_no_policy() -> None:
    assert compose_config(overrides=("compression=none",)).compression is None
    assert compose_config(name="finetune", overrides=("ckpt_path=x",)).compression is None


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_configs(option: str) -> None:
    cfg = compose_config(overrides=(f"trainer={option}",))
    assert get_class(cfg.trainer._target_) is pl.Trainer
    if option == "cpu":
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_epochs == cfg.trainer.max_epochs == 40 and trainer.num_devices == 1  # the recipe's 40
    elif option == "ddp":  # building it launches nothing: the processes start at fit
        trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False, enable_checkpointing=False)
        assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
    else:  # building a GPU Trainer needs a GPU; the config still has to name a real precision
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("option", options("logger"))
def test_logger_configs(option: str, tmp_path: Path) -> None:
    cfg = compose_config(overrides=(f"logger={option}",), output_dir=tmp_path)
    if option == "none":
        assert cfg.logger is None
        return
    logger = instantiate(cfg.logger)
    assert type(logger).__name__ == {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger"}[option]
    assert Path(logger.log_dir).is_relative_to(tmp_path)


def test_recipes_compose_and_override_groups() -> None:
    cnn = compose_config(overrides=("recipe=mnist1d_cnn",))
    assert cnn.model._target_.endswith("CNN1DClassifier") and cnn.compression._target_ == "lmd_lightning.GlobalBudget"
    lenet = compose_config(overrides=("recipe=mnist_lenet300",))
    assert lenet.model.in_features == 784 and list(lenet.model.widths) == [300, 100] and lenet.data.name == "mnist"
    resnet = compose_config(overrides=("recipe=cifar10_resnet",))
    assert resnet.data.name == "cifar10" and resnet.model.scheduler.T_max == resnet.trainer.max_epochs == 100
    assert resnet.trainer.accelerator == "gpu"
    # The command line wins over the recipe, for values and for groups.
    mixed = compose_config(overrides=("recipe=mnist1d_cnn", "model=mlp", "compression.params=0.1"))
    assert mixed.model._target_.endswith("MLPClassifier") and mixed.compression.params == 0.1


def test_unknown_recipe_lists_the_recipes() -> None:
    with pytest.raises(MissingConfigException, match="mnist1d_cnn"):
        compose_config(overrides=("recipe=nope",))


def test_bad_policy_value_names_the_argument() -> None:
    cfg = compose_config(overrides=("compression.energy=-0.5",))
    with pytest.raises(InstantiationException, match="`energy`"):
        instantiate(cfg.callback)


@pytest.mark.parametrize("recipe", sorted(path.stem for path in recipe_dir().glob("*.yaml")))
def test_every_recipe_takes_every_policy_and_model(recipe: str) -> None:
    """Recipes choose groups but leave their values alone, so `compression=…` or `model=…` always works."""
    for option in [o for o in options("compression") if o != "none"]:
        cfg = compose_config(overrides=(f"recipe={recipe}", f"compression={option}"))
        policy = instantiate(cfg.compression)
        assert isinstance(policy, RankPolicy)
        if cfg.callback.rounds == "auto" and policy.knob is None:  # a ladder needs a knob: refused, saying so
            with pytest.raises(InstantiationException, match=r"rounds='auto' climbs the policy's knob"):
                instantiate(cfg.callback)
            continue
        assert isinstance(instantiate(cfg.callback), LMDCompression)
    for option in options("model"):
        cfg = compose_config(overrides=(f"recipe={recipe}", f"model={option}"))
        assert type(instantiate(cfg.model, _convert_="all")).__name__ == cfg.model._target_.rsplit(".", 1)[1]


@pytest.mark.slow
def test_wheel_ships_configs_and_recipes(tmp_path: Path) -> None:
    """A non-editable install finds its configs: the wheel holds them as lmd_lightning.configs/.recipes."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    names = set(zipfile.ZipFile(next(tmp_path.glob("lmd_lightning-*.whl"))).namelist())
    for path in config_dir().rglob("*.yaml"):
        assert f"lmd_lightning/configs/{path.relative_to(config_dir()).as_posix()}" in names
    for path in recipe_dir().glob("*.yaml"):
        assert f"lmd_lightning/recipes/{path.name}" in names
    assert "lmd_lightning/models/transformer.py" in names and "lmd_lightning/data/modules.py" in names
    package = Path(lmd_lightning.__file__).parent
    for module in package.rglob("*.py"):  # every subpackage's modules, not only the listed top level
        assert f"lmd_lightning/{module.relative_to(package).as_posix()}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).read(entry_points).decode()
    assert all(f"lmd-{cmd} = lmd_lightning.cli:{cmd}" in scripts for cmd in ("train", "finetune", "export", "report"))

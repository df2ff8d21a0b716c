"""The lmd-* commands. lmd-train, lmd-finetune and lmd-export are Hydra apps; lmd-report is argparse.

The configs ship inside the package: pyproject maps the repo's top-level `configs/` to
`lmd_lightning.configs` and `recipes/` to `lmd_lightning.recipes`, so a checkout, an editable
install and a wheel all find them. Recipes are registered as the Hydra group `recipe` in the
ConfigStore (each recipe file is `# @package _global_` and may override any group), which keeps
`recipes/` a folder of its own at the top of the repo.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = ["config_dir", "export", "finetune", "recipe_dir", "register_recipes", "report", "train"]

VERSION_BASE = "1.3"


def _package_dir(package: str, repo_folder: str) -> Path:
    """An installed data package's folder; in a bare checkout (not installed), the repo folder."""
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / repo_folder


def config_dir() -> Path:
    return _package_dir("lmd_lightning.configs", "configs")


def recipe_dir() -> Path:
    return _package_dir("lmd_lightning.recipes", "recipes")


def register_recipes() -> list[str]:
    """Store every `recipes/*.yaml` as option of the group `recipe`, at the global package."""
    store = ConfigStore.instance()
    names = []
    for path in sorted(recipe_dir().glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names


def _hydra_app(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], None]:
    def app() -> None:
        register_recipes()
        main = hydra.main(version_base=VERSION_BASE, config_path=str(config_dir()), config_name=config_name)
        main(task)()

    app.__doc__ = f"Hydra entry point running `{config_name}.yaml`."
    return app


def _task(name: str) -> Callable[[DictConfig], None]:
    """The Hydra task running `experiment.<name>`; a bad value ends in one line on stderr and exit code 2."""

    def task(cfg: DictConfig) -> None:
        from lmd_lightning.cli import experiment

        try:
            getattr(experiment, name)(cfg)
        except (experiment.ConfigError, FileNotFoundError, ImportError) as err:
            print(f"lmd-{name}: error: {err}", file=sys.stderr)
            sys.exit(2)

    task.__name__ = name  # Hydra names the job after its task function
    return task


train = _hydra_app("train", _task("train"))
finetune = _hydra_app("finetune", _task("finetune"))
export = _hydra_app("export", _task("export"))
analyze = _hydra_app("analyze", _task("analyze"))


def report(argv: list[str] | None = None) -> None:
    """lmd-report DIR: a trade-off table and figure from a multirun of lmd-train."""
    from lmd_lightning.cli import tradeoff

    tradeoff.main(argv)

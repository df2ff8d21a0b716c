"""The package's layering, its public API, and the callback's hooks (see the README's Architecture)."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import pytorch_lightning as pl

import lmd_lightning
from lmd_lightning import EnergyRank, Guard, LMDCompression

PACKAGE = Path(lmd_lightning.__file__).parent
TORCH_ONLY = ("layers", "truncate", "monitors", "lmd")
FRAMEWORKS = ("pytorch_lightning", "lightning", "lightning_fabric", "hydra", "omegaconf")
# What each folder may import from the package (besides itself); `checks` is the shared argument checks.
ALLOWED = {
    "layers": {"checks"},
    "monitors": {"checks", "layers"},
    "truncate": {"checks", "layers"},
    "lmd": {"checks", "layers", "truncate"},
    "callback": {"checks", "layers", "truncate", "monitors", "lmd"},
    "cli": {"checks", "layers", "truncate", "monitors", "lmd", "callback", "data", "models", "<top>"},
    "data": {"checks"},
    "models": {"checks"},
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.add(f"<relative import at line {node.lineno}>")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _folder_of(module: str) -> str | None:
    """The package folder an `lmd_lightning.…` import lands in ("<top>" for the package itself)."""
    parts = module.split(".")
    if parts[0] != "lmd_lightning":
        return None
    if len(parts) == 1:
        return "<top>"
    return parts[1] if (PACKAGE / parts[1]).is_dir() or parts[1] == "checks" else "<top>"


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_each_folder_imports_only_the_layers_below_it(folder: str) -> None:
    wrong = []
    for path in sorted((PACKAGE / folder).glob("*.py")):
        for module in _imports(path):
            target = "<relative>" if module.startswith("<relative") else _folder_of(module)
            if target not in (None, folder) and target not in ALLOWED[folder]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_the_top_level_modules_sit_where_they_should() -> None:
    """`checks.py` is below every folder: it imports nothing of the package and no framework."""
    assert not [
        m for m in _imports(PACKAGE / "checks.py") if m.startswith("lmd_lightning") or m.split(".")[0] in FRAMEWORKS
    ]
    assert {m for m in _imports(PACKAGE / "lightning.py") if m.startswith("lmd_lightning")} == {
        "lmd_lightning.callback.lmd_compression",
        "lmd_lightning.callback.lmd_compression.LMDCompressionBase",
    }


@pytest.mark.parametrize("folder", TORCH_ONLY)
def test_torch_only_folders_name_no_framework_even_inside_functions(folder: str) -> None:
    found = [
        f"{path.relative_to(PACKAGE)}: {module}"
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for module in _imports(path)
        if module.split(".")[0] in FRAMEWORKS
    ]
    assert not found, found


BLOCKER = """
import importlib.abc, importlib.util, json, pkgutil, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
import lmd_lightning
loaded = []
for folder in {folders!r}:
    package = importlib.import_module(f"lmd_lightning.{{folder}}")
    for info in pkgutil.iter_modules(package.__path__):
        loaded.append(importlib.import_module(f"lmd_lightning.{{folder}}.{{info.name}}").__name__)
from lmd_lightning import EnergyRank, FactoredLinear, compress_  # the functional core, with no framework
print(json.dumps(loaded))
"""


def test_torch_only_folders_import_with_the_frameworks_blocked() -> None:
    """A subprocess in which importing Lightning, Hydra or OmegaConf raises: the torch-only part still loads."""
    script = BLOCKER.format(blocked=FRAMEWORKS, folders=TORCH_ONLY)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {f"lmd_lightning.{f}.{p.stem}" for f in TORCH_ONLY for p in (PACKAGE / f).glob("*.py")}
    assert set(loaded) == expected - {f"lmd_lightning.{f}.__init__" for f in TORCH_ONLY}


def test_the_blocker_really_blocks() -> None:
    """The same subprocess refuses a Lightning-side module: the check above cannot pass by accident."""
    script = BLOCKER.format(blocked=FRAMEWORKS, folders=("callback",))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "blocked: pytorch_lightning" in done.stderr


def test_every_public_name_imports_from_the_package() -> None:
    for name in lmd_lightning.__all__:
        assert getattr(lmd_lightning, name) is not None, name
    from lmd_lightning.lightning import LMDCompression as Unified

    assert Unified.__mro__[1] is lmd_lightning.callback.LMDCompressionBase
    with pytest.raises(AttributeError, match="module 'lmd_lightning' has no attribute 'nope'"):
        lmd_lightning.nope  # noqa: B018


def test_console_scripts_resolve_to_the_commands() -> None:
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("lmd-")}
    assert set(scripts) == {"lmd-train", "lmd-finetune", "lmd-export", "lmd-report", "lmd-analyze"}
    from lmd_lightning.cli import commands

    for name, ep in scripts.items():
        assert ep.value == f"lmd_lightning.cli:{name[4:]}"
        assert ep.load() is getattr(commands, name[4:])


def test_every_callback_hook_is_marked_and_is_a_lightning_hook() -> None:
    """`@override` on each hook, and each one names a real Callback hook: a misspelled hook would never run."""
    hooks = {name for name, _ in inspect.getmembers(pl.Callback, inspect.isfunction) if not name.startswith("_")}
    members = dict(inspect.getmembers(lmd_lightning.callback.LMDCompressionBase, inspect.isfunction))
    marked = {name for name, fn in members.items() if getattr(fn, "__override__", False)}
    assert marked <= hooks, marked - hooks
    assert {name for name in members if name in hooks} == marked
    assert {"setup", "on_train_epoch_start", "on_before_optimizer_step", "state_dict"} <= marked


@pytest.mark.parametrize(
    ("old", "field", "value"),
    [
        ("max_accuracy_drop", "max_drop", 0.02),
        ("guard_batches", "batches", 3),
        ("search_steps", "search_steps", 2),
        ("sweep_points", "sweep_points", 0),
    ],
)
def test_the_old_guard_keywords_still_work_with_a_deprecation_warning(old: str, field: str, value: float) -> None:
    with pytest.warns(DeprecationWarning, match=rf"LMDCompression\({old}=\.\.\.\) is deprecated; pass guard=Guard"):
        callback = LMDCompression(EnergyRank(0.9), monitor="val_acc", **{old: value})
    assert getattr(callback.guard, field) == value and callback.guard == Guard(**{field: value})
    with pytest.raises(ValueError, match=r"pass either `guard` or the deprecated keywords \['guard_batches'\]"):
        LMDCompression(EnergyRank(0.9), monitor="val_acc", guard=Guard(batches=4), guard_batches=2)


def test_two_old_keywords_warn_once_naming_each_replacement() -> None:
    with pytest.warns(DeprecationWarning, match="is deprecated; pass guard=Guard") as caught:
        callback = LMDCompression(EnergyRank(0.9), monitor="val_acc", max_accuracy_drop=0.02, guard_batches=3)
    assert [str(w.message) for w in caught] == [
        "LMDCompression(max_accuracy_drop=..., guard_batches=...) is deprecated; "
        "pass guard=Guard(max_drop=..., batches=...)"
    ]
    assert callback.guard == Guard(max_drop=0.02, batches=3)
    with pytest.warns(
        DeprecationWarning, match=r"sweep_points=\.\.\."
    ):  # a default Guard, as the Hydra config builds, takes them too
        assert LMDCompression(EnergyRank(0.9), guard=Guard(), sweep_points=2).guard == Guard(sweep_points=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_accuracy_drop": 0.01}, ValueError, r"`max_accuracy_drop`=0.01 needs `monitor`"),
        (
            {"monitor": "val_acc", "max_accuracy_drop": -0.1},
            ValueError,
            r"`max_accuracy_drop` must be a number >= 0, got -0.1",
        ),
        ({"guard_batches": 0}, ValueError, r"`guard_batches` must be an int >= 1, got 0"),
        ({"sweep_points": -1}, ValueError, r"`sweep_points` must be an int >= 0, got -1"),
        ({"search_steps": True}, ValueError, r"`search_steps` must be an int >= 0, got True"),
    ],
)
def test_the_old_keywords_fail_with_the_old_messages(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        LMDCompression(EnergyRank(0.9), **kwargs)


def test_monitor_is_the_monitored_name_and_metric_is_deprecated() -> None:
    callback = LMDCompression(EnergyRank(0.9), monitor="val_loss", mode="min", metric="data")
    assert callback.monitor == "val_loss" and callback.mode == "min" and callback.data_metric is not None
    with pytest.warns(DeprecationWarning, match="LMDCompression.metric is deprecated; use LMDCompression.monitor"):
        assert callback.metric == "val_loss"
    with pytest.raises(TypeError, match="`monitor` must be the name of a logged validation metric, got ''"):
        LMDCompression(EnergyRank(0.9), monitor="")


def test_no_deprecation_warning_without_the_old_keywords() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback = LMDCompression(EnergyRank(0.9), monitor="val_acc", guard=Guard(max_drop=0.01))
    assert callback.guard.max_drop == 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_drop": -0.1}, r"Guard `max_drop` must be a number >= 0, got -0.1"),
        ({"batches": 0}, r"Guard `batches` must be an int >= 1, got 0"),
        ({"search_steps": 1.5}, r"Guard `search_steps` must be an int >= 0, got 1.5"),
        ({"sweep_points": -1}, r"Guard `sweep_points` must be an int >= 0, got -1"),
    ],
)
def test_guard_settings_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Guard(**kwargs)

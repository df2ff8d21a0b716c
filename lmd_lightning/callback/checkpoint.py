"""Loading compressed checkpoints: the factored structure is rebuilt from the state-dict shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

from lmd_lightning.truncate.restore import restore_factored_

__all__ = ["LMDCheckpointMixin", "StrictLoadingHold", "load_compressed", "load_factored_state", "read_checkpoint"]

M = TypeVar("M", bound=pl.LightningModule)


def load_compressed(module_cls: type[M], path: str | Path, map_location: Any = "cpu", **init_kwargs: Any) -> M:
    """Build `module_cls`, rebuild its factored layers from the checkpoint, load it strictly, eval mode.

    Constructor arguments come from the checkpoint's saved hyper-parameters, overridden by
    `init_kwargs`. The file is read with `torch.load(weights_only=True)`.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, torch.nn.Module)):
        raise TypeError(f"`module_cls` must be a LightningModule class, got {module_cls!r}")
    checkpoint = read_checkpoint(path, map_location)
    kwargs = {**checkpoint.get("hyper_parameters", {}), **init_kwargs}
    model = module_cls(**kwargs)
    load_factored_state(model, checkpoint["state_dict"])
    return model.eval()


def read_checkpoint(path: str | Path, map_location: Any = "cpu", arg: str = "path") -> dict[str, Any]:
    """A Lightning checkpoint read with `weights_only=True`; `arg` names `path` in the errors."""
    if not isinstance(path, (str, Path)) or not Path(path).is_file():
        raise FileNotFoundError(f"`{arg}` must name a checkpoint file, got {str(path)!r}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(
            f"`{arg}`={path} holds no 'state_dict': is it a Lightning checkpoint? keys: {sorted(checkpoint)}"
        )
    return checkpoint


def load_factored_state(module: torch.nn.Module, state_dict: dict[str, Any], strict: bool = True) -> list[str]:
    """Rebuild the factored layers `state_dict` records, then load it; returns the layers rebuilt."""
    rebuilt = restore_factored_(module, state_dict)
    module.load_state_dict(state_dict, strict=strict)
    return rebuilt


class StrictLoadingHold:
    """Keeps a LightningModule's `strict_loading` off while Lightning loads weights before structure.

    On `fit(ckpt_path=...)` Lightning loads the model's weights before any callback sees the
    checkpoint, so the factored layers do not exist yet: `take` makes that first load loose,
    `reload` rebuilds the structure and loads again with the module's own strictness.
    """

    def __init__(self) -> None:
        self._held: bool | None = None  # the module's own setting while we hold it

    def take(self, module: pl.LightningModule) -> None:
        if self._held is None:
            self._held, module.strict_loading = module.strict_loading, False

    def give_back(self, module: pl.LightningModule) -> None:
        if self._held is not None:
            module.strict_loading, self._held = self._held, None

    def reload(self, module: pl.LightningModule, state_dict: dict[str, Any]) -> list[str]:
        strict = module.strict_loading if self._held is None else self._held
        rebuilt = load_factored_state(module, state_dict, strict)
        self.give_back(module)
        return rebuilt


class LMDCheckpointMixin:
    """Opt-in for `MyModule.load_from_checkpoint(path)` on compressed checkpoints.

    `class MyModule(LMDCheckpointMixin, pl.LightningModule)`: before Lightning loads the weights,
    the factored layers recorded in the checkpoint are rebuilt.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_factored_(self, checkpoint["state_dict"])
        super().on_load_checkpoint(checkpoint)

"""Loading compressed checkpoints: the factored structure is rebuilt from the state-dict shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

from lmd_lightning.compress import restore_factored_

__all__ = ["LMDCheckpointMixin", "load_compressed"]

M = TypeVar("M", bound=pl.LightningModule)


def load_compressed(module_cls: type[M], path: str | Path, map_location: Any = "cpu", **init_kwargs: Any) -> M:
    """Build `module_cls`, rebuild its factored layers from the checkpoint, load it strictly, eval mode.

    Constructor arguments come from the checkpoint's saved hyper-parameters, overridden by
    `init_kwargs`. The file is read with `torch.load(weights_only=True)`.
    """
    if not (isinstance(module_cls, type) and issubclass(module_cls, torch.nn.Module)):
        raise TypeError(f"`module_cls` must be a LightningModule class, got {module_cls!r}")
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} holds no 'state_dict': is it a Lightning checkpoint? keys: {sorted(checkpoint)}")
    kwargs = {**checkpoint.get("hyper_parameters", {}), **init_kwargs}
    model = module_cls(**kwargs)
    restore_factored_(model, checkpoint["state_dict"])
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()


class LMDCheckpointMixin:
    """Opt-in for `MyModule.load_from_checkpoint(path)` on compressed checkpoints.

    `class MyModule(LMDCheckpointMixin, pl.LightningModule)`: before Lightning loads the weights,
    the factored layers recorded in the checkpoint are rebuilt.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_factored_(self, checkpoint["state_dict"])
        super().on_load_checkpoint(checkpoint)

"""LMD's metric maps on a whole model: add them to factored layers, fold them back (LMD.md sections 3, 6)."""

from __future__ import annotations

import fnmatch

from torch import nn

from lmd_lightning.checks import check_module
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.layers.registry import kind_of
from lmd_lightning.truncate.targets import Patterns, as_patterns, shared_factors

__all__ = ["add_metric_maps_", "fold_", "metric_map_layers"]


def metric_map_layers(model: nn.Module) -> dict[str, FactoredModule]:
    """Name → factored layer, for every layer that carries I_dist and O_dist."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactoredModule) and m.has_metric_maps}


def add_metric_maps_(model: nn.Module, include: Patterns = None, exclude: Patterns = None) -> list[str]:
    """Give factored layers identity I_dist/O_dist maps (the model's output does not change).

    `include` / `exclude` are globs over module names; without `include`, every factored layer.
    A layer named by `include` that is not factored is an error: compress it first. Returns the
    names of the layers that carry maps now. Rebuild any optimizer that should train the maps.
    """
    check_module(model)
    include_list, exclude_list = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        if include_list is not None and not any(fnmatch.fnmatchcase(name, p) for p in include_list):
            continue
        if exclude_list is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude_list):
            continue
        if isinstance(module, FactoredModule):
            chosen.append((name, module))
        elif include_list is not None and kind_of(module) is not None:
            raise ValueError(
                f"metric maps need a factored layer, but `{name}` is a dense {type(module).__name__}: "
                "compress it first (compress_ or LMDCompression), or pass compress_(..., metric_maps=True)"
            )
    if not chosen:
        raise ValueError("`add_metric_maps_` found no factored layer: compress the model first")
    shared = shared_factors(model)
    for name, _ in chosen:
        if name in shared:
            raise ValueError(
                f"`{name}` shares its factors with `{shared[name]}` (tied='joint'): "
                "separate metric maps would untie them"
            )
    for _, module in chosen:
        module.add_metric_maps_()
    return [name for name, _ in chosen]


def fold_(model: nn.Module) -> list[str]:
    """Fold every layer's metric maps into its factors (canonical U, s, V again). Returns their names."""
    check_module(model)
    layers = metric_map_layers(model)
    for module in layers.values():
        module.fold_()
    return list(layers)

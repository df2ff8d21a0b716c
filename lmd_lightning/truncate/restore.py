"""restore_factored_: rebuild the factored structure a state dict records, before loading it.

A factored layer's keys imply its structure: `U` (out, r) and `V` (fan_in, r) give the rank, `s`
the "svd" parametrization, `I_dist` the metric maps (DESIGN.md: the checkpoint carries its own
structure). Nothing is read but shapes; the values arrive with `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lmd_lightning.checks import check_module
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.layers.conv import FactoredConv2d
from lmd_lightning.layers.linear import FactoredLinear
from lmd_lightning.truncate.targets import disable_fused_fast_paths, swap_module

__all__ = ["restore_factored_"]


def _rebuilt(module: nn.Module, prefix: str, state_dict: Mapping[str, Tensor]) -> nn.Module | None:
    """An empty factored layer shaped like the checkpoint's entry at `prefix`, or None if already right."""
    U, V = state_dict[prefix + "U"], state_dict[prefix + "V"]  # (out, r), (fan_in, r)
    rank, has_bias = U.shape[1], prefix + "bias" in state_dict
    parametrization = "svd" if prefix + "s" in state_dict else "balanced"
    maps = prefix + "I_dist" in state_dict
    like = module.U if isinstance(module, FactoredModule) else module.weight
    if isinstance(module, FactoredModule) and (
        module.rank,
        module.bias is not None,
        module.parametrization,
        module.has_metric_maps,
    ) == (rank, has_bias, parametrization, maps):
        return None
    kw = {"device": like.device, "dtype": like.dtype, "metric_maps": maps}
    if isinstance(module, (nn.Linear, FactoredLinear)):
        expected = (module.out_features, module.in_features)
    else:
        expected = (module.out_channels, module.in_channels * module.kernel_size[0] * module.kernel_size[1])
    if (U.shape[0], V.shape[0]) != expected or V.shape[1] != rank:
        raise ValueError(
            f"state dict entry `{prefix}U`{tuple(U.shape)} / `{prefix}V`{tuple(V.shape)} does not fit "
            f"layer `{prefix[:-1]}` with (out, fan_in) = {expected}"
        )
    if isinstance(module, (nn.Linear, FactoredLinear)):
        return FactoredLinear(module.in_features, module.out_features, rank, has_bias, parametrization, **kw)
    return FactoredConv2d(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        rank,
        module.stride,
        module.padding,
        module.dilation,
        has_bias,
        module.padding_mode,
        parametrization,
        **kw,
    )


@torch.no_grad()
def restore_factored_(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Rebuild the factored structure recorded in `state_dict` so a strict load_state_dict works.

    Every `<name>.U` / `<name>.V` pair whose `<name>` is a Linear, Conv2d or factored layer in
    `model` gets a factored layer of the checkpoint's rank and parametrization, with metric maps
    if the checkpoint has `<name>.I_dist` (values are
    placeholders until `load_state_dict`). Returns the names of the layers rebuilt.
    """
    check_module(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}")
    modules = dict(model.named_modules())
    rebuilt = []
    for key in state_dict:
        prefix = key[: -len("U")]
        if not key.endswith(".U") or prefix + "V" not in state_dict:
            continue
        module = modules.get(prefix[:-1])
        if not isinstance(module, (nn.Linear, nn.Conv2d, FactoredModule)):
            continue
        new = _rebuilt(module, prefix, state_dict)
        if new is not None:
            swap_module(model, module, new)
            rebuilt.append(prefix[:-1])
    disable_fused_fast_paths(model)
    return rebuilt

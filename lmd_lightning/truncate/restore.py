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
from lmd_lightning.layers.base import FactoredModule, copy_requires_grad
from lmd_lightning.layers.registry import kind_of, split_of
from lmd_lightning.truncate.targets import disable_fused_fast_paths, joint_pairs, swap_module, undo, undo_record

__all__ = ["restore_factored_", "restore_structure_"]


def _rebuilt(module: nn.Module, prefix: str, state_dict: Mapping[str, Tensor]) -> nn.Module | None:
    """An empty factored layer shaped like the checkpoint's entry at `prefix`, or None if already right."""
    U, V = state_dict[prefix + "U"], state_dict[prefix + "V"]  # (out, r), (fan_in, r)
    rank, has_bias = U.shape[1], prefix + "bias" in state_dict
    parametrization = "svd" if prefix + "s" in state_dict else "balanced"
    maps = prefix + "I_dist" in state_dict
    if isinstance(module, FactoredModule) and (
        module.rank,
        module.bias is not None,
        module.parametrization,
        module.has_metric_maps,
    ) == (rank, has_bias, parametrization, maps):
        return None
    kind = kind_of(module)
    if isinstance(module, FactoredModule):
        expected = (module.U.shape[0], module.V.shape[0])
    else:
        expected = tuple(kind.dense_matrix(module).shape)
    if (U.shape[0], V.shape[0]) != expected or V.shape[1] != rank:
        raise ValueError(
            f"state dict entry `{prefix}U`{tuple(U.shape)} / `{prefix}V`{tuple(V.shape)} does not fit "
            f"layer `{prefix[:-1]}` with (out, fan_in) = {expected}"
        )
    return kind.like(module, rank, has_bias, parametrization, metric_maps=maps)


def _split_recorded(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Split each composite (nn.MultiheadAttention) whose entries in `state_dict` are a split module's."""
    for name, module in list(model.named_modules()):
        split = split_of(module)
        if split is None:
            continue
        prefix = f"{name}." if name else ""
        children = getattr(split.split_type, "split_children", ())
        if any(key.startswith(f"{prefix}{child}.") for key in state_dict for child in children):
            swap_module(model, module, split.build(module))


def _restore(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    _split_recorded(model, state_dict)
    pairs = joint_pairs(model)  # ties as the fresh model has them, before anything is rebuilt
    modules = dict(model.named_modules())
    rebuilt = []
    for key in state_dict:
        prefix = key[: -len("U")]
        if not key.endswith(".U") or prefix + "V" not in state_dict:
            continue
        module = modules.get(prefix[:-1])
        if module is None or kind_of(module) is None:
            continue
        new = _rebuilt(module, prefix, state_dict)
        if new is not None:
            copy_requires_grad(module, new)  # a frozen layer stays frozen
            swap_module(model, module, new)
            rebuilt.append(prefix[:-1])
    for embedding, heads in pairs:  # factored jointly (tied="joint"): share one set of factors again
        if embedding in rebuilt and all(head in rebuilt for head in heads):
            for head in heads:
                model.get_submodule(head).share_factors_(model.get_submodule(embedding))
    return rebuilt


@torch.no_grad()
def restore_factored_(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Rebuild the factored structure recorded in `state_dict` so a strict load_state_dict works.

    Every `<name>.U` / `<name>.V` pair whose `<name>` is a layer of a registered kind (or a factored
    layer) in `model` gets a factored layer of the checkpoint's rank and parametrization, with metric
    maps if the checkpoint has `<name>.I_dist` (values are placeholders until `load_state_dict`).
    An nn.MultiheadAttention whose entries are those of separate projections is split first; heads
    tied to their embedding that the checkpoint holds factored share the embedding's factors again.
    Returns the names of the layers rebuilt.
    """
    check_module(model)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}")
    record = undo_record(model)
    try:
        rebuilt = _restore(model, state_dict)
    except BaseException:
        undo(model, record)  # a bad entry leaves the model as it was, not half rebuilt
        raise
    disable_fused_fast_paths(model)
    return rebuilt


@torch.no_grad()
def restore_structure_(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Give `model` the structure `state_dict` records, factored or dense, so that a strict load works.

    Unlike `restore_factored_`, a factored layer that the state dict holds dense (`<name>.weight`, no
    `<name>.U`) goes back to its dense kind, and a split attention module the state dict holds merged
    goes back to nn.MultiheadAttention; then every factored entry is rebuilt at its rank. Values arrive
    with `load_state_dict`. Returns the names of the layers changed. A bad entry leaves the model as it was.
    """
    from lmd_lightning.layers.attention import FactoredMultiheadAttention

    check_module(model)
    record = undo_record(model)
    changed = []
    try:
        for name, module in list(model.named_modules()):
            prefix = f"{name}." if name else ""
            if (
                isinstance(module, FactoredModule)
                and prefix + "U" not in state_dict
                and prefix + "weight" in state_dict
            ):
                dense = module.to_dense()
                copy_requires_grad(module, dense)
                swap_module(model, module, dense)
                changed.append(name)
        for name, module in list(model.named_modules()):
            prefix = f"{name}." if name else ""
            children = FactoredMultiheadAttention.split_children
            split_keys = any(key.startswith(f"{prefix}{child}.") for key in state_dict for child in children)
            if isinstance(module, FactoredMultiheadAttention) and not split_keys:
                swap_module(model, module, module.to_mha())
                changed.append(name)
        changed += _restore(model, state_dict)
    except BaseException:
        undo(model, record)
        raise
    disable_fused_fast_paths(model)
    return changed

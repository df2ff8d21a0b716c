"""Which layers `compress_` may touch, and the module swap itself.

A candidate is a layer of a registered kind (layers/registry.py: nn.Linear, nn.Conv1d,
nn.Conv2d, Hugging Face Conv1D, nn.Embedding; exact type) or an already-factored layer.
nn.MultiheadAttention is first split into separate projections (`split_composites_`), which are
then candidates like any nn.Linear. Some candidates are found but must stay dense, each with a reason:
- layers holding a parameter that another module holds too (a head tied to the embedding);
- children of an nn.MultiheadAttention that could not be split, which reads `out_proj.weight` directly;
- subclasses of a registered class, which may rely on `.weight`, unless included by exact name;
- embeddings, unless `include` names them (opt-in kinds);
- what the kind refuses (grouped convs, embeddings with max_norm), and lazy layers not materialised yet.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn
from torch.nn.parameter import UninitializedParameter

from lmd_lightning.checks import check_callable, check_choice
from lmd_lightning.layers.base import FactoredModule
from lmd_lightning.layers.embedding import FactoredEmbedding
from lmd_lightning.layers.linear import FactoredLinear
from lmd_lightning.layers.registry import dense_base, is_split, kind_of, split_of

__all__ = [
    "TIED",
    "Target",
    "disable_fused_fast_paths",
    "find_targets",
    "joint_pairs",
    "merge_unchanged_splits_",
    "module_names",
    "shared_factors",
    "split_composites_",
    "split_names",
    "swap_module",
    "undo",
    "undo_record",
]

Patterns = str | Sequence[str] | None
FilterFn = Callable[[str, nn.Module], bool]


TIED = ("dense", "joint")


@dataclass
class Target:
    name: str
    module: nn.Module
    skip_reason: str | None = None
    followers: list[Target] = field(default_factory=list)  # heads that share this layer's factors (tied="joint")


def as_patterns(patterns: Patterns, arg: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, Sequence) and all(isinstance(p, str) for p in patterns) and patterns:
        return list(patterns)
    raise TypeError(f"`{arg}` must be a glob string or a non-empty list of them, got {patterns!r}")


def _is_candidate(module: nn.Module) -> bool:
    return kind_of(module) is not None


def _matches(name: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or [])


def _skip_reason(name: str, module: nn.Module, parent: nn.Module | None, include: list[str] | None) -> str | None:
    if isinstance(parent, nn.MultiheadAttention):
        why = "" if type(parent) is nn.MultiheadAttention else f" (a subclass, {type(parent).__name__}, is not split)"
        return f"nn.MultiheadAttention reads this layer's .weight directly{why}"
    if any(isinstance(p, UninitializedParameter) for p in module.parameters(recurse=False)):
        return "parameters not initialised yet (lazy module)"
    if isinstance(module, FactoredModule):
        return None
    base = dense_base(module)
    if base is not None and name not in (include or []):
        return (
            f"subclass {type(module).__name__} of {base.__name__} may read .weight; "
            "include it by its exact name to compress it"
        )
    kind = kind_of(module)
    if kind.opt_in and not _matches(name, include):
        return f"{type(module).__name__} is opt-in: name it in `include` to factor it"
    return kind.dense_skip_reason(module)


def _check_matches(patterns: list[str] | None, names: list[str], arg: str) -> None:
    for pattern in patterns or []:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ValueError(
                f"`{arg}` pattern {pattern!r} matches no layer that can be factored; candidates are: {names}"
            )


def find_targets(
    model: nn.Module, include: Patterns, exclude: Patterns, filter_fn: FilterFn | None, tied: str = "dense"
) -> list[Target]:
    """Candidate layers that pass `include`, `exclude` and `filter_fn`, each with its skip reason.

    `tied="joint"`: an embedding and the heads tied to it become one target, the embedding, with
    the heads as its followers, when every head is selected and the embedding is not excluded.
    """
    include_list, exclude_list = as_patterns(include, "include"), as_patterns(exclude, "exclude")
    if filter_fn is not None:
        check_callable(filter_fn, "filter_fn", "filter_fn(name, module) -> bool")
    check_choice(tied, "tied", TIED)
    if _is_candidate(model):
        raise TypeError(
            f"`model` is itself a {type(model).__name__}; wrap it in a container or use its kind's from_dense"
        )
    parents = {id(child): module for module in model.modules() for child in module.children()}
    ties = _tied_parameters(model)
    found = [(name, module) for name, module in model.named_modules() if _is_candidate(module)]
    names = list(dict.fromkeys([name for name, _ in found] + split_names(model)))
    _check_matches(include_list, names, "include")
    _check_matches(exclude_list, names, "exclude")
    targets = []
    for name, module in found:
        if include_list is not None and not any(fnmatch.fnmatchcase(name, p) for p in include_list):
            continue
        if exclude_list is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude_list):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        reason = ties.get(id(module)) or _skip_reason(name, module, parents.get(id(module)), include_list)
        targets.append(Target(name, module, reason))
    if tied == "joint":
        targets = _join_tied(model, targets, exclude_list, filter_fn)
    return targets


def joint_pairs(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(embedding, [heads]) name groups whose heads hold the embedding's table: one set of factors can serve all.

    Dense: an nn.Embedding and nn.Linear heads sharing its `weight`, (vocab, d) for all of them.
    Factored: a FactoredEmbedding and FactoredLinear heads sharing its U and V.
    """
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), []).append((name, module))
    pairs, seen = [], set()
    for owners in holders.values():
        key = frozenset(id(module) for _, module in owners)
        if len(key) < 2 or key in seen:
            continue
        seen.add(key)
        embeddings = [name for name, m in owners if type(m) in (nn.Embedding, FactoredEmbedding)]
        heads = [name for name, m in owners if type(m) in (nn.Linear, FactoredLinear)]
        if len(embeddings) == 1 and len(heads) == len(owners) - 1:
            pairs.append((embeddings[0], heads))
    return pairs


def shared_factors(model: nn.Module) -> dict[str, str]:
    """Factored layer name → the name of another factored layer holding the same U (tied="joint" pairs)."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, FactoredModule):
            holders.setdefault(id(module.U), []).append(name)
    return {name: next(o for o in names if o != name) for names in holders.values() if len(names) > 1 for name in names}


def _join_tied(
    model: nn.Module, targets: list[Target], exclude: list[str] | None, filter_fn: FilterFn | None
) -> list[Target]:
    by_name = {target.name: target for target in targets}
    for embedding, heads in joint_pairs(model):
        module = model.get_submodule(embedding)
        vetoed = _matches(embedding, exclude) or (filter_fn is not None and not filter_fn(embedding, module))
        if vetoed or any(head not in by_name for head in heads):
            continue  # a head not selected, or the embedding excluded: the pair stays as it is
        reason = None if isinstance(module, FactoredModule) else kind_of(module).dense_skip_reason(module)
        followers = [Target(head, by_name[head].module) for head in heads]
        joint = Target(embedding, module, reason, followers)
        first = min(targets.index(by_name[name]) for name in [*heads, embedding] if name in by_name)
        targets = [t for t in targets if t.name not in {embedding, *heads}]
        targets.insert(min(first, len(targets)), joint)
        by_name = {target.name: target for target in targets}
    return targets


def _tied_parameters(model: nn.Module) -> dict[int, str]:
    """id(module) → why it must stay dense, for modules holding a parameter another module holds too.

    An output head tied to the token embedding is the common case; factoring one of them would
    untie the pair (and, for a head, add parameters instead of saving them). The same module
    registered under several names is not a tie: it is swapped everywhere at once.
    """
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(
                (module, f"{module_name}.{param_name}" if module_name else param_name)
            )
    reasons: dict[int, str] = {}
    for owners in holders.values():
        for module, _ in owners:
            others = [name for other, name in owners if other is not module]
            if others and id(module) not in reasons:
                reasons[id(module)] = f"tied to `{others[0]}` (a shared parameter): factoring it would untie them"
    return reasons


def module_names(model: nn.Module, module: nn.Module) -> list[str]:
    """Every name under which `module` is registered (a shared module has several)."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if m is module]


def swap_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every registration of `old` by `new` through setattr on its parents."""
    new.train(old.training)
    for name in module_names(model, old):
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new)


def split_names(model: nn.Module) -> list[str]:
    """Names the children of each composite (nn.MultiheadAttention) will have once split: `attn.q_proj`, …"""
    names = []
    for name, module in model.named_modules():
        split = split_of(module)
        if split is not None:
            prefix = f"{name}." if name else ""
            names += [prefix + child for child in getattr(split.split_type, "factorable_children", ())]
    return sorted(set(names))


def split_composites_(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Swap every composite layer (nn.MultiheadAttention) for its equivalent split module, in place.

    The split computes the same function with its weights in child layers that can be factored.
    A composite whose parameters another module holds too, or that is not materialised, stays.
    Returns (original, split) pairs for `merge_unchanged_splits_`.
    """
    inside: dict[int, set[int]] = {}  # id(param) → ids of the modules holding it
    for module in model.modules():
        for param in module.parameters(recurse=False):
            inside.setdefault(id(param), set()).add(id(module))
    pairs = []
    for module in list(model.modules()):
        split = split_of(module)
        if split is None or any(isinstance(p, UninitializedParameter) for p in module.parameters()):
            continue
        own = {id(m) for m in module.modules()}
        if any(inside[id(p)] - own for p in module.parameters()):
            continue  # tied to something outside: splitting would untie it
        new = split.build(module)
        swap_module(model, module, new)
        pairs.append((module, new))
    return pairs


def merge_unchanged_splits_(model: nn.Module, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """Put each original composite back where its split module ended with no factored layer."""
    for original, split in pairs:
        if not any(isinstance(m, FactoredModule) for m in split.modules()):
            swap_module(model, split, original)


def disable_fused_fast_paths(model: nn.Module) -> list[str]:
    """Turn off the fused inference kernels that read `linear1.weight`/`linear2.weight`.

    nn.TransformerEncoderLayer (and nn.TransformerEncoder's nested-tensor path) pass the
    dense weights of their feed-forward layers to one fused kernel in eval mode. Once those
    layers are factored there is no dense weight, so the layer must take its regular path.
    """
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            factored = isinstance(module.linear1, FactoredModule) or isinstance(module.linear2, FactoredModule)
            if factored and module.activation_relu_or_gelu:
                module.activation_relu_or_gelu = 0  # the flag the fast-path check reads
                changed.append(name)
        if isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            if any(isinstance(m, FactoredModule) or is_split(m) for m in module.modules()):
                module.use_nested_tensor = False
                changed.append(name)
    return changed


_FAST_PATH_FLAGS = {nn.TransformerEncoderLayer: "activation_relu_or_gelu", nn.TransformerEncoder: "use_nested_tensor"}


def undo_record(model: nn.Module) -> dict:
    """What `compress_` can change: modules, factored layers' parameters, fused fast-path flags."""
    modules = dict(model.named_modules())
    factors = {name: dict(m._parameters) for name, m in modules.items() if isinstance(m, FactoredModule)}
    flags = {
        name: (flag, getattr(m, flag))
        for name, m in modules.items()
        for kind, flag in _FAST_PATH_FLAGS.items()
        if isinstance(m, kind) and hasattr(m, flag)
    }
    return {"modules": modules, "factors": factors, "flags": flags}


def undo(model: nn.Module, record: dict) -> None:
    """Put back what `undo_record` saw: swapped modules first, then shrunk factors."""
    current = dict(model.named_modules())
    for name, module in record["modules"].items():
        if name and name in current and current[name] is not module:
            swap_module(model, current[name], module)
    for name, params in record["factors"].items():
        registered = record["modules"][name]._parameters
        registered.clear()  # also drops what was added since (metric maps)
        registered.update(params)
    for name, (flag, value) in record["flags"].items():
        setattr(record["modules"][name], flag, value)

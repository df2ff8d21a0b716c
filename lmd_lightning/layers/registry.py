"""The layer kinds `compress_` knows: dense class → factored class, looked up by exact type.

Adding a kind is one file with a `FactoredModule` subclass (its `dense_name` names the dense
class it replaces) plus `@register_kind` on it. Kinds are keyed by the dense class's qualified
name, never by the class object, so a kind for a third-party class (Hugging Face's `Conv1D`)
is known without importing that library: if the class is in a model, its library is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lmd_lightning.layers.base import FactoredModule, qualified_name

__all__ = [
    "KINDS",
    "SPLITS",
    "Split",
    "dense_base",
    "is_split",
    "kind_of",
    "kind_of_class",
    "register_kind",
    "register_split",
    "split_of",
]

KINDS: dict[str, type[FactoredModule]] = {}  # qualified name of the dense class → factored class


@dataclass(frozen=True)
class Split:
    """A composite layer (nn.MultiheadAttention) that holds its weights where no kind can reach them.

    `build(dense)` returns a module computing the same function whose weights sit in child layers
    of registered kinds (`split_type`), so that those children can be factored one by one.
    """

    build: Callable[[nn.Module], nn.Module]
    split_type: type[nn.Module]


SPLITS: dict[str, Split] = {}  # qualified name of the composite class → how to split it


def register_kind(factored: type[FactoredModule]) -> type[FactoredModule]:
    """Class decorator: `factored` replaces the dense class named by its `dense_name`."""
    if not (isinstance(factored, type) and issubclass(factored, FactoredModule)):
        raise TypeError(f"register_kind takes a FactoredModule subclass, got {factored!r}")
    name = getattr(factored, "dense_name", None)
    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"{factored.__name__}.dense_name must be the dense class's qualified name, got {name!r}")
    if name in KINDS and KINDS[name] is not factored:
        raise ValueError(f"{name} already has a layer kind: {KINDS[name].__name__}")
    KINDS[name] = factored
    return factored


def kind_of(module: nn.Module) -> type[FactoredModule] | None:
    """The factored class for `module`: its own class if factored, else the kind of its class or of the
    nearest registered class it subclasses (`dense_base` tells the two apart), else None."""
    if isinstance(module, FactoredModule):
        return type(module)
    for cls in type(module).__mro__:
        if qualified_name(cls) in KINDS:
            return KINDS[qualified_name(cls)]
    return None


def kind_of_class(cls: type) -> type[FactoredModule] | None:
    """The registered kind for the dense class `cls` itself, or None."""
    return KINDS.get(qualified_name(cls))


def dense_base(module: nn.Module) -> type | None:
    """The registered dense class `module` subclasses (without being one exactly), or None."""
    if isinstance(module, FactoredModule) or qualified_name(type(module)) in KINDS:
        return None
    for base in type(module).__mro__[1:]:
        if qualified_name(base) in KINDS:
            return base
    return None


def register_split(dense_name: str, build: Callable[[nn.Module], nn.Module], split_type: type[nn.Module]) -> None:
    """`build(module)` splits a `dense_name` module into an equivalent `split_type` with factorable children."""
    if dense_name in SPLITS and SPLITS[dense_name].split_type is not split_type:
        raise ValueError(f"{dense_name} already has a split: {SPLITS[dense_name].split_type.__name__}")
    SPLITS[dense_name] = Split(build, split_type)


def split_of(module: nn.Module) -> Split | None:
    """How to split `module` (by its exact type), or None."""
    return SPLITS.get(qualified_name(type(module)))


def is_split(module: nn.Module) -> bool:
    """Whether `module` is the result of a split (a FactoredMultiheadAttention, say)."""
    return any(isinstance(module, split.split_type) for split in SPLITS.values())

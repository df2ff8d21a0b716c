"""Argument checks shared by every layer of the package; torch only, no Lightning.

Each check raises with a message that names the argument in backticks, the allowed values and
the value it got, e.g. ``ValueError: `rank` must be an int >= 1, got 0``. `owner` prefixes the
name of the object whose field it is (``DataMetric `batches` must be …``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_interval",
    "check_module",
    "check_number",
    "check_unit_interval",
    "is_number",
]


def _name(arg: str, owner: str | None) -> str:
    return f"{owner} `{arg}`" if owner else f"`{arg}`"


def is_number(value: object) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value: Any, arg: str, low: int = 1, *, optional: bool = False, owner: str | None = None) -> Any:
    """An int (not a bool) >= `low`, or None when `optional`; returns `value`."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{_name(arg, owner)} must be {'None or ' if optional else ''}an int >= {low}, got {value!r}")
    return value


def check_number(
    value: Any,
    arg: str,
    low: float,
    *,
    strict: bool = False,
    finite: bool = False,
    kind: str = "number",
    owner: str | None = None,
) -> Any:
    """A number >= `low` (> `low` when `strict`), finite when asked; `kind` words the message ("number", "float")."""
    ok = is_number(value) and (value > low if strict else value >= low) and (not finite or math.isfinite(value))
    if not ok:
        adjective = "finite " if finite else ""
        raise ValueError(
            f"{_name(arg, owner)} must be a {adjective}{kind} {'>' if strict else '>='} {low}, got {value!r}"
        )
    return value


def check_interval(
    value: Any, arg: str, low: float, high: float = math.inf, *, integer: bool = False, open_low: bool = False
) -> Any:
    """A number (an int when `integer`) in [low, high), or (low, high) when `open_low`."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or not (value > low if open_low else value >= low) or not value < high:
        bounds = f"{'(' if open_low else '['}{low}, {high})"
        raise ValueError(f"`{arg}` must be {'an int' if integer else 'a number'} in {bounds}, got {value!r}")
    return value


def check_unit_interval(value: Any, arg: str, *, closed_low: bool = False) -> float:
    """A float in (0, 1), or in [0, 1) when `closed_low`."""
    if not is_number(value) or not ((value >= 0.0) if closed_low else (value > 0.0)) or not value < 1.0:
        raise ValueError(f"`{arg}` must be a float in {'[' if closed_low else '('}0, 1), got {value!r}")
    return value


def check_choice(value: Any, arg: str, allowed: Sequence[Any]) -> Any:
    """One of `allowed` (the message prints the sequence as given)."""
    if value not in allowed:
        raise ValueError(f"`{arg}` must be one of {allowed}, got {value!r}")
    return value


def check_bool(value: Any, arg: str, *, owner: str | None = None) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_name(arg, owner)} must be a bool, got {value!r}")
    return value


def check_callable(value: Any, arg: str, signature: str, *, owner: str | None = None) -> Callable[..., Any]:
    """A callable; `signature` says how it is called, e.g. "filter_fn(name, module) -> bool"."""
    if not callable(value):
        raise TypeError(f"{_name(arg, owner)} must be callable as {signature}, got {value!r}")
    return value


def check_module(value: Any, arg: str = "model") -> nn.Module:
    if not isinstance(value, nn.Module):
        raise TypeError(f"`{arg}` must be a torch.nn.Module, got {type(value).__name__}")
    return value

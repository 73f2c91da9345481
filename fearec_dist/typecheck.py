"""Type checks for config values against dataclass annotations (used by the config loader and
the model registry; no torch, no Ray)."""

from __future__ import annotations

import types
import typing
from typing import Any


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for a config value against a type annotation: ints are floats where
    a float is expected (and YAML's "1e-3" strings too), bools are never numbers, lists are
    checked element by element, ``X | None`` accepts None."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            return type(None) in args, None
        for arg in args:
            if arg is type(None):
                continue
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 1e-3 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (inner,) = typing.get_args(tp) or (Any,)
        out = []
        for v in value:
            ok, c = coerce(v, inner)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, tp), value


def type_name(tp: Any) -> str:
    """How an annotation reads in an error message."""
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")

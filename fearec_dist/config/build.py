"""Dataclass building with type checks: a nested dict -> a section, every key checked.

An unknown key is an error naming the dotted key, the source and the valid keys; a key listed in
``RETIRED_KEYS`` is an error saying why it went. ``config_from_saved`` (loader.py) drops the
retired keys instead, so a config saved inside an older checkpoint still loads.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from fearec_dist.config.model import ModelSection
from fearec_dist.errors import ConfigError
from fearec_dist.typecheck import coerce, type_name

# dotted key -> why it is gone: refused in YAML and --set, dropped from saved configs
RETIRED_KEYS: dict[str, str] = {
    "data.n_buckets": "was removed with the streaming feed (it had been ignored since then); "
    "delete it from the config",
}


def build_section(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    """``cls`` (a section dataclass) from ``raw``; nested sections are built the same way.

    Raises:
        ConfigError: an unknown or retired key, a value of the wrong type, or a value the
            section's ``__post_init__`` refuses; the message names ``source`` and the key.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    if cls is ModelSection:
        return _model_section(raw, prefix, source)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    for key in unknown:
        if f"{prefix}{key}" in RETIRED_KEYS:
            raise ConfigError(f"{source}: {prefix}{key} {RETIRED_KEYS[prefix + key]}")
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}"
            + (f" (and {', '.join(prefix + u for u in unknown[1:])})" if unknown[1:] else "")
            + f"; valid keys of {prefix.rstrip('.') or 'the config'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in raw.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_section(tp, value or {}, f"{prefix}{key}.", source)
            continue
        ok, coerced = coerce(value, tp)
        if not ok:
            raise ConfigError(
                f"{source}: {prefix}{key} = {value!r} has type {type(value).__name__}, "
                f"expected {type_name(tp)}"
            )
        kwargs[key] = coerced
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _model_section(raw: dict[str, Any], prefix: str, source: str) -> ModelSection:
    """``name`` plus free keys (written flat or under ``params``); the registry checks them."""
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    if "name" in raw:
        name = raw.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"{source}: {prefix}name must be a string")
        kwargs["name"] = name
    params = dict(raw.pop("params", {}) or {})
    params.update(raw)
    kwargs["params"] = params
    return ModelSection(**kwargs)


def drop_retired(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` (a whole config) without the keys of ``RETIRED_KEYS`` (never mutated)."""
    for dotted in RETIRED_KEYS:
        raw = _without(raw, dotted.split("."))
    return raw


def _without(node: dict[str, Any], path: list[str]) -> dict[str, Any]:
    head, rest = path[0], path[1:]
    if not rest:
        return {k: v for k, v in node.items() if k != head}
    if not isinstance(node.get(head), dict):
        return node
    return {**node, head: _without(node[head], rest)}


def fold_storage_alias(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Moves ``data.storage`` (the alias) into the top-level ``storage`` section.

    Raises:
        ConfigError: both are given and a key differs.
    """
    data = raw.get("data")
    if not isinstance(data, dict) or "storage" not in data:
        return raw
    raw, data = dict(raw), dict(data)
    alias = data.pop("storage") or {}
    top = raw.get("storage") or {}
    if not isinstance(alias, dict) or not isinstance(top, dict):
        raise ConfigError(f"{source}: storage and data.storage must be mappings")
    for key in sorted(set(alias) & set(top)):
        if alias[key] != top[key]:
            raise ConfigError(
                f"{source}: storage.{key} = {top[key]!r} and data.storage.{key} = "
                f"{alias[key]!r} differ; data.storage is an alias of storage, give one of them"
            )
    raw["data"], raw["storage"] = data, {**alias, **top}
    return raw

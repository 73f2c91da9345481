"""Model registry: build any model by name (or preset) from its config dataclass.

Every model module (``sasrec.py``, ``fearec.py``, …) provides a config dataclass (whose
``__post_init__`` raises ``ConfigError`` naming ``model.<field>``, optionally with
``check_length(max_seq_len)`` for checks that need L), an ``nn.Module`` built as
``Model(config, n_items=…, max_seq_len=…[, item_attributes=…])``, and ``SPEC``, a typed
``ModelSpec`` (``models/spec.py``) with its losses, ``encode``, ``item_table`` and flags.

Adding a model is one line in ``_MODULES`` (plus one in ``_PRESET_HOME`` per preset name); the
module is imported only when the name is used, so ``validate_model_section`` stays cheap and a
model still being written breaks nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any

import torch
from torch import nn

from fearec_dist.config import ConfigError
from fearec_dist.models.spec import ModelSpec
from fearec_dist.typecheck import coerce

# name -> the module that declares its SPEC
_MODULES: dict[str, str] = {
    "sasrec": "fearec_dist.models.sasrec",
    "fearec": "fearec_dist.models.fearec",
    "bert4rec": "fearec_dist.models.bert4rec",
    "lightsans": "fearec_dist.models.lightsans",
    "s3rec": "fearec_dist.models.s3rec",
}
_PRESET_HOME = {"fearec_official": "fearec", "fearec_paper": "fearec"}


def model_names() -> list[str]:
    """Every name ``build_model`` accepts: models and presets."""
    return sorted([*_MODULES, *_PRESET_HOME])


def get_spec(name: str) -> ModelSpec:
    """The spec of a model or preset name; an unknown name is a ConfigError listing the valid."""
    base = _PRESET_HOME.get(name, name)
    if base not in _MODULES:
        raise ConfigError(f"model.name: unknown model {name!r}; valid: {', '.join(model_names())}")
    module_path = _MODULES[base]
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        if err.name != module_path:  # the module exists but one of its imports is missing
            raise
        raise ConfigError(f"model.name: {name!r} is not available in this build ({err})") from None
    spec: ModelSpec = module.SPEC
    return dataclasses.replace(spec, name=name, preset=dict(spec.presets.get(name, {})))


def build_config(name: str, params: dict[str, Any]) -> Any:
    """The model's config dataclass: preset values, then ``params``; unknown keys are errors."""
    spec = get_spec(name)
    for key in sorted(set(params) & set(spec.removed_keys)):
        raise ConfigError(f"model.{key} is no longer a model key: {spec.removed_keys[key]}")
    known = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"unknown key model.{unknown[0]} for model {name!r}; "
            f"valid keys: {', '.join(sorted(known))}"
        )
    values = spec.preset | params
    resolved = typing.get_type_hints(spec.config_cls)
    for key, value in list(values.items()):
        ok, coerced = coerce(value, resolved[key])
        if not ok:
            raise ConfigError(
                f"model.{key} = {value!r} has type {type(value).__name__}, "
                f"expected {getattr(resolved[key], '__name__', resolved[key])}"
            )
        values[key] = coerced
    return spec.config_cls(**values)


def validate_model_section(name: str, params: dict[str, Any], max_seq_len: int) -> None:
    """Raises ConfigError naming ``model.<key>`` for anything the model would reject."""
    cfg = build_config(name, params)
    check = getattr(cfg, "check_length", None)
    if check is not None:
        check(max_seq_len)


def build_model(
    name: str,
    n_items: int,
    max_seq_len: int,
    *,
    item_attributes: torch.Tensor | None = None,
    **overrides: Any,
) -> nn.Module:
    """Builds ``name`` (a model or preset) for ``n_items`` real items (padding row 0 added).

    ``overrides`` are model config keys; ``item_attributes`` is the (n_items + 1, W) attribute
    table, passed to models that take one (``spec.needs_attributes``).
    """
    if n_items < 1 or max_seq_len < 1:
        raise ConfigError(
            f"build_model: need n_items >= 1 and max_seq_len >= 1, got {n_items} and {max_seq_len}"
        )
    spec = get_spec(name)
    cfg = build_config(name, overrides)
    kwargs = {"item_attributes": item_attributes} if spec.needs_attributes else {}
    if item_attributes is not None and not spec.needs_attributes:
        raise ConfigError(f"build_model: model {name!r} takes no item attributes")
    return spec.model_cls(cfg, n_items=n_items, max_seq_len=max_seq_len, **kwargs)

"""Model registry: build any model by name from its config, with presets.

A model module provides a config dataclass, an ``nn.Module`` taking ``(config, n_items,
max_seq_len)``, and the functions ``loss_terms(model, batch, gather=None) -> dict`` and
``full_scores(model, batch) -> (B, n_items + 1)``. Adding a model is one entry in ``_MODULES``
(module path, config class, model class) plus, optionally, a ``PRESETS`` dict in its module.
Modules are imported lazily, so ``validate_model_section`` stays cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any

from torch import nn

from fearec_dist.config import ConfigError, _type_ok

# name -> (module, config class, model class)
_MODULES: dict[str, tuple[str, str, str]] = {
    "sasrec": ("fearec_dist.models.sasrec", "SASRecConfig", "SASRec"),
    "fearec": ("fearec_dist.models.fearec", "FEARecConfig", "FEARec"),
    "bert4rec": ("fearec_dist.models.bert4rec", "BERT4RecConfig", "BERT4Rec"),
    "lightsans": ("fearec_dist.models.lightsans", "LightSANsConfig", "LightSANs"),
    "s3rec": ("fearec_dist.models.s3rec", "S3RecConfig", "S3Rec"),
}
_PRESET_HOME = {"fearec_official": "fearec", "fearec_paper": "fearec"}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type
    loss_terms: Any
    full_scores: Any
    needs_partner: bool  # default; a built model may say otherwise (FEARec's `contrast`)
    needs_attributes: bool
    preset: dict[str, Any]
    module: Any


def model_names() -> list[str]:
    return sorted([*_MODULES, *_PRESET_HOME])


def get_spec(name: str) -> ModelSpec:
    base = _PRESET_HOME.get(name, name)
    if base not in _MODULES:
        raise ConfigError(f"model.name: unknown model {name!r}; valid: {', '.join(model_names())}")
    module_path, cfg_name, model_name = _MODULES[base]
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        raise ConfigError(f"model.name: {name!r} is not available in this build ({err})") from None
    presets = getattr(module, "PRESETS", {})
    return ModelSpec(
        name=name,
        config_cls=getattr(module, cfg_name),
        model_cls=getattr(module, model_name),
        loss_terms=module.loss_terms,
        full_scores=module.full_scores,
        needs_partner=getattr(module, "NEEDS_PARTNER", base == "fearec"),
        needs_attributes=getattr(module, "NEEDS_ATTRIBUTES", False),
        preset=dict(presets.get(name, {})),
        module=module,
    )


def build_config(name: str, params: dict[str, Any]) -> Any:
    """The model's config dataclass: preset values, then ``params``; unknown keys are errors."""
    spec = get_spec(name)
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
        ok, coerced = _type_ok(value, resolved[key])
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


def build_model(name: str, n_items: int, max_seq_len: int, **overrides: Any) -> nn.Module:
    """Builds ``name`` (a model or preset) for ``n_items`` real items (padding row 0 added)."""
    spec = get_spec(name)
    extra = {k: overrides.pop(k) for k in list(overrides) if k.startswith("_")}
    cfg = build_config(name, overrides)
    kwargs = {k.lstrip("_"): v for k, v in extra.items()}
    return spec.model_cls(cfg, n_items=n_items, max_seq_len=max_seq_len, **kwargs)

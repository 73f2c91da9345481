"""Model registry: build any model by name (or preset) from its config dataclass.

Every model module (``sasrec.py``, ``fearec.py``, …) provides:

- a config dataclass (``SASRecConfig``) whose ``__post_init__`` raises ``ConfigError`` naming
  ``model.<field>``, and optionally ``check_length(max_seq_len)`` for checks that need L;
- the model, ``Model(config, n_items=…, max_seq_len=…, **extra)``, an ``nn.Module`` whose
  ``forward(item_seq (B, L), seq_len (B,))`` returns (B, D) and which exposes ``item_embedding``;
- ``loss_terms(model, batch, gather=None) -> dict`` (``"loss"`` plus each term) and
  ``full_scores(model, batch) -> (B, n_items + 1)``;
- optionally ``PRESETS = {preset_name: {field: value}}``, ``NEEDS_PARTNER`` and
  ``NEEDS_ATTRIBUTES`` (module-level bools; a built model may refine ``needs_partner`` with a
  property, as FEARec does from its ``contrast``).

Adding a model is one line in ``_MODULES`` (plus one in ``_PRESET_HOME`` per preset name); the
module is imported only when the name is used, so ``validate_model_section`` stays cheap and a
model still being written breaks nothing else. ``build_model`` passes overrides whose names
start with ``_`` to the model's constructor without the underscore (data-derived inputs such as
``_item_attributes``), never to the config.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
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
    """What the trainer needs to know about a model name (presets resolve to their base)."""

    name: str  # the name asked for (a model or a preset)
    config_cls: type  # the model's config dataclass
    model_cls: type  # the nn.Module
    loss_terms: Callable[..., dict[str, torch.Tensor]]
    full_scores: Callable[..., torch.Tensor]
    needs_partner: bool  # batches carry pos_seq/pos_len; a built model may refine it
    needs_attributes: bool  # the model needs an item-attribute table (S3Rec)
    preset: dict[str, Any]  # the preset's config values ({} for a plain model name)
    module: ModuleType  # the model's module (extra hooks such as pretrain_loss_terms)


def model_names() -> list[str]:
    """Every name ``build_model`` accepts: models and presets."""
    return sorted([*_MODULES, *_PRESET_HOME])


def get_spec(name: str) -> ModelSpec:
    """The spec of a model or preset name; an unknown name is a ConfigError listing the valid."""
    base = _PRESET_HOME.get(name, name)
    if base not in _MODULES:
        raise ConfigError(f"model.name: unknown model {name!r}; valid: {', '.join(model_names())}")
    module_path, cfg_name, model_name = _MODULES[base]
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as err:
        if err.name != module_path:  # the module exists but one of its imports is missing
            raise
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
    if n_items < 1 or max_seq_len < 1:
        raise ConfigError(
            f"build_model: need n_items >= 1 and max_seq_len >= 1, got {n_items} and {max_seq_len}"
        )
    spec = get_spec(name)
    extra = {k: overrides.pop(k) for k in list(overrides) if k.startswith("_")}
    cfg = build_config(name, overrides)
    kwargs = {k.lstrip("_"): v for k, v in extra.items()}
    return spec.model_cls(cfg, n_items=n_items, max_seq_len=max_seq_len, **kwargs)

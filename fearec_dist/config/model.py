"""The ``model:`` section: a model name and that model's own keys (checked by the registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fearec_dist.config.keys import option


@dataclass
class ModelSection:
    """``name`` picks the model (or a preset); every other key is the model's own, written flat
    beside ``name`` and checked against the model's config dataclass (e.g. FEARecConfig) by the
    model registry when the config is loaded."""

    name: str = option("fearec_official", "a model or preset name (each model's keys: below)")
    params: dict[str, Any] = option(
        {}, "the model's own keys (usually written flat beside `name`; listed per model below)"
    )

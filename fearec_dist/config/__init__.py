"""Experiment configuration: one dataclass per concern, loaded from YAML plus `--set` overrides.

Order of precedence (lowest first): dataclass defaults < YAML file < ``--set section.key=value``.
Unknown keys and wrong types are errors that name the dotted key and the file they came from.

One module per section (``storage``, ``data``, ``model``, ``train``, ``run``, ``tune``,
``daily``), the whole experiment (``experiment``), building from dicts with checks (``build``),
loading and ``--set`` (``loader``) and the reference of every key (``reference``). A key is
one line in its section: ``name: type = option(default, "one-line description")``;
``docs/config.md`` is generated from those descriptions (``fearec-dist config --write
docs/config.md``).

This package imports neither torch nor Ray (nor data/, train/, models/, serve/), so the CLI can
validate a config before starting either. The ``model`` section is a name plus free keys here;
the model registry (``fearec_dist.models.validate_model_section``) checks those keys against the
model's own dataclass.
"""

from fearec_dist.config.build import RETIRED_KEYS, fold_storage_alias
from fearec_dist.config.daily import DailySection
from fearec_dist.config.data import FORMATS, DataSection
from fearec_dist.config.experiment import ExperimentConfig
from fearec_dist.config.keys import option
from fearec_dist.config.loader import (
    add_set_argument,
    config_from_saved,
    deep_merge,
    load_config,
    parse_override,
    read_yaml,
)
from fearec_dist.config.model import ModelSection
from fearec_dist.config.run import RunSection
from fearec_dist.config.storage import StorageSection
from fearec_dist.config.train import TrainSection
from fearec_dist.config.tune import TuneSection
from fearec_dist.errors import ConfigError

__all__ = [
    "FORMATS",
    "RETIRED_KEYS",
    "ConfigError",
    "DailySection",
    "DataSection",
    "ExperimentConfig",
    "ModelSection",
    "RunSection",
    "StorageSection",
    "TrainSection",
    "TuneSection",
    "add_set_argument",
    "config_from_saved",
    "deep_merge",
    "fold_storage_alias",
    "load_config",
    "option",
    "parse_override",
    "read_yaml",
]

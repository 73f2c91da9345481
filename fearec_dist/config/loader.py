"""Loading: defaults < YAML file < ``extra`` dict < ``--set section.key=value`` overrides.

Also the one way to rebuild a config saved inside a checkpoint or run (``config_from_saved``),
which tolerates the keys retired since it was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fearec_dist.config.build import drop_retired
from fearec_dist.config.experiment import ExperimentConfig
from fearec_dist.errors import ConfigError


def add_set_argument(parser: Any, help: str) -> None:
    """The repeatable ``--set SECTION.KEY=VALUE`` option (an ``argparse`` parser's) whose values
    are ``load_config``'s ``overrides``; every command that loads a config takes the same one."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help,
    )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 0.0001); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, _, text = item.partition("=")
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set {item!r}: key must be dotted, e.g. train.lr=1e-4")
    return path, yaml.safe_load(text) if text.strip() else ""


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Returns a copy of ``base`` with ``update`` merged in, nested dicts merged key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping of sections (not yet checked)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Loads defaults < YAML file < ``extra`` dict < ``--set`` overrides, checking every key."""
    raw: dict[str, Any] = read_yaml(path) if path else {}
    source = str(path) if path else "<defaults>"
    cfg = ExperimentConfig.from_dict(raw, source)  # file errors name the file
    merged = cfg.to_dict()
    if extra:
        merged = deep_merge(merged, extra)
    for item in overrides:
        keys, value = parse_override(item)
        if keys[:2] == ["data", "storage"]:  # the alias: an override replaces the value
            keys = keys[1:]
        node = merged
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}  # an unknown section is then rejected by from_dict, by name
            node = node[k]
        node[keys[-1]] = value
    return ExperimentConfig.from_dict(merged, f"{source} + --set" if overrides else source)


def config_from_saved(saved: dict[str, Any], source: str = "saved config") -> ExperimentConfig:
    """The config saved inside a checkpoint or run (``state["config"]``, ``to_dict()`` form),
    written by this or an older version: keys retired since (``RETIRED_KEYS``) are dropped,
    everything else is checked as ``from_dict`` checks it."""
    return ExperimentConfig.from_dict(drop_retired(saved or {}), source)

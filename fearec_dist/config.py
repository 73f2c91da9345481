"""Experiment configuration: one dataclass per concern, loaded from YAML plus `--set` overrides.

Order of precedence (lowest first): dataclass defaults < YAML file < ``--set section.key=value``.
Unknown keys and wrong types are errors that name the dotted key and the file they came from.

This module imports neither torch nor Ray, so the CLI can validate a config before starting either.
The ``model`` section is a name plus free keys here; the model registry
(``fearec_dist.models.validate_model_section``) checks those keys against the model's own dataclass.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fearec_dist.errors import ConfigError
from fearec_dist.typecheck import coerce, type_name

FORMATS = ("parquet", "csv", "atomic", "seqtxt", "prepared", "synthetic")


@dataclass
class StorageSection:
    """Object-storage options (the top-level ``storage:`` section), serving everything that is
    read or written: data, run outputs, checkpoints and sweep outputs. ``data.storage`` is an
    alias kept working. Credentials come from the standard AWS env vars (or the instance role);
    they are never part of the config."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO/moto; None = AWS
    region: str | None = None
    anonymous: bool = False


@dataclass
class DataSection:
    path: str = ""  # prepared dataset URI, or raw input when `format` is not "prepared"
    format: str = "prepared"  # prepared | parquet | csv | atomic | seqtxt | synthetic
    prepared_path: str = ""  # where `train` puts prepared raw input ("" = a cache under storage)
    attributes: str | None = None  # item attributes (RecBole .item or item2attributes.json)
    columns: dict[str, str] = field(default_factory=dict)  # user/item/time/rating -> source column
    min_user_inter: int = 0  # k-core style filters; 0 = off (RecBole 1.2.1 default)
    min_item_inter: int = 0
    rating_threshold: float | None = None
    max_seq_len: int = 50  # L: histories keep the most recent L items
    n_buckets: int = 64  # ignored since the streaming feed (kept so that older configs load)
    block_rows: int = 1024  # examples per block of the epoch stream (the unit of prefetch)
    partition_mb: int = 64  # examples per hash partition of the same-target pairing shuffle
    synthetic_users: int = 2000  # only for format=synthetic
    synthetic_items: int = 500
    seed: int = 0
    # alias of the top-level `storage:` section (the same object once the config is built)
    storage: StorageSection = field(default_factory=StorageSection)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.max_seq_len < 1:
            raise ConfigError(f"data.max_seq_len: must be >= 1, got {self.max_seq_len}")
        for key in ("n_buckets", "block_rows", "partition_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class ModelSection:
    """`name` picks the model (or a preset); every other key is the model's own, checked by the
    model registry against its dataclass (e.g. FEARecConfig)."""

    name: str = "fearec_official"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainSection:
    epochs: int = 20
    batch_size: int = 256  # per worker; the global batch is batch_size * workers
    eval_batch_size: int = 512  # per worker
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 1
    patience: int = 40  # evaluations without improvement before stopping (spec: stopping_step)
    valid_metric: str = "hr@10"
    topk: list[int] = field(default_factory=lambda: [5, 10, 20])
    seed: int = 2026
    gather_negatives: bool = True  # contrastive candidates from all workers (with gradient)
    shuffle_window: int = 65536  # examples in each worker's shuffle buffer (bounds its memory)
    prefetch_blocks: int = 4  # blocks of the epoch stream each worker fetches ahead
    # epoch 1 starts on a head of N examples (a seeded sample of users, paired among themselves)
    # while the rest is paired whole; only when the training set is >= 8 N; 0 = off
    first_epoch_head: int = 65536
    valid_users: int = 0  # validate each epoch on a fixed seeded sample of N users; 0 = all
    evaluate: bool = True  # false: no validation or test at all (production retrains, benches)
    torch_threads: int = 0  # 0 = cpus_per_worker rounded up
    amp: str = "auto"  # auto | off | bf16 | fp16 (auto = bf16 on CUDA when supported)
    max_steps_per_epoch: int = 0  # 0 = whole epoch; a cap for smoke tests and benchmarks
    stage: str = "train"  # S3Rec: pretrain | finetune; others: train
    pretrained: str | None = None  # checkpoint URI to start from (S3Rec finetune)
    allow_scratch: bool = False  # finetune without a pretrained checkpoint only if asked
    # the next-item softmax (large catalogues: README "Large catalogues")
    softmax: str = "full"  # full (the reference) | sampled: the target against shared candidates
    n_negatives: int = 1024  # sampled: items drawn per step from negative_sampler, shared by ranks
    negative_sampler: str = "uniform"  # uniform | popularity (training-target count ** alpha)
    negative_alpha: float = 1.0  # popularity sampler exponent
    in_batch_negatives: bool = True  # sampled: the global batch's targets are candidates too
    logq_correction: bool = True  # sampled: logit - log(expected count as a candidate)
    softmax_temperature: float = 1.0  # sampled: logits / T
    sparse_item_updates: bool = False  # row-sparse item-table gradients + lazy (sparse) Adam
    eval_item_chunk: int = 65536  # items scored at a time in evaluation (memory: batch x chunk)

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "eval_every", "prefetch_blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.shuffle_window < self.batch_size:
            raise ConfigError(
                f"train.shuffle_window: the shuffle buffer ({self.shuffle_window} examples) must "
                f"hold at least one batch ({self.batch_size}); 0 (a worker's whole shard) is "
                "gone since the feed streams: use e.g. 65536"
            )
        if self.first_epoch_head < 0:
            raise ConfigError(f"train.first_epoch_head: must be >= 0, got {self.first_epoch_head}")
        if self.valid_users < 0:
            raise ConfigError(f"train.valid_users: must be >= 0, got {self.valid_users}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.patience < 0:
            raise ConfigError(f"train.patience: must be >= 0, got {self.patience}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ConfigError(f"train.amp: {self.amp!r} is not one of auto, off, bf16, fp16")
        self.check_softmax()
        if self.stage not in ("train", "pretrain", "finetune"):
            raise ConfigError(f"train.stage: {self.stage!r} is not train, pretrain or finetune")
        base = self.valid_metric.removeprefix("masked_")
        name, _, k = base.partition("@")
        if name not in ("hr", "ndcg", "mrr") or not k.isdigit():
            raise ConfigError(
                f"train.valid_metric: {self.valid_metric!r} is not of the form "
                "hr@K / ndcg@K / mrr@K (optionally masked_)"
            )
        if int(k) not in self.topk:
            self.topk = sorted({*self.topk, int(k)})

    def check_softmax(self) -> None:
        if self.softmax not in ("full", "sampled"):
            raise ConfigError(f"train.softmax: {self.softmax!r} is not one of full, sampled")
        if self.negative_sampler not in ("uniform", "popularity"):
            raise ConfigError(
                f"train.negative_sampler: {self.negative_sampler!r} is not one of uniform, "
                "popularity"
            )
        if self.n_negatives < 1:
            raise ConfigError(f"train.n_negatives: must be >= 1, got {self.n_negatives}")
        if self.softmax_temperature <= 0:
            raise ConfigError(
                f"train.softmax_temperature: must be > 0, got {self.softmax_temperature}"
            )
        if self.eval_item_chunk < 1:
            raise ConfigError(f"train.eval_item_chunk: must be >= 1, got {self.eval_item_chunk}")
        if self.sparse_item_updates and self.stage == "pretrain":
            raise ConfigError(
                "train.sparse_item_updates: not for train.stage: pretrain (S3Rec's pretraining "
                "objectives score the whole table)"
            )
        if self.sparse_item_updates and self.softmax != "sampled":
            raise ConfigError(
                "train.sparse_item_updates: needs train.softmax: sampled (the full softmax "
                "touches every item row, so its gradient is dense)"
            )


@dataclass
class RunSection:
    name: str = ""  # "" = <model>-<timestamp>
    storage_path: str = "./runs"
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    checkpoints_to_keep: int = 2
    checkpoint_every_steps: int = 0  # also checkpoint every N steps inside an epoch; 0 = per epoch
    progress_every_s: float = 60.0  # rank 0's in-epoch step / ETA line every N s; 0 = off
    # custom Ray resources each worker also requests, e.g. {"trainer_slot": 1} with one slot per
    # node places one worker per node; the names must match the nodes' `--resources`
    worker_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"run.workers: must be >= 0, got {self.workers}")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(
                f"run.checkpoint_every_steps: must be >= 0, got {self.checkpoint_every_steps}"
            )
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"run.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if not self.progress_every_s >= 0:
            raise ConfigError(f"run.progress_every_s: must be >= 0, got {self.progress_every_s}")
        resources = {}
        for name, amount in self.worker_resources.items():
            key = f"run.worker_resources.{name}"
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"run.worker_resources: resource names must be strings, got {name!r}"
                )
            if name in ("CPU", "GPU"):
                raise ConfigError(
                    f"{key}: set CPUs and GPUs with run.cpus_per_worker / run.use_gpu"
                )
            ok, value = coerce(amount, float)
            if not ok or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key}: must be a number >= 0, got {amount!r}")
            resources[name] = value
        self.worker_resources = resources


@dataclass
class TuneSection:
    name: str = ""  # sweep name ("" = <model>-sweep-<timestamp>)
    storage_path: str = "./sweeps"
    num_samples: int = 8
    metric: str = "valid/ndcg@10"
    mode: str = "max"
    max_t: int = 10  # epochs
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int = 0  # 0 = derive from the cluster's CPUs/GPUs
    driver_cpus: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"tune.mode: {self.mode!r} is not max or min")
        if self.grace_period < 1 or self.max_t < self.grace_period:
            raise ConfigError("tune.grace_period: must be >= 1 and <= tune.max_t")


@dataclass
class ExperimentConfig:
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    run: RunSection = field(default_factory=RunSection)
    tune: TuneSection = field(default_factory=TuneSection)
    storage: StorageSection = field(default_factory=StorageSection)

    def __post_init__(self) -> None:
        self.data.storage = self.storage  # one object: the alias can never disagree

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict; the model section is flattened to ``{"name": ..., **params}``, and
        the storage options appear once, under ``storage`` (not under the ``data`` alias)."""
        out = asdict(self)
        model = out.pop("model")
        out["model"] = {"name": model["name"], **model["params"]}
        out["data"].pop("storage")
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
        return _build(cls, fold_storage_alias(raw or {}, source), "", source)


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


# --------------------------------------------------------------------------------------------------
# dataclass building with type checks


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    if cls is ModelSection:
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
        return cls(**kwargs)
    unknown = sorted(set(raw) - names)
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
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.", source)
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


# --------------------------------------------------------------------------------------------------
# loading


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


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

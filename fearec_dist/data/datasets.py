"""From a config to the Ray datasets a run trains on: the data side of the trainer's wiring.

Owns, in order:

1. ``ensure_prepared``: raw input (or the synthetic generator) -> ``prepare`` (cached by content).
2. ``prepare_run``: that, plus ``build_examples`` (the examples' counts, cached by L).
3. ``start_feed``: the run's ``EpochPlanner`` actor, which builds each epoch's training stream
   (``data/planner.py``; the job itself is ``data/epochs.py``); it travels to the workers in
   the train loop config.
4. ``build_datasets``: the valid/test rows (cut from the sequences, validation on a seeded
   sample of ``train.valid_users`` users when set), read once per run and materialized in the
   object store (it spills to disk beyond its cap): every epoch scores them again.
5. ``eval_shards``: each rank's contiguous range of those rows (all rows kept: a dropped row would
   be a user never scored). They travel to the workers in the train loop config, like the
   planner; Ray Train's own dataset splitting (a coordinator actor and a fresh read per
   dataset and epoch) is not used.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fearec_dist.config import ExperimentConfig
from fearec_dist.data.epochs import EpochSource, head_fraction
from fearec_dist.data.examples import ExamplesInfo, build_examples, eval_dataset, sample_users
from fearec_dist.data.planner import start_planner
from fearec_dist.data.prepare import prepare_dataset
from fearec_dist.data.temporal import resolve_protocol
from fearec_dist.data.versions import list_versions, resolve_version
from fearec_dist.storage import storage_root


def ensure_prepared(cfg: ExperimentConfig, progress: bool = True) -> str:
    """Returns the directory of the prepared dataset version a run reads (``data.version``,
    default the newest; ``data/versions.resolve_version``), running ``prepare`` first when the
    config names raw input. A local path comes back absolute: the train workers run in Ray's own
    working directory."""
    data = cfg.data
    if data.format == "prepared":
        if not data.path:
            raise ValueError("data.path is empty: name a prepared dataset or raw input")
        # the one way to a prepared dataset: data.version (default the newest) -> its directory
        return resolve_version(storage_root(data.path), data.version, cfg.storage).uri

    # the examples' keys: they cut the prepared data, they do not change it
    skip = ("storage", "max_seq_len", "version", "split", "valid_start", "test_start", "valid_days",
            "test_days", "train_since")  # fmt: skip
    key = json.dumps({k: v for k, v in data.__dict__.items() if k not in skip}, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    cache = f"{storage_root(cfg.run.storage_path)}/_prepared/{data.format}-{digest}"
    out = storage_root(data.prepared_path) if data.prepared_path else cache
    if list_versions(out, cfg.storage):
        print(f"[fearec-dist] using prepared data at {out}")
        return resolve_version(out, data.version, cfg.storage).uri
    print(f"[fearec-dist] preparing {data.format} input {data.path or '(generated)'} -> {out}")
    prepare_dataset(
        data.path, data.format, out, data=data, attributes_uri=data.attributes, progress=progress
    )
    return resolve_version(out, data.version, cfg.storage).uri


def prepare_run(cfg: ExperimentConfig) -> tuple[str, ExamplesInfo]:
    """Prepared data + examples (both cached, the examples by L and the protocol's cuts);
    returns (prepared URI, examples info)."""
    prepared = ensure_prepared(cfg)
    protocol = resolve_protocol(cfg.data, prepared, cfg.storage)
    info = build_examples(prepared, cfg.data.max_seq_len, cfg.storage, protocol=protocol)
    print(f"[fearec-dist] {protocol.describe()}")
    if protocol.temporal:
        print(
            f"[fearec-dist] cold targets (first seen at or after the cut, counted as misses): "
            f"{info.cold_valid:,} valid / {info.cold_test:,} test; users skipped without "
            f"history: {info.no_history_valid:,} valid / {info.no_history_test:,} test"
        )
    print(
        f"[fearec-dist] examples: {info.n_train:,} train / {info.n_valid:,} valid / "
        f"{info.n_test:,} test, {info.n_items:,} items (cut from the sequences of "
        f"{prepared})"
    )
    return prepared, info


def build_datasets(cfg: ExperimentConfig, info: ExamplesInfo) -> dict[str, Any]:
    """``{"valid", "test"}`` Ray datasets (none with ``train.evaluate: false``). Validation uses
    a fixed seeded sample of ``train.valid_users`` users when set; test always every user."""
    if not cfg.train.evaluate:
        return {}
    users = sample_users(info.n_users, cfg.train.valid_users, cfg.train.seed)
    uri, width, protocol = info.prepared_uri, info.max_seq_len, info.protocol
    return {
        "valid": eval_dataset(uri, width, "valid", cfg.storage, users, protocol).materialize(),
        "test": eval_dataset(uri, width, "test", cfg.storage, protocol=protocol).materialize(),
    }


def start_feed(cfg: ExperimentConfig, info: ExamplesInfo, world: int, needs_partner: bool) -> Any:
    """The run's ``EpochPlanner`` actor for ``world`` ranks (``data/planner.py``); with a
    first-epoch head (``train.first_epoch_head``) when the training set is large enough."""
    source = EpochSource(
        prepared_uri=info.prepared_uri,
        max_seq_len=info.max_seq_len,
        seed=cfg.train.seed,
        pair=needs_partner,
        n_examples=info.n_train,
        block_rows=cfg.data.block_rows,
        partition_bytes=cfg.data.partition_mb << 20,
        storage=cfg.storage,
        protocol=info.protocol,
    )
    head = head_fraction(cfg.train.first_epoch_head, info.n_train)
    counts = f"{info.uri}/item_counts.parquet" if head and needs_partner else None
    return start_planner(source, world, cfg.train.epochs, head=head, counts_uri=counts)


def eval_shards(datasets: dict[str, Any], world: int) -> dict[str, list[Any]]:
    """``{split: [rank 0's rows, ..., rank world-1's]}``: equal contiguous row ranges (the first
    ranks take one more row when ``world`` does not divide the count), none dropped."""
    out = {}
    for name, ds in datasets.items():
        done = ds.materialize()  # a no-op for build_datasets' own
        n = done.count()
        cuts = [n * (r + 1) // world for r in range(world - 1)]
        out[name] = done.split_at_indices(cuts) if cuts else [done]
    return out

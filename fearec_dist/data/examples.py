"""Training and evaluation examples, cut on the fly from the prepared sequences.

Nothing per example is written to disk: a training example (user u, target position t) is
``items[max(0, t - L):t] -> items[t]`` of u's sequence, so the examples are a view of
``<prepared>/sequences``. What is built once per (prepared dataset, L) is only their counts, in
one streaming pass (constant driver memory)::

    <prepared>/examples/L<L>-<fingerprint>[-temporal-<valid_start>-<test_start>][-since-<t>]/
        info.json            counts (n_train, n_valid, n_test), n_items, n_users, L, fingerprint,
                             the protocol (split, cuts; temporal: cold_*, no_history_*;
                             data.train_since: train_since, train_before_since)
        item_counts.parquet  training examples per target item (index = item id; valid and test
                             targets are not counted), for popularity baselines and samplers;
                             temporal: also ``interactions`` (every interaction before the
                             training cut: the warm items, and the popularity baseline's counts)

``info.json`` is written last: it is the commit marker. Evaluation rows (valid/test: history,
length, target, user and ``seen``, the user's whole history before the target) come from
``eval_dataset``, a Ray Data job over the sequences, optionally restricted to a seeded sample of
users; the training feed is ``data/epochs.py``. Which rows exist is the protocol's
(``data/temporal.py``: leave-one-out, or temporal cuts); the cut is the same function in the
count, the feed and the evaluation rows.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fearec_dist.config import StorageSection
from fearec_dist.data.popularity import training_counts
from fearec_dist.data.sequences import gather_ranges, sequences_csr
from fearec_dist.data.since import loo_since_counts
from fearec_dist.data.temporal import (
    LOO,
    SplitProtocol,
    build_split_examples,
    count_summary,
    protocol_record,
    sequence_times,
    temporal_counts,
)
from fearec_dist.data.versions import resolve_version
from fearec_dist.errors import DataError
from fearec_dist.storage import open_output, read_json, read_parquet_dataset, resolve, write_json

EXAMPLES_VERSION = 2
DATA_TASK_CPUS = 0.25  # CPUs of each Ray Data task of the data room (reads, cuts, pairing)
# Users per call of the UDFs that expand sequences into L-wide rows (training examples,
# evaluation rows). Without it a UDF gets whatever batch the Parquet scanner yields (up to
# 131,072 rows, i.e. users: ~4.6M examples at 35 items each); at 40M interactions the epoch job's
# fused read -> TrainRows task grew past 13 GB and was OOM-killed over and over. 4,096 users x
# 35 items x (L + 4) x 4 bytes is ~31 MB of examples per call at L = 50.
USERS_PER_BATCH = 4096


def fingerprint(meta: dict[str, Any]) -> str:
    """A short stable hash of a prepared dataset's meta.json (its counts, sources and version)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]


def examples_uri(
    prepared_uri: str, meta: dict[str, Any], max_seq_len: int, protocol: SplitProtocol = LOO
) -> str:
    """Keyed by L, the data and the protocol with its cuts (a LOO count is never reused)."""
    key = f"L{max_seq_len}-{fingerprint(meta)}{protocol.cache_key()}"
    return f"{prepared_uri.rstrip('/')}/examples/{key}"


def dense(col: Any) -> np.ndarray:
    """A fixed_size_list<…>[L] column (Array or ChunkedArray) -> (N, L) numpy, zero-copy where
    the column is one chunk."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.list_size
    flat = arr.values.to_numpy(zero_copy_only=False)
    return flat[arr.offset * width : (arr.offset + len(arr)) * width].reshape(-1, width)


def fixed_list(x: np.ndarray) -> pa.Array:
    """(N, L) -> fixed_size_list<…>[L]."""
    flat = pa.array(np.ascontiguousarray(x).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, x.shape[1])


def examples_table(split: dict[str, np.ndarray]) -> pa.Table:
    """An evaluation split (see ``build_loo_examples``) as the rows ``eval_batch_from_arrow``
    reads: history, length, target, user, seen."""
    seen = pa.ListArray.from_arrays(
        pa.array(split["seen_offsets"].astype(np.int32)), pa.array(split["seen_items"], pa.int32())
    )
    return pa.table(
        {
            "history": fixed_list(split["history"]),
            "length": pa.array(split["length"], pa.int32()),
            "target": pa.array(split["target"], pa.int32()),
            "user": pa.array(split["user"], pa.int32()),
            "seen": seen,
        }
    )


class EvalRows:
    """Ray Data UDF: user sequences -> their ``split`` rows (valid or test) under ``protocol``,
    for all users or only those in ``users`` (sorted int32 ids)."""

    def __init__(
        self, split: str, max_seq_len: int, users: np.ndarray | None, protocol: SplitProtocol = LOO
    ) -> None:
        self.split, self.max_seq_len, self.users = split, max_seq_len, users
        self.protocol = protocol

    def __call__(self, batch: pa.Table) -> pa.Table:
        offsets, items, users = sequences_csr(batch)
        times = sequence_times(batch) if self.protocol.needs_times else None
        if self.users is not None:
            keep = np.flatnonzero(np.isin(users, self.users))
            lens = np.diff(offsets)[keep]
            take = gather_ranges(offsets[:-1][keep], lens)
            items, times = items[take], None if times is None else times[take]
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            users = users[keep]
        part = build_split_examples(self.protocol, offsets, items, times, users,
                                    self.max_seq_len, (self.split,))  # fmt: skip
        return examples_table(part[self.split])


@dataclass(frozen=True)
class ExamplesInfo:
    """The examples of one (prepared dataset, L): ``info.json``, and what a run, its checkpoints
    and ``results.json`` record of its data. Travels as a dict (``to_dict``) in Ray's train loop
    config and in checkpoint state; ``from_dict`` reads it back."""

    uri: str  # the examples directory (<prepared>/examples/L<L>-<fingerprint>)
    prepared_uri: str
    max_seq_len: int  # L
    n_items: int  # real items (ids 1..n_items)
    n_users: int
    n_train: int = 0
    n_valid: int = 0
    n_test: int = 0
    fingerprint: str = ""
    version: int = 0  # EXAMPLES_VERSION of the count that wrote it
    build_seconds: float = 0.0
    split: str = "loo"  # the protocol (data/temporal.py) and, under temporal, its cuts/counts
    valid_start: int | None = None
    test_start: int | None = None
    cold_valid: int = 0  # rows whose target was first seen at or after valid_start
    cold_test: int = 0
    no_history_valid: int = 0  # users skipped: their window's first item was their first ever
    no_history_test: int = 0
    train_since: int | None = None  # data.train_since: training targets at or after it only
    train_before_since: int = 0  # training examples it removed (their target is before it)
    data_uri: str = ""  # the dataset (its root) and the version read: results' "data" lineage
    data_version: int = 0

    @property
    def data(self) -> dict[str, Any]:
        """``{"uri", "version"}``: the lineage that results, checkpoints and exports record."""
        return {"uri": self.data_uri or self.prepared_uri, "version": self.data_version}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExamplesInfo:
        """Known keys only: checkpoints written by older versions carry retired ones."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def protocol(self) -> SplitProtocol:
        return SplitProtocol(self.split, self.valid_start, self.test_start, self.train_since)

    def protocol_record(self) -> dict[str, Any]:
        """``results.json["protocol"]``: the split, its cuts and counts."""
        return protocol_record(self.protocol, self.to_dict())


def sample_users(n_users: int, k: int, seed: int) -> np.ndarray | None:
    """A fixed seeded sample of ``k`` user ids out of 1..n_users (sorted), or None for all."""
    if k <= 0 or k >= n_users:
        return None
    rng = np.random.default_rng([seed, 41])
    return np.sort(rng.choice(np.arange(1, n_users + 1, dtype=np.int32), k, replace=False))


def sequences_dataset(
    prepared_uri: str, storage: StorageSection | None, protocol: SplitProtocol = LOO
) -> Any:
    uri = f"{prepared_uri.rstrip('/')}/sequences"
    ds = read_parquet_dataset(uri, storage, num_cpus=DATA_TASK_CPUS)
    return ds.select_columns(protocol.columns())  # pushed down into the Parquet read


def eval_dataset(
    prepared_uri: str,
    max_seq_len: int,
    split: str,
    storage: StorageSection | None,
    users: np.ndarray | None = None,
    protocol: SplitProtocol = LOO,
) -> Any:
    """The Ray dataset of ``split``'s evaluation rows, cut from the sequences as they stream."""
    ds = sequences_dataset(prepared_uri, storage, protocol)
    return ds.map_batches(
        EvalRows(split, max_seq_len, users, protocol),
        batch_format="pyarrow",
        batch_size=USERS_PER_BATCH,
        num_cpus=DATA_TASK_CPUS,
    )


def iter_eval_rows(
    prepared_uri: str,
    max_seq_len: int,
    split: str,
    batch_size: int,
    storage: StorageSection | None = None,
    users: np.ndarray | None = None,
    protocol: SplitProtocol = LOO,
) -> Any:
    """The same rows as ``eval_dataset``, in this process (no Ray): the sequences are read
    ``batch_size`` users at a time, so memory stays bounded."""
    fs, root = resolve(f"{prepared_uri.rstrip('/')}/sequences", storage)
    rows = EvalRows(split, max_seq_len, users, protocol)
    source = pads.dataset(root, filesystem=fs, format="parquet")
    for batch in source.to_batches(columns=protocol.columns(), batch_size=batch_size):
        table = rows(pa.Table.from_batches([batch]))
        if table.num_rows:
            yield table


class _Count:
    """Ray Data UDF: a batch of sequences -> its example counts and per-item counts: training
    targets (``counts``); temporal also every interaction before the cut (``interactions``)
    and the valid/test targets (``valid_targets``, ``test_targets``: cold ones are counted
    from them once the whole log's ``interactions`` are known)."""

    def __init__(self, n_items: int, protocol: SplitProtocol = LOO) -> None:
        self.n_items, self.protocol = n_items, protocol

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        offsets, items, _ = sequences_csr(batch)
        if not self.protocol.temporal and self.protocol.train_since is not None:
            times = sequence_times(batch)
            return loo_since_counts(offsets, items, times, self.n_items, self.protocol.train_since)
        if not self.protocol.temporal:
            samples = np.maximum(np.diff(offsets) - 1, 0)
            n_test = int((samples >= 2).sum())
            n_valid = int((samples >= 3).sum())
            n_train = int(samples.sum()) - n_test - n_valid
            counts = training_counts(offsets, items, self.n_items, targets_only=True)
            n = np.array([[n_train, n_valid, n_test]], dtype=np.int64)
            return {"n": n, "counts": counts[None, :]}
        return temporal_counts(offsets, items, sequence_times(batch), self.n_items, self.protocol)


def _sum_counts(parts: Any) -> dict[str, np.ndarray]:
    """Adds up ``_Count``'s per-batch outputs."""
    totals: dict[str, np.ndarray] = {}
    for part in parts:
        for key, value in part.items():
            totals[key] = totals.get(key, 0) + value.sum(axis=0)
    return totals


def count_examples(
    prepared_uri: str,
    n_items: int,
    protocol: SplitProtocol,
    storage: StorageSection | None = None,
    batch_size: int = 65_536,
) -> dict[str, np.ndarray]:
    """``build_examples``' counting pass in this process (no Ray), ``batch_size`` users at a
    time: summed ``_Count`` outputs (``count_summary`` reads them)."""
    fs, root = resolve(f"{prepared_uri.rstrip('/')}/sequences", storage)
    source = pads.dataset(root, filesystem=fs, format="parquet")
    count = _Count(n_items, protocol)
    batches = source.to_batches(columns=protocol.columns(), batch_size=batch_size)
    return _sum_counts(count(pa.Table.from_batches([b])) for b in batches if b.num_rows)


def build_examples(
    prepared_uri: str,
    max_seq_len: int,
    storage: StorageSection | None = None,
    *,
    rebuild: bool = False,
    protocol: SplitProtocol = LOO,
) -> ExamplesInfo:
    """Counts (or finds counted) the examples for ``max_seq_len``; returns their ``info.json``.

    Args:
        prepared_uri: the output of ``fearec-dist prepare`` (local path or URI).
        max_seq_len: L.
        storage: object-storage options.
        rebuild: ignore a cached count.
        protocol: leave-one-out, or temporal cuts (``data/temporal.resolve_protocol``).

    Returns:
        the examples' info (``uri`` is this directory).

    Raises:
        DataError: temporal cuts that leave a split without a single example.
    """
    storage = storage or StorageSection()
    dataset = resolve_version(prepared_uri, storage=storage)  # a root: its newest version
    prepared_uri, lineage = dataset.uri, dataset.lineage
    meta = read_json(f"{prepared_uri}/meta.json", storage)
    out_uri = examples_uri(prepared_uri, meta, max_seq_len, protocol)
    if not rebuild:
        try:
            info = read_json(f"{out_uri}/info.json", storage)
            if info.get("version") == EXAMPLES_VERSION:  # where it lies now, not when counted
                where = {"uri": out_uri, "prepared_uri": prepared_uri}
                return ExamplesInfo.from_dict(info | where | _lineage(lineage))
        except (FileNotFoundError, OSError, ValueError):
            pass
    start = time.time()
    n_items = int(meta["n_items"])
    ds = sequences_dataset(prepared_uri, storage, protocol).map_batches(
        _Count(n_items, protocol), batch_format="pyarrow", num_cpus=DATA_TASK_CPUS
    )
    totals = _sum_counts(ds.iter_batches(batch_size=None, batch_format="numpy"))
    summary = count_summary(totals, protocol)
    if protocol.train_since is not None and not summary["n_train"]:
        raise DataError(
            f"{prepared_uri}: no training example has its target at or after data.train_since "
            f"({protocol.describe()}); {summary['train_before_since']:,} targets are before it"
        )
    empty = [k for k in ("n_train", "n_valid", "n_test") if protocol.temporal and not summary[k]]
    if empty:
        raise DataError(
            f"{prepared_uri}: the temporal cuts ({protocol.describe()}) leave no "
            f"{empty[0].removeprefix('n_')} example; move data.valid_start/test_start "
            "(or valid_days/test_days)"
        )
    columns = {"count": pa.array(totals["counts"])}
    if protocol.temporal:
        columns["interactions"] = pa.array(totals["interactions"])
    with open_output(f"{out_uri}/item_counts.parquet", storage) as f:
        pq.write_table(pa.table(columns), f)
    info = ExamplesInfo(
        version=EXAMPLES_VERSION,
        uri=out_uri,
        prepared_uri=prepared_uri,
        fingerprint=fingerprint(meta),
        max_seq_len=max_seq_len,
        n_items=n_items,
        n_users=int(meta["n_users"]),
        build_seconds=round(time.time() - start, 2),
        split=protocol.split,
        valid_start=protocol.valid_start,
        test_start=protocol.test_start,
        train_since=protocol.train_since,
        **summary,
        **_lineage(lineage),
    )
    write_json(f"{out_uri}/info.json", info.to_dict(), storage)  # last: the commit marker
    return info


def _lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    return {"data_uri": lineage["uri"], "data_version": lineage["version"]}


def read_item_counts(info: ExamplesInfo, storage: StorageSection | None = None) -> np.ndarray:
    """(n_items + 1,) training examples per target item (``item_counts.parquet``)."""
    fs, path = resolve(f"{info.uri}/item_counts.parquet", storage)
    return pq.read_table(path, filesystem=fs).column("count").to_numpy()


def read_warm_items(info: ExamplesInfo, storage: StorageSection | None = None) -> np.ndarray | None:
    """(n_items + 1,) bool: the items seen before the training cut (temporal: ``interactions``
    > 0; the candidates, and the targets that are not cold), or None under leave-one-out."""
    if not info.protocol.temporal:
        return None
    fs, path = resolve(f"{info.uri}/item_counts.parquet", storage)
    return pq.read_table(path, filesystem=fs).column("interactions").to_numpy() > 0

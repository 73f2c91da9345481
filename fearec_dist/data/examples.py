"""Training and evaluation examples, cut on the fly from the prepared sequences.

Nothing per example is written to disk: a training example (user u, target position t) is
``items[max(0, t - L):t] -> items[t]`` of u's sequence, so the examples are a view of
``<prepared>/sequences``. What is built once per (prepared dataset, L) is only their counts, in
one streaming pass (constant driver memory)::

    <prepared>/examples/L<L>-<fingerprint>/
        info.json            counts (n_train, n_valid, n_test), n_items, n_users, L, fingerprint
        item_counts.parquet  training examples per target item (index = item id; valid and test
                             targets are not counted), for popularity baselines and samplers

``info.json`` is written last: it is the commit marker. Evaluation rows (valid/test: history,
length, target, user and ``seen``, the user's whole history before the target) come from
``eval_dataset``, a Ray Data job over the sequences, optionally restricted to a seeded sample of
users; the training feed is ``data/epochs.py``.
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
from fearec_dist.data.sequences import build_loo_examples, gather_ranges, sequences_csr
from fearec_dist.data.versions import resolve_version
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


def examples_uri(prepared_uri: str, meta: dict[str, Any], max_seq_len: int) -> str:
    return f"{prepared_uri.rstrip('/')}/examples/L{max_seq_len}-{fingerprint(meta)}"


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
    """Ray Data UDF: user sequences -> their ``split`` rows (valid or test), for all users or
    only those in ``users`` (sorted int32 ids)."""

    def __init__(self, split: str, max_seq_len: int, users: np.ndarray | None) -> None:
        self.split, self.max_seq_len, self.users = split, max_seq_len, users

    def __call__(self, batch: pa.Table) -> pa.Table:
        offsets, items, users = sequences_csr(batch)
        if self.users is not None:
            keep = np.flatnonzero(np.isin(users, self.users))
            lens = np.diff(offsets)[keep]
            items = items[gather_ranges(offsets[:-1][keep], lens)]
            offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            users = users[keep]
        part = build_loo_examples(offsets, items, users, self.max_seq_len, splits=(self.split,))
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


def sample_users(n_users: int, k: int, seed: int) -> np.ndarray | None:
    """A fixed seeded sample of ``k`` user ids out of 1..n_users (sorted), or None for all."""
    if k <= 0 or k >= n_users:
        return None
    rng = np.random.default_rng([seed, 41])
    return np.sort(rng.choice(np.arange(1, n_users + 1, dtype=np.int32), k, replace=False))


def sequences_dataset(prepared_uri: str, storage: StorageSection | None) -> Any:
    uri = f"{prepared_uri.rstrip('/')}/sequences"
    ds = read_parquet_dataset(uri, storage, num_cpus=DATA_TASK_CPUS)
    return ds.select_columns(["user", "items"])  # pushed down into the Parquet read


def eval_dataset(
    prepared_uri: str,
    max_seq_len: int,
    split: str,
    storage: StorageSection | None,
    users: np.ndarray | None = None,
) -> Any:
    """The Ray dataset of ``split``'s evaluation rows, cut from the sequences as they stream."""
    ds = sequences_dataset(prepared_uri, storage)
    return ds.map_batches(
        EvalRows(split, max_seq_len, users),
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
) -> Any:
    """The same rows as ``eval_dataset``, in this process (no Ray): the sequences are read
    ``batch_size`` users at a time, so memory stays bounded."""
    fs, root = resolve(f"{prepared_uri.rstrip('/')}/sequences", storage)
    rows = EvalRows(split, max_seq_len, users)
    source = pads.dataset(root, filesystem=fs, format="parquet")
    for batch in source.to_batches(columns=["user", "items"], batch_size=batch_size):
        table = rows(pa.Table.from_batches([batch]))
        if table.num_rows:
            yield table


class _Count:
    """Ray Data UDF: a batch of sequences -> its example counts and training-target counts."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        offsets, items, _ = sequences_csr(batch)
        samples = np.maximum(np.diff(offsets) - 1, 0)
        n_test = int((samples >= 2).sum())
        n_valid = int((samples >= 3).sum())
        n_train = int(samples.sum()) - n_test - n_valid
        counts = training_counts(offsets, items, self.n_items, targets_only=True)
        return {
            "n": np.array([[n_train, n_valid, n_test]], dtype=np.int64),
            "counts": counts[None, :],
        }


def build_examples(
    prepared_uri: str,
    max_seq_len: int,
    storage: StorageSection | None = None,
    *,
    rebuild: bool = False,
) -> ExamplesInfo:
    """Counts (or finds counted) the examples for ``max_seq_len``; returns their ``info.json``.

    Args:
        prepared_uri: the output of ``fearec-dist prepare`` (local path or URI).
        max_seq_len: L.
        storage: object-storage options.
        rebuild: ignore a cached count.

    Returns:
        the examples' info (``uri`` is this directory).
    """
    storage = storage or StorageSection()
    dataset = resolve_version(prepared_uri, storage=storage)  # a root: its newest version
    prepared_uri, lineage = dataset.uri, dataset.lineage
    meta = read_json(f"{prepared_uri}/meta.json", storage)
    out_uri = examples_uri(prepared_uri, meta, max_seq_len)
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
    totals = np.zeros(3, dtype=np.int64)
    counts = np.zeros(n_items + 1, dtype=np.int64)
    ds = sequences_dataset(prepared_uri, storage).map_batches(
        _Count(n_items), batch_format="pyarrow", num_cpus=DATA_TASK_CPUS
    )
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        totals += part["n"].sum(axis=0)
        counts += part["counts"].sum(axis=0)
    with open_output(f"{out_uri}/item_counts.parquet", storage) as f:
        pq.write_table(pa.table({"count": pa.array(counts)}), f)
    info = ExamplesInfo(
        version=EXAMPLES_VERSION,
        uri=out_uri,
        prepared_uri=prepared_uri,
        fingerprint=fingerprint(meta),
        max_seq_len=max_seq_len,
        n_items=n_items,
        n_users=int(meta["n_users"]),
        n_train=int(totals[0]),
        n_valid=int(totals[1]),
        n_test=int(totals[2]),
        build_seconds=round(time.time() - start, 2),
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

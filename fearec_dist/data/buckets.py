"""A version's sequences stored by user bucket, and the one write path of ``prepare`` and
``prepare --append`` onto it.

Layout (inside a version's directory)::

    sequences/bucket-<b:05d>.parquet    the users of bucket b (user, items, timestamps,
                                        user_raw), by user id; an empty bucket has no file
    vocab/users/bucket-<b:05d>.parquet  id, raw of the same users
    buckets.parquet                     one row per bucket: users, interactions, min/max
                                        sequence length, min/max timestamp

bucket = SipHash(raw user id) mod B; B (``meta.json["user_buckets"]``) is chosen by the first
prepare (1 under ``ROWS_PER_PARTITION`` interactions, else 4 x the hash partitions) and kept by
every append, so bucket b of a version holds exactly the users of bucket b of its parent plus
the new users that hash there. The write::

    new rows -> records (data/merge.py) -> hash partition by bucket -> materialize
      -> plan: per bucket, new users = raw ids of the records not in the parent's bucket file
         (its user_raw column) -> one count per bucket to the driver -> offsets
      -> write: per bucket, the parent's file + the records: users the records touch are merged
         (data/merge.merge_records), the others kept as they are; new users numbered
         n_users before + offset of the bucket + rank + 1; sequences and user vocabulary
         files written by the task
      -> copy: buckets the new rows do not touch are copied from the parent (server-side on S3)

So an append shuffles only the new rows; the parent's sequences are read and written once, per
bucket, never shuffled. A parent without this layout (written before it), or one whose data has
grown past 4x what its B was chosen for, is *re-bucketed*: its sequences join the new rows'
records in the hash shuffle (src 0) and the version gets a fresh B. Ids never change either way.
The driver holds a few numbers per bucket (<= 4 x 1024 buckets), never a user id.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fearec_dist.config import StorageSection
from fearec_dist.data.merge import (
    RECORD_SCHEMA,
    SEQUENCE_SCHEMA,
    RowsToRecords,
    SequencesToRecords,
    merge_records,
    new_users,
    sequence_records,
)
from fearec_dist.data.sequences import list_csr
from fearec_dist.storage import exists, read_parquet_dataset, resolve

STATS = ("users", "interactions", "min_len", "max_len", "min_t", "max_t")
STATS_FILE = "buckets.parquet"
# The bucket files' Parquet options: no dictionary encoding (timestamps and raw user ids are
# nearly all distinct: the writer tried a dictionary per column and fell back to plain), zstd
# level 1. Measured on 40 buckets of the 10M benchmark (2M interactions): 0.17 s of CPU and
# 8.4 MB, against 0.39 s and 17.1 MB with pyarrow's defaults (dictionary, snappy); reading
# them costs the same.
WRITE_OPTIONS = {"compression": "zstd", "compression_level": 1, "use_dictionary": False}
# An append whose new records take at most this much is not hash-shuffled: every task takes
# its buckets' records from the materialized blocks (object refs; Ray fetches each block once
# per node). Ray Data's hash shuffle runs its map and reduce tasks in worker processes of their
# own (a runtime env each): on a small node they displace the ordinary workers, and starting
# them all again cost ~8 s of the 40M append's 26 s of CPU (measured, 2 cores). Above it (a
# day of ~10M interactions and more) the new rows go through the hash shuffle.
BROADCAST_BYTES = 256 * 2**20


def bucket_name(bucket: int) -> str:
    return f"bucket-{int(bucket):05d}.parquet"


def bucket_count(n_parts: int) -> int:
    """B for data that needs ``n_parts`` hash partitions (1 partition: 1 bucket, sorted ids)."""
    return 1 if n_parts == 1 else 4 * n_parts


def parent_layout(parent_uri: str, parent_meta: dict, n_parts: int, storage: Any) -> int | None:
    """The parent's B when an append can keep it (its sequences are bucketed and B still fits
    the data: at most 4x the partitions it was chosen for); None when it must be re-bucketed."""
    n_buckets = parent_meta.get("user_buckets")
    if not n_buckets or not exists(f"{parent_uri}/{STATS_FILE}", storage):
        return None
    return int(n_buckets) if 4 * int(n_buckets) >= bucket_count(n_parts) else None


def _by_bucket(t: pa.Table) -> Iterator[tuple[int, pa.Table]]:
    """(bucket, its rows) for each bucket of a block (one hash partition)."""
    if t.num_rows == 0:
        return
    b = t.column("bucket").to_numpy()
    order = np.argsort(b, kind="stable")
    t, b = t.take(pa.array(order)), b[order]
    cuts = np.r_[0, np.flatnonzero(np.diff(b)) + 1, len(b)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        yield int(b[lo]), t.slice(lo, hi - lo)


def _local_dirs(fs: Any, *paths: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):  # object stores have no directories to create
        for path in paths:
            os.makedirs(path, exist_ok=True)


class _Parent:
    """The parent version's bucket files, read inside the tasks."""

    def __init__(self, uri: str | None, users: np.ndarray | None, storage: StorageSection):
        self.uri, self.users, self.storage = uri, users, storage

    def has(self, b: int) -> bool:
        return self.uri is not None and self.users is not None and self.users[b] > 0

    def read(self, b: int, columns: list[str] | None = None) -> pa.Table:
        fs, path = resolve(f"{self.uri}/sequences/{bucket_name(b)}", self.storage)
        return pq.read_table(path, filesystem=fs, columns=columns)


class CountNew:
    """Ray Data UDF over one hash partition of records: per bucket, how many new users."""

    def __init__(self, parent: _Parent) -> None:
        self.parent = parent

    def __call__(self, t: pa.Table) -> pa.Table:
        buckets, counts = [], []
        for b, recs in _by_bucket(t):
            known = None
            if self.parent.has(b):
                known = self.parent.read(b, ["user_raw"]).column("user_raw").combine_chunks()
            buckets.append(b)
            counts.append(len(new_users(recs, known)))
        return pa.table({"bucket": pa.array(buckets, pa.int64()),
                         "new": pa.array(counts, pa.int64())})  # fmt: skip


def _stats(b: int, table: pa.Table) -> list[int | None]:
    lens = np.diff(list_csr(table.column("items"))[0])
    span = pc.min_max(pc.list_flatten(table.column("timestamps"))).as_py()
    return [b, len(lens), int(lens.sum()), int(lens.min()), int(lens.max()),
            span["min"], span["max"]]  # fmt: skip


class WriteBuckets:
    """Ray Data UDF over one hash partition of records: per bucket, the parent's file merged
    with the records, written as the new version's bucket files; returns the buckets' stats."""

    def __init__(self, parent: _Parent, out: str, offsets: np.ndarray, expected: np.ndarray):
        self.parent, self.out, self.offsets, self.expected = parent, out, offsets, expected

    def __call__(self, t: pa.Table) -> pa.Table:
        fs, root = resolve(self.out, self.parent.storage)
        _local_dirs(fs, f"{root}/sequences", f"{root}/vocab/users")
        rows = []
        for b, recs in _by_bucket(t):
            first = int(self.offsets[b]) + 1
            parts = []
            if self.parent.has(b):
                old = self.parent.read(b).select(SEQUENCE_SCHEMA.names).cast(SEQUENCE_SCHEMA)
                touched = pc.is_in(old.column("user_raw"), value_set=pc.unique(recs["user_raw"]))
                parts.append(old.filter(pc.invert(touched)))
                hit = old.filter(touched)
                touched_records = sequence_records(hit, np.full(hit.num_rows, b, np.int32))
                recs = pa.concat_tables([touched_records, recs.cast(touched_records.schema)])
            merged = merge_records(recs, first)
            n_new = int(pc.sum(pc.greater_equal(merged.column("user"), first)).as_py() or 0)
            if n_new != self.expected[b]:
                raise RuntimeError(
                    f"prepare: bucket {b} has {n_new} new users, the plan counted "
                    f"{self.expected[b]}; a bucket was split across tasks"
                )
            table = pa.concat_tables([*parts, merged]).sort_by("user")
            name = bucket_name(b)
            pq.write_table(table, f"{root}/sequences/{name}", filesystem=fs, **WRITE_OPTIONS)
            users = pa.table({"id": table.column("user"), "raw": table.column("user_raw")})
            pq.write_table(users, f"{root}/vocab/users/{name}", filesystem=fs, **WRITE_OPTIONS)
            rows.append(_stats(b, table))
        return _stats_table(rows)


class CopyBuckets:
    """Ray Data UDF: bucket ids -> the parent's files of those buckets copied into the new
    version (the new rows touch none of their users)."""

    def __init__(self, parent: _Parent, out: str) -> None:
        self.parent, self.out = parent, out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = resolve(self.out, self.parent.storage)
        _, src = resolve(self.parent.uri, self.parent.storage)
        _local_dirs(fs, f"{root}/sequences", f"{root}/vocab/users")
        for b in batch["bucket"]:
            for sub in ("sequences", "vocab/users"):
                fs.copy_file(f"{src}/{sub}/{bucket_name(b)}", f"{root}/{sub}/{bucket_name(b)}")
        return {"bucket": batch["bucket"]}


class FromBroadcast:
    """Ray Data UDF over bucket groups (one row per group): the records of the group's buckets
    (``bucket % n_groups == group``), taken from every block of the new records, handed to
    ``inner`` (``CountNew`` or ``WriteBuckets``)."""

    def __init__(self, refs: list[Any], n_groups: int, inner: Any) -> None:
        self.refs, self.n_groups, self.inner = refs, n_groups, inner

    def __call__(self, batch: pa.Table) -> pa.Table:
        import ray

        tables = [t for t in ray.get(self.refs) if t.num_rows]
        if not tables:
            return self.inner(RECORD_SCHEMA.empty_table())
        t = pa.concat_tables(tables)
        mine = np.isin(t.column("bucket").to_numpy() % self.n_groups, batch["group"].to_numpy())
        return self.inner(t.filter(pa.array(mine)))


def _stats_table(rows: list[list[int | None]]) -> pa.Table:
    cols = list(zip(*rows)) if rows else [[] for _ in range(1 + len(STATS))]
    names = ("bucket", *STATS)
    return pa.table({name: pa.array(col, pa.int64()) for name, col in zip(names, cols)})


def _collect(ds: Any) -> pa.Table:
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(parts) if parts else pa.table({})


def write_sequences(
    rows: Any,
    item_vocab: pa.Array,
    out: str,
    *,
    n_parts: int,
    append_parts: int,
    storage: StorageSection,
    task_cpus: float,
    parent_uri: str | None = None,
    parent_meta: dict | None = None,
) -> dict[str, Any]:
    """Merges the new standard ``rows`` into the parent's sequences (none for a full prepare)
    and writes the version's ``sequences/``, ``vocab/users/`` and ``buckets.parquet``.

    ``n_parts``: hash partitions when everything is shuffled (a prepare, a re-bucketing append;
    B follows from it); ``append_parts``: when only the new rows are (an append that keeps the
    parent's B; at most B).

    Returns:
        ``user_buckets`` (B), ``rebucketed``, ``n_users``, ``new_users``, ``lengths`` (n, sum,
        min, max), ``time`` (min, max), ``buckets_written``, ``buckets_copied``.
    """
    import ray.data

    pmeta = parent_meta or {}
    n_old = int(pmeta.get("n_users", 0))
    kept = parent_layout(parent_uri, pmeta, n_parts, storage) if parent_uri else None
    n_buckets = kept or bucket_count(n_parts)
    if kept:
        n_parts = min(n_buckets, append_parts)
    args = {"batch_format": "pyarrow", "batch_size": None, "num_cpus": task_cpus}
    recs = rows.map_batches(RowsToRecords(item_vocab, n_buckets), **args)
    parent = _Parent(None, None, storage)
    before = None
    if kept:
        fs, path = resolve(f"{parent_uri}/{STATS_FILE}", storage)
        before = pq.read_table(path, filesystem=fs).sort_by("bucket")
        parent = _Parent(parent_uri, before.column("users").to_numpy(), storage)
    elif parent_uri:  # re-bucket: the parent's sequences go through the shuffle too
        old = read_parquet_dataset(f"{parent_uri}/sequences", storage, num_cpus=task_cpus)
        recs = old.map_batches(SequencesToRecords(n_buckets), **args).union(recs)
    if kept:
        recs = recs.materialize()
    if kept and recs.size_bytes() <= BROADCAST_BYTES:
        refs = recs.to_arrow_refs()
        groups = ray.data.from_items(
            [{"group": g} for g in range(n_parts)], override_num_blocks=n_parts
        )

        def run(udf: Any) -> pa.Table:
            return _collect(groups.map_batches(FromBroadcast(refs, n_parts, udf), **args))
    else:
        parts = recs.repartition(n_parts, keys=["bucket"]).materialize()

        def run(udf: Any) -> pa.Table:
            return _collect(parts.map_batches(udf, **args))

    plan = run(CountNew(parent))
    touched = np.zeros(n_buckets, dtype=np.int64)
    expected = np.zeros(n_buckets, dtype=np.int64)
    if plan.num_rows:
        np.add.at(touched, plan.column("bucket").to_numpy(), 1)
        expected[plan.column("bucket").to_numpy()] = plan.column("new").to_numpy()
    if (touched > 1).any():
        raise RuntimeError(
            f"prepare: bucket {int(np.flatnonzero(touched > 1)[0])} was split across hash "
            "partitions; each must stay whole (check DataContext.shuffle_strategy)"
        )
    offsets = n_old + np.r_[0, np.cumsum(expected)[:-1]]
    written = run(WriteBuckets(parent, out, offsets, expected))
    stats = {name: np.zeros(n_buckets, dtype=np.int64) for name in STATS}
    span = {"min_t": np.full(n_buckets, np.iinfo(np.int64).max),
            "max_t": np.full(n_buckets, np.iinfo(np.int64).min)}  # fmt: skip
    copied = np.zeros(0, dtype=np.int64)
    if before is not None:
        copied = np.flatnonzero((touched == 0) & (parent.users > 0))
        for name in STATS:
            values = pc.fill_null(before.column(name), 0).to_numpy()
            (span if name in span else stats)[name][copied] = values[copied]
    if written.num_rows:
        b = written.column("bucket").to_numpy()
        for name in STATS:
            (span if name in span else stats)[name][b] = written.column(name).to_numpy()
    if len(copied):
        items = [{"bucket": int(b)} for b in copied]
        ray.data.from_items(items, override_num_blocks=min(len(items), n_parts)).map_batches(
            CopyBuckets(parent, out), batch_format="numpy", num_cpus=task_cpus
        ).materialize()
    _write_stats(out, stats, span, storage)
    some = stats["users"] > 0
    return {
        "user_buckets": n_buckets,
        "rebucketed": bool(parent_uri and not kept),
        "n_users": int(stats["users"].sum()),
        "new_users": int(expected.sum()),
        "lengths": {
            "n": int(stats["users"].sum()),
            "sum": int(stats["interactions"].sum()),
            "min": int(stats["min_len"][some].min()) if some.any() else 0,
            "max": int(stats["max_len"][some].max()) if some.any() else 0,
        },
        "time": {
            "min": int(span["min_t"][some].min()) if some.any() else None,
            "max": int(span["max_t"][some].max()) if some.any() else None,
        },
        "buckets_written": int(written.num_rows),
        "buckets_copied": len(copied),
    }


def _write_stats(out: str, stats: dict, span: dict, storage: StorageSection) -> None:
    n = len(stats["users"])
    some = stats["users"] > 0
    cols = {"bucket": pa.array(np.arange(n, dtype=np.int32))}
    for name in STATS:
        values = span[name] if name in span else stats[name]
        cols[name] = pa.array(values, pa.int64(), mask=~some if name in span else None)
    fs, root = resolve(out, storage)
    _local_dirs(fs, root)
    pq.write_table(pa.table(cols), f"{root}/{STATS_FILE}", filesystem=fs)

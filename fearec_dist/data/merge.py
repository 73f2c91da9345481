"""Per-user sequences from new rows merged into a version's sequences: the one write path of
``prepare`` (no previous sequences) and ``prepare --append`` (the parent version's).

    parent sequences -> records (src 0) ┐
    new rows -> item ids -> records (src 1, grouped per block)  ┴ union
      -> hash partition by bucket (a user's records all meet in one task)
      -> Merge: one row per user, sorted by (timestamp, src, order); each new user gets its rank
         inside its bucket -> materialize
      -> per bucket: how many new users (one small row per bucket to the driver) -> offsets
      -> new user id = n_users before + offset of its bucket + rank + 1 -> write

The order of a user's interactions, the same in both paths: the stored timestamp (the input's
unit, truncated to an integer), then rows of earlier versions before rows of this one, then input
order (file, then row). Existing users keep their ids; new users are numbered after the current
maximum by (bucket, raw id: numeric when every new raw id of the bucket is an integer), where
bucket = a stable hash of the raw id modulo ``n_buckets`` (1 for small data: plain sorted order).
The driver holds one number per bucket, never a user id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fearec_dist.data.sequences import list_csr
from fearec_dist.storage import resolve

RECORD_SCHEMA = pa.schema(
    [
        ("bucket", pa.int32()),
        ("user_raw", pa.string()),
        ("user", pa.int32()),
        ("src", pa.int8()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
        ("orders", pa.list_(pa.int64())),
    ]
)


def buckets_of(raw: pa.Array, n_buckets: int) -> np.ndarray:
    """A stable hash of each raw id (pandas' SipHash with its fixed key) modulo ``n_buckets``."""
    if n_buckets == 1:
        return np.zeros(len(raw), dtype=np.int32)
    values = np.asarray(raw.to_numpy(zero_copy_only=False), dtype=object)
    return (pd.util.hash_array(values) % np.uint64(n_buckets)).astype(np.int32)


def _lists(offsets: np.ndarray, values: np.ndarray, tp: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, tp))


class SequencesToRecords:
    """Ray Data UDF: the parent version's sequences -> records (src 0; order = position)."""

    def __init__(self, n_buckets: int) -> None:
        self.n_buckets = n_buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        off, items = list_csr(batch.column("items"))
        _, ts = list_csr(batch.column("timestamps"))
        lens = np.diff(off)
        pos = np.arange(off[-1]) - np.repeat(off[:-1], lens)
        raw = batch.column("user_raw").combine_chunks()
        return pa.table(
            {
                "bucket": pa.array(buckets_of(raw, self.n_buckets)),
                "user_raw": raw,
                "user": batch.column("user").cast(pa.int32()),
                "src": pa.array(np.zeros(batch.num_rows, dtype=np.int8)),
                "items": _lists(off, items.to_numpy(zero_copy_only=False), pa.int32()),
                "timestamps": _lists(off, ts.to_numpy(zero_copy_only=False), pa.int64()),
                "orders": _lists(off, pos.astype(np.int64), pa.int64()),
            },
            schema=RECORD_SCHEMA,
        )


class RowsToRecords:
    """Ray Data UDF: standard rows (user, item, time, order) -> one record per user of the block
    (src 1), items as ids of ``item_vocab`` (raw ids in id order)."""

    def __init__(self, item_vocab: pa.Array, n_buckets: int) -> None:
        self.item_vocab, self.n_buckets = item_vocab, n_buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        if batch.num_rows == 0:
            return RECORD_SCHEMA.empty_table()
        enc = pc.dictionary_encode(batch.column("user").combine_chunks())
        code = enc.indices.to_numpy()
        perm = np.argsort(code, kind="stable")
        counts = np.bincount(code, minlength=len(enc.dictionary))
        off = np.r_[0, np.cumsum(counts)]
        item = pc.index_in(batch.column("item"), value_set=self.item_vocab).to_numpy() + 1
        t = batch.column("time").to_numpy().astype(np.int64)  # the stored (truncated) unit
        order = batch.column("order").to_numpy()
        raw = enc.dictionary
        return pa.table(
            {
                "bucket": pa.array(buckets_of(raw, self.n_buckets)),
                "user_raw": raw,
                "user": pa.array(np.full(len(raw), -1, dtype=np.int32)),
                "src": pa.array(np.ones(len(raw), dtype=np.int8)),
                "items": _lists(off, item[perm].astype(np.int32), pa.int32()),
                "timestamps": _lists(off, t[perm], pa.int64()),
                "orders": _lists(off, order[perm].astype(np.int64), pa.int64()),
            },
            schema=RECORD_SCHEMA,
        )


def _numeric_order(raw: pa.Array) -> np.ndarray:
    try:
        return np.argsort(pc.cast(raw, pa.int64()).to_numpy(), kind="stable")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return np.argsort(np.asarray(raw.to_numpy(zero_copy_only=False), dtype=object),
                          kind="stable")  # fmt: skip


class Merge:
    """Ray Data UDF on one hash partition by bucket: records -> one row per user (its merged,
    ordered sequence), with ``rank`` (new users: 0-based inside the bucket; -1 otherwise)."""

    def __call__(self, t: pa.Table) -> pa.Table:
        if t.num_rows == 0:
            return _merged_empty()
        off, items = list_csr(t.column("items"))
        _, ts = list_csr(t.column("timestamps"))
        _, order = list_csr(t.column("orders"))
        items = items.to_numpy(zero_copy_only=False)
        ts, order = ts.to_numpy(zero_copy_only=False), order.to_numpy(zero_copy_only=False)
        lens = np.diff(off)
        enc = pc.dictionary_encode(t.column("user_raw").combine_chunks())
        code, raws = enc.indices.to_numpy(), enc.dictionary
        n_users = len(raws)
        uid = np.full(n_users, -1, dtype=np.int64)
        np.maximum.at(uid, code, t.column("user").to_numpy().astype(np.int64))
        ubucket = np.zeros(n_users, dtype=np.int32)
        ubucket[code] = t.column("bucket").to_numpy()
        rec = np.repeat(np.arange(t.num_rows), lens)
        e_code, e_src = code[rec], t.column("src").to_numpy()[rec]
        perm = np.lexsort((order, e_src, ts, e_code))
        counts = np.bincount(e_code, minlength=n_users)
        offsets = np.r_[0, np.cumsum(counts)]
        rank = np.full(n_users, -1, dtype=np.int64)
        new = uid < 0
        for b in np.unique(ubucket[new]):
            idx = np.flatnonzero(new & (ubucket == b))
            rank[idx[_numeric_order(raws.take(pa.array(idx)))]] = np.arange(len(idx))
        return pa.table(
            {
                "bucket": pa.array(ubucket),
                "user_raw": raws,
                "user": pa.array(uid),
                "rank": pa.array(rank),
                "items": _lists(offsets, items[perm].astype(np.int32), pa.int32()),
                "timestamps": _lists(offsets, ts[perm].astype(np.int64), pa.int64()),
            }
        )


def _merged_empty() -> pa.Table:
    return pa.table(
        {
            "bucket": pa.array([], pa.int32()),
            "user_raw": pa.array([], pa.string()),
            "user": pa.array([], pa.int64()),
            "rank": pa.array([], pa.int64()),
            "items": pa.array([], pa.list_(pa.int32())),
            "timestamps": pa.array([], pa.list_(pa.int64())),
        }
    )


def block_stats(t: pa.Table) -> pa.Table:
    """Per bucket of a merged block: new users (rows with a rank) and the largest rank + 1; and
    the block's sequence lengths and time range (as the bucket -1 row)."""
    lens = np.diff(list_csr(t.column("items"))[0]) if t.num_rows else np.zeros(0, np.int64)
    ts = list_csr(t.column("timestamps"))[1].to_numpy() if t.num_rows else np.zeros(0)
    rank, bucket = t.column("rank").to_numpy(), t.column("bucket").to_numpy()
    some, any_t = len(lens) > 0, len(ts) > 0
    rows = {
        "bucket": [-1],
        "a": [len(lens)],
        "b": [int(lens.sum())],
        "c": [int(lens.min()) if some else 0],
        "d": [int(lens.max()) if some else 0],
        "e": [int(ts.min()) if any_t else 0],
        "f": [int(ts.max()) if any_t else 0],
    }
    for b in np.unique(bucket[rank >= 0]):
        r = rank[(bucket == b) & (rank >= 0)]
        for key, value in zip("abcdef", (len(r), int(r.max()) + 1, 0, 0, 0, 0)):
            rows[key].append(value)
        rows["bucket"].append(int(b))
    return pa.table({k: pa.array(v, pa.int64()) for k, v in rows.items()})


class AssignIds:
    """Ray Data UDF: merged rows -> the layout's sequence rows, new users numbered
    ``offsets[bucket] + rank + 1``."""

    def __init__(self, offsets: np.ndarray) -> None:
        self.offsets = offsets

    def __call__(self, t: pa.Table) -> pa.Table:
        uid, rank = t.column("user").to_numpy(), t.column("rank").to_numpy()
        new = self.offsets[t.column("bucket").to_numpy()] + rank + 1
        user = np.where(rank >= 0, new, uid).astype(np.int32)
        return pa.table(
            {
                "user": pa.array(user),
                "items": t.column("items"),
                "timestamps": t.column("timestamps"),
                "user_raw": t.column("user_raw"),
            }
        )


def merge_sequences(
    parent_sequences: Any, rows: Any, item_vocab: pa.Array, n_old_users: int, n_parts: int,
    task_cpus: float,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The merged, id-assigned sequences (a lazy Ray dataset over a materialized merge) and
    their stats: ``n_users``, ``new_users``, ``lengths`` (n, sum, min, max), ``time`` (min, max).

    Args:
        parent_sequences: the parent version's sequences (user, items, timestamps, user_raw),
            or None for a full prepare.
        rows: the new standard rows (after filters).
        item_vocab: every raw item id in id order (the parent's, then the new ones).
        n_old_users: the parent's user count (new ids start after it).
        n_parts: hash partitions of the merge.
    """
    n_buckets = 1 if n_parts == 1 else 4 * n_parts
    recs = rows.map_batches(RowsToRecords(item_vocab, n_buckets), batch_format="pyarrow",
                            batch_size=None, num_cpus=task_cpus)  # fmt: skip
    if parent_sequences is not None:
        old = parent_sequences.map_batches(SequencesToRecords(n_buckets), batch_format="pyarrow",
                                           num_cpus=task_cpus)  # fmt: skip
        recs = old.union(recs)
    merged = (
        recs.repartition(n_parts, keys=["bucket"])
        .map_batches(Merge(), batch_format="pyarrow", batch_size=None, num_cpus=task_cpus)
        .materialize()
    )
    new_per_bucket = np.zeros(n_buckets, dtype=np.int64)
    seen_per_bucket = np.zeros(n_buckets, dtype=np.int64)
    n, total, lo, hi = 0, 0, None, None
    t_lo, t_hi = None, None
    stats = merged.map_batches(block_stats, batch_format="pyarrow", batch_size=None)
    for part in stats.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in part.to_pylist():
            if row["bucket"] < 0:
                if row["a"] == 0:
                    continue
                n, total = n + row["a"], total + row["b"]
                lo = row["c"] if lo is None else min(lo, row["c"])
                hi = row["d"] if hi is None else max(hi, row["d"])
                t_lo = row["e"] if t_lo is None else min(t_lo, row["e"])
                t_hi = row["f"] if t_hi is None else max(t_hi, row["f"])
            else:
                seen_per_bucket[row["bucket"]] += row["a"]
                new_per_bucket[row["bucket"]] = max(new_per_bucket[row["bucket"]], row["b"])
    if not np.array_equal(seen_per_bucket, new_per_bucket):
        bad = int(np.flatnonzero(seen_per_bucket != new_per_bucket)[0])
        raise RuntimeError(
            f"prepare: bucket {bad}'s new users were split across merge tasks; the hash "
            "partition must keep each bucket whole (check DataContext.shuffle_strategy)"
        )
    offsets = n_old_users + np.r_[0, np.cumsum(new_per_bucket)[:-1]]
    out = merged.map_batches(AssignIds(offsets), batch_format="pyarrow", batch_size=None,
                             num_cpus=task_cpus)  # fmt: skip
    return out, {
        "n_users": n,
        "new_users": int(new_per_bucket.sum()),
        "lengths": {"n": n, "sum": total, "min": lo or 0, "max": hi or 0},
        "time": {"min": t_lo, "max": t_hi},
    }


def time_range(old: dict | None, new: dict[str, Any]) -> dict[str, Any]:
    """The union of two ``{"min", "max"}`` time ranges (None where unknown)."""
    lows = [x for x in ((old or {}).get("min"), new.get("min")) if x is not None]
    highs = [x for x in ((old or {}).get("max"), new.get("max")) if x is not None]
    return {"min": min(lows) if lows else None, "max": max(highs) if highs else None}


def read_item_vocab(parent_uri: str | None, storage: Any) -> tuple[list[str], np.ndarray]:
    """A version's raw item ids in id order and their counts ([] for none)."""
    if parent_uri is None:
        return [], np.zeros(0, dtype=np.int64)
    import pyarrow.parquet as pq

    fs, path = resolve(f"{parent_uri}/vocab/items.parquet", storage)
    table = pq.read_table(path, filesystem=fs).sort_by("id")
    return table.column("raw").to_pylist(), table.column("count").to_numpy().astype(np.int64)

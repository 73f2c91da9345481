"""Records and the per-user merge: the pieces ``data/buckets.py`` assembles into the one write
path of ``prepare`` (no previous sequences) and ``prepare --append`` (the parent version's).

A *record* is one user's interactions from one source: new rows (``RowsToRecords``: one record
per user and input block, src 1) or a stored sequence (``sequence_records``: src 0, order =
position). ``merge_records`` merges every record of one user bucket into one row per user.

The order of a user's interactions, the same in both paths: the stored timestamp (the input's
unit, truncated to an integer), then rows of earlier versions before rows of this one, then input
order (file, then row). Existing users keep their ids; new users are numbered after the current
maximum by (bucket, raw id: numeric when every new raw id of the bucket is an integer), where
bucket = a stable hash of the raw id modulo the dataset's bucket count (1 for small data: plain
sorted order). The driver holds one number per bucket, never a user id.
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
# one row per user of a version's sequences (and of a merged bucket, with ``user`` assigned)
SEQUENCE_SCHEMA = pa.schema(
    [
        ("user", pa.int32()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
        ("user_raw", pa.string()),
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


def sequence_records(batch: pa.Table, bucket: np.ndarray) -> pa.Table:
    """Stored sequences (user, items, timestamps, user_raw) -> records (src 0; order = the
    position in the sequence), ``bucket`` per row."""
    off, items = list_csr(batch.column("items"))
    _, ts = list_csr(batch.column("timestamps"))
    lens = np.diff(off)
    pos = np.arange(off[-1]) - np.repeat(off[:-1], lens)
    return pa.table(
        {
            "bucket": pa.array(bucket, pa.int32()),
            "user_raw": batch.column("user_raw").combine_chunks().cast(pa.string()),
            "user": batch.column("user").cast(pa.int32()),
            "src": pa.array(np.zeros(batch.num_rows, dtype=np.int8)),
            "items": _lists(off, items.to_numpy(zero_copy_only=False), pa.int32()),
            "timestamps": _lists(off, ts.to_numpy(zero_copy_only=False), pa.int64()),
            "orders": _lists(off, pos.astype(np.int64), pa.int64()),
        },
        schema=RECORD_SCHEMA,
    )


class SequencesToRecords:
    """Ray Data UDF: a version's sequences -> records (src 0), bucketed by ``n_buckets`` (only
    when a dataset is re-bucketed: its whole sequences go through the hash shuffle)."""

    def __init__(self, n_buckets: int) -> None:
        self.n_buckets = n_buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        raw = batch.column("user_raw").combine_chunks()
        return sequence_records(batch, buckets_of(raw, self.n_buckets))


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


def new_users(records: pa.Table, known: pa.Array | None = None) -> pa.Array:
    """The raw ids of one bucket's records that are new: no record carries an id for them, and
    they are not in ``known`` (the raw ids the parent's bucket file holds)."""
    enc = pc.dictionary_encode(records.column("user_raw").combine_chunks())
    uid = np.full(len(enc.dictionary), -1, dtype=np.int64)
    np.maximum.at(uid, enc.indices.to_numpy(), records.column("user").to_numpy().astype(np.int64))
    new = uid < 0
    if known is not None and len(known):
        new &= ~pc.is_in(enc.dictionary, value_set=known).to_numpy(zero_copy_only=False)
    return enc.dictionary.filter(pa.array(new))


def merge_records(t: pa.Table, first_new_id: int) -> pa.Table:
    """Every record of one bucket -> one row per user (``SEQUENCE_SCHEMA``): its interactions
    in the documented order; a user without an id gets ``first_new_id + rank`` (rank: by raw id,
    numeric when all of the bucket's new raw ids are integers)."""
    if t.num_rows == 0:
        return SEQUENCE_SCHEMA.empty_table()
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
    rec = np.repeat(np.arange(t.num_rows), lens)
    e_code, e_src = code[rec], t.column("src").to_numpy()[rec]
    perm = np.lexsort((order, e_src, ts, e_code))
    offsets = np.r_[0, np.cumsum(np.bincount(e_code, minlength=n_users))]
    new = np.flatnonzero(uid < 0)
    uid[new[_numeric_order(raws.take(pa.array(new)))]] = first_new_id + np.arange(len(new))
    return pa.table(
        {
            "user": pa.array(uid.astype(np.int32)),
            "items": _lists(offsets, items[perm].astype(np.int32), pa.int32()),
            "timestamps": _lists(offsets, ts[perm].astype(np.int64), pa.int64()),
            "user_raw": raws.cast(pa.string()),
        },
        schema=SEQUENCE_SCHEMA,
    )


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

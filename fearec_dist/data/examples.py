"""Training and evaluation examples, built once per max_seq_len by a Ray Data job.

Layout, beside the prepared data and keyed by L, the bucket count and the prepared fingerprint::

    <prepared>/examples/L<L>-K<K>-<fingerprint>/
        train/bucket-<b>/part-<first user>-<n users>.parquet
              history:fixed_size_list<int32>[L], length:int32, target:int32, user:int32
        valid/part-….parquet, test/part-….parquet    the same + seen:list<int32>
        info.json                                   written last: the commit marker

Training examples are written in buckets keyed by target (``bucket_of[target]``), so every
same-target group lives in one bucket and a worker that reads a bucket draws partners exactly,
without an all-pairs index and without a shuffle between workers (DESIGN.md). ``bucket_of`` is a
longest-processing-time assignment of items to buckets by interaction count (O(n_items log K)).
An item whose own group outgrows the average bucket simply gets a bucket to itself; it stays whole,
so pairing stays exact, and ``info.json`` records the largest bucket.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import posixpath
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fearec_dist.config import StorageSection
from fearec_dist.data.sequences import build_loo_examples
from fearec_dist.storage import read_json, resolve, write_json

EXAMPLES_VERSION = 1


def fingerprint(meta: dict[str, Any]) -> str:
    """A short stable hash of a prepared dataset's meta.json (its counts, sources and version)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:12]


def examples_uri(prepared_uri: str, meta: dict[str, Any], max_seq_len: int, n_buckets: int) -> str:
    return f"{prepared_uri.rstrip('/')}/examples/L{max_seq_len}-K{n_buckets}-{fingerprint(meta)}"


def assign_buckets(counts: np.ndarray, n_buckets: int) -> np.ndarray:
    """Greedy LPT: items by count descending, each into the currently lightest bucket.

    Args:
        counts: (n_items + 1,) interactions per item id (index 0 = padding, ignored).
        n_buckets: K.

    Returns:
        (n_items + 1,) int32 bucket of each item id.
    """
    bucket_of = np.zeros(len(counts), dtype=np.int32)
    heap = [(0, b) for b in range(n_buckets)]
    order = np.argsort(-counts[1:], kind="stable") + 1
    for item in order:
        load, b = heapq.heappop(heap)
        bucket_of[item] = b
        heapq.heappush(heap, (load + int(counts[item]), b))
    return bucket_of


def _history_array(history: np.ndarray, max_seq_len: int) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(history, dtype=np.int32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, max_seq_len)


def _csr_list_array(offsets: np.ndarray, items: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(items, pa.int32()))


def examples_table(split: dict[str, np.ndarray], max_seq_len: int) -> pa.Table:
    cols = {
        "history": _history_array(split["history"], max_seq_len),
        "length": pa.array(split["length"], pa.int32()),
        "target": pa.array(split["target"], pa.int32()),
        "user": pa.array(split["user"], pa.int32()),
    }
    if "seen_offsets" in split:
        cols["seen"] = _csr_list_array(split["seen_offsets"], split["seen_items"])
    return pa.table(cols)


def _batch_to_csr(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    items_col = batch.column("items").combine_chunks()
    offsets = items_col.offsets.to_numpy().astype(np.int64)
    offsets = offsets - offsets[0]
    items = items_col.flatten().to_numpy().astype(np.int32)
    users = batch.column("user").to_numpy().astype(np.int32)
    return offsets, items, users


class _ExampleWriter:
    """Ray Data UDF: one batch of user sequences -> example part files; returns their counts."""

    def __init__(
        self, out_uri: str, max_seq_len: int, bucket_of: np.ndarray, storage: StorageSection
    ) -> None:
        self.out_uri, self.max_seq_len, self.bucket_of = out_uri, max_seq_len, bucket_of
        self.storage = storage

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        offsets, items, users = _batch_to_csr(batch)
        splits = build_loo_examples(offsets, items, users, self.max_seq_len)
        fs, root = resolve(self.out_uri, self.storage)
        # A deterministic name per input batch: a retried task overwrites rather than duplicates.
        name = f"part-{int(users.min()) if len(users) else 0:010d}-{len(users):07d}.parquet"
        train = splits["train"]
        buckets = self.bucket_of[train["target"]]
        counts = np.bincount(buckets, minlength=int(self.bucket_of.max()) + 1)
        written = []
        for b in np.flatnonzero(counts):
            rows = {k: v[buckets == b] for k, v in train.items()}
            path = posixpath.join(root, "train", f"bucket-{b:05d}", name)
            fs.create_dir(posixpath.dirname(path), recursive=True)
            pq.write_table(examples_table(rows, self.max_seq_len), path, filesystem=fs)
            written.append(int(b))
        for split in ("valid", "test"):
            if len(splits[split]["target"]):
                fs.create_dir(posixpath.join(root, split), recursive=True)
                table = examples_table(splits[split], self.max_seq_len)
                pq.write_table(table, posixpath.join(root, split, name), filesystem=fs)
        return {
            "name": np.array([name]),
            "buckets": np.array([json.dumps(written)]),
            "bucket_counts": np.array([json.dumps(counts.tolist())]),
            "n_valid": np.array([len(splits["valid"]["target"])]),
            "n_test": np.array([len(splits["test"]["target"])]),
        }


def _item_counts(ds: Any, n_items: int) -> np.ndarray:
    """Interactions per item id, streamed block by block (constant driver memory)."""

    def count(batch: pa.Table) -> dict[str, np.ndarray]:
        flat = batch.column("items").combine_chunks().flatten().to_numpy()
        return {"counts": np.bincount(flat, minlength=n_items + 1)[None, :]}

    total = np.zeros(n_items + 1, dtype=np.int64)
    for b in ds.map_batches(count, batch_format="pyarrow").iter_batches(batch_size=1):
        total += b["counts"][0]
    return total


def build_examples(
    prepared_uri: str,
    max_seq_len: int,
    n_buckets: int,
    storage: StorageSection | None = None,
    *,
    rebuild: bool = False,
) -> dict[str, Any]:
    """Builds (or finds cached) examples for ``max_seq_len`` and returns their ``info.json``.

    Args:
        prepared_uri: the output of ``fearec-dist prepare`` (local path or URI).
        max_seq_len: L.
        n_buckets: K target-keyed buckets of training examples (K >> workers).
        storage: object-storage options for both URIs.
        rebuild: ignore a cached build.

    Returns:
        info dict: ``uri``, ``n_train``, ``n_valid``, ``n_test``, ``buckets`` (list of
        ``{"bucket", "n", "paths"}``), ``n_items``, ``n_users``, ``max_seq_len``, ``fingerprint``.
    """
    import ray.data

    storage = storage or StorageSection()
    meta = read_json(f"{prepared_uri.rstrip('/')}/meta.json", storage)
    out_uri = examples_uri(prepared_uri, meta, max_seq_len, n_buckets)
    if not rebuild:
        try:
            info = read_json(f"{out_uri}/info.json", storage)
            if info.get("version") == EXAMPLES_VERSION:
                return info
        except (FileNotFoundError, OSError, ValueError):
            pass
    start = time.time()
    fs, seq_root = resolve(f"{prepared_uri.rstrip('/')}/sequences", storage)
    ds = ray.data.read_parquet(seq_root, filesystem=fs, columns=["user", "items"])
    n_items = int(meta["n_items"])
    bucket_of = assign_buckets(_item_counts(ds, n_items), n_buckets)
    writer = _ExampleWriter(out_uri, max_seq_len, bucket_of, storage)
    parts = ds.map_batches(writer, batch_format="pyarrow", batch_size=20_000).take_all()
    _, out_root = resolve(out_uri, storage)
    prefix = out_uri.rstrip("/")
    per_bucket: dict[int, dict[str, Any]] = {}
    n_valid = n_test = 0
    for part in parts:
        counts = json.loads(part["bucket_counts"])
        for b in json.loads(part["buckets"]):
            entry = per_bucket.setdefault(b, {"bucket": b, "n": 0, "paths": []})
            entry["n"] += counts[b]
            entry["paths"].append(f"{prefix}/train/bucket-{b:05d}/{part['name']}")
        n_valid += int(part["n_valid"])
        n_test += int(part["n_test"])
    buckets = [per_bucket[b] for b in sorted(per_bucket)]
    sizes = [b["n"] for b in buckets] or [0]
    info = {
        "version": EXAMPLES_VERSION,
        "uri": prefix,
        "prepared_uri": prepared_uri,
        "fingerprint": fingerprint(meta),
        "max_seq_len": max_seq_len,
        "n_buckets": n_buckets,
        "n_items": n_items,
        "n_users": int(meta["n_users"]),
        "n_train": int(sum(sizes)),
        "n_valid": n_valid,
        "n_test": n_test,
        "largest_bucket": int(max(sizes)),
        "buckets": buckets,
        "build_seconds": round(time.time() - start, 2),
    }
    write_json(f"{prefix}/info.json", info, storage)  # last: the commit marker
    return info

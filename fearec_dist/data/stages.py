"""The Ray Data stages of ``prepare`` (see ``prepare.py`` for the pipeline they form).

Each stage works block by block inside Ray tasks; what comes back to the driver is only
vocabulary-sized (per-id counts, the ignored column names), never the interaction rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fearec_dist.config import DataSection, StorageSection
from fearec_dist.data.formats import read_any
from fearec_dist.storage import read_bytes


class ReadFile:
    """Ray Data UDF: one input file -> standard rows (validated)."""

    def __init__(self, fmt: str, columns: dict[str, str], storage: StorageSection) -> None:
        self.fmt, self.columns, self.storage = fmt, columns, storage

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        path, index = str(batch["path"][0]), int(batch["index"][0])
        table, ignored = read_any(
            read_bytes(path, self.storage), path, self.fmt, index, self.columns
        )
        return table.append_column("ignored", pa.array([",".join(ignored)] * table.num_rows))


def value_counts(ds: Any) -> tuple[dict[str, int], dict[str, int]]:
    """Interactions per user and per item, in one pass: each block counts its own values and the
    driver merges the partial counts (vocabulary-sized state only, never the rows)."""

    def count(batch: pa.Table) -> pa.Table:
        parts = []
        for kind in ("user", "item"):
            vc = pc.value_counts(batch.column(kind))
            n = len(vc)
            parts.append(
                pa.table(
                    {
                        "kind": pa.array([kind] * n),
                        "value": vc.field("values"),
                        "n": vc.field("counts"),
                    }
                )
            )
        return pa.concat_tables(parts)

    acc: pa.Table | None = None
    for part in ds.map_batches(count, batch_format="pyarrow", batch_size=None).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        acc = part if acc is None else pa.concat_tables([acc, part])
        acc = (
            acc.group_by(["kind", "value"])
            .aggregate([("n", "sum")])
            .rename_columns(["kind", "value", "n"])
        )
    out: dict[str, dict[str, int]] = {"user": {}, "item": {}}
    if acc is not None:
        for kind in out:
            sub = acc.filter(pc.equal(acc["kind"], kind))
            out[kind] = dict(zip(sub["value"].to_pylist(), sub["n"].to_pylist()))
    return out["user"], out["item"]


def sorted_vocab(raw: list[str]) -> list[str]:
    try:
        return sorted(raw, key=int)
    except ValueError:
        return sorted(raw)


def filter_rows(ds: Any, fn: Any) -> Any:
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None)


def k_core(
    ds: Any, min_user: int, min_item: int, dropped: dict[str, int]
) -> tuple[Any, dict[str, int], dict[str, int]]:
    """Iterated k-core on users and items (until stable), counting the rows each reason removes
    (a row whose user and item both fall short counts under ``user_min_inter``)."""
    for key, k in (("user_min_inter", min_user), ("item_min_inter", min_item)):
        if k > 1:
            dropped.setdefault(key, 0)
    users, items = value_counts(ds)
    while True:
        bad_u = {u for u, n in users.items() if n < min_user}
        bad_i = {i for i, n in items.items() if n < min_item}
        if not bad_u and not bad_i:
            return ds, users, items
        drop_u, drop_i = pa.array(sorted(bad_u), pa.string()), pa.array(sorted(bad_i), pa.string())
        before = sum(users.values())
        by_user = sum(users[u] for u in bad_u)

        def keep(batch: pa.Table, du=drop_u, di=drop_i) -> pa.Table:
            mask = pc.invert(pc.or_(pc.is_in(batch["user"], du), pc.is_in(batch["item"], di)))
            return batch.filter(mask)

        ds = filter_rows(ds, keep).materialize()
        users, items = value_counts(ds)
        removed = before - sum(users.values())
        if min_user > 1:
            dropped["user_min_inter"] += by_user
        if min_item > 1:
            dropped["item_min_inter"] += removed - by_user


class BuildSequences:
    """Ray Data UDF on a hash partition by user: ids -> per-user sorted sequences (numpy)."""

    def __init__(self, user_vocab: pa.Array, item_vocab: pa.Array) -> None:
        self.user_vocab, self.item_vocab = user_vocab, item_vocab

    def __call__(self, batch: pa.Table) -> pa.Table:
        user = pc.index_in(batch["user"], value_set=self.user_vocab).to_numpy() + 1
        item = pc.index_in(batch["item"], value_set=self.item_vocab).to_numpy() + 1
        t = batch["time"].to_numpy()
        order = np.lexsort((batch["order"].to_numpy(), t, user))  # user, then time, then input
        user, item, t = user[order], item[order], t[order]
        starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else []
        offsets = np.r_[starts, len(user)].astype(np.int32)
        return pa.table(
            {
                "user": pa.array(user[starts].astype(np.int32)),
                "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(item, pa.int32())),
                # int64 per the layout; sorting above used the full-precision value
                "timestamps": pa.ListArray.from_arrays(
                    pa.array(offsets), pa.array(t.astype(np.int64))
                ),
            }
        )


def read_rows(files: list[str], fmt: str, data: DataSection, storage: StorageSection) -> Any:
    """One Ray Data task per input file -> validated standard rows (materialized, distributed)."""
    import ray.data

    listing = ray.data.from_items(
        [{"path": f, "index": i} for i, f in enumerate(files)], override_num_blocks=len(files)
    )
    reader = ReadFile(fmt, data.columns, storage)
    return listing.map_batches(reader, batch_size=1, batch_format="numpy").materialize()


def ignored_columns(rows: Any) -> list[str]:
    """Union of the per-file ignored column lists (one small value per block)."""

    def uniq(batch: pa.Table) -> pa.Table:
        return pa.table({"ignored": pc.unique(batch["ignored"])})

    names: set[str] = set()
    for part in rows.map_batches(uniq, batch_format="pyarrow", batch_size=None).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        names.update(c for v in part["ignored"].to_pylist() for c in v.split(",") if c)
    return sorted(names)


def check_one_row_per_user(fs: Any, path: str, n_users: int) -> None:
    """Footer-only row count of the written sequences: a user split over two partitions would
    show up as extra rows (the hash shuffle must keep each partition whole)."""
    import pyarrow.dataset as pads

    n_rows = pads.dataset(path, filesystem=fs, format="parquet").count_rows()
    if n_rows != n_users:
        raise RuntimeError(
            f"prepare: wrote {n_rows} sequence rows for {n_users} users; the per-user grouping "
            "split a user across partitions (check DataContext.shuffle_strategy)"
        )

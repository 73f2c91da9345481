"""The Ray Data stages of ``prepare`` (see ``prepare.py`` for the pipeline they form).

Each stage works block by block inside Ray tasks; what comes back to the driver is only
vocabulary-sized (per-id counts, the ignored column names), never the interaction rows.
"""

from __future__ import annotations

import json
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
        partition = json.loads(str(batch["partition"][0]))
        table, ignored = read_any(
            read_bytes(path, self.storage), path, self.fmt, index, self.columns, partition
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


def item_counts(ds: Any) -> dict[str, int]:
    """Interactions per item (vocabulary-sized: the users are never counted in the driver)."""

    def count(batch: pa.Table) -> pa.Table:
        vc = pc.value_counts(batch.column("item"))
        return pa.table({"value": vc.field("values"), "n": vc.field("counts")})

    acc: pa.Table | None = None
    for part in ds.map_batches(count, batch_format="pyarrow", batch_size=None).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        acc = part if acc is None else pa.concat_tables([acc, part])
        acc = acc.group_by("value").aggregate([("n", "sum")]).rename_columns(["value", "n"])
    if acc is None:
        return {}
    return dict(zip(acc["value"].to_pylist(), acc["n"].to_pylist()))


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


def read_rows(files: list[Any], fmt: str, data: DataSection, storage: StorageSection) -> Any:
    """One Ray Data task per input file (an ``InputFile`` or a URI) -> validated standard rows
    (materialized, distributed); Hive/Delta partition values become columns of the file's rows.
    Row order key: the file's position in ``files`` << 40 | its row."""
    import ray.data

    items = [
        {"path": getattr(f, "uri", f), "index": i,
         "partition": json.dumps(getattr(f, "partition", {}))}
        for i, f in enumerate(files)
    ]  # fmt: skip
    listing = ray.data.from_items(items, override_num_blocks=max(1, len(files)))
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

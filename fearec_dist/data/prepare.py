"""``fearec-dist prepare``: raw interaction logs -> a prepared dataset, as a Ray Data job.

    read (one task per input file) -> validate -> [filters] -> id vocab -> hash-repartition by
    user -> per-user sequences sorted by (time, input order), vectorised -> write

Output layout (DESIGN.md)::

    <out>/sequences/*.parquet   user:int32, items:list<int32> (time-ordered),
                                timestamps:list<double>
    <out>/vocab/items.parquet   id:int32 (1..n_items, 0 = padding), raw:string, count:int64
    <out>/vocab/users.parquet   id:int32 (1..n_users), raw:string
    <out>/attributes.parquet    item:int32, attrs:list<int32> (1..n_attributes), when given
    <out>/meta.json             written last: its presence marks a complete dataset

Ids: raw ids sorted (numerically when every raw id is an integer, else as strings) and numbered
from 1, so the numbering does not depend on file order or parallelism (Beauty keeps its ids).
No step collects the interaction table into one process: the driver holds only the vocabularies
and per-id counts. Filters (k-core on users/items, rating threshold) are off by default; what
they remove is counted in ``meta.json['dropped']`` and printed. On failure the partial output is
deleted and no ``meta.json`` is written.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fearec_dist.config import DataSection, StorageSection
from fearec_dist.data import attributes as attrs_mod
from fearec_dist.data.errors import DataError
from fearec_dist.data.formats import read_any
from fearec_dist.data.sources import delete_dir, list_files, read_bytes, write_json

FORMAT_VERSION = 1
SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "atomic": (".inter",),
    "seqtxt": (".txt",),
}


def parse_columns(text: str) -> dict[str, str]:
    """``"user=uid,item=iid,time=ts"`` -> ``{"user": "uid", ...}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise DataError(f"--columns: expected field=column, got {part!r}")
        out[key.strip()] = value.strip()
    return out


class _ReadFile:
    """Ray Data UDF: one input file -> standard rows (validated)."""

    def __init__(self, fmt: str, columns: dict[str, str], storage: dict) -> None:
        self.fmt, self.columns, self.storage = fmt, columns, StorageSection(**storage)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        path, index = str(batch["path"][0]), int(batch["index"][0])
        table, ignored = read_any(
            read_bytes(path, self.storage), path, self.fmt, index, self.columns
        )
        return table.append_column("ignored", pa.array([",".join(ignored)] * table.num_rows))


def _value_counts(ds: Any, column: str) -> dict[str, int]:
    """Counts per distinct value, combined in the driver (vocabulary-sized state only)."""

    def count(batch: pa.Table) -> pa.Table:
        vc = pc.value_counts(batch.column(column))
        return pa.table({"value": vc.field("values"), "n": vc.field("counts")})

    totals: dict[str, int] = {}
    for part in ds.map_batches(count, batch_format="pyarrow", batch_size=None).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        for v, n in zip(part.column("value").to_pylist(), part.column("n").to_pylist()):
            totals[v] = totals.get(v, 0) + n
    return totals


def _sorted_vocab(raw: list[str]) -> list[str]:
    try:
        return sorted(raw, key=int)
    except ValueError:
        return sorted(raw)


def _filter_rows(ds: Any, fn: Any) -> Any:
    return ds.map_batches(fn, batch_format="pyarrow", batch_size=None)


def _k_core(
    ds: Any, min_user: int, min_item: int, dropped: dict[str, int]
) -> tuple[Any, dict[str, int], dict[str, int]]:
    """Iterated k-core on users and items (until stable); counts what each pass removes."""
    users, items = _value_counts(ds, "user"), _value_counts(ds, "item")
    while True:
        bad_u = {u for u, n in users.items() if n < min_user}
        bad_i = {i for i, n in items.items() if n < min_item}
        if not bad_u and not bad_i:
            return ds, users, items
        drop_u, drop_i = pa.array(sorted(bad_u), pa.string()), pa.array(sorted(bad_i), pa.string())
        before = sum(users.values())

        def keep(batch: pa.Table, du=drop_u, di=drop_i) -> pa.Table:
            mask = pc.invert(pc.or_(pc.is_in(batch["user"], du), pc.is_in(batch["item"], di)))
            return batch.filter(mask)

        ds = _filter_rows(ds, keep).materialize()
        users, items = _value_counts(ds, "user"), _value_counts(ds, "item")
        removed = before - sum(users.values())
        key = "user_min_inter" if bad_u else "item_min_inter"
        dropped[key] = dropped.get(key, 0) + removed


class _BuildSequences:
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
                "timestamps": pa.ListArray.from_arrays(pa.array(offsets), pa.array(t)),
            }
        )


def prepare_dataset(
    input_uri: str,
    fmt: str,
    output_uri: str,
    *,
    data: DataSection | None = None,
    attributes_uri: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the prepare job and returns the written ``meta.json`` content.

    Args:
        input_uri: file, directory, glob or URI (ignored for ``fmt="synthetic"``).
        fmt: ``parquet``, ``csv``, ``atomic``, ``seqtxt`` or ``synthetic``.
        output_uri: where the prepared dataset goes.
        data: filters, column mapping and storage options (defaults: none).
        attributes_uri: item attributes (RecBole ``.item`` or ``item2attributes.json``).
        progress: show Ray Data's progress bars.

    Raises:
        DataError: bad or unreachable input, naming the file and row or column.
    """
    import ray.data

    data = data or DataSection()
    storage = data.storage
    ray.data.DataContext.get_current().enable_progress_bars = progress
    start = time.time()
    out = output_uri.rstrip("/")
    if fmt == "synthetic":
        from fearec_dist.data.synthetic import write_synthetic

        input_uri = f"{out}.raw"
        write_synthetic(
            input_uri,
            storage=storage,
            n_users=data.synthetic_users,
            n_items=data.synthetic_items,
            seed=data.seed,
        )
        fmt = "parquet"
    if fmt not in SUFFIXES:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(SUFFIXES)} or synthetic")
    files = list_files(input_uri, storage, SUFFIXES[fmt])
    delete_dir(out, storage)
    try:
        meta = _run(files, fmt, out, data, storage, attributes_uri, input_uri)
    except BaseException as err:
        delete_dir(out, storage)
        raise _unwrap(err) from None
    meta["seconds"] = round(time.time() - start, 2)
    write_json(f"{out}/meta.json", meta, storage)  # last: the commit marker
    return meta


def _run(files, fmt, out, data, storage, attributes_uri, input_uri) -> dict[str, Any]:
    import ray.data

    listing = ray.data.from_items(
        [{"path": f, "index": i} for i, f in enumerate(files)], override_num_blocks=len(files)
    )
    reader = _ReadFile(fmt, data.columns, storage.__dict__)
    rows = listing.map_batches(reader, batch_size=1, batch_format="numpy").materialize()
    n_read = rows.count()
    if n_read == 0:
        raise DataError(f"{input_uri}: the input has no interactions")
    ignored = sorted({c for v in rows.unique("ignored") for c in v.split(",") if c})
    rows = rows.drop_columns(["ignored"])
    dropped: dict[str, int] = {}
    if data.rating_threshold is not None:
        if "rating" not in rows.schema().names:
            raise DataError(f"data.rating_threshold is set but {input_uri} has no rating column")
        thr = data.rating_threshold
        rows = _filter_rows(rows, lambda b: b.filter(pc.greater_equal(b["rating"], thr)))
        rows = rows.materialize()
        dropped["rating_below_threshold"] = n_read - rows.count()
    if data.min_user_inter > 1 or data.min_item_inter > 1:
        rows, users, items = _k_core(rows, data.min_user_inter, data.min_item_inter, dropped)
    else:
        users, items = _value_counts(rows, "user"), _value_counts(rows, "item")
    if not users:
        raise DataError(f"{input_uri}: no interactions left after filtering ({dropped})")
    user_raw, item_raw = _sorted_vocab(list(users)), _sorted_vocab(list(items))
    user_vocab, item_vocab = pa.array(user_raw, pa.string()), pa.array(item_raw, pa.string())
    n_blocks = max(1, min(64, sum(users.values()) // 200_000 + 1))
    seqs = rows.repartition(n_blocks, keys=["user"]).map_batches(
        _BuildSequences(user_vocab, item_vocab), batch_format="pyarrow", batch_size=None
    )
    from fearec_dist.data.sources import resolve

    fs, root = resolve(out, storage)
    seqs.write_parquet(f"{root}/sequences", filesystem=fs)
    _write_vocab(out, "items", item_raw, [items[i] for i in item_raw], storage)
    _write_vocab(out, "users", user_raw, None, storage)
    n_inter = int(sum(users.values()))
    lengths = np.array([users[u] for u in user_raw])
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "n_users": len(user_raw),
        "n_items": len(item_raw),
        "n_interactions": n_inter,
        "n_read": int(n_read),
        "dropped": dropped,
        "ignored_columns": ignored,
        "sequence_length": {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 2),
            "max": int(lengths.max()),
        },
        "sources": {"input": input_uri, "format": fmt, "files": len(files)},
        "filters": {
            "min_user_inter": data.min_user_inter,
            "min_item_inter": data.min_item_inter,
            "rating_threshold": data.rating_threshold,
        },
    }
    if attributes_uri:
        meta |= attrs_mod.write_attributes(attributes_uri, item_raw, out, storage)
        meta["sources"]["attributes"] = attributes_uri
    return meta


def _write_vocab(out: str, name: str, raw: list[str], counts: list[int] | None, storage) -> None:
    import pyarrow.parquet as pq

    from fearec_dist.data.sources import resolve

    cols = {"id": pa.array(np.arange(1, len(raw) + 1, dtype=np.int32)), "raw": pa.array(raw)}
    if counts is not None:
        cols["count"] = pa.array(counts, pa.int64())
    fs, root = resolve(f"{out}/vocab", storage)
    fs.create_dir(root, recursive=True)
    pq.write_table(pa.table(cols), f"{root}/{name}.parquet", filesystem=fs)


def _unwrap(err: BaseException) -> BaseException:
    """Ray wraps a task's exception; return our DataError (with its message) when it is one."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DataError):
            return DataError(str(e).split("DataError: ")[-1].strip())
        e = getattr(e, "cause", None) or e.__cause__
    text = str(err)
    if "DataError: " in text:
        return DataError(text.rsplit("DataError: ", 1)[-1].strip().splitlines()[0])
    return err


def format_summary(meta: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of ``prepare``."""
    lines = [
        "prepared dataset",
        f"  users         {meta['n_users']:>12,}",
        f"  items         {meta['n_items']:>12,}",
        f"  interactions  {meta['n_interactions']:>12,}  (read {meta['n_read']:,})",
        f"  per user      min {meta['sequence_length']['min']}, "
        f"mean {meta['sequence_length']['mean']}, max {meta['sequence_length']['max']}",
    ]
    for reason, n in meta.get("dropped", {}).items():
        lines.append(f"  dropped       {n:>12,}  ({reason})")
    if not meta.get("dropped"):
        lines.append("  dropped                  0  (no filters)")
    if meta.get("ignored_columns"):
        lines.append(f"  ignored columns: {', '.join(meta['ignored_columns'])}")
    if "n_attributes" in meta:
        lines.append(
            f"  attributes    {meta['n_attributes']:>12,}  "
            f"({meta['items_with_attributes']:,} items)"
        )
    lines.append(f"  took {meta.get('seconds', 0):.1f} s")
    return "\n".join(lines)

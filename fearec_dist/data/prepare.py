"""``fearec-dist prepare``: raw interaction logs -> a prepared dataset, as a Ray Data job.

    read (one task per input file) -> validate -> [filters] -> id vocab -> hash-repartition by
    user -> per-user sequences sorted by (time, input order), vectorised -> write

Output layout (DESIGN.md)::

    <out>/sequences/*.parquet   user:int32, items:list<int32> (time-ordered),
                                timestamps:list<int64> (input unit truncated; seqtxt: position)
    <out>/vocab/items.parquet   id:int32 (1..n_items, 0 = padding), raw:string, count:int64
    <out>/vocab/users.parquet   id:int32 (1..n_users), raw:string
    <out>/attributes.parquet    item:int32, attrs:list<int32> (1..n_attributes), when given
    <out>/meta.json             written last: its presence marks a complete dataset

Ids: raw ids sorted (numerically when every raw id is an integer, else as strings) and numbered
from 1, so the numbering does not depend on file order or parallelism (Beauty keeps its ids).
No step collects the interaction table into one process: the driver holds only the vocabularies
and per-id counts. Filters (k-core on users/items, rating threshold) are off by default; what
they remove is counted in ``meta.json['dropped']`` and printed.

Commit protocol: everything else is written first and ``meta.json`` last, so a dataset without
``meta.json`` is incomplete (readers check for it). On failure the partial output is deleted. An
existing output is replaced only when it holds nothing but a prepared layout (and its
``examples/`` cache); anything else there is an error, never a silent deletion.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fearec_dist.config import DataSection, StorageSection
from fearec_dist.data import attributes as attrs_mod
from fearec_dist.data import stages
from fearec_dist.data.synthetic import write_synthetic
from fearec_dist.errors import DataError
from fearec_dist.storage import (
    delete_dir,
    list_children,
    list_files,
    redact,
    resolve,
    write_json,
)

FORMAT_VERSION = 1
ROWS_PER_PARTITION = 200_000  # interactions per hash partition of the per-user grouping step
MAX_PARTITIONS = 1024
LAYOUT = {"sequences", "vocab", "attributes.parquet", "meta.json", "examples"}
FIELDS = ("user", "item", "time", "rating")
SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "atomic": (".inter",),
    "seqtxt": (".txt",),
}


def parse_columns(text: str) -> dict[str, str]:
    """Parses the CLI's column mapping.

    Args:
        text: ``"user=uid,item=iid,time=ts[,rating=r]"``.

    Returns:
        ``{"user": "uid", "item": "iid", "time": "ts"}`` (only the fields given).

    Raises:
        DataError: a part without ``=`` or an unknown field.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not value:
            raise DataError(f"--columns: expected field=column, got {part!r}")
        if key not in FIELDS:
            raise DataError(f"--columns: unknown field {key!r}; use {', '.join(FIELDS)}")
        out[key] = value
    return out


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

    Needs a running Ray instance (or starts a default one, as any Ray Data call does).

    Args:
        input_uri: file, directory, glob or URI (ignored for ``fmt="synthetic"``, which writes
            its generated log to ``<output_uri>.raw`` and prepares that).
        fmt: ``parquet``, ``csv``, ``atomic``, ``seqtxt`` or ``synthetic``.
        output_uri: where the prepared dataset goes.
        data: filters, column mapping and storage options (defaults: none).
        attributes_uri: item attributes (RecBole ``.item`` or ``item2attributes.json``).
        progress: show Ray Data's progress bars.

    Returns:
        The meta dict: ``n_users``, ``n_items``, ``n_interactions``, ``dropped``, ``sources``, …

    Raises:
        DataError: bad or unreachable input, naming the file and row or column; or an output
            location that holds something other than a prepared dataset.
    """
    import ray.data

    data = data or DataSection()
    storage = data.storage
    ray.data.DataContext.get_current().enable_progress_bars = progress
    start = time.time()
    out = output_uri.rstrip("/")
    if fmt == "synthetic":
        input_uri = f"{out}.raw"
        delete_dir(input_uri, storage)
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
    _clear_output(out, storage)
    try:
        meta = _run(files, fmt, out, data, storage, attributes_uri, input_uri)
    except BaseException as err:
        delete_dir(out, storage)
        raise _unwrap(err) from None
    meta["seconds"] = round(time.time() - start, 2)
    write_json(f"{out}/meta.json", meta, storage)  # last: the commit marker
    return meta


def _clear_output(out: str, storage: StorageSection) -> None:
    """Removes a previous prepared dataset at ``out``; refuses to touch anything else."""
    children = list_children(out, storage)
    foreign = sorted(set(children) - LAYOUT)
    if foreign:
        raise DataError(
            f"--output {redact(out)} already holds {', '.join(foreign[:5])}"
            f"{' …' if len(foreign) > 5 else ''}, which is not a prepared dataset; "
            "choose a new or empty location"
        )
    if children:
        delete_dir(out, storage)


def _run(
    files: list[str],
    fmt: str,
    out: str,
    data: DataSection,
    storage: StorageSection,
    attributes_uri: str | None,
    input_uri: str,
) -> dict[str, Any]:
    """read -> validate -> [filters] -> vocab -> per-user sequences -> write; returns meta."""
    rows = stages.read_rows(files, fmt, data, storage)
    n_read = rows.count()
    if n_read == 0:
        raise DataError(f"{redact(input_uri)}: the input has no interactions")
    ignored = stages.ignored_columns(rows)
    rows = rows.drop_columns(["ignored"])
    dropped: dict[str, int] = {}
    if data.rating_threshold is not None:
        if "rating" not in rows.schema().names:
            raise DataError(
                f"data.rating_threshold is set but {redact(input_uri)} has no rating column"
            )
        thr = data.rating_threshold
        rows = stages.filter_rows(rows, lambda b: b.filter(pc.greater_equal(b["rating"], thr)))
        rows = rows.materialize()
        dropped["rating_below_threshold"] = n_read - rows.count()
    if data.min_user_inter > 1 or data.min_item_inter > 1:
        rows, users, items = stages.k_core(rows, data.min_user_inter, data.min_item_inter, dropped)
    else:
        users, items = stages.value_counts(rows)
    if not users:
        raise DataError(f"{redact(input_uri)}: no interactions left after filtering ({dropped})")
    user_raw, item_raw = stages.sorted_vocab(list(users)), stages.sorted_vocab(list(items))
    user_vocab, item_vocab = pa.array(user_raw, pa.string()), pa.array(item_raw, pa.string())
    n_inter = int(sum(users.values()))
    n_parts = max(1, min(MAX_PARTITIONS, -(-n_inter // ROWS_PER_PARTITION)))
    # Hash-partition by user (each partition arrives whole at one task), then sort and cut each
    # partition into per-user lists with numpy; far faster than groupby().map_groups().
    seqs = rows.repartition(n_parts, keys=["user"]).map_batches(
        stages.BuildSequences(user_vocab, item_vocab), batch_format="pyarrow", batch_size=None
    )
    fs, root = resolve(out, storage)
    seqs.write_parquet(f"{root}/sequences", filesystem=fs)
    stages.check_one_row_per_user(fs, f"{root}/sequences", len(user_raw))
    _write_vocab(out, "items", item_raw, [items[i] for i in item_raw], storage)
    _write_vocab(out, "users", user_raw, None, storage)
    lengths = np.array([users[u] for u in user_raw])
    counts = np.array([items[i] for i in item_raw])
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "n_users": len(user_raw),
        "n_items": len(item_raw),
        "n_interactions": n_inter,
        "n_read": int(n_read),
        "dropped": dropped,
        "ignored_columns": ignored,
        "sequence_length": _summary(lengths),
        "item_interactions": _summary(counts),
        "sources": {"input": redact(input_uri), "format": fmt, "files": len(files)},
        "filters": {
            "min_user_inter": data.min_user_inter,
            "min_item_inter": data.min_item_inter,
            "rating_threshold": data.rating_threshold,
        },
        "id_order": "sorted raw ids (numeric when all are integers)",
    }
    if attributes_uri:
        meta |= attrs_mod.write_attributes(attributes_uri, item_raw, out, storage)
        meta["sources"]["attributes"] = redact(attributes_uri)
    return meta


def _summary(values: np.ndarray) -> dict[str, float]:
    return {
        "min": int(values.min()),
        "mean": round(float(values.mean()), 2),
        "max": int(values.max()),
    }


def _write_vocab(out: str, name: str, raw: list[str], counts: list[int] | None, storage) -> None:
    import pyarrow.parquet as pq

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
    if "item_interactions" in meta:
        per_item = meta["item_interactions"]
        lines.append(
            f"  per item      min {per_item['min']}, mean {per_item['mean']}, max {per_item['max']}"
        )
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
    lines.append(f"  source        {meta['sources']['input']} ({meta['sources']['format']})")
    lines.append(f"  took {meta.get('seconds', 0):.1f} s")
    return "\n".join(lines)

"""``fearec-dist prepare [--append]``: raw interaction logs -> a new version of a prepared
dataset, as a Ray Data job.

    list inputs (only the unconsumed ones for --append) -> read (one task per file) -> validate
    -> [filters] -> item vocab (driver) -> per user bucket: merge with the parent's bucket,
    users numbered by bucket (data/buckets.py) -> write versions/<N>-<id>/ -> commit
    (data/versions.py)

Layout of one version ``<v>`` = ``<root>/versions/<N>-<id>`` (docs/data.md, "The prepared
layout"): ``sequences/bucket-<b>.parquet`` (user, items, timestamps, user_raw; one file per
user bucket), ``vocab/items.parquet``, ``vocab/users/bucket-<b>.parquet``, ``buckets.parquet``,
``[attributes.parquet]``, ``inputs.json``, ``meta.json``; ``<root>/_commits/<N>.json`` is the
commit, created last and only if absent. A dataset written before versions reads as version 0.

Ids: items are the raw ids sorted (numerically when every raw id is an integer) at the first
prepare; an append numbers new items after the maximum, sorted the same way among themselves.
Users: see ``data/buckets.py`` (sorted raw ids for small data; the driver never holds them).
Filters (k-core on users/items, rating threshold) are off by default; what they remove is
counted in ``meta.json['dropped']`` and printed. ``--append`` refuses a dataset prepared with
k-core filters: they are global and iterative, so rows dropped before could come back.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fearec_dist import s3_policy
from fearec_dist.config import DataSection, StorageSection
from fearec_dist.data import attributes as attrs_mod
from fearec_dist.data import inputs as inputs_mod
from fearec_dist.data import stages
from fearec_dist.data.buckets import write_sequences
from fearec_dist.data.merge import read_item_vocab, time_range
from fearec_dist.data.partitions import InputFile
from fearec_dist.data.synthetic import write_synthetic
from fearec_dist.data.versions import (
    DatasetVersion,
    commit_version,
    list_versions,
    new_version_dir,
)
from fearec_dist.errors import DataError
from fearec_dist.storage import (
    delete_dir,
    exists,
    list_children,
    read_bytes,
    read_json,
    redact,
    resolve,
    storage_root,
    write_bytes,
    write_json,
)

FORMAT_VERSION = 2  # 2: versions, user_raw in the sequences, inputs.json
ROWS_PER_PARTITION = 200_000  # interactions per hash partition of the per-user grouping step
MAX_PARTITIONS = 1024
# An append that keeps its parent's buckets shuffles only the new rows, and each of its tasks
# rewrites the parent's buckets of its partition one at a time (memory: one bucket plus the
# partition's new rows): up to this many existing interactions a task. Partitions sized by
# ROWS_PER_PARTITION alone (200 at 40M) spent more CPU starting and tracking tasks than
# merging (measured: 30 s of CPU for a 40M append against 75 s for the full prepare).
REWRITE_ROWS_PER_TASK = 2_000_000
# CPUs of each of prepare's own Ray Data tasks (records, plan, merge + write): one, so a node
# runs as many at once as it has cores. Fractions (the data room's 0.25) ran 4 tasks a core,
# more worker processes than Ray keeps (its soft limit is the node's CPUs): the extra workers
# were killed between the job's stages and started again, ~1.5 s of CPU each (importing Ray
# Data): 20 processes started in a 10M append on 2 cores, 18 s of its 38 s of CPU (measured).
TASK_CPUS = 1.0
LAYOUT = {
    "sequences",
    "vocab",
    "attributes.parquet",
    "meta.json",
    "examples",
    "versions",
    "_commits",
}
FIELDS = ("user", "item", "time", "rating")
SUFFIXES = inputs_mod.SUFFIXES
FORMATS = (*SUFFIXES, "delta")


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


class NothingNew(Exception):
    """``--append`` found no unconsumed input: no new version (the CLI exits 0)."""


@s3_policy.s3_job(lambda *args, data=None, **kwargs: data and data.storage)
def prepare_dataset(
    input_uri: str,
    fmt: str,
    output_uri: str,
    *,
    data: DataSection | None = None,
    attributes_uri: str | None = None,
    progress: bool = True,
    append: bool = False,
) -> dict[str, Any]:
    """Runs the prepare job, commits a new version of ``output_uri``, returns its ``meta.json``.

    Needs a running Ray instance (or starts a default one, as any Ray Data call does).

    Args:
        input_uri: file, directory (plain or Hive-partitioned), glob, Delta table or URI
            (ignored for ``fmt="synthetic"``, which writes its generated log to
            ``<output_uri>.raw`` and prepares that).
        fmt: ``parquet``, ``csv``, ``atomic``, ``seqtxt``, ``delta`` or ``synthetic``.
        output_uri: the prepared dataset (its versions live under it).
        data: filters, column mapping and storage options (defaults: none).
        attributes_uri: item attributes (RecBole ``.item`` or ``item2attributes.json``).
        progress: show Ray Data's progress bars.
        append: read only what the newest version has not consumed, and merge it in.

    Returns:
        The meta dict: ``version``, ``n_users``, ``n_items``, ``n_interactions``, ``dropped``, …

    Raises:
        NothingNew: ``append`` and no unconsumed input (nothing written).
        CommitConflict: another writer committed the same version first.
        DataError: bad or unreachable input, naming the file and row or column; a refused
            append; an output location that holds something other than a prepared dataset.
    """
    import ray.data

    data = data or DataSection()
    storage = data.storage
    ray.data.DataContext.get_current().enable_progress_bars = progress
    start = time.time()
    root = storage_root(output_uri)
    if fmt == "synthetic":
        if append:
            raise DataError("--append: the synthetic generator has no new data to append")
        input_uri = f"{root}.raw"
        delete_dir(input_uri, storage)
        write_synthetic(input_uri, storage=storage, n_users=data.synthetic_users,
                        n_items=data.synthetic_items, seed=data.seed)  # fmt: skip
        fmt = "parquet"
    if fmt not in SUFFIXES and fmt != "delta":
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)} or synthetic")
    existed = exists(root, storage)
    _check_output(root, storage)
    versions = list_versions(root, storage)
    parent = (
        inputs_mod.appendable(root, versions, input_uri, fmt, data, storage) if append else None
    )
    consumed = read_json(f"{parent.uri}/inputs.json", storage) if parent else None
    files, inputs = inputs_mod.select(input_uri, fmt, storage, consumed)
    if not files:
        raise NothingNew(
            f"nothing new in {redact(input_uri)}: every input is already in version "
            f"{parent.version} of {redact(root)}; no version written"
        )
    version = versions[-1].version + 1 if versions else 1
    vdir = new_version_dir(root, version)
    out = f"{root}/{vdir}"
    try:
        meta = _run(files, fmt, out, data, storage, attributes_uri, input_uri, parent)
        meta |= {"version": version, "parent": versions[-1].version if versions else None,
                 "kind": "append" if append else "prepare"}  # fmt: skip
        meta["seconds"] = round(time.time() - start, 2)
        write_json(f"{out}/inputs.json", inputs, storage)
        write_json(f"{out}/meta.json", meta, storage)
        inputs_mod.pause_before_commit()
        commit_version(root, version, vdir, meta["parent"], meta["kind"], storage)
    except BaseException as err:
        with contextlib.suppress(DataError):
            delete_dir(out, storage)
            for path in (f"{root}/versions", root)[: 1 + (not existed)]:
                if not list_children(path, storage):  # only what this run created, empty
                    delete_dir(path, storage)
        raise _unwrap(err) from None
    return meta


def _check_output(root: str, storage: StorageSection) -> None:
    """Refuses an output that holds anything but a prepared dataset (never deletes it)."""
    foreign = sorted(set(list_children(root, storage)) - LAYOUT)
    if foreign:
        raise DataError(
            f"--output {redact(root)} already holds {', '.join(foreign[:5])}"
            f"{' …' if len(foreign) > 5 else ''}, which is not a prepared dataset; "
            "choose a new or empty location"
        )


def _run(
    files: list[InputFile],
    fmt: str,
    out: str,
    data: DataSection,
    storage: StorageSection,
    attributes_uri: str | None,
    input_uri: str,
    parent: DatasetVersion | None,
) -> dict[str, Any]:
    """read -> validate -> [filters] -> item vocab -> merge -> write; returns meta."""
    rows = stages.read_rows(files, "parquet" if fmt == "delta" else fmt, data, storage)
    n_read = rows.count()
    if n_read == 0 and not parent:
        raise DataError(f"{redact(input_uri)}: the input has no interactions")
    ignored = stages.ignored_columns(rows)
    rows = rows.drop_columns(["ignored"])
    pmeta = read_json(f"{parent.uri}/meta.json", storage) if parent else {}
    dropped: dict[str, int] = dict(pmeta.get("dropped", {}))
    if data.rating_threshold is not None:
        if "rating" not in rows.schema().names:
            raise DataError(
                f"data.rating_threshold is set but {redact(input_uri)} has no rating column"
            )
        thr = data.rating_threshold
        rows = stages.filter_rows(rows, lambda b: b.filter(pc.greater_equal(b["rating"], thr)))
        rows = rows.materialize()
        dropped["rating_below_threshold"] = (
            dropped.get("rating_below_threshold", 0) + n_read - rows.count()
        )
    if data.min_user_inter > 1 or data.min_item_inter > 1:
        rows, _, items = stages.k_core(rows, data.min_user_inter, data.min_item_inter, dropped)
    else:
        items = stages.item_counts(rows)
    old_raw, old_counts = read_item_vocab(parent.uri if parent else None, storage)
    index = {raw: i for i, raw in enumerate(old_raw)}
    new_raw = stages.sorted_vocab([i for i in items if i not in index])
    item_raw = old_raw + new_raw
    index |= {raw: len(old_raw) + i for i, raw in enumerate(new_raw)}
    counts = np.concatenate([old_counts, np.zeros(len(new_raw), dtype=np.int64)])
    for raw, n in items.items():
        counts[index[raw]] += n
    n_new = int(sum(items.values()))
    if not item_raw or (not parent and n_new == 0):
        raise DataError(f"{redact(input_uri)}: no interactions left after filtering ({dropped})")
    n_inter = int(pmeta.get("n_interactions", 0)) + n_new
    n_parts = _parts(n_inter, ROWS_PER_PARTITION)
    append_parts = max(_parts(n_new, ROWS_PER_PARTITION), _parts(n_inter, REWRITE_ROWS_PER_TASK))
    vocab = pa.array(item_raw, pa.string())
    stats = write_sequences(
        rows, vocab, out, n_parts=n_parts, append_parts=append_parts, storage=storage,
        task_cpus=TASK_CPUS, parent_uri=parent.uri if parent else None, parent_meta=pmeta,
    )  # fmt: skip
    n_users = int(pmeta.get("n_users", 0)) + stats["new_users"]
    if stats["n_users"] != n_users:
        raise RuntimeError(f"prepare: {stats['n_users']} users written, expected {n_users}")
    fs, root = resolve(out, storage)
    stages.check_one_row_per_user(fs, f"{root}/sequences", n_users)
    _write_vocab(out, "items", item_raw, counts.tolist(), storage)
    lengths = stats["lengths"]
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "n_users": n_users,
        "n_items": len(item_raw),
        "n_interactions": n_inter,
        "n_read": int(pmeta.get("n_read", 0)) + int(n_read),
        "dropped": dropped,
        "ignored_columns": sorted(set(pmeta.get("ignored_columns", [])) | set(ignored)),
        "sequence_length": {
            "min": lengths["min"],
            "mean": round(lengths["sum"] / max(1, lengths["n"]), 2),
            "max": lengths["max"],
        },
        "item_interactions": _summary(counts),
        "time_range": time_range(pmeta.get("time_range"), stats["time"]),
        "sources": {
            "input": redact(input_uri),
            "format": fmt,
            "files": int(pmeta.get("sources", {}).get("files", 0)) + len(files),
        },  # fmt: skip
        "this_version": {
            "files": len(files),
            "rows_read": int(n_read),
            "interactions": n_new,
            "new_users": stats["new_users"],
            "new_items": len(new_raw),
            "buckets_written": stats["buckets_written"],
            "buckets_copied": stats["buckets_copied"],
            "rebucketed": stats["rebucketed"],
        },  # fmt: skip
        "user_buckets": stats["user_buckets"],
        "filters": {
            "min_user_inter": data.min_user_inter,
            "min_item_inter": data.min_item_inter,
            "rating_threshold": data.rating_threshold,
        },
        "id_order": "items: sorted raw ids (numeric when all are integers), new ones after the "
        "maximum; users: by (bucket, raw id), new ones after the maximum (data/merge.py)",
    }
    for key in ("n_attributes", "items_with_attributes", "attribute_items_not_in_vocab"):
        if key in pmeta:
            meta[key] = pmeta[key]
    if attributes_uri:  # an append keeps the parent's attribute ids and adds new items'
        meta |= attrs_mod.write_attributes(
            attributes_uri, item_raw, out, storage, parent.uri if parent else None
        )
        meta["sources"]["attributes"] = redact(attributes_uri)
    elif parent and exists(f"{parent.uri}/attributes.parquet", storage):
        for name in ("attributes.parquet", "vocab/attributes.parquet"):  # carried over as is
            if exists(f"{parent.uri}/{name}", storage):
                write_bytes(f"{out}/{name}", read_bytes(f"{parent.uri}/{name}", storage), storage)
        meta["sources"]["attributes"] = pmeta.get("sources", {}).get("attributes")
    return meta


def _parts(rows: int, per_part: int) -> int:
    return max(1, min(MAX_PARTITIONS, -(-rows // per_part)))


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

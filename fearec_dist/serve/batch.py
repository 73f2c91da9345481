"""Batch recommendations as a Ray Data job: every user's history -> top-k Parquet, raw ids.

    read_parquet(histories) --streaming--> map_batches(BatchRecommender, ActorPoolStrategy)
        --> write_parquet(<output>/*.parquet) --> <output>/_summary.json

Input (``--input``) is either a prepared dataset (``meta.json``, ``sequences/``, ``vocab/``:
each user's whole sequence is the history) or Parquet with ``user_id`` and ``item_ids``
(a list of raw item ids, oldest first). Output rows: ``user_id`` (string), ``item_ids``
(list<string>), ``scores`` (list<float32>), ``source`` (``model``, ``popularity`` for the
fallback, ``empty_history`` when a history had no known item and there was no fallback: the
row is still written, with no items, so every input user has exactly one row) and
``n_unknown`` (raw ids dropped from that history). ``--strict`` fails the job on the first
unknown id or empty history instead, and removes the partial output.

Memory is bounded by configuration, not by the data: Ray Data streams blocks through a fixed
pool of actors; each actor holds one copy of the export (N × D floats, the vocabulary, the
encoder) and scores ``batch_size`` users against the table in item chunks (``SCORE_CHUNK``
scores at a time). Actors take fractional CPUs (``cpus_per_actor``) and a GPU each only when
``device`` is ``cuda``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from fearec_dist import s3_policy
from fearec_dist.config import StorageSection
from fearec_dist.data.sequences import list_csr
from fearec_dist.data.versions import list_versions, resolve_version
from fearec_dist.serve.artifact import ServeError, load_export, vocab_checksum
from fearec_dist.serve.recommend import Histories, item_tables, map_histories, recommend_batch
from fearec_dist.storage import (
    delete_dir,
    exists,
    list_children,
    read_bytes,
    read_parquet_dataset,
    redact,
    resolve,
    write_json,
)

OUTPUT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_ids", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
        ("source", pa.string()),
        ("n_unknown", pa.int32()),
    ]
)
SUMMARY = "_summary.json"  # written last; list_files and Ray's readers skip "_" files
READ_CPUS = 0.25  # per read or write task


def read_vocab(prepared_uri: str, name: str, storage: StorageSection) -> pa.Array:
    """``<prepared>/vocab/<name>.parquet``'s raw ids in id order (id 1 first)."""
    import io

    import pyarrow.parquet as pq

    uri = f"{prepared_uri.rstrip('/')}/vocab/{name}.parquet"
    if not exists(uri, storage):  # versioned datasets write vocab/users/ as part files
        fs, path = resolve(uri.removesuffix(".parquet"), storage)
        table = pq.read_table(path, filesystem=fs, columns=["id", "raw"])
    else:
        table = pq.read_table(io.BytesIO(read_bytes(uri, storage)), columns=["id", "raw"])
    table = table.sort_by("id")
    if not np.array_equal(table.column("id").to_numpy(), np.arange(1, table.num_rows + 1)):
        raise ServeError(f"{uri}: ids are not 1..{table.num_rows}")
    return table.column("raw").combine_chunks()


class BatchRecommender:
    """Ray Data actor UDF: a batch of users' histories -> their top-k rows (OUTPUT_SCHEMA).

    Args:
        export_uri: the export directory.
        options: ``k``, ``ann``, ``exclude_seen``, ``fallback``, ``strict``, ``device``,
            ``threads`` and ``prepared`` (the prepared input's URI, or None for raw Parquet).
        storage: StorageSection fields (a plain dict travels to the actor).
    """

    def __init__(self, export_uri: str, options: dict[str, Any], storage: dict) -> None:
        import torch

        torch.set_num_threads(max(1, int(options["threads"])))
        self.o = options
        store = StorageSection(**storage)
        self.export = load_export(
            export_uri, store, device=options["device"], with_index=options["ann"]
        )
        self.tables = item_tables(self.export)
        self.users = self.item_raw = None
        if options["prepared"]:
            self.users = read_vocab(options["prepared"], "users", store)
            if not options["same_vocab"]:  # translate through raw ids
                self.item_raw = read_vocab(options["prepared"], "items", store)

    def __call__(self, batch: pa.Table) -> pa.Table:

        o = self.o
        if self.users is not None:  # a prepared dataset: internal user and item ids
            user_ids = self.users.take(pa.array(batch.column("user").to_numpy() - 1))
            col = batch.column("items")
        else:
            user_ids = batch.column("user_id").cast(pa.string()).combine_chunks()
            col = batch.column("item_ids")
        offsets, values = list_csr(col)
        if self.users is not None and self.item_raw is None:
            items = values.to_numpy(zero_copy_only=False).astype(np.int64)
            hist = Histories(offsets, items, np.zeros(len(offsets) - 1, dtype=np.int64))
        else:
            raw = (
                values
                if self.users is None
                else self.item_raw.take(
                    pa.array(values.to_numpy(zero_copy_only=False).astype(np.int64) - 1)
                )
            )
            hist = map_histories(self.export, offsets, raw.cast(pa.string()), o["strict"])
        if o["strict"] and (hist.lengths == 0).any() and o["fallback"] != "popularity":
            first = user_ids.take(pa.array(np.flatnonzero(hist.lengths == 0)[:10])).to_pylist()
            raise ServeError(
                f"empty history (no known item) for user(s) {', '.join(map(str, first))}; "
                "pass --fallback popularity, or drop --strict to write them with no items"
            )
        recs = recommend_batch(
            self.export,
            hist,
            o["k"],
            ann=o["ann"],
            exclude_seen=o["exclude_seen"],
            fallback=o["fallback"],
            tables=self.tables,
        )
        return _rows(self.export, user_ids, recs, hist.n_unknown)


def _rows(export: Any, user_ids: pa.Array, recs: Any, n_unknown: np.ndarray) -> pa.Table:
    """Recommendations -> OUTPUT_SCHEMA rows (id 0 / -inf padding dropped per row)."""
    keep = recs.ids > 0
    counts = keep.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    flat_ids = recs.ids[keep]
    item_ids = pa.ListArray.from_arrays(offsets, export.raw_of(flat_ids))
    scores = pa.ListArray.from_arrays(offsets, pa.array(recs.scores[keep], pa.float32()))
    return pa.Table.from_arrays(
        [
            user_ids,
            item_ids,
            scores,
            pa.array(recs.source.astype(str), pa.string()),
            pa.array(n_unknown.astype(np.int32)),
        ],
        schema=OUTPUT_SCHEMA,
    )


@s3_policy.s3_job(lambda *args, storage=None, **kwargs: storage)
def run_batch(
    export_uri: str,
    input_uri: str,
    output_uri: str,
    *,
    k: int = 100,
    ann: bool = False,
    exclude_seen: bool = False,
    fallback: str = "none",
    strict: bool = False,
    device: str = "cpu",
    actors: int = 2,
    cpus_per_actor: float = 1.0,
    threads: int | None = None,
    batch_size: int = 1024,
    overwrite: bool = False,
    storage: StorageSection | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the batch job on the current Ray instance and returns its summary.

    Args:
        export_uri: an export directory (``fearec-dist export``).
        input_uri: a prepared dataset, or Parquet of ``user_id`` + ``item_ids`` (raw ids).
        output_uri: a new (or empty, or ``overwrite``) directory for the top-k Parquet.
        k: items per user.
        ann: use the export's FAISS index.
        exclude_seen: never recommend an item of the user's own history.
        fallback: ``popularity`` for users with no known item, or ``none``.
        strict: fail on an unknown id or an empty history (the partial output is removed).
        device: ``cpu`` or ``cuda`` (one GPU per actor).
        actors: the largest actor pool (it starts at one and grows while input is waiting).
        cpus_per_actor: Ray CPUs per actor (fractions allowed).
        threads: torch threads per actor (default: its CPUs, rounded, at least 1).
        batch_size: users per batch.
        overwrite: replace whatever is at ``output_uri``.
        storage: object-storage options (default: the AWS environment variables).
        progress: Ray Data's progress bars.

    Returns:
        ``{"users": rows written, "by_source": {...}, "unknown_ids": …, "seconds": …,
        "users_per_s": …, "output": uri}``, also written to ``<output>/_summary.json``.
    """
    import ray.data

    start = time.time()
    storage = storage or StorageSection()
    export = load_export(export_uri, storage, with_encoder=False, with_index=ann)
    out = output_uri.rstrip("/")
    if list_children(out, storage):
        if not overwrite:
            raise ServeError(f"--output {redact(out)} is not empty; choose a new location")
        delete_dir(out, storage)
    # a prepared dataset (its newest version, data/versions.py), or raw histories
    prepared = None
    if list_versions(input_uri, storage):
        prepared = resolve_version(input_uri, storage=storage).uri
    same_vocab = bool(prepared) and (
        vocab_checksum(read_vocab(prepared, "items", storage)) == export.manifest["vocab_checksum"]
    )
    options = {
        "k": k,
        "ann": ann,
        "exclude_seen": exclude_seen,
        "fallback": fallback,
        "strict": strict,
        "device": device,
        "threads": threads or max(1, round(cpus_per_actor)),
        "prepared": prepared,
        "same_vocab": same_vocab,
    }
    uri = f"{prepared}/sequences" if prepared else input_uri
    columns = ["user", "items"] if prepared else ["user_id", "item_ids"]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    # reads and writes are I/O-bound: a fraction of a CPU each, so an actor pool that takes
    # every CPU of the instance does not starve them (on 2 CPUs, one 2-CPU actor stalled the job)
    ds = read_parquet_dataset(uri, storage, num_cpus=READ_CPUS).select_columns(columns)
    use_gpu = device.startswith("cuda")
    ds = ds.map_batches(
        BatchRecommender,
        fn_constructor_args=(export_uri, options, storage.__dict__),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else None,
    )
    out_fs, out_path = resolve(out, storage)
    try:
        ds.write_parquet(out_path, filesystem=out_fs, ray_remote_args={"num_cpus": READ_CPUS})
    except Exception as err:
        delete_dir(out, storage)
        raise _unwrap(err) from None
    summary = _summarize(out, storage) | {
        "export": redact(export_uri),
        "input": redact(input_uri),
        "output": redact(out),
        "k": k,
        "ann": ann,
        "device": device,
        "seconds": round(time.time() - start, 2),
    }
    summary["users_per_s"] = round(summary["users"] / max(summary["seconds"], 1e-9), 1)
    write_json(f"{out}/{SUMMARY}", summary, storage)
    return summary


def _summarize(out: str, storage: StorageSection) -> dict[str, Any]:
    """Counts from the written files (two small columns, read file by file)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = resolve(out, storage)
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    by_source: dict[str, int] = {}
    users = unknown = 0
    for batch in dataset.to_batches(columns=["source", "n_unknown"]):
        users += batch.num_rows
        unknown += int(pc.sum(batch.column("n_unknown")).as_py() or 0)
        for row in pc.value_counts(batch.column("source")).to_pylist():
            by_source[row["values"]] = by_source.get(row["values"], 0) + row["counts"]
    return {"users": users, "by_source": by_source, "unknown_ids": unknown}


def _unwrap(err: BaseException) -> BaseException:
    """Ray wraps an actor's exception; give back our ServeError (its message) when it is one."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ServeError):
            return ServeError(str(e).split("ServeError: ")[-1].strip())
        e = getattr(e, "cause", None) or e.__cause__
    text = str(err)
    if "ServeError: " in text:
        return ServeError(text.rsplit("ServeError: ", 1)[-1].strip().splitlines()[0])
    return err

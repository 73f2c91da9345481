"""``fearec-dist data info | dump | gc``: what a prepared dataset holds, without knowing its
layout.

- ``info``: every version (parent, kind, date), and for one version its counts, time range and
  the inputs it consumed.
- ``dump``: one JSON line per user, ``{"user": raw id, "items": [raw ids, time order],
  "timestamps": [...]}``, streamed file by file (memory: one batch); lines come in storage
  order, so ``sort`` two dumps before comparing them line by line.
- ``gc``: ``data/versions.gc_versions``.

Also ``format_summary``, the summary ``prepare`` prints.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from fearec_dist.config import StorageSection
from fearec_dist.data.sequences import list_csr
from fearec_dist.data.versions import list_versions, resolve_version
from fearec_dist.errors import DataError
from fearec_dist.storage import exists, open_output, read_json, redact, resolve


def dataset_info(
    uri: str, version: int | None = None, storage: StorageSection | None = None
) -> dict[str, Any]:
    """``{"dataset", "versions": [{"version", "parent", "kind", "created_at"}], "version": N,
    "meta": the version's meta.json, "inputs": what it consumed}``."""
    chosen = resolve_version(uri, version, storage)
    versions = [
        {
            "version": v.version,
            "parent": v.commit.get("parent"),
            "kind": v.commit.get("kind"),
            "created_at": v.commit.get("created_at"),
            "dir": v.commit.get("dir"),
        }
        for v in list_versions(chosen.root, storage)
    ]
    inputs = None
    if exists(f"{chosen.uri}/inputs.json", storage):
        record = read_json(f"{chosen.uri}/inputs.json", storage)
        inputs = {k: v for k, v in record.items() if k != "root"}
    return {
        "dataset": redact(chosen.root),
        "version": chosen.version,
        "versions": versions,
        "meta": read_json(f"{chosen.uri}/meta.json", storage),
        "inputs": inputs,
    }


def format_info(info: dict[str, Any]) -> str:
    meta = info["meta"]
    lines = [f"dataset {info['dataset']}", "versions:"]
    for v in info["versions"]:
        mark = "*" if v["version"] == info["version"] else " "
        lines.append(
            f" {mark} {v['version']:>4}  {v['kind'] or '':<8} parent {str(v['parent']):<5} "
            f"{v['created_at'] or '(before versions)'}"
        )
    span = meta.get("time_range") or {}
    lines += [
        f"version {info['version']}:",
        f"  users {meta['n_users']:,}  items {meta['n_items']:,}  "
        f"interactions {meta['n_interactions']:,}",
        f"  time range {span.get('min')} .. {span.get('max')}",
    ]
    if meta.get("this_version"):
        lines.append(f"  this version added {meta['this_version']}")
    inputs = info.get("inputs") or {}
    if inputs:
        extra = f", Delta version {inputs['delta_version']}" if "delta_version" in inputs else ""
        lines.append(
            f"  consumed {len(inputs.get('files', {}))} file(s) of {inputs.get('input')} "
            f"({inputs.get('format')}{extra})"
        )
    return "\n".join(lines)


def format_summary(meta: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of ``prepare``."""
    kind = meta.get("kind", "prepare")
    lines = [
        f"prepared dataset, version {meta.get('version', 0)} ({kind}"
        + (f" on version {meta['parent']})" if meta.get("parent") is not None else ")"),
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
    if kind == "append" and meta.get("this_version"):
        added = meta["this_version"]
        lines.append(
            f"  this version  {added['interactions']:>12,}  interactions from {added['files']} "
            f"file(s); {added['new_users']:,} new users, {added['new_items']:,} new items"
        )
    lines.append(f"  source        {meta['sources']['input']} ({meta['sources']['format']})")
    lines.append(f"  took {meta.get('seconds', 0):.1f} s")
    return "\n".join(lines)


def _raw(vocab: pa.Array, ids: np.ndarray) -> list[Any]:
    return vocab.take(pa.array(ids.astype(np.int64) - 1)).to_pylist()


def dump_dataset(
    uri: str, output: str, version: int | None = None, storage: StorageSection | None = None
) -> int:
    """Writes the JSON lines of ``version`` (default the newest) to ``output``; returns users."""
    chosen = resolve_version(uri, version, storage)
    fs, path = resolve(f"{chosen.uri}/vocab/items.parquet", storage)
    items = pq.read_table(path, filesystem=fs).sort_by("id").column("raw").combine_chunks()
    fs, seq_path = resolve(f"{chosen.uri}/sequences", storage)
    source = pads.dataset(seq_path, filesystem=fs, format="parquet")
    users = None
    if "user_raw" not in source.schema.names:  # a dataset from before versions
        fs, upath = resolve(f"{chosen.uri}/vocab/users.parquet", storage)
        users = pq.read_table(upath, filesystem=fs).sort_by("id").column("raw").combine_chunks()
    columns = ["user", "items", "timestamps"] + (["user_raw"] if users is None else [])
    n = 0
    with open_output(output, storage) as out:
        for batch in source.to_batches(columns=columns, batch_size=4096):
            off, values = list_csr(batch.column("items"))
            _, times = list_csr(batch.column("timestamps"))
            raw_items = _raw(items, values.to_numpy(zero_copy_only=False))
            times = times.to_numpy(zero_copy_only=False).tolist()
            if users is None:
                names = batch.column("user_raw").to_pylist()
            else:
                names = _raw(users, pc.cast(batch.column("user"), pa.int64()).to_numpy())
            for r, name in enumerate(names):
                a, b = int(off[r]), int(off[r + 1])
                line = {"user": name, "items": raw_items[a:b], "timestamps": times[a:b]}
                out.write((json.dumps(line) + "\n").encode())
            n += len(names)
    if n == 0:
        raise DataError(f"{redact(chosen.uri)}: no sequences")
    return n

"""What a prepare reads: every input file, or for ``--append`` only those that the parent
version has not consumed; and the record of what the new version has consumed
(``<version>/inputs.json``).

``inputs.json``: ``{"input": redacted URI, "root": the URI as compared, "format",
"files": {path relative to the input: [size, mtime_ns], on S3 [size, mtime_ns, ETag]},
"columns": the partitions' columns or null, "delta_version": the Delta table version consumed
(delta only)}``. It is cumulative: each version holds everything consumed up to it.

Order of the files (the input-order tie-break of equal timestamps): plain and Hive directories
by relative path; Delta by the commit that added the file, then path.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fearec_dist.config import DataSection, StorageSection
from fearec_dist.data import delta
from fearec_dist.data.partitions import (
    InputFile,
    check_partition_columns,
    list_input_files,
    unconsumed,
)
from fearec_dist.data.versions import DatasetVersion
from fearec_dist.errors import DataError
from fearec_dist.storage import exists, read_json, redact, storage_root

SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz", ".tsv"),
    "atomic": (".inter",),
    "seqtxt": (".txt",),
}


def select(
    uri: str, fmt: str, storage: StorageSection | None, consumed: dict[str, Any] | None
) -> tuple[list[InputFile], dict[str, Any]]:
    """(files to read now, in order; the inputs record of the version that reads them).

    ``consumed``: the parent version's ``inputs.json`` (None for a full prepare).

    Raises:
        DataError: no input; an unknown partition layout; partitions with other columns; a
            consumed file that changed; a refused Delta commit (each naming it).
    """
    record: dict[str, Any] = {"input": redact(uri), "root": storage_root(uri), "format": fmt}
    if fmt == "delta":
        if consumed is None:
            version, files = delta.snapshot_files(uri, storage)
        else:
            version, files = delta.changes_since(uri, int(consumed["delta_version"]), storage)
        seen = dict((consumed or {}).get("files", {}))
        seen.update({f.rel: f.stamp() for f in files})
        return files, record | {"files": seen, "columns": None, "delta_version": version}
    listed = list_input_files(uri, storage, SUFFIXES[fmt])
    before = (consumed or {}).get("files", {})
    files = unconsumed(listed, before, uri) if consumed is not None else listed
    columns = check_partition_columns(files, fmt, storage, (consumed or {}).get("columns"))
    seen = dict(before) | {f.rel: f.stamp() for f in files}
    return files, record | {"files": seen, "columns": columns}


def appendable(
    root: str,
    versions: list[DatasetVersion],
    input_uri: str,
    fmt: str,
    data: DataSection,
    storage: StorageSection,
) -> DatasetVersion:
    """The version an append builds on, after the checks that it can."""
    if not versions:
        raise DataError(
            f"--append: {redact(root)} holds no prepared dataset; prepare it once without --append"
        )
    parent = versions[-1]
    meta = read_json(f"{parent.uri}/meta.json", storage)
    if meta.get("format_version", 1) < 2 or not exists(f"{parent.uri}/inputs.json", storage):
        raise DataError(
            f"--append: version {parent.version} of {redact(root)} was written before versioned "
            "datasets (no record of its inputs, no raw user ids); prepare the input once "
            "without --append (a new version) and append to that"
        )
    filters = meta.get("filters", {})
    if (filters.get("min_user_inter") or 0) > 1 or (filters.get("min_item_inter") or 0) > 1:
        raise DataError(
            f"--append: {redact(root)} was prepared with k-core filters (min_user_inter "
            f"{filters.get('min_user_inter')}, min_item_inter {filters.get('min_item_inter')}). "
            "They are global and iterated until stable: new rows can bring back users and items "
            "dropped before, so an append cannot equal a prepare of the whole log; prepare the "
            "whole log again instead"
        )
    for key in ("min_user_inter", "min_item_inter", "rating_threshold"):
        if getattr(data, key) not in (None, 0, filters.get(key)):
            raise DataError(
                f"--append: data.{key} is {getattr(data, key)!r} but version {parent.version} "
                f"was prepared with {filters.get(key)!r}; an append keeps the dataset's filters"
            )
    data.rating_threshold = filters.get("rating_threshold")
    recorded = read_json(f"{parent.uri}/inputs.json", storage)
    if storage_root(input_uri) != recorded.get("root") or fmt != recorded.get("format"):
        raise DataError(
            f"--append: version {parent.version} of {redact(root)} consumed "
            f"{recorded.get('input')} ({recorded.get('format')}), not {redact(input_uri)} ({fmt})"
        )
    return parent


def pause_before_commit() -> None:
    """Test hook: with ``FEAREC_DIST_COMMIT_GATE=<path>`` the writer creates ``<path>.waiting``
    once every file of its version is written, and waits (up to 120 s) for ``<path>`` before
    it commits, so a test can kill it there or commit a rival version first."""
    gate = os.environ.get("FEAREC_DIST_COMMIT_GATE")
    if not gate:
        return
    with open(f"{gate}.waiting", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.time() + 120
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.1)

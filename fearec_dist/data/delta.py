"""Delta Lake inputs (``--format delta``): the table's files, and the files its commits added
after a version.

The ``deltalake`` package (delta-rs) finds the table's current version (``_last_checkpoint``
and checkpoints included); the commits after the version a dataset recorded are then read from
``_delta_log/<version>.json`` (newline-delimited actions, the Delta protocol) through the same
storage layer as every other input, local or ``s3://`` alike:

- ``add`` actions with ``dataChange: true`` are new rows: their files are read (partition values
  from ``partitionValues``, as columns, like Hive partitions);
- commits whose actions all have ``dataChange: false`` (OPTIMIZE / compaction, Z-order) rewrite
  rows already consumed: nothing is read;
- commits that remove rows (DELETE, UPDATE, MERGE, overwrite: a ``remove`` with ``dataChange:
  true``, or an ``add`` with a deletion vector) cannot be applied to an append-only dataset:
  an error naming the version and the operation;
- metadata-only commits (schema, properties) add nothing.

A full prepare reads the snapshot: the files live at the current version, ordered by the commit
that added them, then path (replaying the JSON log; when it has been cleaned up, the snapshot's
add actions ordered by path).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import unquote

from fearec_dist import s3_policy
from fearec_dist.config import StorageSection
from fearec_dist.data.partitions import InputFile
from fearec_dist.errors import DataError
from fearec_dist.storage import endpoint_of, exists, read_bytes, redact, storage_root

REFUSED_OPERATIONS = ("DELETE", "UPDATE", "MERGE")


def storage_options(uri: str, storage: StorageSection | None) -> dict[str, str]:
    """delta-rs's options for ``uri`` from the same ``storage.*`` settings as every other read
    (credentials only from the environment, as everywhere)."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    storage = storage or StorageSection()
    opts = {
        "AWS_REGION": storage.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    }
    endpoint = endpoint_of(storage)
    if endpoint:
        opts["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if storage.anonymous:
        opts["AWS_SKIP_SIGNATURE"] = "true"
    opts |= s3_policy.object_store_options(storage)  # the storage retry policy
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(key):
            opts[key] = os.environ[key]
    return opts


def _table(uri: str, storage: StorageSection | None) -> Any:
    try:
        from deltalake import DeltaTable
    except ImportError:  # an optional dependency
        raise DataError(
            "--format delta needs the deltalake package: pip install 'fearec-dist[delta]'"
        ) from None
    try:
        return DeltaTable(storage_root(uri), storage_options=storage_options(uri, storage))
    except Exception as err:  # delta-rs raises its own TableNotFoundError, OSError, …
        raise DataError(f"{redact(uri)}: not a readable Delta table: {err}") from None


def _log(uri: str, version: int, storage: StorageSection | None) -> list[dict[str, Any]]:
    path = f"{storage_root(uri)}/_delta_log/{version:020d}.json"
    try:
        text = read_bytes(path, storage).decode()
    except FileNotFoundError:
        raise DataError(
            f"{redact(uri)}: the log of version {version} is gone (cleaned up after a "
            "checkpoint); the commits after the dataset's recorded version cannot be read: "
            "prepare the table again in full"
        ) from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _file(uri: str, add: dict[str, Any], version: int) -> InputFile:
    path = unquote(add["path"])
    full = path if "://" in path else f"{storage_root(uri)}/{path}"
    values = {
        k: ("" if v is None else str(v)) for k, v in (add.get("partitionValues") or {}).items()
    }
    return InputFile(full, path, int(add.get("size", 0)), int(add.get("modificationTime", 0)),
                     values, version)  # fmt: skip


def latest_version(uri: str, storage: StorageSection | None) -> int:
    return int(_table(uri, storage).version())


def commit_files(
    uri: str, version: int, storage: StorageSection | None
) -> tuple[list[InputFile], str]:
    """The files commit ``version`` added with new rows, and its operation.

    Raises:
        DataError: a commit that deletes or changes rows, naming the version.
    """
    actions = _log(uri, version, storage)
    op = next((a["commitInfo"].get("operation", "?") for a in actions if "commitInfo" in a), "?")
    adds = [a["add"] for a in actions if "add" in a]
    removes = [a["remove"] for a in actions if "remove" in a]
    changed = [r for r in removes if r.get("dataChange", True)]
    vectors = [a for a in adds if a.get("deletionVector")]
    if op.upper() in REFUSED_OPERATIONS or changed or vectors:
        raise DataError(
            f"{redact(uri)}: Delta version {version} ({op}) deletes or changes rows "
            f"({len(changed)} file(s) removed with dataChange); an append-only dataset cannot "
            "apply it: prepare the table again in full (a new version of the dataset)"
        )
    return [_file(uri, a, version) for a in adds if a.get("dataChange", True)], op


def changes_since(
    uri: str, since: int, storage: StorageSection | None
) -> tuple[int, list[InputFile]]:
    """(the table's version, the files the commits after ``since`` added), in commit order."""
    latest = latest_version(uri, storage)
    files: list[InputFile] = []
    for v in range(since + 1, latest + 1):
        added, _ = commit_files(uri, v, storage)
        files.extend(sorted(added, key=lambda f: f.rel))
    return latest, files


def snapshot_files(uri: str, storage: StorageSection | None) -> tuple[int, list[InputFile]]:
    """(the table's version, its live files ordered by the commit that added them, then path)."""
    table = _table(uri, storage)
    latest = int(table.version())
    root = storage_root(uri)
    if exists(f"{root}/_delta_log/{0:020d}.json", storage):
        live: dict[str, InputFile] = {}
        for v in range(latest + 1):
            for action in _log(uri, v, storage):
                if "add" in action:
                    f = _file(uri, action["add"], v)
                    live[f.rel] = f
                elif "remove" in action:
                    live.pop(unquote(action["remove"]["path"]), None)
        files = sorted(live.values(), key=lambda f: (f.commit, f.rel))
    else:
        import pyarrow as pa

        acts = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        files = sorted(
            (
                _file(
                    uri,
                    {
                        "path": a["path"],
                        "size": a["size_bytes"],
                        "modificationTime": 0,
                        "partitionValues": {
                            k.split(".", 1)[1]: v
                            for k, v in a.items()
                            if k.startswith("partition.")
                        },
                    },
                    latest,
                )
                for a in acts
            ),
            key=lambda f: f.rel,
        )
    if not files:
        raise DataError(f"{redact(uri)}: the Delta table has no data files")
    return latest, files

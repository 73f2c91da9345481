"""Dataset versions: immutable version directories and a conditional commit that works where a
rename is a copy (object storage).

Layout of a prepared dataset ``<root>`` (format 2)::

    <root>/versions/<N>-<attempt>/      one writer's files (sequences/, vocab/, meta.json, …);
                                        never modified once committed
    <root>/_commits/<N>.json            the commit of version N: {"version", "dir", "parent",
                                        "created_at", "kind"}; created last, conditionally

A writer reads the newest commit N, writes version N + 1 into a directory of its own
(``versions/<N+1>-<random>``: two writers never share a file), then creates
``_commits/<N+1>.json`` only if it does not exist: ``If-None-Match: *`` on S3, ``O_EXCL``-style
``link`` on a local disk. Exactly one of two concurrent writers of N + 1 succeeds; the other
gets ``CommitConflict`` naming the version, and removes its directory. A writer killed before the
commit leaves an uncommitted directory that no reader ever sees (``data gc`` removes it).
Nothing is renamed or copied, so the commit costs one small PUT whatever the dataset's size.

A dataset written before versions (``meta.json`` at the root, no ``_commits/``) reads as
version 0, in place (no migration); ``prepare`` / ``--append`` on it write version 1 and up
beside it. Every reader of a prepared dataset goes through ``resolve_version``.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from fearec_dist import s3_policy
from fearec_dist.config import StorageSection
from fearec_dist.errors import DataError
from fearec_dist.storage import (
    delete_dir,
    endpoint_of,
    exists,
    file_info,
    is_remote,
    list_children,
    read_json,
    redact,
    resolve,
    storage_root,
)

COMMITS = "_commits"
VERSIONS = "versions"
_COMMIT_NAME = re.compile(r"^(\d+)\.json$")
_VERSION_DIR = re.compile(r"^(?P<root>.+)/versions/(?P<n>\d+)-[0-9a-f]+$")


class CommitConflict(DataError):
    """Another writer committed the version this one was writing."""


@dataclass(frozen=True)
class DatasetVersion:
    """One committed version of a prepared dataset: ``uri`` is the directory its readers read
    (``<uri>/sequences``, ``<uri>/vocab/…``, ``<uri>/meta.json``)."""

    root: str  # the dataset (what the user names)
    version: int
    uri: str  # the version's directory (the root itself for version 0)
    commit: dict[str, Any] = field(default_factory=dict)

    @property
    def lineage(self) -> dict[str, Any]:
        """``{"uri", "version"}``: what results, checkpoints and exports record."""
        return {"uri": redact(self.root), "version": self.version}


def _commits(root: str, storage: StorageSection | None) -> list[int]:
    out = []
    for name in list_children(f"{root}/{COMMITS}", storage):
        m = _COMMIT_NAME.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def list_versions(uri: str, storage: StorageSection | None = None) -> list[DatasetVersion]:
    """Every committed version of the dataset at ``uri``, oldest first ([] when none)."""
    root = storage_root(uri)
    out = []
    if exists(f"{root}/meta.json", storage):  # a dataset from before versions: version 0
        out.append(DatasetVersion(root, 0, root, {"version": 0, "dir": ".", "kind": "legacy"}))
    for n in _commits(root, storage):
        commit = read_json(f"{root}/{COMMITS}/{n}.json", storage)
        out.append(DatasetVersion(root, n, f"{root}/{commit['dir']}", commit))
    return out


def resolve_version(
    uri: str, version: int | None = None, storage: StorageSection | None = None
) -> DatasetVersion:
    """The one way to a prepared dataset: the directory of ``version`` (default: the newest).

    Args:
        uri: the dataset root, or a version's directory (``…/versions/<N>-<id>``, as recorded in
            a run's examples info), or a dataset from before versions (version 0).
        version: the version wanted; None = the newest committed (or the one ``uri`` names).
        storage: object-storage options.

    Raises:
        DataError: nothing committed there, or ``version`` does not exist (never committed, or
            removed by ``data gc``), naming the dataset and the version.
    """
    root = storage_root(uri)
    m = _VERSION_DIR.match(root)
    if m:  # a version's own directory
        n = int(m.group("n"))
        if version is not None and version != n:
            raise DataError(f"{redact(root)} is version {n}, not version {version}")
        base = m.group("root")
        if not exists(f"{base}/{COMMITS}/{n}.json", storage) or not exists(
            f"{root}/meta.json", storage
        ):
            raise DataError(
                f"{redact(base)}: version {n} ({redact(root)}) is not committed or was removed"
            )
        commit = read_json(f"{base}/{COMMITS}/{n}.json", storage)
        if f"{base}/{commit['dir']}" != root:
            raise DataError(f"{redact(root)}: not the committed directory of version {n}")
        return DatasetVersion(base, n, root, commit)
    versions = list_versions(root, storage)
    if not versions:
        raise DataError(f"{redact(root)}: not a prepared dataset (no meta.json, no commits)")
    if version is None:
        return versions[-1]
    for v in versions:
        if v.version == version:
            if not exists(f"{v.uri}/meta.json", storage):
                raise DataError(f"{redact(root)}: version {version}'s files are gone")
            return v
    have = ", ".join(str(v.version) for v in versions)
    raise DataError(
        f"{redact(root)}: version {version} does not exist (committed versions: {have}; "
        "a version removed by `fearec-dist data gc` cannot be read)"
    )


def new_version_dir(root: str, version: int) -> str:
    """A fresh directory for this writer's version ``version`` (never shared with another)."""
    return f"{VERSIONS}/{version}-{secrets.token_hex(4)}"


def conditional_create(uri: str, data: bytes, storage: StorageSection | None = None) -> bool:
    """Creates the object at ``uri`` only if nothing is there; False when something is.

    S3: ``PutObject`` with ``If-None-Match: *`` (AWS S3 since 2024, MinIO, moto). Local disk:
    the bytes go to a private temporary file that is then hard-linked to ``uri`` (``link``
    fails when the name exists, and the object appears complete). Other stores are refused:
    they offer no conditional create here.
    """
    root = storage_root(uri)
    if root.startswith(("s3://", "s3a://")):
        return _s3_create(root, data, storage)
    if is_remote(root):
        raise DataError(
            f"{redact(root)}: versioned datasets need a conditional create (local disk or S3)"
        )
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.{secrets.token_hex(6)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, root)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _s3_create(uri: str, data: bytes, storage: StorageSection | None) -> bool:
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError

    storage = storage or StorageSection()
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict[str, Any] = {"region_name": region or "us-east-1"}
    if endpoint_of(storage):
        kwargs["endpoint_url"] = endpoint_of(storage)
    if storage.anonymous:
        raise DataError(f"{redact(uri)}: cannot commit a version anonymously")
    client = botocore.session.get_session().create_client(
        "s3",
        config=Config(**s3_policy.botocore_options(storage)),
        **kwargs,
    )
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
            return False
        raise DataError(f"cannot commit {redact(uri)}: {err}") from None


def commit_version(
    root: str,
    version: int,
    directory: str,
    parent: int | None,
    kind: str,
    storage: StorageSection | None = None,
) -> dict[str, Any]:
    """Makes ``directory`` (relative to ``root``) version ``version``: creates
    ``_commits/<version>.json`` conditionally.

    Raises:
        CommitConflict: another writer committed ``version`` first (this one's files are left
            for the caller to remove).
    """
    commit = {
        "version": version,
        "dir": directory,
        "parent": parent,
        "kind": kind,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    body = json.dumps(commit, indent=2).encode()
    if not conditional_create(f"{root}/{COMMITS}/{version}.json", body, storage):
        raise CommitConflict(
            f"{redact(root)}: version {version} was committed by another writer while this one "
            "was writing it; nothing of this run was committed (run it again to build on it)"
        )
    return commit


def gc_versions(
    uri: str, keep: int, storage: StorageSection | None = None, orphan_age_s: float = 3600.0
) -> dict[str, list[str]]:
    """Removes every committed version but the newest ``keep`` (their commit first, so a reader
    never sees a commit without its files), and uncommitted directories older than
    ``orphan_age_s`` (a killed or losing writer's). Nothing else ever deletes a version.

    Returns:
        ``{"removed": [N, …], "orphans": [dir, …], "kept": [N, …]}``.
    """
    if keep < 1:
        raise DataError(f"--keep: must be >= 1, got {keep}")
    root = storage_root(uri)
    versions = list_versions(root, storage)
    if not versions:
        raise DataError(f"{redact(root)}: not a prepared dataset (no meta.json, no commits)")
    drop, kept = versions[:-keep], versions[-keep:]
    removed = []
    for v in drop:
        if v.version == 0:
            continue  # a dataset from before versions lives at the root: not removed here
        fs, path = resolve(f"{root}/{COMMITS}/{v.version}.json", storage)
        fs.delete_file(path)  # the commit first: no reader sees a commit without its files
        delete_dir(v.uri, storage)
        removed.append(v.version)
    # uncommitted directories: a writer that lost or was killed. One whose number is already
    # committed can never commit; a newer one may still be writing, so only an old one goes.
    newest = versions[-1].version
    live = {posixpath.basename(v.uri) for v in kept}
    orphans = []
    for name in list_children(f"{root}/{VERSIONS}", storage):
        if name in live:
            continue
        head = name.split("-", 1)[0]
        number = int(head) if head.isdigit() else -1
        info = file_info(f"{root}/{VERSIONS}/{name}", storage)
        # no mtime for an S3 prefix: then only a superseded number marks a directory as dead
        age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
        if number <= newest or age >= orphan_age_s:
            delete_dir(f"{root}/{VERSIONS}/{name}", storage)
            orphans.append(name)
    return {"removed": removed, "orphans": orphans, "kept": [v.version for v in kept]}

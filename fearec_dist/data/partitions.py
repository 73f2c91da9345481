"""Input files of a prepare or an append: listing with size and mtime, Hive partitions, and what
an append has not consumed yet.

A directory input is either plain (files at any depth) or Hive-partitioned: every file lies under
the same sequence of ``key=value`` directories (``dt=2026-12-04/part-0.parquet``); the values are
added to the file's rows as string columns named ``key`` (so ``--columns time=dt`` works). A file
outside that layout (a directory that is not ``key=value``, other keys, another depth) is an
error naming it, and so are partitions whose files have other columns than the first partition's.

Each consumed file is recorded (path relative to the input, size, mtime — S3's LastModified — and
on S3 its ETag), so an append reads only new files and a consumed file that has changed since is
an error naming it. A file is unchanged when its size and its ETag (where both records have one)
or else its mtime match: an object uploaded again with the same bytes keeps its ETag, so an S3
re-upload of the same file is not a change.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import unquote

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fearec_dist.config import StorageSection
from fearec_dist.errors import DataError
from fearec_dist.storage import fsspec_filesystem, is_remote, redact, resolve


@dataclass(frozen=True)
class InputFile:
    """One input file: ``uri`` for the readers, ``rel`` (relative to the input) for records."""

    uri: str
    rel: str
    size: int
    mtime_ns: int
    partition: dict[str, str] = field(default_factory=dict)
    commit: int = -1  # Delta: the table version that added it
    etag: str | None = None  # S3's ETag (None on local disks and other stores)

    def stamp(self) -> list[Any]:
        return [self.size, self.mtime_ns] + ([self.etag] if self.etag else [])


def same_file(recorded: list[Any], now: list[Any]) -> bool:
    """Whether a consumed file's record (``[size, mtime_ns]`` or ``[size, mtime_ns, etag]``)
    still describes it: same size and, where both have an ETag, the same ETag, else the same
    mtime."""
    if recorded[0] != now[0]:
        return False
    if len(recorded) > 2 and len(now) > 2:
        return recorded[2] == now[2]
    return recorded[1] == now[1]


def s3_etags(uri: str, base: str, storage: StorageSection | None) -> dict[str, str]:
    """``{path: ETag}`` of the objects under ``base`` (an s3 path without the scheme); pyarrow's
    listing has no ETags, s3fs's has (one more listing: a LIST per 1,000 objects)."""
    fs, _ = fsspec_filesystem(uri, storage)
    try:
        found = fs.find(base, detail=True)
    except OSError as err:
        raise DataError(f"cannot list {redact(uri)}: {err}") from None
    return {path: str(d.get("ETag", "")).strip('"') for path, d in found.items() if d.get("ETag")}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_input_files(
    uri: str, storage: StorageSection | None, suffixes: tuple[str, ...]
) -> list[InputFile]:
    """Files under ``uri`` (a file, a directory, or a glob on the last part), sorted by path,
    with size, mtime and Hive partition values.

    Raises:
        DataError: nothing there; an unknown partition layout, naming the file.
    """
    fs, path = resolve(uri, storage)
    prefix = uri[: len(uri) - len(uri.split("://", 1)[-1])] if is_remote(uri) else ""
    base, pattern = path, None
    if any(ch in posixpath.basename(path) for ch in "*?["):
        base, pattern = posixpath.split(path)
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{redact(uri)} does not exist")
        if info.type == pafs.FileType.File and pattern is None:
            infos, base = [info], posixpath.dirname(base)
        else:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as err:
        raise DataError(f"cannot reach {redact(uri)}: {err}") from None
    import fnmatch

    out = []
    for fi in infos:
        name = posixpath.basename(fi.path)
        rel = fi.path[len(base) :].lstrip("/")
        if fi.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
            continue
        if (pattern and not fnmatch.fnmatch(name, pattern)) or not name.endswith(suffixes):
            continue
        mtime = int(fi.mtime_ns) if fi.mtime_ns is not None else 0
        out.append(InputFile(prefix + fi.path, rel, int(fi.size or 0), mtime))
    if not out:
        raise DataError(f"{redact(uri)}: no input files found")
    if uri.startswith(("s3://", "s3a://")):
        tags = s3_etags(uri, base, storage)
        out = [replace(f, etag=tags.get(f.uri[len(prefix) :])) for f in out]
    out.sort(key=lambda f: f.rel)
    return hive_partitions(out, uri)


def hive_partitions(files: list[InputFile], uri: str) -> list[InputFile]:
    """The files with their ``key=value`` values; plain when no directory is ``key=value``."""
    dirs = [f.rel.split("/")[:-1] for f in files]
    if not any("=" in d for parts in dirs for d in parts):
        return files
    keys = [p.split("=", 1)[0] for p in dirs[0]]
    out = []
    for f, parts in zip(files, dirs):
        bad = [p for p in parts if "=" not in p or not p.split("=", 1)[0]]
        if bad or [p.split("=", 1)[0] for p in parts] != keys:
            what = f"directory {bad[0]!r} is not key=value" if bad else "other partition keys"
            raise DataError(
                f"{redact(uri)}: unknown partition layout at {f.rel}: {what} (expected "
                f"{'/'.join(k + '=…' for k in keys)}/file, as the first file {files[0].rel})"
            )
        values = {p.split("=", 1)[0]: unquote(p.split("=", 1)[1]) for p in parts}
        out.append(replace(f, partition=values))
    return out


def partition_name(f: InputFile) -> str:
    return "/".join(f"{k}={v}" for k, v in f.partition.items()) or posixpath.dirname(f.rel) or "."


def file_columns(f: InputFile, fmt: str, storage: StorageSection | None) -> list[str]:
    """The column names of one file (a Parquet footer, or a CSV header line)."""
    fs, path = resolve(f.uri, storage)
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as handle:
                return list(pq.read_schema(handle).names)
        with fs.open_input_stream(path) as handle:
            head = handle.read(1 << 16)
    except (OSError, ValueError) as err:
        raise DataError(f"{f.uri}: cannot read its columns: {err}") from None
    if f.uri.endswith(".gz"):
        import gzip

        head = gzip.GzipFile(fileobj=io.BytesIO(head)).read(1 << 16)
    line = head.decode("utf-8", "replace").splitlines()[0] if head else ""
    return [c.strip() for c in line.split("\t" if f.uri.endswith(".tsv") else ",")]


def check_partition_columns(
    files: list[InputFile],
    fmt: str,
    storage: StorageSection | None,
    expected: list[str] | None = None,
) -> list[str] | None:
    """The first file of each partition must have the same columns as the first partition's
    (or ``expected``, the columns an earlier version recorded). Returns those columns (None for a
    plain directory or a format without a schema).

    Raises:
        DataError: naming the partition and the columns that differ.
    """
    if fmt not in ("parquet", "csv") or not files or not files[0].partition:
        return expected
    seen: dict[str, InputFile] = {}
    for f in files:
        seen.setdefault(partition_name(f), f)
    first_name = None
    for name, f in seen.items():
        cols = sorted(file_columns(f, fmt, storage))
        if expected is None:
            expected, first_name = cols, name
            continue
        if cols != sorted(expected):
            extra = sorted(set(cols) - set(expected))
            missing = sorted(set(expected) - set(cols))
            against = f"partition {first_name}" if first_name else "the consumed partitions"
            raise DataError(
                f"partition {name} ({f.rel}) has other columns than {against}: "
                f"extra {extra or 'none'}, missing {missing or 'none'}"
            )
        clash = sorted(set(f.partition) & set(cols))
        if clash:
            raise DataError(f"partition {name}: column(s) {clash} are also partition keys")
    return expected


def unconsumed(files: list[InputFile], consumed: dict[str, list[int]], uri: str) -> list[InputFile]:
    """The files not recorded in ``consumed`` (``{rel: [size, mtime_ns]}``).

    Raises:
        DataError: a consumed file whose size or mtime changed since, naming it (its rows were
            counted once; reading it again would count them twice).
    """
    out = []
    for f in files:
        stamp = consumed.get(f.rel)
        if stamp is None:
            out.append(f)
        elif not same_file(list(stamp), f.stamp()):
            raise DataError(
                f"{redact(uri)}: {f.rel} changed since it was consumed (size/mtime/ETag "
                f"{'/'.join(map(str, stamp))} then, {'/'.join(map(str, f.stamp()))} now); an "
                "append-only dataset cannot take back rows: restore the file, or prepare the "
                "input again in full"
            )
    return out

"""The storage floor: every read and write of data, run outputs, checkpoints and sweep outputs.

Owns: URIs (any local path, ``file://``, ``s3://`` or other fsspec URI) -> a filesystem
(``resolve``, ``fsspec_filesystem``, ``ray_storage``), bounded timeouts and retries, redaction of
URIs for logs, whole-object reads and writes (``read_bytes``/``write_bytes``/``open_output``,
JSON), and telling a lost S3 connection from other failures (``is_connection_lost``,
``connection_lost_error``; ``s3_policy.s3_failure`` for the rest).

Object-storage options come from a ``StorageSection`` (the config's top-level ``storage:``
section, passed as that object everywhere, Ray UDFs included) or the standard AWS environment
variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, …). Credentials are never
part of a config, a log line or an output file: they stay in the environment (or the instance
role) and reach pyarrow's S3 client from there.

Every S3 request follows one retry policy (``storage.max_attempts``, ``retry_mode``,
``connect_timeout_s``, ``read_timeout_s``; ``s3_policy.py`` turns it into each client's
settings): a throttling or unreachable endpoint fails after bounded attempts with an error naming
the endpoint, the operation and the attempts, never a hang.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from fearec_dist import s3_policy
from fearec_dist.config import StorageSection
from fearec_dist.errors import DataError
from fearec_dist.s3_policy import endpoint_of


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than ``file://`` (s3://, gs://, memory://, …)."""
    return "://" in uri and not uri.startswith("file://")


def storage_root(uri: str) -> str:
    """An absolute local path (what Ray wants) or the URI itself, without a trailing slash."""
    if is_remote(uri):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


def ray_storage(uri: str, storage: StorageSection | None) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's ``RunConfig``: a remote URI gets this
    layer's filesystem (endpoint, region and retries from the config), so Ray never falls back to
    the environment alone; a local path gets None."""
    root = storage_root(uri)
    if not is_remote(root):
        return root, None
    fs, path = resolve(root, storage)
    return path, fs


def redact(uri: str) -> str:
    """The URI without user info or query (where credentials could hide), for logs and meta."""
    if not is_remote(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class PolicyS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps the retry policy when pickled. pyarrow's own pickling
    drops ``retry_strategy``: every copy sent to a Ray task or worker (Ray Data's reads and
    writes, Ray Train's checkpoints) fell back to pyarrow's default of 3 attempts (measured)."""

    def __init__(self, max_attempts: int, **kwargs: Any) -> None:
        super().__init__(retry_strategy=s3_policy.pyarrow_retry_strategy(max_attempts), **kwargs)
        self._policy_args = (max_attempts, kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild_s3, self._policy_args


def _rebuild_s3(max_attempts: int, kwargs: dict[str, Any]) -> PolicyS3FileSystem:
    return PolicyS3FileSystem(max_attempts, **kwargs)


def s3_filesystem(storage: StorageSection | None) -> pafs.S3FileSystem:
    """pyarrow's S3 client under the storage retry policy; credentials from the environment."""
    storage = storage or StorageSection()
    kwargs: dict[str, Any] = s3_policy.pyarrow_timeouts(storage)
    endpoint = endpoint_of(storage)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    if storage.anonymous:
        kwargs["anonymous"] = True
    return PolicyS3FileSystem(storage.max_attempts, **kwargs)


def resolve(uri: str, storage: StorageSection | None = None) -> tuple[pafs.FileSystem, str]:
    """Returns (pyarrow filesystem, path inside it) for a local path or URI."""
    if not uri:
        raise DataError("empty URI")
    if is_remote(uri) and "@" in urlsplit(uri).netloc:
        raise DataError(
            f"{redact(uri)}: credentials inside a URI are not accepted; set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY in the environment (or use an instance role)"
        )
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        return s3_filesystem(storage), uri.split("://", 1)[1].rstrip("/")
    if is_remote(uri):  # any other fsspec protocol (gcs, abfs, memory, …)
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    path = os.path.abspath(uri.removeprefix("file://"))
    return pafs.LocalFileSystem(), path


def read_parquet_dataset(uri: str, storage: StorageSection | None, **ray_args: Any) -> Any:
    """``ray.data.read_parquet`` of a local path or URI through Ray's file-based Parquet reader.

    Ray 2.60's default ("DataSourceV2") starts 32 footer-reader actors for every read, whatever
    the dataset's size: on this 2-CPU box each read of a 200-user dataset took 9-10 s instead of
    0.2-0.4 s, and a run's prepare and per-epoch reads pay it each time. The file-based reader
    splits the same files into the same read tasks without them. ``RAY_DATA_USE_DATASOURCE_V2``
    set in the environment keeps the user's choice. Ray Data's own retries of S3 errors are
    limited to those the client does not retry (``s3_policy.ray_data_retries_for_s3``).
    """
    import ray.data

    fs, root = resolve(uri, storage)
    s3_policy.ray_data_retries_for_s3()
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        ray.data.DataContext.get_current().use_datasource_v2 = False
    return ray.data.read_parquet(root, filesystem=fs, **ray_args)


def fsspec_filesystem(uri: str, storage: StorageSection | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) for libraries that want fsspec (pandas, torch.save via open);
    s3 gets the same endpoint, region, anonymity and retry policy as ``resolve`` (botocore's
    ``standard`` / ``adaptive`` mode; s3fs's own retry loop, which would re-run a call that
    botocore gave up on 5 times more, is set to one try)."""
    import fsspec

    if uri.startswith(("s3://", "s3a://")):
        import s3fs

        storage = storage or StorageSection()
        region = (
            storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        )
        client_kwargs = {"region_name": region or "us-east-1"}
        if endpoint_of(storage):
            client_kwargs["endpoint_url"] = endpoint_of(storage)
        fs = s3fs.S3FileSystem(
            anon=storage.anonymous,
            client_kwargs=client_kwargs,
            config_kwargs=s3_policy.botocore_options(storage),
        )
        fs.retries = 1  # s3fs's loop around botocore's: one layer of retries, not two
        return fs, uri.split("://", 1)[1].rstrip("/")
    if is_remote(uri):
        return fsspec.core.url_to_fs(uri)
    return fsspec.filesystem("file"), os.path.abspath(uri.removeprefix("file://"))


def _describe(uri: str, storage: StorageSection | None) -> str:
    endpoint = endpoint_of(storage)
    uri = redact(uri)
    return f"{uri} (endpoint {redact(endpoint)})" if endpoint and is_remote(uri) else uri


def _failed(verb: str, uri: str, storage: StorageSection | None, err: BaseException) -> DataError:
    """``cannot <verb> <uri> (endpoint E): <error>``, and for an S3 request error the attempts
    made and the policy."""
    text = str(err)
    found = s3_policy.failed_request(text) if is_remote(uri) else None
    if found:
        code, _, attempts = found
        made = s3_policy.attempts_made(code, attempts, storage)
        text += f" [{made}; {s3_policy.describe(storage)}]"
    return DataError(f"cannot {verb} {_describe(uri, storage)}: {text}")


def file_info(uri: str, storage: StorageSection | None = None) -> pafs.FileInfo:
    """pyarrow's FileInfo for ``uri`` (type NotFound when absent)."""
    fs, path = resolve(uri, storage)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise _failed("reach", uri, storage, err) from None


def exists(uri: str, storage: StorageSection | None = None) -> bool:
    """Whether a file or directory is at ``uri`` (DataError when the store is unreachable)."""
    return file_info(uri, storage).type != pafs.FileType.NotFound


def list_children(uri: str, storage: StorageSection | None = None) -> list[str]:
    """Names directly under a directory ([] when it does not exist)."""
    fs, path = resolve(uri, storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as err:
        raise _failed("reach", uri, storage, err) from None
    return sorted(posixpath.basename(fi.path.rstrip("/")) for fi in infos)


def list_files(
    uri: str, storage: StorageSection | None = None, suffixes: tuple[str, ...] = ()
) -> list[str]:
    """Files under ``uri`` (a file, a directory, or a glob on the last path part), sorted.

    Raises:
        DataError: nothing there, naming the URI (and the endpoint for object storage).
    """
    fs, path = resolve(uri, storage)
    prefix = uri[: len(uri) - len(uri.split("://", 1)[-1])] if is_remote(uri) else ""
    base, pattern = path, None
    if any(ch in posixpath.basename(path) for ch in "*?["):
        base, pattern = posixpath.split(path)
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and pattern is None:
            return [uri]
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{_describe(uri, storage)} does not exist")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as err:
        raise _failed("reach", uri, storage, err) from None
    import fnmatch

    out = []
    for fi in infos:
        name = posixpath.basename(fi.path)
        if fi.type != pafs.FileType.File or name.startswith((".", "_")):
            continue
        if pattern and not fnmatch.fnmatch(name, pattern):
            continue
        if suffixes and not name.endswith(suffixes):
            continue
        out.append(prefix + fi.path)
    if not out:
        raise DataError(f"{_describe(uri, storage)}: no input files found")
    return sorted(out)


def read_bytes(uri: str, storage: StorageSection | None = None) -> bytes:
    """The whole object at ``uri``.

    Raises:
        FileNotFoundError: nothing there.
        DataError: the store is unreachable or refuses the read (names the endpoint).
    """
    fs, path = resolve(uri, storage)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return s3_policy.call(read, storage)
    except FileNotFoundError:
        raise
    except OSError as err:
        if "not found" in str(err).lower() or "does not exist" in str(err).lower():
            raise FileNotFoundError(f"{uri} does not exist") from None
        raise _failed("read", uri, storage, err) from None


def open_output(uri: str, storage: StorageSection | None = None) -> IO[bytes]:
    """A writable binary stream at ``uri`` (parent directories created); use it as a context
    manager. On object storage the object appears when the stream is closed."""
    fs, path = resolve(uri, storage)
    try:
        parent = posixpath.dirname(path)
        if parent:
            fs.create_dir(parent, recursive=True)
        return fs.open_output_stream(path)
    except OSError as err:
        raise _failed("write", uri, storage, err) from None


def write_bytes(uri: str, data: bytes, storage: StorageSection | None = None) -> None:
    """Writes ``data`` as the whole object at ``uri``."""
    try:
        with open_output(uri, storage) as f:
            f.write(data)
    except OSError as err:
        raise _failed("write", uri, storage, err) from None


def read_json(uri: str, storage: StorageSection | None = None) -> Any:
    """Parsed JSON at ``uri``."""
    return json.loads(read_bytes(uri, storage))


def write_json(uri: str, obj: Any, storage: StorageSection | None = None) -> None:
    """``obj`` as indented JSON at ``uri``."""
    write_bytes(uri, json.dumps(obj, indent=2, default=str).encode(), storage)


def delete_dir(uri: str, storage: StorageSection | None = None) -> None:
    """Removes a directory (or prefix) and everything under it; no-op when absent."""
    fs, path = resolve(uri, storage)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError as err:
        raise _failed("delete", uri, storage, err) from None


# what a lost connection to object storage looks like in pyarrow's and botocore's errors
NETWORK_MARKERS = (
    "NETWORK_CONNECTION",
    "Could not connect",
    "Couldn't connect",
    "Connection refused",
    "Connect timeout",
    "EndpointConnectionError",
    "Could not resolve host",
)
# ... and an endpoint that kept throttling or failing a request through every attempt
REFUSAL_MARKERS = (
    "AWS Error SLOW_DOWN",
    "AWS Error SERVICE_UNAVAILABLE",
    "(SlowDown)",
    "(ServiceUnavailable)",
    "HTTP status 503",
)


def is_connection_lost(text: str, uris: tuple[str, ...]) -> bool:
    """Whether an error text reads as a lost (or throttling) S3 endpoint, its requests out of
    attempts, while some of ``uris`` are on S3."""
    on_s3 = any(u.startswith(("s3://", "s3a://")) for u in uris if u)
    return on_s3 and any(m in text for m in NETWORK_MARKERS + REFUSAL_MARKERS)


def connection_lost_error(storage: StorageSection | None, detail: str, cause: str) -> DataError:
    """The one-line error for a lost or throttling S3 endpoint, after the policy's attempts."""
    endpoint = redact(endpoint_of(storage) or "AWS S3 (default endpoint)")
    found = s3_policy.failed_request(cause)
    what = f"lost the connection to the S3 endpoint {endpoint}"
    if found and any(m in cause for m in REFUSAL_MARKERS):
        what = f"the S3 endpoint {endpoint} kept refusing {found[1]} ({found[0]})"
    return DataError(
        f"{what}: gave up after {s3_policy.policy_of(storage).max_attempts} attempts per "
        f"request ({s3_policy.describe(storage)}) {detail}. Cause: {cause[:500]}"
    )

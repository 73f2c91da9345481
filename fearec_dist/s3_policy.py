"""The S3 retry policy: ``storage.max_attempts``, ``retry_mode``, ``connect_timeout_s`` and
``read_timeout_s`` turned into each client's settings, and an S3 failure read back out of any
client's error text (which request failed, with what, after how many attempts).

One policy, one layer: the S3 client retries each request (``max_attempts`` attempts, back-off
between them). The layers above it that would re-run a failed call retry only what the client
does not (Ray Data's I/O retries keep ``INTERNAL_FAILURE``; ``call`` below); s3fs's own loop is
off. So ``max_attempts`` bounds the attempts of a request, times ``1 + run.max_failures`` in a
training run (Ray Train's restarts). docs/data.md ("Object storage: one retry policy") has the
per-client table and the bounds in attempts and time.

Clients:
- pyarrow's ``S3FileSystem`` (every read and write of this package, Ray Data's reads and writes
  and Ray Train's checkpoints, which are handed that filesystem; ``storage.PolicyS3FileSystem``
  keeps the policy when Ray pickles it): the AWS C++ SDK's *default* strategy in both modes.
  Its *standard* strategy takes from a retry quota (500 tokens, 5 per retry) that pyarrow never
  pays back (its wrapper does not forward the SDK's bookkeeping), so one filesystem object
  stops retrying after ~100 retries for good: measured through the fault proxy at 25 % 503 +
  5 % resets, one object failed 46 of 100 writes once its quota was gone, where the default
  strategy failed none. pyarrow has no adaptive mode (no client-side rate limiter):
  ``adaptive`` and ``standard`` are the same there.
- botocore / s3fs (``storage.fsspec_filesystem``) and any boto3 client: the SDK's ``standard``
  or ``adaptive`` mode as named, with the same attempts and timeouts.
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

from fearec_dist.config import StorageSection
from fearec_dist.errors import DataError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
# a transient error the AWS C++ SDK misreports as final (see ``call``)
NOT_RETRIED = "Failed to flush response stream"
# pyarrow: "AWS Error SLOW_DOWN during GetObject operation" (also "UNKNOWN (HTTP status 503)")
PYARROW_ERROR = re.compile(r"AWS Error ([A-Z_]+(?: \(HTTP status \d+\))?) during (\w+) operation")
# botocore: "An error occurred (SlowDown) when calling the PutObject operation (reached max
# retries: 9): ..."
BOTOCORE_ERROR = re.compile(
    r"An error occurred \((\w+)\) when calling the (\w+) operation"
    r"(?: \(reached max retries: (\d+)\))?"
)
# the error codes the SDKs retry (throttling, transient server errors, lost connections)
RETRIED = re.compile(
    r"SLOW_DOWN|SlowDown|THROTTL|Throttl|SERVICE_UNAVAILABLE|ServiceUnavailable|"
    r"INTERNAL_FAILURE|InternalError|NETWORK_CONNECTION|REQUEST_TIMEOUT|RequestTimeout|"
    r"HTTP status 5\d\d"
)


def policy_of(storage: StorageSection | None) -> StorageSection:
    return storage or StorageSection()


def describe(storage: StorageSection | None) -> str:
    """The policy in a few words, for error messages."""
    s = policy_of(storage)
    return (
        f"storage.max_attempts {s.max_attempts}, retry_mode {s.retry_mode}, "
        f"{s.connect_timeout_s:g} s connect / {s.read_timeout_s:g} s read timeout"
    )


def pyarrow_timeouts(storage: StorageSection | None) -> dict[str, float]:
    """``S3FileSystem``'s ``connect_timeout`` and ``request_timeout``: the latter is, on Linux
    too (curl's low-speed limit, measured), how long a response may stall."""
    s = policy_of(storage)
    return {
        "connect_timeout": float(s.connect_timeout_s),
        "request_timeout": float(s.read_timeout_s),
    }


def pyarrow_retry_strategy(max_attempts: int) -> pafs.S3RetryStrategy:
    """``AwsDefaultS3RetryStrategy(n)`` counts retries: n + 1 attempts (measured), with back-off
    0, 50, 100, … ms between them (doubling, no jitter: 12.75 s in all over 10 attempts)."""
    return pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts - 1)


def botocore_options(storage: StorageSection | None) -> dict[str, Any]:
    """``botocore.config.Config`` keyword arguments (s3fs's ``config_kwargs``). botocore's
    ``retries["max_attempts"]`` counts retries (one more attempt than it says, measured);
    ``total_max_attempts`` counts attempts. ``adaptive`` adds the SDK's client-side rate
    limiter to ``standard``."""
    s = policy_of(storage)
    return {
        "connect_timeout": float(s.connect_timeout_s),
        "read_timeout": float(s.read_timeout_s),
        "retries": {"total_max_attempts": s.max_attempts, "mode": s.retry_mode},
    }


def object_store_options(storage: StorageSection | None) -> dict[str, str]:
    """deltalake's ``storage_options`` (Rust ``object_store``): retries count after the first
    try (``max_attempts - 1``; back-off 100 ms doubling to 15 s, with jitter, and no retry
    more than 180 s after the first try: object_store's defaults). Its ``timeout`` is a whole
    request's, not a stall's, so ``read_timeout_s`` is not mapped (object_store's 30 s stays)."""
    s = policy_of(storage)
    return {"max_retries": str(s.max_attempts - 1), "connect_timeout": f"{s.connect_timeout_s:g}s"}


def aws_environment(storage: StorageSection | None) -> dict[str, str]:
    """The policy as the environment variables every AWS SDK reads when its caller sets nothing
    (``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``), for clients built by other libraries (MLflow's
    S3 artifact uploads)."""
    s = policy_of(storage)
    return {"AWS_MAX_ATTEMPTS": str(s.max_attempts), "AWS_RETRY_MODE": s.retry_mode}


def ray_data_retries_for_s3() -> None:
    """Keeps, of this thread's Ray Data ``DataContext.retried_io_errors``, only the S3 errors
    the client does not retry itself. Ray Data re-runs a failed file operation up to 10 times,
    with up to 32 s of back-off each: on top of the client's ``max_attempts`` that would
    multiply every throttled request's attempts by 10. ``AWS Error INTERNAL_FAILURE`` stays:
    it is how pyarrow reports ``NOT_RETRIED`` below. Patterns the user added are kept. Call it
    where a dataset is built (the context travels with it)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    kept = [
        p for p in ctx.retried_io_errors if not p.startswith("AWS Error") or "INTERNAL_FAILURE" in p
    ]
    if kept != list(ctx.retried_io_errors):
        with warnings.catch_warnings():  # "substring matching will be deprecated": not ours
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.retried_io_errors = kept


def call(fn: Callable[[], T], storage: StorageSection | None) -> T:
    """``fn()`` (one S3 operation through pyarrow), run again, up to ``max_attempts`` times in
    all with jittered back-off, when it fails with ``NOT_RETRIED``: an error response (a 503
    SlowDown's XML body) larger than the range being read overflows the SDK's preallocated
    read buffer, and the SDK reports ``INTERNAL_FAILURE … Failed to flush response stream``,
    which it does not retry (seen reading small JSON objects through the fault proxy)."""
    attempts = policy_of(storage).max_attempts
    for attempt in range(attempts):
        try:
            return fn()
        except OSError as err:
            if NOT_RETRIED not in str(err) or attempt + 1 == attempts:
                raise
            time.sleep(random.uniform(0, min(20.0, 0.1 * 2**attempt)))
    raise AssertionError("unreachable")


def failed_request(text: str) -> tuple[str, str, int | None] | None:
    """(error code, operation, attempts or None when unknown) of the last S3 request failure
    in an error text from pyarrow or botocore, or None when the text holds none."""
    found = [(m.start(), m.group(1), m.group(2), None) for m in PYARROW_ERROR.finditer(text)]
    for m in BOTOCORE_ERROR.finditer(text):
        tries = int(m.group(3)) + 1 if m.group(3) else None
        found.append((m.start(), m.group(1), m.group(2), tries))
    if not found:
        return None
    _, code, operation, attempts = max(found)
    return code, operation, attempts


def attempts_made(code: str, attempts: int | None, storage: StorageSection | None) -> str:
    """ "after N attempts" for an error the client retries, else "not retried"."""
    if not RETRIED.search(code):
        return "not retried (the store refused it)"
    return f"after {attempts or policy_of(storage).max_attempts} attempts"


def endpoint_of(storage: StorageSection | None) -> str | None:
    """The S3 endpoint in use: the config's, else ``AWS_ENDPOINT_URL(_S3)``, else None (AWS)."""
    storage = storage or StorageSection()
    return (
        storage.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )


def _redacted(url: str) -> str:
    """An endpoint URL without user info or query."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))


def s3_job(storage_of: Callable[..., StorageSection | None]) -> Callable[[F], F]:
    """Decorator for a job's entry point (``prepare``) under the storage retry policy: the
    calling thread's Ray Data retries are limited (``ray_data_retries_for_s3``), and an error
    escaping the job that holds an S3 request failure (raised by any client, at any depth,
    Ray's wrapping included) becomes ``s3_failure``'s one-line ``DataError``.
    ``storage_of(*args, **kwargs)`` gives the job's storage options."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def job(*args: Any, **kwargs: Any) -> Any:
            ray_data_retries_for_s3()
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                storage = storage_of(*args, **kwargs)
                named = s3_failure(err, storage)
                endpoint = _redacted(endpoint_of(storage) or "AWS S3 (default endpoint)")
                if named is None or (endpoint in str(err) and " attempts" in str(err)):
                    raise  # no S3 failure, or one already told with its endpoint and attempts
                raise named from err

        return job  # type: ignore[return-value]

    return decorate


def s3_failure(err: BaseException | str, storage: StorageSection | None) -> DataError | None:
    """A one-line ``DataError`` for an S3 request that failed for good, read from any client's
    error text (Ray's wrapping included): the endpoint, the operation, the error code and the
    attempts made; None when ``err`` holds no S3 request error."""
    text = str(err)
    found = failed_request(text)
    if found is None:
        return None
    code, operation, attempts = found
    endpoint = _redacted(endpoint_of(storage) or "AWS S3 (default endpoint)")
    line = next((x for x in text.splitlines() if operation in x and code in x), text)
    return DataError(
        f"S3 request to {endpoint} failed: {code} during {operation}, "
        f"{attempts_made(code, attempts, storage)} ({describe(storage)}). "
        f"Cause: {line.strip()[:400]}"
    )

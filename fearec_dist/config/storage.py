"""The ``storage:`` section: object-storage options for everything read or written."""

from __future__ import annotations

from dataclasses import dataclass

from fearec_dist.config.keys import option


@dataclass
class StorageSection:
    """Object-storage options serving everything that is read or written: data, run outputs,
    checkpoints and sweep outputs. ``data.storage`` is an alias kept working. Credentials come
    from the standard AWS env vars (or the instance role); they are never part of the config."""

    endpoint_url: str | None = option(
        None, "S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO/moto; null = AWS"
    )
    region: str | None = option(None, "S3 region; null = the SDK's default (env, profile)")
    anonymous: bool = option(False, "read public buckets without credentials")

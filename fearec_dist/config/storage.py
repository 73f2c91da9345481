"""The ``storage:`` section: object-storage options for everything read or written."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fearec_dist.config.keys import option
from fearec_dist.errors import ConfigError

RETRY_MODES = ("standard", "adaptive")


@dataclass
class StorageSection:
    """Object-storage options serving everything that is read or written: data, run outputs,
    checkpoints and sweep outputs. ``data.storage`` is an alias kept working. Credentials come
    from the standard AWS env vars (or the instance role); they are never part of the config.

    The retry policy (``max_attempts``, ``retry_mode``, ``connect_timeout_s``,
    ``read_timeout_s``) applies to every S3 request of every client; docs/data.md says what
    each setting does in each client."""

    endpoint_url: str | None = option(
        None, "S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO/moto; null = AWS"
    )
    region: str | None = option(None, "S3 region; null = the SDK's default (env, profile)")
    anonymous: bool = option(False, "read public buckets without credentials")
    max_attempts: int = option(
        10, "attempts per S3 request (the first try included) before it fails"
    )
    retry_mode: str = option(
        "adaptive",
        "standard | adaptive: the AWS SDK retry modes (adaptive adds client-side rate "
        "limiting where the client has it; see docs/data.md)",
    )
    connect_timeout_s: float = option(5.0, "seconds to open a connection to the S3 endpoint")
    read_timeout_s: float = option(
        20.0, "seconds an S3 response may stall (no byte received) before the attempt fails"
    )

    def __post_init__(self) -> None:
        if self.retry_mode not in RETRY_MODES:
            raise ConfigError(
                f"storage.retry_mode: {self.retry_mode!r} is not one of {', '.join(RETRY_MODES)}"
            )
        if isinstance(self.max_attempts, bool) or not 1 <= self.max_attempts <= 100:
            raise ConfigError(f"storage.max_attempts: must be in 1..100, got {self.max_attempts}")
        for key in ("connect_timeout_s", "read_timeout_s"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"storage.{key}: must be a number > 0, got {value!r}")

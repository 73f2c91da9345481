"""The ``data:`` section: where the interactions are, their format, and how examples are cut."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from fearec_dist.config.keys import option
from fearec_dist.config.storage import StorageSection
from fearec_dist.errors import ConfigError

FORMATS = ("parquet", "csv", "atomic", "seqtxt", "delta", "prepared", "synthetic")
SPLITS = ("loo", "temporal")
PROTOCOL_KEYS = ("split", "valid_start", "test_start", "valid_days", "test_days")


def cut_time(value: Any, key: str) -> int:
    """A cut time as the data's integer timestamps compare with it: epoch numbers as given (in
    the data's unit), ISO-8601 as epoch seconds (UTC unless a zone is given). A fractional
    value is rounded up, so ``t < cut`` keeps the same interactions it would keep unrounded.

    Raises:
        ConfigError: naming ``key``, for a value that is neither.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a time")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, date):
        moment = value if isinstance(value, datetime) else datetime(*value.timetuple()[:3])
        number = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                raise ConfigError(
                    f"{key}: {value!r} is neither ISO-8601 (e.g. 1998-03-01, "
                    "1998-03-01T12:00:00+02:00) nor an epoch number in the data's unit"
                ) from None
            number = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {value!r} is not a finite time")
    return math.ceil(number)


@dataclass
class DataSection:
    """The input: a prepared dataset (``fearec-dist prepare``), or raw logs that ``train``
    prepares first (cached by these keys), and the shape of the examples cut from them."""

    path: str = option("", 'prepared dataset URI, or raw input when `format` is not "prepared"')
    format: str = option("prepared", "prepared | parquet | csv | atomic | seqtxt | synthetic")
    prepared_path: str = option(
        "", 'where `train` puts prepared raw input ("" = a cache under run.storage_path)'
    )
    attributes: str | None = option(
        None, "item attributes URI (RecBole .item or item2attributes.json); S3Rec needs them"
    )
    columns: dict[str, str] = option(
        {}, "parquet/csv column mapping: user/item/time/rating -> source column name"
    )
    min_user_inter: int = option(
        0, "k-core filter: drop users with fewer interactions; 0 = off (RecBole 1.2.1 default)"
    )
    min_item_inter: int = option(0, "k-core filter: drop items with fewer interactions; 0 = off")
    rating_threshold: float | None = option(
        None, "keep only interactions rated >= this (needs a rating column); null = all"
    )
    max_seq_len: int = option(50, "L: histories keep the most recent L items")
    block_rows: int = option(1024, "examples per block of the epoch stream (the unit of prefetch)")
    partition_mb: int = option(64, "MB of examples per hash partition of the same-target pairing")
    synthetic_users: int = option(2000, "users of the generated logs (format: synthetic)")
    synthetic_items: int = option(500, "items of the generated logs (format: synthetic)")
    seed: int = option(0, "seed of the generated logs (format: synthetic)")
    version: int | None = option(
        None, "dataset version to read (fearec-dist data info lists them); null = the newest"
    )
    split: str = option(
        "loo", "evaluation protocol: loo (each user's last items) | temporal (cut times)"
    )
    # a date: YAML reads 1998-03-01 as one (taken at midnight UTC, kept as ISO text)
    valid_start: str | int | float | date | None = option(
        None,
        "temporal: validation window start, ISO-8601 (UTC unless a zone is given) or an epoch "
        "number in the data's unit",
    )
    test_start: str | int | float | date | None = option(
        None, "temporal: test window start (as valid_start); the window runs to the newest time"
    )
    valid_days: float | None = option(
        None, "temporal: instead of valid_start, the validation window's days before the test's"
    )
    test_days: float | None = option(
        None, "temporal: instead of test_start, the last N days up to the newest timestamp"
    )
    train_since: str | int | float | date | None = option(
        None,
        "only training examples whose target is at or after this time (as valid_start), each "
        "with its whole history; with loo or temporal; null = all",
    )
    storage: StorageSection = option(
        help="alias of the top-level `storage:` section (the same object once the config is built)",
        factory=StorageSection,
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.max_seq_len < 1:
            raise ConfigError(f"data.max_seq_len: must be >= 1, got {self.max_seq_len}")
        for key in ("block_rows", "partition_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")
        if self.version is not None and self.version < 0:
            raise ConfigError(f"data.version: must be >= 0 or null, got {self.version}")
        self._check_protocol()
        self._check_train_since()

    def _check_train_since(self) -> None:
        """``train_since``: a time as the cuts are given; never with positions for times."""
        if self.train_since is None:
            return
        if isinstance(self.train_since, date):  # a YAML date/datetime: kept as ISO text
            self.train_since = self.train_since.isoformat()
        since = cut_time(self.train_since, "data.train_since")
        if self.format == "seqtxt":
            raise ConfigError(
                "data.train_since needs real timestamps; data.format seqtxt has positions only"
            )
        if self.valid_start is not None and since >= cut_time(self.valid_start, "data.valid_start"):
            raise ConfigError(
                f"data.train_since ({self.train_since}) must come before data.valid_start "
                f"({self.valid_start}): training targets are those before the validation window"
            )

    def _check_protocol(self) -> None:
        """``split`` and its cut times: one way to give each cut under temporal, none under loo
        (a cut ignored silently would be a protocol other than the one asked for)."""
        if self.split not in SPLITS:
            raise ConfigError(f"data.split: {self.split!r} is not one of {', '.join(SPLITS)}")
        for key in ("valid_start", "test_start"):  # a YAML date/datetime: kept as ISO text
            if isinstance(getattr(self, key), date):
                setattr(self, key, getattr(self, key).isoformat())
        given = [k for k in PROTOCOL_KEYS[1:] if getattr(self, k) is not None]
        if self.split == "loo":
            if given:
                raise ConfigError(
                    f"data.{given[0]} is set but data.split is loo; set data.split=temporal "
                    "or remove it"
                )
            return
        if self.format == "seqtxt":
            raise ConfigError(
                "data.split=temporal needs real timestamps; data.format seqtxt has positions "
                "only (use loo, or a log with times: parquet, csv, atomic)"
            )
        for start, days in (("valid_start", "valid_days"), ("test_start", "test_days")):
            if (getattr(self, start) is None) == (getattr(self, days) is None):
                raise ConfigError(
                    f"data.split=temporal needs exactly one of data.{start} and data.{days}"
                )
            if getattr(self, days) is not None and not getattr(self, days) > 0:
                raise ConfigError(f"data.{days}: must be > 0, got {getattr(self, days)}")
            if getattr(self, start) is not None:
                cut_time(getattr(self, start), f"data.{start}")
        if self.valid_start is not None and self.test_start is not None:
            valid = cut_time(self.valid_start, "data.valid_start")
            test = cut_time(self.test_start, "data.test_start")
            if valid >= test:
                raise ConfigError(
                    f"data.valid_start ({self.valid_start}) must come before data.test_start "
                    f"({self.test_start})"
                )

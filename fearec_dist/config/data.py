"""The ``data:`` section: where the interactions are, their format, and how examples are cut."""

from __future__ import annotations

from dataclasses import dataclass

from fearec_dist.config.keys import option
from fearec_dist.config.storage import StorageSection
from fearec_dist.errors import ConfigError

FORMATS = ("parquet", "csv", "atomic", "seqtxt", "delta", "prepared", "synthetic")


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

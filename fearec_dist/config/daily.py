"""The ``daily:`` section: one continuous-training pipeline (``fearec-dist daily``, docs/daily.md).

Its promotion pointer lives at ``<run.storage_path>/pipelines/<name>/current.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fearec_dist.config.keys import option
from fearec_dist.errors import ConfigError

# a metric of the evaluation's usual names (targets a model does not know count as misses);
# warm_* is refused: each model's warm rows are a different set of rows
METRIC = re.compile(r"^(masked_)?(hr|ndcg|mrr)@(\d+)$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class DailySection:
    """A daily job: append the new data, warm start from the promoted model, train under the
    temporal protocol, export, and promote only a model that beats the promoted one."""

    name: str = option("daily", "the pipeline: its pointer is <run.storage_path>/pipelines/<name>/")
    promote_metric: str = option(
        "hr@10",
        "test metric both models are compared on (hr@K / ndcg@K / mrr@K, optionally masked_; "
        "K in train.topk)",
    )
    min_gain: float = option(
        0.0,
        "promote only when new > current and (new - current) >= min_gain x current (relative)",
    )
    warm_start: bool = option(
        True,
        "start each day from the promoted run's weights; false: every day trains cold (e.g. "
        "after a model change the promoted weights cannot seed)",
    )
    warm_optimizer: bool = option(
        True,
        "a warm day carries the promoted run's optimizer state too (Adam's moments, per-row "
        "remapped; train.warm_start_optimizer); false: a fresh optimizer (e.g. after changing "
        "the optimizer's settings)",
    )
    warm_epochs: int | None = option(
        None, "epochs of a warm-started day (null = train.epochs); the first day trains cold"
    )
    train_days: float | None = option(
        None,
        "warm days train only on examples whose target is in the last N days before the "
        "validation window (sets data.train_since; null = the whole history)",
    )
    index: str | None = option(None, "ANN index built with each day's export: ivf | hnsw | flat")

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ConfigError(
                f"daily.name: {self.name!r} must be letters, digits, '.', '_' or '-' (it names "
                "a directory under run.storage_path/pipelines/)"
            )
        m = METRIC.match(self.promote_metric)
        if not m:
            hint = " (warm_ metrics score a different set of rows for each model)" * (
                self.promote_metric.startswith("warm_")
            )
            raise ConfigError(
                f"daily.promote_metric: {self.promote_metric!r} is not one of hr@K, ndcg@K, "
                f"mrr@K, optionally masked_{hint}"
            )
        if not self.min_gain >= 0:
            raise ConfigError(f"daily.min_gain: must be >= 0, got {self.min_gain}")
        if self.warm_epochs is not None and self.warm_epochs < 1:
            raise ConfigError(f"daily.warm_epochs: must be >= 1 or null, got {self.warm_epochs}")
        if self.train_days is not None and not self.train_days > 0:
            raise ConfigError(f"daily.train_days: must be > 0 or null, got {self.train_days}")
        if self.index not in (None, "ivf", "hnsw", "flat"):
            raise ConfigError(f"daily.index: {self.index!r} is not one of ivf, hnsw, flat")

    def metric_k(self) -> int:
        """The K of ``promote_metric``."""
        return int(self.promote_metric.rpartition("@")[2])

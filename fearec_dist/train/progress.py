"""A run's bookkeeping: epochs done, early stopping, the best epoch's metrics, the epoch rows.

Owns ``Progress`` (saved in every checkpoint, so a resumed run continues it), ``epoch_row`` (the
``metrics.csv`` row of one epoch from its training stats) and ``results_dict`` (the content of
``results.json``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fearec_dist.data.examples import ExamplesInfo


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``{"hr@10": …}`` -> ``{"<prefix>/hr@10": …}``, without the user and cold counts (the
    protocol's counts are in ``results.json["protocol"]``)."""
    return {f"{prefix}/{k}": v for k, v in metrics.items() if k not in ("n_users", "n_cold")}


@dataclass
class Progress:
    """Early-stopping and bookkeeping state; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    best: float = -math.inf
    best_epoch: int = 0
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    valid: dict[str, float] = field(default_factory=dict)  # at the best epoch
    test: dict[str, float] = field(default_factory=dict)  # at the best epoch
    # mid-epoch (a step checkpoint of epoch ``epoch + 1``): steps done, loss sums, samples,
    # seconds; empty at an epoch boundary
    partial: dict[str, Any] = field(default_factory=dict)

    def record_valid(self, epoch: int, valid: dict[str, float], metric: str, patience: int) -> bool:
        """Counts one evaluation of epoch ``epoch`` (1-based); True when it is a new best (then
        the caller computes the test metrics and keeps the weights)."""
        value = valid[metric]
        if value > self.best:  # strict, as the official FEARec repo (spec §9)
            self.best, self.best_epoch, self.bad_evals = value, epoch, 0
            self.valid = prefixed(valid, "valid")
            return True
        self.bad_evals += 1
        self.stopped_early = self.bad_evals > patience
        return False

    def finish_epoch(self, row: dict[str, Any]) -> None:
        """Closes epoch ``row["epoch"]``: its row replaces a replayed one in the history."""
        row |= self.test
        row["best_epoch"] = self.best_epoch
        self.epoch, self.partial = row["epoch"], {}
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]


def epoch_row(epoch: int, stats: dict[str, Any], world: int) -> dict[str, Any]:
    """The ``metrics.csv`` row of epoch ``epoch`` (1-based) from ``train_one_epoch``'s stats."""
    row: dict[str, Any] = {"epoch": epoch}
    row |= {k: v for k, v in stats.items() if k.startswith("train/")}
    row["train_seconds"] = round(stats["seconds"], 2)
    row["samples_per_s"] = round(stats["train/samples"] * world / stats["seconds"], 1)
    row["data_wait_share"] = round(stats["data_wait_s"] / max(stats["seconds"], 1e-9), 4)
    row["plan_wait_s"] = round(stats["plan_wait_s"], 3)  # waiting for the epoch's stream
    # waiting before the first batch (the plan and the first blocks): the rest is steady-state
    row["first_batch_wait_s"] = round(stats.get("first_wait_s", 0.0), 3)
    row["first_step_unix"], row["last_step_unix"] = (
        stats["first_step_unix"],
        stats["last_step_unix"],
    )
    row["skipped"] = stats["skipped"]
    row["plan_seconds"] = round(stats.get("plan_seconds", 0.0), 2)  # building the epoch's parts
    row |= {k: v for k, v in stats.items() if k.startswith("head_")}
    return row


def results_dict(progress: Progress, cfg_dict: dict[str, Any], info: ExamplesInfo) -> dict:
    """``results.json``: metrics at the best epoch, epochs run, the data and the config."""
    return {
        "valid": {k.removeprefix("valid/"): v for k, v in progress.valid.items()},
        "test": {k.removeprefix("test/"): v for k, v in progress.test.items()},
        "best_epoch": progress.best_epoch,
        "epochs_run": progress.epoch,
        "stopped_early": progress.stopped_early,
        "seconds_training": round(sum(r.get("train_seconds", 0.0) for r in progress.history), 1),
        # lineage (DESIGN.md): the dataset and its version; then the examples counted from it
        "data": info.data
        | {"examples": info.uri}
        | {k: getattr(info, k) for k in ("fingerprint", "n_train", "n_valid", "n_test")},
        "protocol": info.protocol_record(),
        "config": cfg_dict,
    }

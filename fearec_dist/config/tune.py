"""The ``tune:`` section: the sweep's name, outputs, samples and ASHA schedule."""

from __future__ import annotations

from dataclasses import dataclass

from fearec_dist.config.keys import option
from fearec_dist.errors import ConfigError


@dataclass
class TuneSection:
    """A Ray Tune sweep (``fearec-dist tune --space F``): ``num_samples`` trials of the search
    space, stopped early by ASHA on ``metric``; outputs under ``<storage_path>/<name>/``."""

    name: str = option("", 'sweep name ("" = <model>-sweep-<timestamp>)')
    storage_path: str = option("./sweeps", "where sweeps are written: a local path or s3:// URI")
    num_samples: int = option(8, "trials drawn from the search space")
    metric: str = option("valid/ndcg@10", "the metric ASHA and the best trial are judged on")
    mode: str = option("max", "max | min: whether a larger metric is better")
    max_t: int = option(10, "ASHA: epochs of the longest trial (sets train.epochs)")
    grace_period: int = option(1, "ASHA: epochs every trial runs before it can be stopped")
    reduction_factor: int = option(2, "ASHA: each rung keeps 1 / reduction_factor of the trials")
    max_concurrent_trials: int = option(
        0, "trials at once; 0 = derive from the cluster's CPUs/GPUs"
    )
    driver_cpus: float = option(0.01, "CPUs reserved by each trial's driver (not its workers)")

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"tune.mode: {self.mode!r} is not max or min")
        if self.grace_period < 1 or self.max_t < self.grace_period:
            raise ConfigError("tune.grace_period: must be >= 1 and <= tune.max_t")
        if self.reduction_factor < 2:  # ASHA's rungs are powers of it: 1 never stops a trial
            raise ConfigError(f"tune.reduction_factor: must be >= 2, got {self.reduction_factor}")
        for key in ("num_samples",):
            if getattr(self, key) < 1:
                raise ConfigError(f"tune.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("max_concurrent_trials",):
            if getattr(self, key) < 0:
                raise ConfigError(f"tune.{key}: must be >= 0, got {getattr(self, key)}")
        if not self.driver_cpus > 0:
            raise ConfigError(f"tune.driver_cpus: must be > 0, got {self.driver_cpus}")

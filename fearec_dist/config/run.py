"""The ``run:`` section: the run's name and outputs, its workers and their resources."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from fearec_dist.config.keys import option
from fearec_dist.errors import ConfigError
from fearec_dist.typecheck import coerce


@dataclass
class RunSection:
    """Where a run writes (``<storage_path>/<name>/``: results, metrics, checkpoints) and the
    Ray Train resources it asks for."""

    name: str = option("", 'run name; the same name resumes the run ("" = <model>-<timestamp>)')
    storage_path: str = option("./runs", "where runs are written: a local path or s3:// URI")
    workers: int = option(1, "Ray Train workers (train --debug runs one, in this process)")
    use_gpu: bool = option(False, "one GPU per worker")
    cpus_per_worker: float = option(1.0, "CPUs each worker requests (fractions allowed)")
    max_failures: int = option(0, "worker-group restarts from the latest checkpoint on failure")
    checkpoints_to_keep: int = option(
        2, "newest checkpoints kept (each holds the best weights too)"
    )
    checkpoint_every_steps: int = option(
        0, "also checkpoint every N steps inside an epoch; 0 = once per epoch"
    )
    progress_every_s: float = option(60.0, "rank 0's in-epoch step / ETA line every N s; 0 = off")
    tracking_uri: str = option(
        "",
        'MLflow tracking URI ("" = off): file:./mlruns or sqlite:///mlflow.db here, '
        "http://host:5000 on a cluster (docs/tracking.md)",
    )
    experiment: str = option("fearec-dist", "MLflow experiment runs and sweeps are logged to")
    tracking_parent: str = option(
        "", "MLflow run id this run is a child of (tune sets it: the sweep's run); usually empty"
    )
    worker_resources: dict[str, float] = option(
        {},
        'custom Ray resources each worker also requests, e.g. {"trainer_slot": 1} '
        "(the names must match the nodes' --resources)",
    )

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"run.workers: must be >= 0, got {self.workers}")
        if self.max_failures < -1:  # Ray: -1 = restart without limit
            raise ConfigError(f"run.max_failures: must be >= -1, got {self.max_failures}")
        if self.checkpoints_to_keep < 1:  # the newest holds the resume state and best weights
            raise ConfigError(
                f"run.checkpoints_to_keep: must be >= 1, got {self.checkpoints_to_keep}"
            )
        if self.checkpoint_every_steps < 0:
            raise ConfigError(
                f"run.checkpoint_every_steps: must be >= 0, got {self.checkpoint_every_steps}"
            )
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"run.cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if self.tracking_uri and not self.experiment.strip():
            raise ConfigError("run.experiment: must name an MLflow experiment when tracking")
        self.tracking_uri = resolve_tracking_uri(self.tracking_uri)
        if not self.progress_every_s >= 0:
            raise ConfigError(f"run.progress_every_s: must be >= 0, got {self.progress_every_s}")
        resources = {}
        for name, amount in self.worker_resources.items():
            key = f"run.worker_resources.{name}"
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"run.worker_resources: resource names must be strings, got {name!r}"
                )
            if name in ("CPU", "GPU"):
                raise ConfigError(
                    f"{key}: set CPUs and GPUs with run.cpus_per_worker / run.use_gpu"
                )
            ok, value = coerce(amount, float)
            if not ok or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{key}: must be a number >= 0, got {amount!r}")
            resources[name] = value
        self.worker_resources = resources


def resolve_tracking_uri(uri: str) -> str:
    """A local MLflow store as an absolute URI (Ray workers do not share the driver's working
    directory): ``./mlruns``, ``file:mlruns`` -> ``file:///abs/mlruns``; ``sqlite:///x.db`` ->
    ``sqlite:////abs/x.db``; ``http://…``, ``databricks`` and the like as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    local = not re.match(r"^[A-Za-z][\w+.-]*:", uri) and uri not in ("", "databricks")
    if uri.startswith("file:") or local:  # file:rel, file:/abs, file:///abs, or a bare path
        return Path(re.sub(r"^file:(//)?", "", uri)).resolve().as_uri()
    return uri

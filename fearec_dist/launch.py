"""Ray start-up, and the one formula for what a training run asks of the cluster.

Owns: ``init_ray`` (debug and local modes start an instance here, cluster mode joins the running
one at ``RAY_ADDRESS``), ``start_local_ray`` (a local instance with its dashboard on 127.0.0.1),
``worker_resources`` (what each train worker requests) and ``cpus_per_run`` (a run's workers plus
its Ray Data read tasks), which both the local instance size and Tune's concurrent-trial count
(``max_concurrent_trials``) are derived from.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

from fearec_dist.config import ExperimentConfig
from fearec_dist.data.examples import DATA_TASK_CPUS

# a run's Ray Data tasks beside its workers: room for two at once (each takes DATA_TASK_CPUS)
DATA_TASKS_CPUS = 2 * DATA_TASK_CPUS


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Ray resources each train worker requests: its CPUs, a GPU when asked, custom ones."""
    resources = {"CPU": cfg.run.cpus_per_worker} | ({"GPU": 1} if cfg.run.use_gpu else {})
    return resources | cfg.run.worker_resources  # custom node resources, e.g. one slot per node


def cpus_per_run(cfg: ExperimentConfig) -> float:
    """CPUs one trainer run occupies: its workers plus its Ray Data read tasks."""
    return max(cfg.run.workers, 1) * cfg.run.cpus_per_worker + DATA_TASKS_CPUS


def max_concurrent_runs(cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """How many trainer runs (Tune trials) fit on a cluster with ``cluster`` resources at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    if cfg.run.use_gpu:
        return max(1, int(cluster.get("GPU", 0) // max(cfg.run.workers, 1)))
    return max(1, int(cluster.get("CPU", 1) // cpus_per_run(cfg)))


def init_ray(mode: str, cfg: ExperimentConfig, concurrent_runs: int = 1) -> bool:
    """Starts or joins Ray for a training ``mode``; returns True when this call started it.

    ``concurrent_runs``: trainer runs that will share a local instance (Tune trials).
    """
    need = concurrent_runs * cpus_per_run(cfg)
    # Logical CPUs: room for the workers plus Ray Data's read tasks, or both wait on each other.
    return connect_ray(mode, num_cpus=max(os.cpu_count() or 1, math.ceil(need) + 2))


def connect_ray(mode: str = "auto", num_cpus: int | None = None, dashboard: bool = True) -> bool:
    """The one place Ray is started or joined; returns True when this call started it (the
    caller stops it with ``ray.shutdown()``), False when Ray was already initialised.

    Args:
        mode: ``"cluster"`` joins the cluster at ``RAY_ADDRESS`` (or the local head, ``auto``) and
            fails with a clear message when there is none; ``"local"`` and ``"debug"`` start a
            local instance; ``"auto"`` joins ``RAY_ADDRESS`` when it is set, else starts one.
        num_cpus: logical CPUs of a local instance (default: the machine's).
        dashboard: start a local instance's dashboard (training needs it, see ``start_local_ray``;
            prepare, batch scoring and serving do not, and start faster without it).
    """
    import ray  # here, not at the top: the CLI validates configs before paying Ray's import

    if ray.is_initialized():
        return False
    if mode == "auto":
        mode = "cluster" if os.environ.get("RAY_ADDRESS") else "local"
    if mode == "cluster":
        address = os.environ.get("RAY_ADDRESS", "auto")
        try:
            ray.init(address=address)
        except ConnectionError as err:
            raise RuntimeError(
                f"no running Ray cluster at {address!r} ({err}). Start one (`ray start --head`, "
                "see docs/cluster.md), set RAY_ADDRESS, or use --local / --debug."
            ) from None
        return True
    start_local_ray(num_cpus or os.cpu_count() or 1, dashboard=dashboard)
    return True


@contextlib.contextmanager
def ray_session(mode: str = "auto", num_cpus: int | None = None, dashboard: bool = False):
    """``connect_ray`` for the length of a ``with`` block; stops Ray after it if it started it."""
    started = connect_ray(mode, num_cpus=num_cpus, dashboard=dashboard)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def start_local_ray(
    num_cpus: int, object_store_memory: int | None = None, dashboard: bool = True
) -> Any:
    """``ray.init(address="local")`` with the dashboard on 127.0.0.1 and a job-wide
    ``RAY_API_SERVER_ADDRESS`` pointing at it.

    Train V2's placement-group cleaner reads the State API (served by the dashboard) to notice a
    dead controller, e.g. a Tune trial stopped by ASHA; without it the trial's CPUs leak and the
    next trials wait forever. Naming the address keeps it on this instance even when other Ray
    instances run on the machine. ``object_store_memory`` (bytes) caps the object store (Ray's
    default: 30 % of RAM); beyond it objects spill to disk. ``dashboard=False`` starts neither
    (for work that starts no Train run: prepare, batch scoring, serving).
    """
    import socket

    import ray

    if not dashboard:
        return ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )

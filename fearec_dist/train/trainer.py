"""TorchTrainer wiring: from an experiment config to a finished run, in any of the three modes.

1. ``ensure_prepared``: raw input (or the synthetic generator) -> ``prepare`` (cached by content).
2. ``build_examples``: target-bucketed training examples + valid/test rows (cached by L).
3. ``build_datasets``: Ray datasets over them (train: whole buckets; valid/test: rows).
4. ``build_trainer``: ``TorchTrainer(train_func, ScalingConfig, RunConfig, DataConfig)``.
5. ``run_training``: fit, then print where the outputs are.

Modes: ``debug`` runs ``train_func`` in this process (Train V2 local mode, ``num_workers=0``);
``local`` starts a Ray instance on this machine with N workers; ``cluster`` joins the running
cluster (``RAY_ADDRESS``, as inside ``ray job submit``). Nothing in ``train_func`` asks which.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from typing import Any

from fearec_dist.config import ExperimentConfig, StorageSection

MODES = ("debug", "local", "cluster")


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.run.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(uri: str) -> str:
    """Ray wants absolute local paths; URIs pass through."""
    if "://" in uri and not uri.startswith("file://"):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


def ensure_prepared(cfg: ExperimentConfig, progress: bool = True) -> str:
    """Returns a prepared dataset URI, running ``prepare`` first when the config names raw input."""
    data = cfg.data
    if data.format == "prepared":
        if not data.path:
            raise ValueError("data.path is empty: name a prepared dataset or raw input")
        return data.path
    from fearec_dist.data.prepare import prepare_dataset
    from fearec_dist.storage import exists

    skip = ("storage", "max_seq_len", "n_buckets")
    key = json.dumps({k: v for k, v in data.__dict__.items() if k not in skip}, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    cache = f"{storage_root(cfg.run.storage_path)}/_prepared/{data.format}-{digest}"
    out = data.prepared_path or cache
    if exists(f"{out}/meta.json", data.storage):
        print(f"[fearec-dist] using prepared data at {out}")
        return out
    print(f"[fearec-dist] preparing {data.format} input {data.path or '(generated)'} -> {out}")
    prepare_dataset(
        data.path, data.format, out, data=data, attributes_uri=data.attributes, progress=progress
    )
    return out


def build_datasets(info: dict[str, Any], storage: StorageSection) -> dict[str, Any]:
    from fearec_dist.data.feed import eval_dataset, train_dataset

    return {
        "train": train_dataset(info, storage),
        "valid": eval_dataset(info, "valid", storage),
        "test": eval_dataset(info, "test", storage),
    }


def _uneven_data_config() -> Any:
    """A DataConfig that splits every dataset with ``streaming_split(equal=False)``.

    Ray's default (``equal=True``) cuts blocks to even out shards: it would cut a target bucket in
    two and drop evaluation rows (a dropped row is a user never scored).
    """
    from ray.train import DataConfig

    class UnevenSplitDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output: list[dict[str, Any]] = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(
                    ds.streaming_split(world_size, equal=False, locality_hints=hints)
                ):
                    output[i][name] = split
            return output

    return UnevenSplitDataConfig()


def _storage_filesystem(uri: str, storage: StorageSection) -> Any:
    if "://" not in uri or uri.startswith("file://"):
        return None
    from fearec_dist.storage import resolve

    return resolve(uri, storage)[0]


def build_trainer(
    cfg: ExperimentConfig,
    datasets: dict[str, Any],
    info: dict[str, Any],
    *,
    mode: str = "local",
    name: str | None = None,
    callbacks: tuple[Any, ...] = (),
) -> Any:
    """A ``TorchTrainer`` for ``cfg`` over ``datasets`` (``mode="debug"``: zero workers)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from fearec_dist.train.loop import train_func

    name = name or run_name(cfg)
    root = storage_root(cfg.run.storage_path)
    fs = _storage_filesystem(root, cfg.data.storage)
    storage_path = root.split("://", 1)[1] if fs is not None else root
    workers = 0 if mode == "debug" else max(1, cfg.run.workers)
    resources = {"CPU": cfg.run.cpus_per_worker} | ({"GPU": 1} if cfg.run.use_gpu else {})
    resources |= cfg.run.worker_resources  # custom node resources, e.g. one slot per node
    return TorchTrainer(
        train_func,
        train_loop_config={
            "experiment": cfg.to_dict(),
            "examples": info,
            "run_dir": f"{root}/{name}",
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=_uneven_data_config(),
    )


def init_ray(mode: str, cfg: ExperimentConfig, concurrent_runs: int = 1) -> bool:
    """Starts or joins Ray for ``mode``; returns True when this call started it (caller stops).

    ``concurrent_runs``: trainer runs that will share a local instance (Tune trials).
    """
    import ray

    if ray.is_initialized():
        return False
    if mode == "cluster":
        address = os.environ.get("RAY_ADDRESS", "auto")
        try:
            ray.init(address=address)
        except ConnectionError as err:
            raise RuntimeError(
                f"no running Ray cluster at {address!r} ({err}). Start one (`ray start --head`, "
                "see README 'Run on a cluster'), set RAY_ADDRESS, or use --local / --debug."
            ) from None
        return True
    need = concurrent_runs * (max(cfg.run.workers, 1) * cfg.run.cpus_per_worker + 0.5)
    # Logical CPUs: room for the workers plus Ray Data's read tasks, or both wait on each other.
    start_local_ray(max(os.cpu_count() or 1, math.ceil(need) + 2))
    return True


def start_local_ray(num_cpus: int) -> Any:
    """``ray.init(address="local")`` with the dashboard on 127.0.0.1 and a job-wide
    ``RAY_API_SERVER_ADDRESS`` pointing at it.

    Train V2's placement-group cleaner reads the State API (served by the dashboard) to notice a
    dead controller, e.g. a Tune trial stopped by ASHA; without it the trial's CPUs leak and the
    next trials wait forever. Naming the address keeps it on this instance even when other Ray
    instances run on the machine.
    """
    import socket

    import ray

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


def prepare_run(cfg: ExperimentConfig) -> tuple[str, dict[str, Any]]:
    """Prepared data + examples (both cached); returns (prepared URI, examples info)."""
    from fearec_dist.data.examples import build_examples

    prepared = ensure_prepared(cfg)
    info = build_examples(prepared, cfg.data.max_seq_len, cfg.data.n_buckets, cfg.data.storage)
    print(
        f"[fearec-dist] examples: {info['n_train']:,} train / {info['n_valid']:,} valid / "
        f"{info['n_test']:,} test, {info['n_items']:,} items, {len(info['buckets'])} buckets "
        f"(largest {info['largest_bucket']:,}) at {info['uri']}"
    )
    return prepared, info


class TrainingFailed(RuntimeError):
    """The run failed; the message says why in one line, then the workers' error report."""


# what a lost connection to object storage looks like in pyarrow's and botocore's errors
NETWORK_MARKERS = (
    "NETWORK_CONNECTION",
    "Could not connect",
    "Couldn't connect",
    "Connection refused",
    "Connect timeout",
    "EndpointConnectionError",
    "Could not resolve host",
)


def training_error(err: BaseException, cfg: ExperimentConfig, run_dir: str) -> Exception:
    """A clear error for a failed ``fit()``: a lost S3 endpoint is named as such (after the S3
    client's bounded retries and Ray's ``max_failures`` restarts), anything else keeps the
    workers' report under a one-line summary."""
    from fearec_dist.data.errors import DataError
    from fearec_dist.storage import (
        CONNECT_TIMEOUT_S,
        MAX_ATTEMPTS,
        endpoint_of,
        redact,
    )

    text = str(err)
    causes = re.findall(r"^\s*(\w*(?:Error|Exception)\b:? .*)$", text, flags=re.MULTILINE)
    cause = causes[-1].strip() if causes else (text.strip().splitlines() or [repr(err)])[-1]
    uris = (cfg.run.storage_path, cfg.data.path, cfg.data.prepared_path)
    if any(u.startswith(("s3://", "s3a://")) for u in uris) and any(
        m in text for m in NETWORK_MARKERS
    ):
        endpoint = endpoint_of(cfg.data.storage) or "AWS S3 (default endpoint)"
        return DataError(
            f"lost the connection to the S3 endpoint {redact(endpoint)}: gave up after "
            f"{MAX_ATTEMPTS} attempts per request ({CONNECT_TIMEOUT_S:.0f} s connect timeout) "
            f"and {cfg.run.max_failures} restart(s) (run.max_failures). The last complete "
            f"checkpoint stays in {run_dir}; run again with the same name to resume. "
            f"Cause: {cause[:500]}"
        )
    return TrainingFailed(f"training failed: {cause[:500]}\n\n{text}")


def run_training(cfg: ExperimentConfig, mode: str = "local") -> dict[str, Any]:
    """Trains ``cfg`` in ``mode`` and returns the run's ``results.json`` content."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    from fearec_dist.models import validate_model_section
    from fearec_dist.storage import read_json

    validate_model_section(cfg.model.name, cfg.model.params, cfg.data.max_seq_len)
    started = init_ray(mode, cfg)
    try:
        name = run_name(cfg)
        run_dir = f"{storage_root(cfg.run.storage_path)}/{name}"
        print(f"[fearec-dist] run {name} ({mode} mode) -> {run_dir}")
        _, info = prepare_run(cfg)
        trainer = build_trainer(
            cfg, build_datasets(info, cfg.data.storage), info, mode=mode, name=name
        )
        t0 = time.time()
        try:
            result = trainer.fit()
        except Exception as err:  # Train V2 raises the workers' error from fit()
            raise training_error(err, cfg, run_dir) from err
        if getattr(result, "error", None):
            raise training_error(result.error, cfg, run_dir)
        results = read_json(f"{run_dir}/results.json", cfg.data.storage)
        print(f"[fearec-dist] finished in {time.time() - t0:.0f} s; outputs in {run_dir}")
        return results
    finally:
        if started:
            import ray

            ray.shutdown()

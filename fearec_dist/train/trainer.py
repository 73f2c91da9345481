"""TorchTrainer wiring: from an experiment config to a finished run, in any of the three modes.

Owns ``build_trainer`` (``TorchTrainer(train_func, ScalingConfig, RunConfig)``, the data in its
train loop config) and ``run_training`` (start Ray -> prepared data and examples -> datasets ->
fit -> results), plus the one-line error of a failed fit. Everything it wires lives elsewhere: the
datasets in ``data/datasets.py``, Ray start-up and the resource formula in ``launch.py``, storage in
``storage.py``, the per-worker story in ``train/loop.py``.

Modes: ``debug`` runs ``train_func`` in this process (Train V2 local mode, ``num_workers=0``);
``local`` starts a Ray instance on this machine with N workers; ``cluster`` joins the running
cluster (``RAY_ADDRESS``, as inside ``ray job submit``). Nothing in ``train_func`` asks which.

The config is validated by the command that loads it (``cli.py``), before Ray starts; this module
takes a checked ``ExperimentConfig``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from fearec_dist.config import ExperimentConfig
from fearec_dist.data.datasets import build_datasets, eval_shards, prepare_run, start_feed
from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.launch import init_ray, worker_resources
from fearec_dist.models import build_config, get_spec
from fearec_dist.storage import (
    connection_lost_error,
    is_connection_lost,
    ray_storage,
    read_json,
    storage_root,
)
from fearec_dist.tracking import check_tracking, end_run
from fearec_dist.train.build import check_warm_start
from fearec_dist.train.loop import train_func

MODES = ("debug", "local", "cluster")


def run_name(cfg: ExperimentConfig) -> str:
    return cfg.run.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_trainer(
    cfg: ExperimentConfig,
    datasets: dict[str, Any],
    info: ExamplesInfo | None,
    *,
    mode: str = "local",
    name: str | None = None,
    callbacks: tuple[Any, ...] = (),
) -> Any:
    """A ``TorchTrainer`` for ``cfg`` (``mode="debug"``: zero workers). Its train loop config
    carries the run's ``EpochPlanner`` (the training stream) and each rank's share of
    ``datasets`` (``{"valid", "test"}``, from ``build_datasets``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = name or run_name(cfg)
    storage_path, fs = ray_storage(cfg.run.storage_path, cfg.storage)
    workers = 0 if mode == "debug" else max(1, cfg.run.workers)
    pair = get_spec(cfg.model.name).needs_partner(build_config(cfg.model.name, cfg.model.params))
    return TorchTrainer(
        train_func,
        train_loop_config={
            "experiment": cfg.to_dict(),
            "examples": info.to_dict() if info else None,
            "run_dir": f"{storage_root(cfg.run.storage_path)}/{name}",
            # the run's training stream (none for a trainer built without examples, to inspect)
            "planner": start_feed(cfg, info, max(1, workers), pair) if info else None,
            # each rank's valid/test rows
            "eval": eval_shards(datasets, max(1, workers)),
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.run.use_gpu, resources_per_worker=worker_resources(cfg)
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            callbacks=list(callbacks),
        ),
    )


class TrainingFailed(RuntimeError):
    """The run failed; the message says why in one line, then the workers' error report."""


def training_error(err: BaseException, cfg: ExperimentConfig, run_dir: str) -> Exception:
    """A clear error for a failed ``fit()``: a lost S3 endpoint is named as such (after the S3
    client's bounded retries and Ray's ``max_failures`` restarts), anything else keeps the
    workers' report under a one-line summary."""

    text = str(err)
    causes = re.findall(r"^\s*(\w*(?:Error|Exception)\b:? .*)$", text, flags=re.MULTILINE)
    cause = causes[-1].strip() if causes else (text.strip().splitlines() or [repr(err)])[-1]
    if is_connection_lost(text, (cfg.run.storage_path, cfg.data.path, cfg.data.prepared_path)):
        detail = (
            f"and {cfg.run.max_failures} restart(s) (run.max_failures). The last complete "
            f"checkpoint stays in {run_dir}; run again with the same name to resume"
        )
        return connection_lost_error(cfg.storage, detail, cause)
    return TrainingFailed(f"training failed: {cause[:500]}\n\n{text}")


def run_training(cfg: ExperimentConfig, mode: str = "local") -> dict[str, Any]:
    """Trains ``cfg`` (already validated) in ``mode``; returns the run's ``results.json``."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {MODES}")
    check_tracking(cfg.run.tracking_uri)  # MLflow's client installed when tracking

    started = init_ray(mode, cfg)
    try:
        name = run_name(cfg)
        run_dir = f"{storage_root(cfg.run.storage_path)}/{name}"
        print(f"[fearec-dist] run {name} ({mode} mode) -> {run_dir}")
        _, info = prepare_run(cfg)
        check_warm_start(cfg, info)  # a refused source named before any worker starts
        trainer = build_trainer(cfg, build_datasets(cfg, info), info, mode=mode, name=name)
        t0 = time.time()
        try:
            result = trainer.fit()
        except Exception as err:  # Train V2 raises the workers' error from fit()
            end_run(cfg, run_dir, "FAILED")  # the MLflow run, when tracked
            raise training_error(err, cfg, run_dir) from err
        except KeyboardInterrupt:
            end_run(cfg, run_dir, "KILLED")
            raise
        if getattr(result, "error", None):
            end_run(cfg, run_dir, "FAILED")
            raise training_error(result.error, cfg, run_dir)
        results = read_json(f"{run_dir}/results.json", cfg.storage)
        print(f"[fearec-dist] finished in {time.time() - t0:.0f} s; outputs in {run_dir}")
        return results
    finally:
        if started:
            import ray  # here: configs are checked and prepared before Ray's import is paid

            ray.shutdown()

"""Hyper-parameter sweeps: Ray Tune over the distributed trainer, ASHA on per-epoch reports.

    fearec-dist tune --config jobs/configs/demo.yaml --space jobs/spaces/fearec.yaml --local

Each trial runs ``train_driver_fn``: a whole ``TorchTrainer`` run (its own workers, from the
config) with ``TuneReportCallback``, so every epoch's report reaches ASHA, which may stop the trial
after any epoch. Trials read the prepared data from its URI; nothing large travels through the
driver. Ray Train V2's way (``Tuner(trainer)`` is deprecated since Ray 2.43).

Space file: dotted config keys mapped to one sampler each::

    train.lr: {loguniform: [1.0e-4, 1.0e-2]}
    model.hidden_dropout: {choice: [0.2, 0.5]}
    model.n_layers: {grid: [1, 2]}
    model.global_ratio: {uniform: [0.6, 1.0]}

Outputs in ``<tune.storage_path>/<tune.name>/``: ``trials.csv``, ``trials.md``,
``best_config.yaml`` (a ready-to-use train config) and ``curves.png`` (``tune.metric`` per epoch of
every trial, so early stopping is visible). Running again with the same name resumes the sweep.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import yaml

from fearec_dist.config import ConfigError, ExperimentConfig, config_from_saved, deep_merge
from fearec_dist.data.datasets import build_datasets, prepare_run
from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.launch import init_ray, max_concurrent_runs
from fearec_dist.models import validate_model_section
from fearec_dist.storage import ray_storage, storage_root, write_bytes
from fearec_dist.tracking import SweepTracking
from fearec_dist.train.trainer import build_trainer

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


def read_space(path: str | Path) -> dict[str, dict[str, list[Any]]]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"search space file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: expected a mapping of dotted config keys to samplers")
    return raw


def validate_space(space: dict[str, Any], cfg: ExperimentConfig, source: str) -> None:
    """Checks every key and range before any trial starts; errors name the key."""

    for key, spec in space.items():
        where = f"{source}: {key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(SAMPLERS)}: [...]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
                raise ConfigError(f"{where}: {kind} needs [low, high] numbers")
            low, high = (float(a) for a in args)
            if not low < high:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {low}")
            values = [args[0], args[1]] if kind != "randint" else [int(low), int(high) - 1]
        else:
            values = args
        for value in values:  # every value must make a valid config
            trial = _apply(cfg.to_dict(), {key: value})
            try:
                tcfg = ExperimentConfig.from_dict(trial, where)
                validate_model_section(tcfg.model.name, tcfg.model.params, tcfg.data.max_seq_len)
            except ConfigError as err:
                raise ConfigError(f"{where} = {value!r}: {err}") from None


def _apply(base: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def to_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> Tune samplers, nested like the experiment dict."""
    from ray import tune

    make = {
        "choice": lambda a: tune.choice(a),
        "grid": lambda a: tune.grid_search(a),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    flat = {k: make[next(iter(v))](next(iter(v.values()))) for k, v in space.items()}
    return _apply({}, flat)


def eval_key(cfg: ExperimentConfig) -> tuple[Any, ...]:
    """What the valid/test rows of a run depend on beyond the (shared) examples."""
    return (cfg.train.evaluate, cfg.train.valid_users, cfg.train.seed)


def train_driver_fn(config: dict[str, Any], evals: dict[str, Any] | None = None) -> None:
    """One trial: a full trainer run whose per-epoch reports reach Tune (and ASHA). ``evals``:
    the sweep's valid/test rows, read once for every trial (a trial whose space changes what
    they depend on, ``eval_key``, reads its own)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    # saved configs: a sweep restored after an upgrade may carry retired keys
    base = config_from_saved(config["base"], "sweep config")
    cfg = config_from_saved(deep_merge(config["base"], config["params"]), "trial config")
    info = ExamplesInfo.from_dict(config["examples"])
    if evals is None or eval_key(cfg) != eval_key(base):
        evals = build_datasets(cfg, info)
    # No timestamp in the name: restoring the sweep must find the same run directory.
    name = f"{config['sweep_name']}-{tune.get_context().get_trial_id()}"
    trainer = build_trainer(
        cfg, evals, info, mode="cluster", name=name, callbacks=(TuneReportCallback(),)
    )
    trainer.fit()  # code after this does not run when ASHA stops the trial


def run_sweep(cfg: ExperimentConfig, space_path: str | Path, mode: str = "local") -> dict[str, Any]:
    """Runs (or resumes) the sweep; returns the best trial's summary. ``cfg`` is not changed."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = read_space(space_path)
    cfg = copy.deepcopy(cfg)  # the sweep's own copy: the caller's config stays as it was
    cfg.train.eval_every = 1  # every report carries the metric ASHA reads
    validate_space(space, cfg, str(space_path))
    started = init_ray(mode, cfg, concurrent_runs=cfg.tune.max_concurrent_trials or 2)
    try:
        name = cfg.tune.name or f"{cfg.model.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        root = storage_root(cfg.tune.storage_path)
        cfg.run.storage_path = f"{root}/{name}/runs"
        cfg.train.epochs = cfg.tune.max_t
        _, info = prepare_run(cfg)
        # the valid/test rows, read once for all trials (they stay in the object store)
        trainable = tune.with_parameters(train_driver_fn, evals=build_datasets(cfg, info))
        trainable = tune.with_resources(trainable, {"CPU": cfg.tune.driver_cpus})
        concurrent = max_concurrent_runs(cfg, ray.cluster_resources())
        path = f"{root}/{name}"
        # the storage layer's filesystem: the endpoint may be given only in the config
        storage_path, fs = ray_storage(root, cfg.storage)
        experiment = f"{storage_path}/{name}"
        restoring = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
        # the sweep's MLflow parent run (run.tracking_uri): sets run.tracking_parent for trials
        tracking = SweepTracking(cfg, name, path, space, resume=restoring)
        if restoring:
            print(f"[fearec-dist] resuming sweep {path}")
            tuner = tune.Tuner.restore(
                experiment, trainable, resume_errored=True, storage_filesystem=fs
            )
        else:
            print(
                f"[fearec-dist] sweep {name}: {cfg.tune.num_samples} samples, "
                f"{concurrent} concurrent trials -> {path}"
            )
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "base": cfg.to_dict(),
                    "params": to_param_space(space),
                    "examples": info.to_dict(),
                    "sweep_name": name,
                },
                tune_config=tune.TuneConfig(
                    scheduler=ASHAScheduler(
                        time_attr="epoch",  # not training_iteration: step checkpoints report too
                        metric=cfg.tune.metric,
                        mode=cfg.tune.mode,
                        max_t=cfg.tune.max_t,
                        grace_period=cfg.tune.grace_period,
                        reduction_factor=cfg.tune.reduction_factor,
                    ),
                    num_samples=cfg.tune.num_samples,
                    max_concurrent_trials=concurrent,
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage_path, storage_filesystem=fs
                ),
            )
        try:
            grid = tuner.fit()
        except BaseException as err:
            tracking.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        summary = write_sweep_outputs(grid, cfg, path)
        tracking.finish(summary)  # KILLED for the trials ASHA stopped; the best trial tagged
        return summary
    finally:
        if started:
            ray.shutdown()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_sweep_outputs(grid: Any, cfg: ExperimentConfig, path: str) -> dict[str, Any]:
    """trials.csv, trials.md, best_config.yaml and curves.png from the Tune result grid."""
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "max" else -1)
    rows, curves = [], {}
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and "step_in_epoch" in df:  # step checkpoints: not epoch results
            df = df[df["step_in_epoch"].isna()]
        trial_id = (result.metrics or {}).get("trial_id", Path(result.path).name)
        series = df[metric].dropna().tolist() if df is not None and metric in df else []
        params = _flatten(result.config.get("params", {}))
        best = max(series, key=lambda v: sign * v) if series else math.nan
        epochs = int(df["epoch"].max()) if df is not None and "epoch" in df else 0
        status = "error" if result.error else ("stopped" if epochs < cfg.tune.max_t else "done")
        rows.append(
            {
                "trial": trial_id,
                **params,
                "best": best,
                "last": series[-1] if series else math.nan,
                "epochs": epochs,
                "status": status,
            }
        )
        curves[trial_id] = (df["epoch"].tolist(), df[metric].tolist()) if series else ([], [])
    rows.sort(key=lambda r: -sign * r["best"] if not math.isnan(r["best"]) else math.inf)
    out_dir = path.rstrip("/")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    files = {
        "trials.csv": buf.getvalue().encode(),
        "trials.md": (f"metric: {metric} ({cfg.tune.mode})\n\n" + "\n".join(md)).encode(),
    }
    best = rows[0] if rows else None
    if best is not None:
        best_params = {
            k: v for k, v in best.items() if k not in ("trial", "best", "last", "epochs", "status")
        }
        best_cfg = ExperimentConfig.from_dict(_apply(cfg.to_dict(), best_params))
        best_cfg.run.storage_path, best_cfg.run.name = "./runs", ""
        best_cfg.run.tracking_parent = ""
        files["best_config.yaml"] = yaml.safe_dump(best_cfg.to_dict(), sort_keys=False).encode()
    files["curves.png"] = _plot(curves, metric)
    for file_name, data in files.items():  # through the storage layer: s3:// lands in the bucket
        write_bytes(f"{out_dir}/{file_name}", data, cfg.storage)
    print(f"[fearec-dist] sweep results in {out_dir}: {', '.join(files)}")
    return {"best": best, "n_trials": len(rows), "path": out_dir, "trials": rows}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(curves: dict[str, tuple[list, list]], metric: str) -> bytes:
    """PNG: the metric per epoch of every trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for trial, (x, y) in curves.items():
        if x:
            ax.plot(x, y, marker="o", label=trial)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("ASHA sweep: every trial, stopped ones end early")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()

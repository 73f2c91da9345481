"""``fearec-dist daily``: one day of continuous training, in six steps (docs/daily.md).

    fearec-dist daily --config F --input s3://logs/interactions [--format parquet] [--local]

1. read the pipeline's pointer (``pointer.read_state``: generation G, the promoted model);
2. append the new input to ``data.path`` (``prepare --append``; a full prepare when the dataset
   does not exist yet). Nothing new, and this dataset version already decided: a no-op;
3. train on the newest version under the temporal protocol, warm-started from the promoted
   run (``train.warm_start``; cold on the first day), ``daily.warm_epochs`` and
   ``daily.train_days`` (``data.train_since``) on warm days;
4. export the run (``serve/export.export_run``);
5. score the new and the promoted export on the same test rows (``compare.score_export``);
6. promote when the new one wins by ``daily.min_gain`` (``pointer.promote``: a conditional
   create of generation G + 1), and record the decision: the pipeline's ``decisions/``, the
   run's ``results.json["daily"]``, the run's MLflow run, stdout.

A failure at any step leaves the pointer where it was and is recorded as a ``failed`` decision.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from fearec_dist.config import ConfigError, ExperimentConfig, deep_merge
from fearec_dist.data.prepare import NothingNew, prepare_dataset
from fearec_dist.data.temporal import DAY, SplitProtocol, resolve_protocol
from fearec_dist.data.versions import list_versions, resolve_version
from fearec_dist.launch import init_ray
from fearec_dist.pipeline.compare import decide, score_export, warm_items
from fearec_dist.pipeline.pointer import (
    PipelineState,
    list_decisions,
    pipeline_root,
    promote,
    read_state,
    record_decision,
)
from fearec_dist.serve.export import export_run
from fearec_dist.storage import read_json, redact, storage_root, write_json
from fearec_dist.tracking import Tracker, saved_tracking
from fearec_dist.train.trainer import run_training

STEPS = ("pointer", "append", "train", "export", "compare", "promote")


class DailyFailed(RuntimeError):
    """A day failed at ``step``; the pointer was left where it was."""

    def __init__(self, step: str, err: BaseException, state: PipelineState | None) -> None:
        where = "nothing promoted yet" if state else "not read"
        if state is not None and state.current:
            where = f"generation {state.generation}, export {state.current.get('export')}"
        super().__init__(
            f"daily: failed at step {step}: {' '.join(str(err).split())[:800]}\n"
            f"  the pointer is unchanged ({where})"
        )
        self.step, self.cause = step, err


def check_daily(cfg: ExperimentConfig) -> None:
    """The config a daily job needs, checked before Ray starts (each error names the key)."""
    data, daily = cfg.data, cfg.daily
    if data.format != "prepared" or not data.path:
        raise ConfigError(
            "data.path must name the prepared dataset the days are appended to, with "
            f"data.format: prepared (got format {data.format!r}); the raw log is --input"
        )
    if data.split != "temporal" or data.valid_days is None or data.test_days is None:
        raise ConfigError(
            "the daily job needs data.split: temporal with data.valid_days and data.test_days "
            "(cuts counted back from the newest interaction, so the windows move with each day)"
        )
    if data.version is not None:
        raise ConfigError("data.version: the daily job trains on the version it appends; unset it")
    if data.train_since is not None:
        raise ConfigError(
            "data.train_since is a fixed time; a daily job moves it with daily.train_days"
        )
    if cfg.train.warm_start:
        raise ConfigError("train.warm_start: the daily job starts from its pointer; unset it")
    if not cfg.train.evaluate:
        raise ConfigError("train.evaluate: the daily job needs validation (the best weights)")
    if daily.metric_k() not in cfg.train.topk:
        raise ConfigError(
            f"daily.promote_metric {daily.promote_metric}: K={daily.metric_k()} is not in "
            f"train.topk {cfg.train.topk}; add it there"
        )


def append_input(cfg: ExperimentConfig, input_uri: str, fmt: str) -> tuple[int, dict | None]:
    """Step 2: appends ``input_uri`` to ``data.path`` (prepares it when it does not exist);
    returns (the newest version, its meta when this call wrote it, else None)."""
    root = storage_root(cfg.data.path)
    data = dataclasses.replace(cfg.data, columns=dict(cfg.data.columns))  # append may edit it
    append = bool(list_versions(root, cfg.storage))
    try:
        meta = prepare_dataset(input_uri, fmt, root, data=data, attributes_uri=cfg.data.attributes,
                               progress=False, append=append)  # fmt: skip
    except NothingNew as done:
        print(f"[fearec-dist] {done}")
        return list_versions(root, cfg.storage)[-1].version, None
    print(f"[fearec-dist] {'appended' if append else 'prepared'}: version {meta['version']} "
          f"({meta['n_interactions']:,} interactions, {meta['n_users']:,} users)")  # fmt: skip
    return int(meta["version"]), meta


def finished_day(
    cfg: ExperimentConfig, state: PipelineState, version: int
) -> dict[str, Any] | None:
    """What makes a day with nothing new a no-op: the pointer already on a model of this
    dataset version, or a decision (promoted or rejected) recorded for it."""
    lineage = {"uri": redact(storage_root(cfg.data.path)), "version": version}
    if state.current and state.current.get("data") == lineage:
        return {"decision": "promoted", "run": state.current.get("run")}
    decided = [
        d
        for d in list_decisions(state.root, version, cfg.storage)
        if d.get("decision") in ("promoted", "rejected") and d.get("data") == lineage
    ]
    return decided[-1] if decided else None


def day_config(
    cfg: ExperimentConfig, state: PipelineState, version: int, protocol: SplitProtocol
) -> ExperimentConfig:
    """Step 3's config: this version pinned, a run name of its own, the warm start."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    over: dict[str, Any] = {
        "run": {"name": f"{cfg.daily.name}-v{version}-{stamp}"},
        "data": {"version": version},
    }
    if state.current and cfg.daily.warm_start:  # a warm day
        over["train"] = {"warm_start": state.current["run"],
                         "warm_start_optimizer": cfg.daily.warm_optimizer}  # fmt: skip
        if cfg.daily.warm_epochs is not None:
            over["train"]["epochs"] = cfg.daily.warm_epochs
        if cfg.daily.train_days is not None:
            since = math.floor(protocol.valid_start - cfg.daily.train_days * DAY)
            over["data"]["train_since"] = since
    return ExperimentConfig.from_dict(deep_merge(cfg.to_dict(), over), "daily job")


def run_daily(
    cfg: ExperimentConfig, input_uri: str, fmt: str = "parquet", mode: str = "local"
) -> dict[str, Any]:
    """One day (the six steps above); returns the decision (``"decision"``: promoted,
    rejected or noop).

    Raises:
        DailyFailed: a step failed (recorded as a ``failed`` decision; the pointer unchanged).
    """
    check_daily(cfg)
    started = init_ray(mode, cfg)
    step, state, record = STEPS[0], None, {"pipeline": cfg.daily.name, "input": redact(input_uri)}
    seconds: dict[str, float] = {}
    clock = time.time()
    try:
        root = pipeline_root(cfg)
        state = read_state(root, cfg.storage)
        record |= {"generation_read": state.generation, "started_at": _now()}
        step = "append"
        version, meta = append_input(cfg, input_uri, fmt)
        record["data"] = {"uri": redact(storage_root(cfg.data.path)), "version": version}
        record["appended"] = meta is not None
        seconds["append"] = _lap(clock)
        if meta is None and (done := finished_day(cfg, state, version)):
            print(
                f"[fearec-dist] daily {cfg.daily.name}: nothing to do: no new data, and dataset "
                f"version {version} was already decided ({done.get('decision')}, run "
                f"{done.get('run')}); the pointer stays at generation {state.generation}"
            )
            return record | {"decision": "noop", "generation": state.generation}
        step = "train"
        version_uri = resolve_version(cfg.data.path, version, cfg.storage).uri
        day = day_config(cfg, state, version, resolve_protocol(cfg.data, version_uri, cfg.storage))
        record["run"] = f"{storage_root(day.run.storage_path)}/{day.run.name}"
        record["warm_start"] = day.train.warm_start
        clock = time.time()
        results = run_training(day, mode)
        run_dir = record["run"]
        seconds["train"] = _lap(clock)
        step, clock = "export", time.time()
        manifest = export_run(run_dir, index=cfg.daily.index, storage=cfg.storage)
        seconds["export"] = _lap(clock)
        step, clock = "compare", time.time()
        cut = results["protocol"]
        protocol = SplitProtocol("temporal", cut["valid_start"], cut["test_start"])
        record |= compare(cfg, state, version_uri, protocol, run_dir, manifest, results)
        seconds["compare"] = _lap(clock)
        step = "promote"
        if record["decision"] == "promoted":
            promoted = promote(state, pointer_of(record, run_dir, manifest, cut), cfg.storage)
            record["generation"] = promoted["generation"]
        else:
            record["generation"] = state.generation
        record |= {"seconds": seconds, "finished_at": _now()}
    except Exception as err:
        failed = DailyFailed(step, err, state)
        if state is not None:
            _record_failure(state.root, record | {"step": step, "seconds": seconds}, err, cfg)
        raise failed from err
    finally:
        if started:
            import ray

            ray.shutdown()
    try:  # the decision is made (and a promotion is in the history): this no longer fails the day
        record["decision_file"] = record_decision(root, record, cfg.storage)
        report(cfg, record, run_dir)
    except Exception as err:  # noqa: BLE001 - said, and the day's outcome stands
        print(f"[fearec-dist] daily {cfg.daily.name}: {record['decision']}, but recording the "
              f"decision failed: {' '.join(str(err).split())[:500]}")  # fmt: skip
    return record


def compare(
    cfg: ExperimentConfig,
    state: PipelineState,
    version_uri: str,
    protocol: SplitProtocol,
    run_dir: str,
    manifest: dict[str, Any],
    results: dict[str, Any],
) -> dict[str, Any]:
    """Step 5: both exports on the day's test rows; the decision and its reason."""
    metric = cfg.daily.promote_metric
    warm = warm_items(version_uri, protocol, cfg.storage)
    new = score_export(manifest["uri"], version_uri, protocol, cfg.train, cfg.storage, warm)
    current, before = None, None
    if state.current:
        current = score_export(state.current["export"], version_uri, protocol, cfg.train,
                               cfg.storage, warm)  # fmt: skip
        before = {"run": state.current["run"], "export": state.current["export"],
                  "generation": state.generation, "data": state.current.get("data"),
                  "test": current}  # fmt: skip
    promoted, reason = decide(new[metric], current and current[metric], metric,
                              cfg.daily.min_gain)  # fmt: skip
    return {
        "decision": "promoted" if promoted else "rejected",
        "reason": reason,
        "metric": metric,
        "min_gain": cfg.daily.min_gain,
        "protocol": results.get("protocol"),
        "new": {
            "run": run_dir,
            "export": manifest["uri"],
            "export_id": manifest["export_id"],
            "data": _lineage_of(results),
            "test": new,
            "run_test": results.get("test"),
            "warm_start": results.get("warm_start"),
        },
        "current": before,
    }


def pointer_of(
    record: dict[str, Any], run_dir: str, manifest: dict[str, Any], cut: dict[str, Any]
) -> dict[str, Any]:
    """The pointer of a promoted model (DESIGN.md's ``current.json``)."""
    return {
        "export": manifest["uri"],
        "run": run_dir,
        "data": manifest.get("data") or record["data"],
        "test": record["new"]["test"],
        "protocol": cut,
        "promoted_at": _now(),
        "pipeline": record["pipeline"],
        "metric": record["metric"],
        "reason": record["reason"],
        "export_id": manifest["export_id"],
        "model": manifest.get("model"),
    }


def report(cfg: ExperimentConfig, record: dict[str, Any], run_dir: str) -> None:
    """The decision on stdout, in the run's ``results.json`` and on its MLflow run."""
    metric, new, cur = record["metric"], record["new"]["test"], record["current"]
    print(f"[fearec-dist] daily {record['pipeline']}: {record['decision'].upper()} "
          f"{record['new']['run']} (generation {record['generation']})")  # fmt: skip
    line = f"  {metric}: new {new[metric]:.4f}"
    if cur:
        line += f", current {cur['test'][metric]:.4f} ({cur['run']})"
    print(f"{line} on {new['n_users']:,} test rows\n  reason: {record['reason']}")
    print(f"  decision recorded in {redact(record['decision_file'])}")
    results = read_json(f"{run_dir}/results.json", cfg.storage)
    write_json(f"{run_dir}/results.json", results | {"daily": record}, cfg.storage)
    saved = saved_tracking(run_dir, cfg.storage)
    if saved.get("run_id"):
        tracker = Tracker(saved["uri"], saved.get("experiment") or "")
        tracker.run_id = saved["run_id"]
        text = json.dumps(record, indent=2, default=str)
        tracker.submit(lambda client: client.log_text(tracker.run_id, text, "daily/decision.json"))
        tracker.set_tags({"daily.pipeline": record["pipeline"],
                          "daily.decision": record["decision"],
                          "daily.reason": record["reason"][:500],
                          "daily.generation": record["generation"]})  # fmt: skip
        scores = {f"daily/new_{metric}": new[metric]}
        if cur:
            scores[f"daily/current_{metric}"] = cur["test"][metric]
        tracker.log_metrics(scores, step=0)
        tracker.close()


def _record_failure(root: str, record: dict[str, Any], err: BaseException, cfg) -> None:
    """Best effort: a failed day's record (the storage itself may be what failed)."""
    body = record | {"decision": "failed", "reason": " ".join(str(err).split())[:2000],
                     "finished_at": _now()}  # fmt: skip
    try:
        uri = record_decision(root, body, cfg.storage)
        print(f"[fearec-dist] daily {cfg.daily.name}: failure recorded in {redact(uri)}")
    except Exception as again:  # noqa: BLE001 - the original error is what the user needs
        print(f"[fearec-dist] daily {cfg.daily.name}: could not record the failure: {again}")


def _lineage_of(results: dict[str, Any]) -> dict[str, Any]:
    """``{"uri", "version"}`` of a run's ``results.json["data"]`` (which says more)."""
    data = results.get("data") or {}
    return {"uri": data.get("uri"), "version": data.get("version")}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _lap(start: float) -> float:
    return round(time.time() - start, 2)

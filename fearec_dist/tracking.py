"""Experiment tracking with MLflow: every run and sweep trial recorded; a tracker outage never
fails or stalls training.

    fearec-dist train --config F --set run.tracking_uri=file:./mlruns   # or http://host:5000

Owns ``Tracker`` (one MLflow run, written by a background thread: calls only queue, failures are
dropped with one warning, waits are bounded), ``RunTracking`` (rank 0's run of a training run),
``SweepTracking`` (a sweep's parent run) and ``log_export``. docs/tracking.md has the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import queue
import re
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from fearec_dist.config import ConfigError, ExperimentConfig, StorageSection
from fearec_dist.storage import read_bytes, read_json, redact

# MLflow's HTTP client retries for minutes by default (7 retries, 120 s timeout): one call is
# held to 3 tries of 5 s and ~2 s of backoff here (a user's own settings are kept)
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
QUEUE_SIZE = 1000  # calls waiting to be sent; more are dropped
RETRY_AFTER_S = 30.0  # after a failed call, calls are dropped unsent for this long
EPOCH_WAIT_S, OPEN_WAIT_S, CLOSE_WAIT_S = 2.0, 10.0, 10.0  # the longest single waits
WAIT_BUDGET_S = 12.0  # all waits of one tracker together: a run ends at most ~15 s later
RUN_FILES = ("results.json", "metrics.csv", "curves.png")
SWEEP_FILES = ("trials.csv", "trials.md", "best_config.yaml", "curves.png")
TRIAL_STATUS = {"done": "FINISHED", "stopped": "KILLED", "error": "FAILED"}  # trials.csv's


class TrackingWarning(UserWarning):
    """The tracker could not be reached: what was not sent is dropped; training goes on."""


# urllib3 logs a line per retry of the client; from the tracker's thread, one warning is enough
_QUIET = lambda record: record.threadName != "fearec-mlflow"  # noqa: E731


def check_tracking(uri: str) -> None:
    """A clear error, before Ray starts, when tracking lacks its packages."""
    needs = ["mlflow"] + (["sqlalchemy", "alembic"] if uri.startswith("sqlite:") else [])
    if uri and (missing := [m for m in needs if find_spec(m) is None]):
        raise ConfigError(f"run.tracking_uri={redact(uri)!r} needs {', '.join(missing)}: pip "
                          f"install 'fearec-dist[tracking]' {' '.join(needs[1:])}")  # fmt: skip


def flatten_params(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: dotted keys, JSON values (the URI without credentials)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= flatten_params(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v, default=str)
    if "run.tracking_uri" in out:
        out["run.tracking_uri"] = redact(out["run.tracking_uri"])
    return out


def git_commit() -> str | None:
    """HEAD of the git checkout this package runs from (not of a repo it is installed in)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--show-prefix", "HEAD"], capture_output=True,
                              text=True, timeout=5, cwd=Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.split()
    ok = done.returncode == 0 and len(lines) == 2 and lines[0] == "fearec_dist/"
    return lines[1] if ok else None


def saved_tracking(run_dir: str, storage: StorageSection | None) -> dict[str, Any]:
    """``results.json["tracking"]`` of a run directory ({} when there is none)."""
    try:
        return read_json(f"{run_dir.rstrip('/')}/results.json", storage).get("tracking") or {}
    except Exception:  # no results.json yet (a fresh run), or an unreadable one
        return {}


class Tracker:
    """One MLflow run in ``experiment`` at ``uri``, written by a background thread; only
    ``wait`` and ``close`` wait, ``WAIT_BUDGET_S`` at most together."""

    def __init__(self, uri: str, experiment: str) -> None:
        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)  # MLflow's client reads them at every request
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        logging.getLogger("urllib3.connectionpool").addFilter(_QUIET)
        self.uri, self.experiment, self.run_id = uri, experiment, None
        self.dropped, self.warning, self._open_args = 0, "", {}
        self._budget, self._retry_at, self._slow, self._closed = WAIT_BUDGET_S, 0.0, False, False
        self._queue, self._submitted, self._done = queue.Queue(QUEUE_SIZE), 0, 0
        self._cond = threading.Condition()
        threading.Thread(target=self._work, name="fearec-mlflow", daemon=True).start()

    def open(self, run_name: str, *, run_id: Callable[[], str | None] | None = None,
             find: str = "", parent_id: str = "", tags: dict[str, Any] | None = None,
             params: dict[str, str] | None = None) -> int:  # fmt: skip
        """Resumes the run ``run_id()`` (called on the thread) names, else the newest matching
        ``find``; else creates one (a child of ``parent_id`` when given)."""
        parent = {"mlflow.parentRunId": parent_id} if parent_id else {}  # MLflow's parent link
        self._open_args = dict(run_name=run_name, run_id=run_id, find=find,
                               tags=(tags or {}) | parent, params=params or {})  # fmt: skip
        return self.submit(self.ensure_run)

    def log_metrics(self, values: dict[str, Any], step: int) -> int:
        """The numeric, finite ``values`` at ``step``."""
        ts = int(time.time() * 1000)
        # MLflow allows [/\w.\- ] in names: valid/hr@10 -> valid/hr_at_10
        metrics = [(re.sub(r"[^/\w.\- ]", "_", k.replace("@", "_at_")), float(v), ts, step)
                   for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)]  # fmt: skip
        return self.submit(lambda client: self._log_batch(client, metrics=metrics))

    def set_tags(self, tags: dict[str, Any]) -> int:
        return self.submit(lambda client: self._log_batch(client, tags=tags))

    def log_files(self, files: dict[str, str], storage: StorageSection | None = None) -> int:
        """Artifacts ``{name: uri}`` read through the storage layer (missing ones skipped)."""
        return self.submit(lambda client: self._send_files(client, files, storage))

    def finish(self, status: str, tags: dict[str, Any] | None = None) -> int:
        """Ends the run as ``FINISHED``, ``FAILED`` or ``KILLED`` (MLflow's run statuses)."""
        return self.submit(lambda client: self._log_batch(client, tags=tags, status=status))

    def submit(self, op: Callable[[Any], Any]) -> int:
        """Queues ``op(client)``; returns its number for ``wait`` (0: dropped)."""
        with self._cond:
            if self._closed:
                return 0
            try:
                self._queue.put_nowait((self._submitted + 1, op))
            except queue.Full:
                self.dropped += 1
                self._warn(f"more than {QUEUE_SIZE} calls waiting")
                return 0
            self._submitted += 1
            return self._submitted

    def wait(self, seq: int, at_most: float) -> bool:
        """Until call ``seq`` is done (sent or dropped), at most ``at_most`` s within the budget;
        not at all while failing or slow (a wait ran out, no call succeeded since)."""
        start = time.monotonic()
        with self._cond:
            if seq == 0 or self._slow or self._failing():
                return 0 < seq <= self._done
            timeout = max(0.0, min(at_most, self._budget))
            done = self._cond.wait_for(lambda: self._done >= seq or self._failing(), timeout)
            self._slow = not done
        self._budget -= time.monotonic() - start
        if not done:
            self._warn(f"no answer within {timeout:.0f} s")
        return self._done >= seq

    def close(self, at_most: float = CLOSE_WAIT_S) -> None:
        """Waits (bounded) for the queued calls; what is left then is dropped unsent."""
        if not self.wait(seq := self._submitted, at_most) and self._done < seq:
            self.dropped += seq - self._done  # the thread drops them unsent, uncounted
            self._warn(f"{seq - self._done} call(s) not sent before the end")
        self._closed = True

    def experiment_id(self, client: Any) -> str:
        if (exp := client.get_experiment_by_name(self.experiment)) is None:
            try:
                return client.create_experiment(self.experiment)
            except Exception:  # created meanwhile (by another trial)
                exp = client.get_experiment_by_name(self.experiment)
        return exp.experiment_id

    def ensure_run(self, client: Any) -> str:
        """The run id, opening the run first (again, after a failed try)."""
        if self.run_id is not None:
            return self.run_id
        o, exp_id = self._open_args, self.experiment_id(client)
        run_id = o["run_id"]() if o["run_id"] else None
        if not run_id and o["find"]:
            found = client.search_runs([exp_id], o["find"], max_results=1,
                                       order_by=["attributes.start_time DESC"])  # fmt: skip
            run_id = found[0].info.run_id if found else None
        try:
            run = client.get_run(run_id) if run_id else None
        except Exception:  # deleted, or from another store: a new run
            run = None
        commit = git_commit()
        tags = o["tags"] | ({"mlflow.source.git.commit": commit} if commit else {})
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")  # resumed
        else:
            run = client.create_run(exp_id, tags=tags, run_name=o["run_name"])
        self.run_id = run.info.run_id
        # a param cannot change: a resumed run keeps its first values (results.json has all)
        params = {k: v for k, v in o["params"].items() if k not in run.data.params}
        self._log_batch(client, tags=tags, params=params)
        return self.run_id

    def _log_batch(self, client: Any, metrics: list[tuple] | None = None,
                   tags: dict[str, Any] | None = None, params: dict[str, str] | None = None,
                   status: str = "") -> None:  # fmt: skip
        from mlflow.entities import Metric, Param, RunTag

        run_id, n = self.ensure_run(client), 100  # MLflow's limit of params and tags per batch
        metric_list = [Metric(*m) for m in metrics or []]
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        for i in range(0, max(len(tag_list), len(param_list), 1), n):
            client.log_batch(run_id, metrics=metric_list if i == 0 else [],
                             params=param_list[i : i + n], tags=tag_list[i : i + n])  # fmt: skip
        if status:
            client.set_terminated(run_id, status)

    def _send_files(self, client: Any, files: dict[str, str], storage: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="fearec-mlflow-") as tmp:
            for name, uri in files.items():
                try:
                    Path(tmp, name).write_bytes(read_bytes(uri, storage))
                except FileNotFoundError:
                    continue
            client.log_artifacts(self.ensure_run(client), tmp)

    def _work(self) -> None:
        try:
            from mlflow import MlflowClient  # here: a 2-5 s import, off the training thread

            client = MlflowClient(tracking_uri=self.uri)
        except Exception as err:  # whatever it is: untracked, never a crash
            client = None
            self._fail(err)
        while True:
            try:
                seq, op = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if client is None or self._closed or self._failing():
                self.dropped += not self._closed
            else:
                try:
                    op(client)
                    self._slow = False
                except Exception as err:
                    self._fail(err)
            with self._cond:
                self._done = seq
                self._cond.notify_all()

    def _failing(self) -> bool:
        return time.monotonic() < self._retry_at

    def _fail(self, err: Any) -> None:
        """A call failed after the client's retries: dropped, as are the next RETRY_AFTER_S."""
        self.dropped += not self._closed
        self._retry_at = time.monotonic() + RETRY_AFTER_S
        self._warn(" ".join(str(err).split())[:300])
        with self._cond:
            self._cond.notify_all()

    def _warn(self, why: str) -> None:
        if not self.warning:  # one warning per tracker
            self.warning = (f"[fearec-dist] MLflow tracking at {redact(self.uri)}: {why}. What "
                            "cannot be sent is dropped, without further warnings; training "
                            "goes on, and the run's own files are complete.")  # fmt: skip
            warnings.warn(self.warning, TrackingWarning, stacklevel=3)


class RunTracking:
    """Rank 0's MLflow run of a training run, named after its run directory; a resumed run
    goes on with the one its ``results.json`` names (or, before that, its RUNNING one)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str) -> None:
        self.run_dir, self.storage = run_dir.rstrip("/"), cfg.storage
        self.tracker = Tracker(cfg.run.tracking_uri, cfg.run.experiment)
        tag = redact(self.run_dir)
        find = f"tags.run_dir = '{tag}' and attributes.status = 'RUNNING'" * ("'" not in tag)
        earlier = lambda: saved_tracking(self.run_dir, self.storage).get("run_id")  # noqa: E731
        self.tracker.open(posixpath.basename(self.run_dir), run_id=earlier, find=find,
                          parent_id=cfg.run.tracking_parent, params=flatten_params(cfg.to_dict()),
                          tags={"model": cfg.model.name, "run_dir": tag})  # fmt: skip

    def info(self) -> dict[str, Any]:  # results.json["tracking"]
        t = self.tracker
        return {"uri": redact(t.uri), "experiment": t.experiment, "run_id": t.run_id}

    def log_epoch(self, row: dict[str, Any], results: dict[str, Any]) -> None:
        """The epoch row's numeric values at step = epoch; waits briefly until they are sent
        (call it before ``ray.train.report``: ASHA may stop the trial right after it)."""
        data = results.get("data", {})  # the run's data: uri, fingerprint, version when known
        keys = ("uri", "fingerprint", "version")
        self.tracker.set_tags({f"data.{k}": data[k] for k in keys if data.get(k) is not None})
        seq = self.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                       step=int(row["epoch"]))  # fmt: skip
        self.tracker.wait(seq, EPOCH_WAIT_S if self.tracker.run_id else OPEN_WAIT_S)

    def log_outputs(self) -> None:
        """``results.json``, ``metrics.csv`` and ``curves.png`` as artifacts (each epoch)."""
        self.tracker.log_files({n: f"{self.run_dir}/{n}" for n in RUN_FILES}, self.storage)

    def end(self, status: str, tags: dict[str, Any] | None = None) -> None:
        """Ends the run (``FINISHED``; the driver's ``FAILED`` / ``KILLED``) and closes."""
        self.tracker.finish(status, tags)
        self.tracker.close()


def end_run(cfg: ExperimentConfig, run_dir: str, status: str) -> None:
    """The driver's FAILED (``fit`` failed) or KILLED (interrupted) for a tracked run."""
    if cfg.run.tracking_uri:
        RunTracking(cfg, run_dir).end(status)


class SweepTracking:
    """A sweep's parent run; sets ``run.tracking_parent`` in ``cfg`` (the sweep's copy) for
    the trials' child runs, or untracks them when it is not open within ``OPEN_WAIT_S``."""

    def __init__(self, cfg: ExperimentConfig, name: str, path: str, space: dict[str, Any],
                 resume: bool) -> None:  # fmt: skip
        self.tracker: Tracker | None = None
        if not cfg.run.tracking_uri:
            return
        check_tracking(cfg.run.tracking_uri)
        self.name, self.path, self.storage = name, path.rstrip("/"), cfg.storage
        self.metric, sweep_dir = cfg.tune.metric, redact(self.path)
        self.tracker = Tracker(cfg.run.tracking_uri, cfg.run.experiment)
        find = f"tags.sweep_dir = '{sweep_dir}'" * (resume and "'" not in sweep_dir)
        params = flatten_params(cfg.to_dict()) | {f"space.{k}": json.dumps(v)
                                                  for k, v in space.items()}  # fmt: skip
        tags = {"model": cfg.model.name, "sweep_dir": sweep_dir, "tune.metric": self.metric}
        seq = self.tracker.open(name, find=find, params=params, tags=tags)
        if self.tracker.wait(seq, OPEN_WAIT_S) and self.tracker.run_id:
            cfg.run.tracking_parent = self.tracker.run_id
        else:
            cfg.run.tracking_uri = ""  # no parent run: the trials are not tracked either
            self.tracker._warn(f"no parent run within {OPEN_WAIT_S:.0f} s: trials untracked")

    def finish(self, summary: dict[str, Any]) -> None:
        """Trials ASHA stopped end KILLED; the best one tagged, its config and metric here."""
        if self.tracker is None:
            return
        trials = {f"{self.name}-{r['trial']}": r for r in summary.get("trials", [])}
        best, parent = summary.get("best") or {}, self.tracker.run_id

        def send(client: Any) -> None:
            children = client.search_runs([self.tracker.experiment_id(client)],
                                          f"tags.mlflow.parentRunId = '{parent}'",
                                          max_results=5000)  # fmt: skip
            for child in children:
                row = trials.get(child.info.run_name)
                # Tune's verdict decides: a trial ASHA stopped may have run to its end (and ended
                # its run FINISHED) before the stop reached it; trials.csv says stopped, so here too
                if row is not None and child.info.status != TRIAL_STATUS[row["status"]]:
                    client.set_terminated(child.info.run_id, TRIAL_STATUS[row["status"]])
                if row is not None and row["trial"] == best.get("trial"):
                    client.set_tag(child.info.run_id, "best_trial", "true")
                    client.set_tag(parent, "best_run_id", child.info.run_id)

        self.tracker.submit(send)
        if best:
            tags = {f"best.{k}": v for k, v in best.items()
                    if k not in ("trial", "best", "last", "epochs", "status")}  # fmt: skip
            self.tracker.set_tags({"best_trial": best["trial"], **tags})
            self.tracker.log_metrics({f"best/{self.metric}": best["best"]}, step=0)
        self.tracker.log_files({n: f"{self.path}/{n}" for n in SWEEP_FILES}, self.storage)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        if self.tracker is not None:
            self.tracker.finish(status)
            self.tracker.close()


def log_export(run_dir: str, manifest: dict[str, Any], storage: StorageSection | None,
               say: Callable[[str], None] = print) -> None:  # fmt: skip
    """An export's manifest (artifact ``export/manifest.json``) on a tracked run it came from."""
    saved = saved_tracking(run_dir, storage)
    if not saved.get("run_id") or find_spec("mlflow") is None:
        return
    tracker = Tracker(saved["uri"], saved.get("experiment") or "")
    tracker.run_id, text = saved["run_id"], json.dumps(manifest, indent=2, default=str)
    tracker.submit(lambda client: client.log_text(tracker.run_id, text, "export/manifest.json"))
    tracker.set_tags({"export.uri": redact(manifest["uri"]), "export.id": manifest["export_id"]})
    tracker.close()
    if not tracker.warning:
        say(f"[fearec-dist] export logged to MLflow run {tracker.run_id} ({redact(tracker.uri)})")

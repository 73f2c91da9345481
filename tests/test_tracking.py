"""MLflow tracking read back from a real local store (MLflow's file store in tmp_path, through
``MlflowClient``): params, metric histories, tags, artifacts, a resumed run and an export; and the
outage bound: a tracker at a closed port, or at a server that accepts and never answers, adds at
most ``OUTAGE_BOUND_S`` to a run. The sweep's parent/child runs are checked in
tests/test_tune.py's ASHA sweep (tracked there, so no second sweep runs)."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

import fearec_dist
from fearec_dist.config import ConfigError, load_config
from fearec_dist.config.run import resolve_tracking_uri
from fearec_dist.tracking import RunTracking, Tracker, TrackingWarning, flatten_params
from tests.conftest import free_port

mlflow = pytest.importorskip("mlflow", reason="pip install 'fearec-dist[tracking]'")

OUTAGE_BOUND_S = 15.0  # docs/tracking.md: a tracked run ends at most 15 s after an untracked one
TINY = [
    "data.format=synthetic",
    "data.synthetic_users=200",
    "data.synthetic_items=40",
    "data.max_seq_len=16",
    "model.name=sasrec",
    "model.hidden_size=16",
    "model.inner_size=32",
    "train.batch_size=64",
    "run.cpus_per_worker=0.5",
]


def client_for(uri: str):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return mlflow.MlflowClient(tracking_uri=uri)


def test_config_resolves_a_local_store_and_params_hide_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("./mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path}/m.db"
    for uri in ("", "sqlite:////abs/m.db", "http://h:5000", "databricks", "file:///abs/mlruns"):
        assert resolve_tracking_uri(uri) == uri
    cfg = load_config(None, ["run.tracking_uri=https://user:secret@mlflow.example/"])
    params = flatten_params(cfg.to_dict())
    assert params["run.tracking_uri"] == "https://mlflow.example/"
    assert params["train.lr"] == "0.001" and params["run.worker_resources"] == "{}"
    assert "secret" not in json.dumps(params)
    with pytest.raises(ConfigError, match="run.experiment"):
        load_config(None, ["run.tracking_uri=file:/tmp/x", "run.experiment= "])


def test_tracker_writes_a_run_and_a_resume_continues_it(tmp_path):
    uri = (tmp_path / "mlruns").as_uri()
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")
    tracker = Tracker(uri, "unit")
    tracker.open("r1", tags={"model": "sasrec"}, params={"train.lr": "0.001"})
    for epoch in (1, 2):  # bools, NaN and strings are not metrics; "@" is not allowed in names
        row = {"valid/hr@10": 0.1 * epoch, "train/loss": 1 / epoch, "ok": True, "x": "s"}
        tracker.log_metrics(row | {"gone": float("nan")}, step=epoch)
    tracker.log_files({"metrics.csv": str(tmp_path / "metrics.csv"), "no.png": "/nope/no.png"})
    tracker.finish("FINISHED", {"stopped_early": "false"})
    tracker.close()
    assert tracker.warning == "" and tracker.dropped == 0

    client = client_for(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params == {"train.lr": "0.001"}
    assert set(run.data.metrics) == {"valid/hr_at_10", "train/loss"}
    history = client.get_metric_history(tracker.run_id, "valid/hr_at_10")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2)]
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=Path(fearec_dist.__file__).parent)  # fmt: skip
    assert run.data.tags.get("mlflow.source.git.commit") == (git.stdout.strip() or None)
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["metrics.csv"]

    again = Tracker(uri, "unit")  # a resumed run: same MLflow run, first params kept
    again.open("r1", run_id=lambda: tracker.run_id, params={"train.lr": "0.5", "new": "1"})
    again.log_metrics({"train/loss": 0.25}, step=3)
    again.finish("KILLED")
    again.close()
    run = client.get_run(tracker.run_id)
    assert again.run_id == tracker.run_id and again.warning == ""
    assert run.info.status == "KILLED"
    assert run.data.params == {"train.lr": "0.001", "new": "1"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1, 2, 3]


def test_a_sweep_ends_its_trial_runs_as_tune_saw_them(tmp_path):
    """trials.csv decides each child run's end: a trial ASHA stopped ends KILLED even when its
    run raced to FINISHED before the stop reached it (seen once in CI), a done one FINISHED."""
    from fearec_dist.tracking import SweepTracking

    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, [*TINY, f"run.tracking_uri={uri}"])
    sweep = SweepTracking(cfg, "tiny", str(tmp_path / "sweep"), {"train.lr": {"grid": [1]}}, False)
    client, parent = client_for(uri), cfg.run.tracking_parent
    experiment = client.get_experiment_by_name(cfg.run.experiment).experiment_id
    ended = {"a": ("FINISHED", "stopped"), "b": ("RUNNING", "done"), "c": ("RUNNING", "stopped"),
             "d": ("KILLED", "done"), "e": ("RUNNING", "error")}  # fmt: skip
    ids = {}
    for trial, (status, _) in ended.items():
        run = client.create_run(experiment, run_name=f"tiny-{trial}",
                                tags={"mlflow.parentRunId": parent})  # fmt: skip
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        ids[trial] = run.info.run_id
    rows = [{"trial": t, "status": s, "best": 0.5} for t, (_, s) in ended.items()]
    sweep.finish({"trials": rows, "best": rows[1]})
    want = {"stopped": "KILLED", "done": "FINISHED", "error": "FAILED"}
    for trial, (_, row_status) in ended.items():
        assert client.get_run(ids[trial]).info.status == want[row_status], trial
    assert client.get_run(ids["b"]).data.tags["best_trial"] == "true"
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.fixture
def silent_server():
    """``http://127.0.0.1:<port>``: accepts connections and never answers; the connections it
    held are listed in the second item."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", held
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        srv.close()


@pytest.mark.parametrize("outage", ["closed port", "never answers"])
def test_a_tracker_outage_never_stalls_the_run(outage, tmp_path, silent_server, caplog):
    """Three epochs of 0.5 s through the Reporter's calls (RunTracking); untracked, they take
    1.5 s. Tracked at a dead URI they end within OUTAGE_BOUND_S of that, with one warning, and
    the run's own files untouched (urllib3's per-retry log lines silenced)."""
    uri = f"http://127.0.0.1:{free_port()}" if outage == "closed port" else silent_server[0]
    cfg = load_config(None, [*TINY, f"run.tracking_uri={uri}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"valid": {}}))
    epochs, epoch_s = 3, 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.monotonic()
        tracking = RunTracking(cfg, str(run_dir))
        for epoch in range(1, epochs + 1):
            time.sleep(epoch_s)  # the epoch's training
            tracking.log_epoch({"epoch": epoch, "train/loss": 1 / epoch}, {"data": {"uri": "x"}})
            tracking.log_outputs()
        tracking.end("FINISHED")
        elapsed = time.monotonic() - start
    print(f"{outage}: tracked {elapsed:.1f} s, untracked {epochs * epoch_s:.1f} s")
    assert elapsed <= epochs * epoch_s + OUTAGE_BOUND_S
    ours = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(ours) == 1 and uri in str(ours[0].message)
    assert "training goes on" in str(ours[0].message)
    assert tracking.tracker.run_id is None and tracking.tracker.dropped >= 1
    assert json.loads((run_dir / "results.json").read_text()) == {"valid": {}}
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]  # one warning, ours
    if outage == "never answers":
        assert silent_server[1], "the client never connected"


@pytest.mark.slow
def test_tracked_debug_run_reads_back(ray_session, tmp_path):
    """2 epochs in debug mode, tracked to a file store: every param, one value per epoch of
    each metric, tags, the run's files as artifacts, FINISHED. (``export`` logging its manifest
    to the run is checked on the local-mode run of tests/test_tune.py's sweep test.)"""
    from fearec_dist.train.trainer import run_training

    uri = (tmp_path / "mlruns").as_uri()
    tracked = [f"run.storage_path={tmp_path}/runs", f"run.tracking_uri={uri}"]
    short = ["train.epochs=2", "train.max_steps_per_epoch=10", "run.name=tracked"]
    cfg = load_config(None, [*TINY, *short, *tracked])
    results = run_training(cfg, mode="debug")
    run_id = results["tracking"]["run_id"]
    assert results["tracking"] == {"uri": uri, "experiment": "fearec-dist", "run_id": run_id}

    client = client_for(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params == flatten_params(cfg.to_dict())
    with open(tmp_path / "runs" / "tracked" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("train/loss", "valid/hr@10", "valid/masked_ndcg@10", "samples_per_s"):
        history = client.get_metric_history(run_id, key.replace("@", "_at_"))
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows]), key
    tags = run.data.tags
    assert tags["model"] == "sasrec" and tags["run_dir"] == str(tmp_path / "runs" / "tracked")
    assert tags["data.fingerprint"] == results["data"]["fingerprint"]
    assert tags["data.uri"] == results["data"]["uri"] and tags["stopped_early"] == "False"
    assert "mlflow.parentRunId" not in tags
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"results.json", "metrics.csv", "curves.png"} <= names

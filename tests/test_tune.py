"""A real ASHA sweep on tiny synthetic data, and the space validation that runs before it."""

from __future__ import annotations

import copy
import csv
import io
from pathlib import Path

import pytest
import yaml

from fearec_dist.config import ConfigError, load_config

TINY = [
    "data.format=synthetic",
    "data.synthetic_users=200",
    "data.synthetic_items=40",
    "data.max_seq_len=16",
    "model.name=sasrec",
    "model.hidden_size=16",
    "model.inner_size=32",
    "train.batch_size=64",
    "run.workers=1",
    "run.cpus_per_worker=0.5",
    "tune.num_samples=6",
    "tune.max_t=3",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
    "tune.max_concurrent_trials=2",
    "tune.name=tiny",
]


def _space(tmp_path, space: dict) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.lrr": {"choice": [0.1]}}, r"train\.lrr"),
        ({"train.lr": {"loguniform": [0, 1]}}, r"train\.lr.*low > 0"),
        ({"train.lr": {"uniform": [0.1, 0.01]}}, r"train\.lr.*low < high"),
        ({"model.hidden_dropout": {"normal": [0, 1]}}, r"model\.hidden_dropout"),
        ({"model.not_a_key": {"choice": [1]}}, r"model\.not_a_key"),
    ],
)
def test_bad_space_fails_before_any_trial(tmp_path, space, message):
    from fearec_dist.tune import read_space, validate_space

    cfg = load_config(None, TINY)
    with pytest.raises(ConfigError, match=message):
        validate_space(read_space(_space(tmp_path, space)), cfg, "space.yaml")


def test_shipped_fearec_space_is_valid():
    from fearec_dist.tune import read_space, validate_space

    cfg = load_config(None, ["model.name=fearec_official"])
    validate_space(read_space("jobs/spaces/fearec.yaml"), cfg, "jobs/spaces/fearec.yaml")


@pytest.mark.slow
def test_asha_sweep_stops_weak_trials_and_best_config_trains(ray_session, tmp_path, monkeypatch):
    """Tracked to a local MLflow store too (docs/tracking.md): a parent run, one child run per
    trial with every epoch's metric, ASHA-stopped trials KILLED, the best trial tagged."""
    from fearec_dist.train.trainer import run_training
    from fearec_dist.tune import run_sweep

    # a grid, not random draws: strong rates first, then weak ones, so that ASHA's rung-1 cutoff
    # is set by strong trials before a weak one reports, whatever the timing (with random draws
    # that happen to arrive weakest first, no trial falls below the cutoff: seen once in CI)
    lrs = [2e-2, 1e-2, 1e-4, 2e-4, 5e-3, 5e-4]
    space = _space(tmp_path, {"train.lr": {"grid": lrs}})
    store = (tmp_path / "mlruns").as_uri()
    cfg = load_config(
        None,
        [*TINY, "tune.num_samples=1", f"tune.storage_path={tmp_path}/sweeps",
         f"run.tracking_uri={store}"],
    )  # fmt: skip
    summary = run_sweep(cfg, space, mode="local")
    assert summary["n_trials"] == 6
    out = tmp_path / "sweeps" / "tiny"
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    epochs = [int(r["epochs"]) for r in rows]
    assert max(epochs) == 3 and min(epochs) < 3  # ASHA stopped some trials early
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "trials.md").read_text().count("\n") >= 7
    check_sweep_runs(store, rows, cfg.tune.metric.replace("@", "_at_"), monkeypatch)

    best = load_config(out / "best_config.yaml", ["train.epochs=1", f"run.storage_path={tmp_path}"])
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    results = run_training(best, mode="local")
    assert results["epochs_run"] == 1
    check_export_logged(store, results, tmp_path)


@pytest.mark.slow
def test_sweep_on_s3_with_the_endpoint_only_in_the_config(
    ray_session, s3_server, tmp_path, monkeypatch
):
    """Data in, and trials.csv, trials.md, best_config.yaml, curves.png out, on the moto server,
    with the endpoint given only as ``data.storage.endpoint_url``: the driver's environment has
    no ``AWS_ENDPOINT_URL`` (the session fixture's is removed for this test), so the Tuner's
    storage, the trainers' storage and the sweep outputs all take it from the config. The
    caller's config is left as it was."""
    from fearec_dist.config import DataSection, StorageSection
    from fearec_dist.data.prepare import prepare_dataset
    from fearec_dist.tune import run_sweep

    bucket = s3_server.create_bucket("sweep-data")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    data = DataSection(synthetic_users=120, synthetic_items=30)
    data.storage = StorageSection(endpoint_url=s3_server.endpoint_url)
    prepare_dataset("", "synthetic", f"s3://{bucket}/prepared", data=data, progress=False)
    space = _space(tmp_path, {"train.lr": {"choice": [1e-3, 1e-2]}})
    overrides = [o for o in TINY if not o.startswith(("data.format", "data.synthetic", "tune."))]
    cfg = load_config(
        None,
        [
            *overrides,
            "data.format=prepared",
            f"data.path=s3://{bucket}/prepared",
            f"data.storage.endpoint_url={s3_server.endpoint_url}",
            "tune.num_samples=2",
            "tune.max_t=2",
            "tune.name=s3",
            f"tune.storage_path=s3://{bucket}/sweeps",
        ],
    )
    before = copy.deepcopy(cfg.to_dict())
    summary = run_sweep(cfg, space, mode="local")
    assert cfg.to_dict() == before  # run_sweep works on its own copy
    assert summary["n_trials"] == 2 and summary["path"] == f"s3://{bucket}/sweeps/s3"
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="sweeps/")["Contents"]}
    for name in ("trials.csv", "trials.md", "best_config.yaml", "curves.png"):
        assert f"sweeps/s3/{name}" in keys, name
    assert any(k.startswith("sweeps/s3/runs/") and k.endswith("results.json") for k in keys)
    assert not (Path.cwd() / "s3:").exists()  # nothing written to a local folder named s3:
    body = client.get_object(Bucket=bucket, Key="sweeps/s3/trials.csv")["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 2
    assert {r["status"] for r in rows} <= {"done", "stopped"}
    assert all(float(r["best"]) > 0 for r in rows)
    png = client.get_object(Bucket=bucket, Key="sweeps/s3/curves.png")["Body"].read()
    assert png[:4] == b"\x89PNG"


def check_sweep_runs(store: str, rows: list[dict], metric: str, monkeypatch) -> None:
    """The sweep's MLflow runs, read back from the store, against trials.csv's rows (``metric``:
    tune.metric as MLflow names it)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("fearec-dist").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "tiny"]
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}  # fmt: skip
    assert len(children) == len(rows) == 6
    status = {"done": "FINISHED", "stopped": "KILLED"}
    for row in rows:
        child = children[f"tiny-{row['trial']}"]
        assert child.info.status == status[row["status"]], row
        assert child.data.params["train.lr"] == row["train.lr"]
        # every epoch Tune saw; a trial ASHA stops may have logged one more before it died
        history = sorted(client.get_metric_history(child.info.run_id, metric), key=lambda m: m.step)
        seen = history[: int(row["epochs"])]
        assert [m.step for m in history] == list(range(1, len(history) + 1)), row
        assert len(seen) == int(row["epochs"]) and len(history) <= 3, row
        assert max(m.value for m in seen) == pytest.approx(float(row["best"]))
        assert (child.data.tags.get("best_trial") == "true") == (row is rows[0])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == rows[0]["trial"]
    assert parent.data.tags["best_run_id"] == children[f"tiny-{rows[0]['trial']}"].info.run_id
    assert parent.data.metrics[f"best/{metric}"] == pytest.approx(float(rows[0]["best"]))
    assert (
        parent.data.params["space.train.lr"]
        == '{"grid": [0.02, 0.01, 0.0001, 0.0002, 0.005, 0.0005]}'
    )
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_config.yaml", "curves.png"} <= names


def check_export_logged(store: str, results: dict, tmp_path: Path) -> None:
    """best_config.yaml keeps run.tracking_uri: the retrained run is tracked (on its own, no
    parent), and ``export`` puts its manifest on that run."""
    import json

    import mlflow

    from fearec_dist.serve.export import export_run

    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(results["tracking"]["run_id"])
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags
    manifest = export_run(run.data.tags["run_dir"], say=lambda *_: None)
    run = client.get_run(run.info.run_id)
    assert run.data.tags["export.id"] == manifest["export_id"]
    logged = client.download_artifacts(run.info.run_id, "export/manifest.json", str(tmp_path))
    assert json.loads(Path(logged).read_text())["export_id"] == manifest["export_id"]

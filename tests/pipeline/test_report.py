"""Where a day's decision goes: stdout, the new run's ``results.json`` (``"daily"``) and the run's
MLflow run (read back from a real file store). No Ray, no training."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fearec_dist.config import load_config
from fearec_dist.pipeline.daily import report

mlflow = pytest.importorskip("mlflow", reason="pip install 'fearec-dist[tracking]'")


def test_decision_in_stdout_results_and_the_runs_mlflow_run(tmp_path, capsys):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("daily"), run_name="shop-v2-x")
    run_dir = tmp_path / "runs" / "shop-v2-x"
    run_dir.mkdir(parents=True)
    tracking = {"uri": uri, "experiment": "daily", "run_id": run.info.run_id}
    (run_dir / "results.json").write_text(
        json.dumps({"test": {"hr@10": 0.5}, "tracking": tracking})
    )
    record = {
        "pipeline": "shop", "decision": "rejected", "metric": "ndcg@10", "generation": 4,
        "reason": "ndcg@10 0.3000 vs current 0.3100 (-3.23%); needs > 0.3100 and …",
        "new": {"run": str(run_dir), "test": {"ndcg@10": 0.3, "n_users": 57}},
        "current": {"run": "s3://b/runs/shop-v1-y", "test": {"ndcg@10": 0.31, "n_users": 57}},
        "decision_file": "s3://b/runs/pipelines/shop/decisions/x.json",
    }  # fmt: skip
    report(load_config(), record, str(run_dir))

    out = capsys.readouterr().out
    assert "daily shop: REJECTED" in out and "(generation 4)" in out
    assert "ndcg@10: new 0.3000, current 0.3100 (s3://b/runs/shop-v1-y) on 57 test rows" in out
    assert "reason: ndcg@10 0.3000 vs current" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["daily"] == record and results["tracking"] == tracking  # the rest kept

    got = client.get_run(run.info.run_id).data
    assert got.tags["daily.decision"] == "rejected" and got.tags["daily.pipeline"] == "shop"
    assert got.tags["daily.generation"] == "4" and got.tags["daily.reason"] == record["reason"]
    assert got.metrics == {"daily/new_ndcg_at_10": 0.3, "daily/current_ndcg_at_10": 0.31}
    path = client.download_artifacts(run.info.run_id, "daily/decision.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == record

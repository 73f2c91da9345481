"""Object storage end to end against moto's S3 server on 127.0.0.1: the prepared data is read
from ``s3://``, the run directory and checkpoints are written to ``s3://`` (``storage_path``),
and ``evaluate``, a resumed run and ``export`` read them back from there. Credentials come from
the environment only and never appear in any object the run writes."""

from __future__ import annotations

import json
import os

import pytest

from fearec_dist.config import DataSection, load_config

pytestmark = pytest.mark.slow


def _keys(s3_server, bucket: str, prefix: str) -> list[str]:
    pages = (
        s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_train_evaluate_and_resume_on_s3(ray_session, s3_server, capsys):
    from fearec_dist.data.prepare import prepare_dataset
    from fearec_dist.train.evaluate import evaluate_checkpoint
    from fearec_dist.train.trainer import run_training

    bucket = s3_server.create_bucket("e2e-run")
    data = DataSection(synthetic_users=160, synthetic_items=40, max_seq_len=20)
    prepare_dataset("", "synthetic", f"s3://{bucket}/prepared", data=data, progress=False)

    def cfg(epochs: int):
        return load_config(
            None,
            [
                "data.format=prepared",
                f"data.path=s3://{bucket}/prepared",
                "data.max_seq_len=20",
                "model.name=sasrec",
                f"train.epochs={epochs}",
                "train.batch_size=64",
                "run.workers=2",
                "run.cpus_per_worker=0.5",
                f"run.storage_path=s3://{bucket}/runs",
                "run.name=on-s3",
            ],
        )

    first = run_training(cfg(1), mode="local")
    assert first["epochs_run"] == 1
    keys = _keys(s3_server, bucket, "runs/on-s3/")
    for name in ("results.json", "metrics.csv", "curves.png"):
        assert f"runs/on-s3/{name}" in keys, keys
    assert any(k.startswith("runs/on-s3/checkpoint_") and k.endswith("/state.pt") for k in keys)
    assert any(k.startswith("runs/on-s3/tensorboard/") and "tfevents" in k for k in keys), keys

    # evaluate straight from the s3 run directory (its newest checkpoint)
    again = evaluate_checkpoint(f"s3://{bucket}/runs/on-s3")
    for key, value in first["test"].items():
        assert again["test"][key] == pytest.approx(value, abs=1e-9), key

    # the same name + storage path resumes from the checkpoint on s3
    capsys.readouterr()
    second = run_training(cfg(2), mode="local")
    assert "resumed at epoch 2 step 0" in capsys.readouterr().out
    assert second["epochs_run"] == 2
    body = s3_server.client().get_object(Bucket=bucket, Key="runs/on-s3/metrics.csv")["Body"]
    assert [line.split(",")[0] for line in body.read().decode().splitlines()[1:]] == ["1", "2"]

    # no credential is written anywhere
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    client = s3_server.client()
    for key in _keys(s3_server, bucket, "runs/"):
        if key.endswith((".json", ".csv", ".yaml", ".txt")):
            blob = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            assert secret not in blob and b"aws_secret" not in blob.lower(), key
    results = json.loads(
        client.get_object(Bucket=bucket, Key="runs/on-s3/results.json")["Body"].read()
    )
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(results)

    # the trainer's own run directory on s3 -> export, written beside it in the bucket
    from fearec_dist.cli import main

    assert main(["export", "--run", f"s3://{bucket}/runs/on-s3", "--index", "hnsw"]) == 0
    keys = set(_keys(s3_server, bucket, "runs/on-s3/export/"))
    for name in ("manifest.json", "items.parquet", "encoder.pt2", "index-hnsw.faiss"):
        assert f"runs/on-s3/export/{name}" in keys, sorted(keys)
    manifest = json.loads(
        client.get_object(Bucket=bucket, Key="runs/on-s3/export/manifest.json")["Body"].read()
    )
    expected = {f"test/{k}": v for k, v in second["test"].items()}
    assert manifest["metrics"]["test"] == pytest.approx(expected, abs=1e-9)
    assert manifest["encoder"]["max_abs_diff_vs_model"] < 1e-5

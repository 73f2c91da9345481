"""The one resource formula (local Ray size and Tune's concurrent trials), and the storage layer's
pieces the launchers use: Ray's storage path and filesystem, a lost S3 connection told apart."""

from __future__ import annotations

import pyarrow.fs as pafs

from fearec_dist.config import StorageSection, load_config
from fearec_dist.launch import cpus_per_run, max_concurrent_runs, worker_resources
from fearec_dist.storage import connection_lost_error, is_connection_lost, ray_storage


def test_one_formula_for_a_run_and_for_concurrent_trials():
    cfg = load_config(None, ["run.workers=2", "run.cpus_per_worker=1.5"])
    assert cpus_per_run(cfg) == 2 * 1.5 + 0.5
    assert max_concurrent_runs(cfg, {"CPU": 8}) == 2  # 8 // 3.5
    assert max_concurrent_runs(cfg, {"CPU": 1}) == 1  # always at least one
    pinned = load_config(None, ["tune.max_concurrent_trials=5"])
    assert max_concurrent_runs(pinned, {"CPU": 1}) == 5
    gpu = load_config(None, ["run.workers=2", "run.use_gpu=true"])
    assert max_concurrent_runs(gpu, {"CPU": 64, "GPU": 8}) == 4
    slots = load_config(None, ["run.use_gpu=true", "run.worker_resources={slot: 1}"])
    assert worker_resources(slots) == {"CPU": 1.0, "GPU": 1, "slot": 1.0}


def test_ray_storage_gives_remote_paths_the_configured_filesystem(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    path, fs = ray_storage(str(tmp_path / "runs") + "/", StorageSection())
    assert (path, fs) == (str(tmp_path / "runs"), None)
    storage = StorageSection(endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    path, fs = ray_storage("s3://bucket/sweeps/", storage)
    assert path == "bucket/sweeps" and isinstance(fs, pafs.S3FileSystem)
    assert fs.region == "eu-west-1"


def test_lost_s3_connection_is_told_apart():
    text = "OSError: AWS Error NETWORK_CONNECTION during HeadBucket: Could not connect"
    assert is_connection_lost(text, ("s3://bucket/runs", ""))
    assert not is_connection_lost(text, ("./runs", "/data"))  # nothing on S3
    assert not is_connection_lost("ValueError: bad shape", ("s3://bucket/runs",))
    err = connection_lost_error(
        StorageSection(endpoint_url="http://minio:9000"), "and 0 restarts", "x"
    )
    assert "lost the connection to the S3 endpoint http://minio:9000" in str(err)

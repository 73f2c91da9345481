"""Fault tolerance and resume through real Ray: a run cut after epoch k and resumed under the same
name equals an uncut run; a worker killed mid-epoch (``os._exit``) is restarted from the latest
checkpoint and the run ends as the uninterrupted one does; half-written checkpoints are skipped.

One worker with a fixed thread count: the whole-shard shuffle concatenates buckets in bucket
order, partners and permutations are seeded by (seed, epoch, bucket/rank), and the checkpoint
carries the RNG states, so the runs are bit-for-bit comparable on CPU (asserted to 1e-5).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fearec_dist.config import load_config
from fearec_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


def overrides(storage: Path, name: str, epochs: int) -> list[str]:
    return [
        "data.format=synthetic",
        "data.synthetic_users=240",
        "data.synthetic_items=50",
        "data.max_seq_len=20",
        "data.n_buckets=6",
        "model.name=fearec_official",
        f"train.epochs={epochs}",
        "train.batch_size=64",
        "train.eval_batch_size=64",
        "train.torch_threads=1",
        "train.patience=1",  # early-stopping state must survive the restart too
        "run.workers=1",
        "run.cpus_per_worker=0.5",
        "run.max_failures=1",
        f"run.storage_path={storage}",
        f"run.name={name}",
    ]


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = metrics_rows(a), metrics_rows(b)
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    compared = [k for k in rows_a[0] if k.startswith(("train/", "valid/", "test/"))]
    assert "train/loss" in compared and "valid/hr@10" in compared
    for ra, rb in zip(rows_a, rows_b):
        for key in compared:
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-5), (ra["epoch"], key)
        assert ra["best_epoch"] == rb["best_epoch"]
    state_a = ckpt.load_state(ckpt.latest_checkpoint(str(a)))
    state_b = ckpt.load_state(ckpt.latest_checkpoint(str(b)))
    assert state_a["progress"]["epoch"] == state_b["progress"]["epoch"]
    for key, value in state_a["model"].items():
        torch.testing.assert_close(value, state_b["model"][key], atol=1e-5, rtol=0)
    for key in ("best", "best_epoch", "bad_evals", "stopped_early"):
        assert state_a["progress"][key] == state_b["progress"][key], key


@pytest.fixture(scope="module")
def uncut(ray_session, storage) -> Path:
    from fearec_dist.train.trainer import run_training

    run_training(load_config(None, overrides(storage, "uncut", 4)), mode="local")
    return storage / "uncut"


def test_cut_after_epoch_2_and_resumed_equals_uncut(ray_session, storage, uncut, capsys):
    from fearec_dist.train.trainer import run_training

    first = run_training(load_config(None, overrides(storage, "cut", 2)), mode="local")
    assert first["epochs_run"] == 2
    resumed = run_training(load_config(None, overrides(storage, "cut", 4)), mode="local")
    assert "resumed from epoch 2" in capsys.readouterr().out
    assert resumed["epochs_run"] == 4
    assert [int(r["epoch"]) for r in metrics_rows(storage / "cut")] == [1, 2, 3, 4]
    assert_same_run(storage / "cut", uncut)
    assert json.loads((storage / "cut" / "results.json").read_text())["test"] == pytest.approx(
        json.loads((uncut / "results.json").read_text())["test"], abs=1e-5
    )


def test_worker_killed_mid_epoch_restarts_from_checkpoint(storage, uncut, tmp_path):
    """The CLI in its own process (and its own local Ray, which inherits the kill switch from the
    environment): rank 0 exits hard at step 2 of the third epoch, once."""
    from fearec_dist.train.faults import TEST_KILL_ENV

    marker = tmp_path / "killed"
    config = tmp_path / "killed.yaml"
    config.write_text("{}\n")
    sets = [a for o in overrides(storage, "killed", 4) for a in ("--set", o)]
    env = dict(os.environ, **{TEST_KILL_ENV: f"{marker}:2:2:0"})
    done = subprocess.run(
        [sys.executable, "-m", "fearec_dist.cli", "train", "--local", "--config", str(config)]
        + sets,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert marker.exists(), "the kill switch never fired"
    assert "exits at epoch 2 step 2" in log
    assert "resumed from epoch" in log, log[-4000:]
    assert [int(r["epoch"]) for r in metrics_rows(storage / "killed")] == [1, 2, 3, 4]
    assert_same_run(storage / "killed", uncut)


def test_half_written_checkpoint_is_never_picked(tmp_path):
    good = tmp_path / "run" / "checkpoint_000001"
    good.mkdir(parents=True)
    ckpt.save_state(good, {"progress": {"epoch": 1}})
    torn = tmp_path / "run" / "checkpoint_000002"
    torn.mkdir()
    data = (good / ckpt.STATE_FILE).read_bytes()
    (torn / ckpt.STATE_FILE).write_bytes(data[: len(data) // 2])  # a copy cut short
    (tmp_path / "run" / "checkpoint_000003").mkdir()  # created, nothing written yet
    assert ckpt.latest_checkpoint(str(tmp_path / "run")) == str(good)
    assert ckpt.load_state(ckpt.latest_checkpoint(str(tmp_path / "run")))["progress"]["epoch"] == 1
    with pytest.raises(FileNotFoundError, match="complete"):
        ckpt.latest_checkpoint(str(torn))

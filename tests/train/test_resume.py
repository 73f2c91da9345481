"""Fault tolerance and exact resume through real Ray with 2 workers: a run cut mid-epoch (at a
step checkpoint) and resumed under the same name equals an uncut run; a train worker killed with
SIGKILL from outside its process mid-epoch is restarted from the latest step checkpoint and the
run ends as the uninterrupted one does; half-written checkpoints are skipped.

The runs are bit-for-bit comparable on CPU (asserted to 1e-5): each epoch's stream is a function
of (seed, epoch, workers) (data/epochs.py), the resumed epoch replays its first k batches without
training on them, and every rank restores its own RNG states from the checkpoint.
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


EPOCHS = 3
STEPS_PER_CHECKPOINT = 8


def overrides(storage: Path, name: str, every: int = STEPS_PER_CHECKPOINT) -> list[str]:
    return [
        "data.format=synthetic",
        "data.synthetic_users=200",
        "data.synthetic_items=50",
        "data.max_seq_len=20",
        "model.name=fearec_official",
        "model.hidden_size=32",
        "model.inner_size=64",
        f"train.epochs={EPOCHS}",
        "train.batch_size=48",
        "train.eval_batch_size=64",
        "train.torch_threads=1",
        "train.shuffle_window=2048",
        "train.patience=1",  # early-stopping state must survive the restart too
        "run.workers=2",
        "run.cpus_per_worker=0.5",
        "run.max_failures=1",
        f"run.checkpoint_every_steps={every}",  # 0 for the uncut run: they must not matter
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

    run_training(load_config(None, overrides(storage, "uncut", every=0)), mode="local")
    return storage / "uncut"


def newest_progress(run_dir: Path) -> dict:
    try:
        return ckpt.load_state(ckpt.latest_checkpoint(str(run_dir)))["progress"]
    except (FileNotFoundError, OSError, RuntimeError, EOFError):
        return {}


def test_cut_mid_epoch_and_resumed_equals_uncut(ray_session, storage, uncut, tmp_path, capsys):
    """The CLI in its own process (its own local Ray inherits the kill switch): rank 1 exits hard
    at step 21 of epoch 2 and, with no restart allowed, the run ends there. Resumed in this
    process under the same name, it continues at step 16 (the last step checkpoint)."""
    from fearec_dist.train.faults import TEST_KILL_ENV
    from fearec_dist.train.trainer import run_training

    marker = tmp_path / "cut"
    config = tmp_path / "cut.yaml"
    config.write_text("{}\n")
    sets = [a for o in [*overrides(storage, "cut"), "run.max_failures=0"] for a in ("--set", o)]
    env = dict(os.environ, **{TEST_KILL_ENV: f"{marker}:1:21:1"})
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
    assert done.returncode != 0 and marker.exists(), log[-4000:]
    progress = newest_progress(storage / "cut")
    assert progress["epoch"] == 1 and progress["partial"]["steps"] == 16, progress
    assert [int(r["epoch"]) for r in metrics_rows(storage / "cut")] == [1]  # no step rows
    resumed = run_training(load_config(None, overrides(storage, "cut")), mode="local")
    assert "resumed at epoch 2 step 16" in capsys.readouterr().out
    assert resumed["epochs_run"] == EPOCHS
    assert [int(r["epoch"]) for r in metrics_rows(storage / "cut")] == [1, 2, 3]
    assert_same_run(storage / "cut", uncut)
    assert json.loads((storage / "cut" / "results.json").read_text())["test"] == pytest.approx(
        json.loads((uncut / "results.json").read_text())["test"], abs=1e-5
    )


def test_worker_killed_from_outside_mid_epoch_restarts_and_equals_uncut(
    ray_session, storage, uncut, capsys
):
    """A watcher thread waits for a step checkpoint inside epoch 2, then sends SIGKILL to one of
    the run's train workers (found through Ray's State API, as an operator would); Ray Train
    restarts the worker group (run.max_failures=1) from that checkpoint."""
    import signal
    import threading
    import time

    import ray
    from ray.util.state import list_actors

    from fearec_dist.train.trainer import run_training

    killed: list[int] = []
    errors: list[BaseException] = []
    # this Ray instance's State API (the shared session names it in the job's environment)
    api = ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]

    def watch() -> None:
        deadline = time.time() + 500
        try:
            while time.time() < deadline and not killed:
                progress = newest_progress(storage / "killed")
                if progress.get("epoch") == 1 and progress.get("partial", {}).get("steps", 0):
                    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                    workers = list_actors(address=api, filters=alive)
                    if workers:
                        os.kill(int(workers[-1]["pid"]), signal.SIGKILL)
                        killed.append(int(workers[-1]["pid"]))
                        return
                time.sleep(0.3)
        except BaseException as err:  # reported by the test, not lost in the thread
            errors.append(err)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = run_training(load_config(None, overrides(storage, "killed")), mode="local")
    watcher.join(timeout=10)
    assert not errors, errors
    assert killed, "the watcher never saw a step checkpoint inside epoch 2"
    assert "resumed at epoch 2 step" in capsys.readouterr().out
    assert results["epochs_run"] == EPOCHS
    assert [int(r["epoch"]) for r in metrics_rows(storage / "killed")] == [1, 2, 3]
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

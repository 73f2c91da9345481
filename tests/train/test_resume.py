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
from pathlib import Path

import pytest
import torch

from fearec_dist.config import load_config
from fearec_dist.train import checkpoint as ckpt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


EPOCHS = 2
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
        "train.first_epoch_head=512",  # epoch 1 in two parts (head, rest): ~6.4k examples >= 8x
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


def registered_step_in_epoch_2(run_dir: Path) -> bool:
    """Whether Ray Train has registered a step checkpoint inside epoch 2 (its snapshot lists
    it): one on disk but not yet registered is not what a restart restores from."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return any(
        r.get("metrics", {}).get("epoch") == 1 and r.get("metrics", {}).get("step_in_epoch")
        for r in snap.get("checkpoint_results", [])
    )


def registered_latest_step(run_dir: Path) -> int:
    """The step inside its epoch of the checkpoint Ray Train restores from (its snapshot's
    latest registered result): a newer step checkpoint on disk that Ray had not registered
    before the kill is not it."""
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return int(snap["latest_checkpoint_result"]["metrics"].get("step_in_epoch") or 0)


class KillInEpoch2:
    """A watcher thread: once Ray has registered a step checkpoint inside epoch 2,
    it sends SIGKILL to one of the run's train workers, found through this Ray instance's State
    API as an operator would (from outside the worker's process, no hook inside it)."""

    def __init__(self, run_dir: Path) -> None:
        import threading

        import ray

        self.run_dir, self.killed, self.errors = run_dir, [], []
        # the shared session names its State API in the job's environment
        self.api = ray.get_runtime_context().runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"]
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import signal
        import time

        from ray.util.state import list_actors

        deadline = time.time() + 500
        try:
            while time.time() < deadline and not self.killed:
                if registered_step_in_epoch_2(self.run_dir):
                    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
                    workers = list_actors(address=self.api, filters=alive)
                    if workers:
                        os.kill(int(workers[-1]["pid"]), signal.SIGKILL)
                        self.killed.append(int(workers[-1]["pid"]))
                        return
                time.sleep(0.3)
        except BaseException as err:  # reported by the test, not lost in the thread
            self.errors.append(err)

    def check(self) -> None:
        self.thread.join(timeout=10)
        assert not self.errors, self.errors
        assert self.killed, "the watcher never saw a step checkpoint inside epoch 2"


def test_cut_mid_epoch_and_resumed_equals_uncut(ray_session, storage, uncut):
    """A worker killed mid-epoch 2 with no restart allowed (run.max_failures=0) ends the run
    there; run again under the same name, it continues at the last step checkpoint."""
    from fearec_dist.train.trainer import TrainingFailed, run_training

    watcher = KillInEpoch2(storage / "cut")
    with pytest.raises(TrainingFailed):
        run_training(load_config(None, [*overrides(storage, "cut"), "run.max_failures=0"]))
    watcher.check()
    progress = newest_progress(storage / "cut")
    assert progress["epoch"] == 1 and progress["partial"]["steps"], progress  # cut in epoch 2
    steps = registered_latest_step(storage / "cut")  # where Ray Train will restart from
    assert 0 < steps <= progress["partial"]["steps"] and steps % STEPS_PER_CHECKPOINT == 0
    assert [int(r["epoch"]) for r in metrics_rows(storage / "cut")] == [1]  # no step rows
    resumed = run_training(load_config(None, overrides(storage, "cut")), mode="local")
    assert resumed["epochs_run"] == EPOCHS
    rows = metrics_rows(storage / "cut")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[0]["head_rows"]) > 0 and not rows[1].get("head_rows")  # epoch 1's head
    assert rows[1]["resumed_at_step"] == str(steps)  # epoch 2 continued at the step checkpoint
    assert_same_run(storage / "cut", uncut)
    assert json.loads((storage / "cut" / "results.json").read_text())["test"] == pytest.approx(
        json.loads((uncut / "results.json").read_text())["test"], abs=1e-5
    )


def test_worker_killed_from_outside_mid_epoch_restarts_and_equals_uncut(
    ray_session, storage, uncut
):
    """The same kill with run.max_failures=1: Ray Train restarts the worker group from the
    latest step checkpoint within the run, and the run ends as the uninterrupted one."""
    from fearec_dist.train.trainer import run_training

    watcher = KillInEpoch2(storage / "killed")
    results = run_training(load_config(None, overrides(storage, "killed")), mode="local")
    watcher.check()
    assert results["epochs_run"] == EPOCHS
    rows = metrics_rows(storage / "killed")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert int(rows[1]["resumed_at_step"]) % STEPS_PER_CHECKPOINT == 0  # from a step checkpoint
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

"""Multi-node: a real 2-node Ray cluster on this machine, one train worker per node, a few FEARec
steps. DDP's gradient all-reduce and the all-gather of InfoNCE candidates cross node boundaries
(two raylets, two object stores) as they would across machines.

The session's own Ray instance (``ray_session``) lives in this process, so the cluster runs in a
subprocess (``multinode_run.py``) with its own ``RAY_TMPDIR``; every wait there is bounded.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fearec_dist.config import ConfigError, load_config

SCRIPT = Path(__file__).with_name("multinode_run.py")
REPO = Path(__file__).resolve().parents[2]
BATCH = 16


def test_worker_resources_reach_the_scaling_config():
    from fearec_dist.train.trainer import build_trainer

    cfg = load_config(None, ["run.worker_resources={slot: 1}", "run.cpus_per_worker=0.25"])
    trainer = build_trainer(cfg, {}, {}, name="x")
    assert trainer.scaling_config.resources_per_worker == {"CPU": 0.25, "slot": 1.0}
    assert load_config(None, []).run.worker_resources == {}
    for bad in ("run.worker_resources.slot=-1", "run.worker_resources.slot=x"):
        with pytest.raises(ConfigError, match=r"run\.worker_resources\.slot"):
            load_config(None, [bad])


def _run_bounded(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[str, int | None]:
    """Runs ``cmd``; past ``timeout`` it gets SIGINT (its ``finally`` shuts the cluster down),
    then SIGKILL after 60 s more (Ray's reaper then stops the cluster's processes)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        return proc.communicate(timeout=timeout)[0], proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            log = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0]
        pytest.fail(f"the 2-node run did not finish within {timeout:.0f} s:\n{log[-6000:]}")


@pytest.mark.slow
def test_one_worker_per_node(tmp_path):
    # Ray's socket paths (under RAY_TMPDIR) must stay short, so not under tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    out = tmp_path / "out.json"
    overrides = [
        "run.name=two-nodes",
        "data.format=synthetic",
        "data.synthetic_users=120",
        "data.synthetic_items=40",
        "data.max_seq_len=10",
        "model.name=fearec_official",
        "train.epochs=2",
        f"train.batch_size={BATCH}",
        "train.eval_batch_size=64",
        "train.max_steps_per_epoch=3",
        "run.workers=2",
        "run.cpus_per_worker=0.25",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(SCRIPT), str(tmp_path / "runs"), str(out), *overrides]
    try:
        log, rc = _run_bounded(cmd, tmp_path, env, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert rc == 0, log[-6000:]
    got = json.loads(out.read_text())

    assert sorted(got["nodes"].values()) == ["node_a", "node_b"]
    assert sorted(got["worker_nodes"]) == ["node_a", "node_b"], got["worker_nodes"]

    results = got["results"]
    assert results["epochs_run"] == 2
    with open(tmp_path / "runs" / "two-nodes" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert 0 <= results["test"]["hr@10"] <= 1

    # 2 workers x batch 16 x 2 views: 64 candidates per row, 63 of them negatives
    assert "2 worker(s) x batch 16 = global batch 32" in log
    assert f"InfoNCE candidates/row {2 * 2 * BATCH - 1}" in log

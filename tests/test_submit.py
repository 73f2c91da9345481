"""`fearec-dist submit` against a real Ray head with token auth on.

The head is ``ray start --head --block`` on 127.0.0.1 with free ports, the dashboard on and
``RAY_AUTH_MODE=token``, started as a subprocess and stopped by SIGTERM to that process (never
``ray stop``, which would stop other Ray instances on the machine). Jobs go through the real
``ray job submit`` CLI, called by ``fearec_dist.submit.main``.

The fast tests at the top need no Ray: an invalid config must fail in seconds, naming the key.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from fearec_dist import submit, submit_plan
from fearec_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = "jobs/configs/demo.yaml"
SPACE = "jobs/spaces/fearec.yaml"
# The demo job made tiny: a 1-epoch, 5-step run on 200 synthetic users.
TINY = [
    "train.epochs=1",
    "train.max_steps_per_epoch=5",
    "data.synthetic_users=200",
    "data.synthetic_items=50",
    "data.max_seq_len=20",
]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# --------------------------------------------------------------------------------------------------
# no cluster needed


def test_invalid_config_fails_fast_naming_the_key(capsys):
    t0 = time.monotonic()
    rc = submit.main([DEMO, "--working-dir", str(REPO), "--set", "train.lrr=0.1"])
    assert rc == 2
    assert "train.lrr" in capsys.readouterr().err
    rc = submit.main([DEMO, "--working-dir", str(REPO), "--set", "model.hiden_size=32"])
    assert rc == 2
    assert "model.hiden_size" in capsys.readouterr().err
    assert time.monotonic() - t0 < 20  # nothing was sent; the model check imports torch once


def test_invalid_space_fails_fast(tmp_path, capsys):
    pytest.importorskip("fearec_dist.tune", reason="fearec_dist.tune (tune issue) not present")
    space = tmp_path / "space.yaml"
    space.write_text("model.n_headz: {choice: [1, 2]}\n")
    rc = submit.main([DEMO, "--working-dir", str(REPO), "--tune", str(space)])
    assert rc == 2
    assert "model.n_headz" in capsys.readouterr().err


def test_dry_run_command_and_token_stay_out_of_argv(tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("not-a-real-token-0123456789")
    args = [DEMO, "--working-dir", str(REPO), "--address", "127.0.0.1:8265"]
    args += ["--token-path", str(token), "--workers", "3", "--dry-run", *_sets(["train.lr=5e-4"])]
    plan = submit.build_plan(submit.build_submit_parser().parse_args(args))
    cmd = plan.command
    assert cmd[1:3] == ["job", "submit"]
    assert cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265"
    assert cmd[cmd.index("--working-dir") + 1] == str(REPO)
    entry = cmd[cmd.index("--") + 1 :]
    assert entry[:6] == ["python", "-m", "fearec_dist", "train", "--config", DEMO]
    assert "train.lr=5e-4" in entry and "run.workers=3" in entry
    assert f"run.storage_path={REPO / 'runs'}" in entry  # local head: made absolute
    assert "not-a-real-token" not in " ".join(cmd)
    env = plan.child_env({"RAY_AUTH_TOKEN": "stale"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert "RAY_AUTH_TOKEN" not in env  # it would win over the path
    assert submit.main(args) == 0
    assert "not-a-real-token" not in capsys.readouterr().out


def test_pip_runtime_env_lists_pinned_deps_but_not_ray():
    env = submit_plan.build_runtime_env(REPO, "pip", '{"env_vars": {"OMP_NUM_THREADS": "1"}}')
    packages = env["pip"]["packages"]
    assert any(p.startswith("torch") for p in packages)
    assert not any(p.startswith("ray") for p in packages)
    assert env["env_vars"] == {"OMP_NUM_THREADS": "1"} and ".git" in env["excludes"]


# --------------------------------------------------------------------------------------------------
# a real head node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    address: str
    token_path: Path
    tmp: Path

    def get(self, path: str, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(f"{self.address}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code
        except (urllib.error.URLError, OSError):
            return 0  # not listening (yet)


@pytest.fixture(scope="module")
def ray_head():
    # A short temp dir: Ray's socket paths must stay under 107 characters.
    tmp = Path(tempfile.mkdtemp(prefix="fd-head-", dir="/tmp"))
    token_path = tmp / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    ports = {
        name: _free_port()
        for name in (
            "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
            "node-manager-port", "object-manager-port",
        )
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_path),
        # Jobs run `python` from the head's PATH: this venv's, as for a head started in it.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        # Anything in the jobs that looks for "the local cluster" must find this one, not
        # another Ray instance on the same machine.
        RAY_ADDRESS=f"127.0.0.1:{ports['port']}",
        # No Serve replicas to drain: SIGTERM tears the node down at once, not after 30 s.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--include-dashboard", "true", "--num-cpus", "6", "--temp-dir", str(tmp / "ray"),
        "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0",
        *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))],
    ]  # fmt: skip
    log = open(tmp / "head.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
                            start_new_session=True)  # fmt: skip
    head = Head(f"http://127.0.0.1:{ports['dashboard-port']}", token_path, tmp)
    try:
        deadline = time.monotonic() + 120
        while head.get("/api/version", token_path.read_text()) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"head did not start: {(tmp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
        yield head
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session only
            proc.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_head_requires_the_token(ray_head):
    assert ray_head.get("/api/version", None) == 401
    assert ray_head.get("/api/version", "wrong") == 403


@pytest.mark.slow
def test_submit_without_or_with_a_wrong_token_is_refused(ray_head, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    base = [DEMO, "--working-dir", str(REPO), "--address", ray_head.address, "--no-wait"]
    assert submit.main([*base, "--submission-id", "refused-no-token"]) == 3
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    assert submit.main([*base, "--token-path", str(wrong), "--submission-id", "refused-wrong"]) == 3
    token = ray_head.token_path.read_text()
    for job in ("refused-no-token", "refused-wrong"):
        assert ray_head.get(f"/api/jobs/{job}", token) == 404  # never created


@pytest.fixture(scope="module")
def sweep_job(ray_head, tmp_path_factory):
    """A tiny sweep submitted with --no-wait (None when the tune module is absent: the sweep
    test skips); the sweep test waits for it."""
    if importlib.util.find_spec("fearec_dist.tune") is None:
        return None
    out = tmp_path_factory.mktemp("sweeps")
    sets = [*TINY, "run.workers=1", "tune.num_samples=2", "tune.max_t=1", "tune.name=tiny"]
    args = [DEMO, "--tune", SPACE, "--working-dir", str(REPO), "--address", ray_head.address]
    args += ["--token-path", str(ray_head.token_path), "--submission-id", "tiny-sweep", "--no-wait"]
    args += _sets([*sets, f"tune.storage_path={out}"])
    assert submit.main(args) == 0
    return submit.build_plan(submit.build_submit_parser().parse_args(args)), out / "tiny"


@pytest.mark.slow
def test_tiny_sweep_job_succeeds(ray_head, sweep_job):
    if sweep_job is None:
        pytest.skip("fearec_dist.tune (tune issue: run_sweep) is not present yet")
    plan, sweep_dir = sweep_job
    assert submit.wait_for_job(plan, timeout=420, follow_logs=False) == "SUCCEEDED"
    with open(sweep_dir / "trials.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.model.name == "fearec_official"


@pytest.mark.slow
def test_demo_job_succeeds_and_writes_results(ray_head, tmp_path):
    """After the sweep job (two jobs at once thrash a 2-core box: each brings its own Ray
    Train and Ray Data processes), the demo job made tiny, waited for to the end."""
    args = [DEMO, "--working-dir", str(REPO), "--address", ray_head.address]
    args += ["--token-path", str(ray_head.token_path), "--submission-id", "tiny-demo"]
    args += ["--timeout", "600", *_sets([*TINY, f"run.storage_path={tmp_path}"])]
    assert submit.main(args) == 0
    results = json.loads((tmp_path / "tiny-demo" / "results.json").read_text())
    assert results["epochs_run"] == 1 and results["best_epoch"] == 1
    assert 0.0 <= results["test"]["hr@10"] <= 1.0 and "ndcg@10" in results["valid"]

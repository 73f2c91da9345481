"""The S3 endpoint going away mid-run: bounded retries, then a clear error naming the endpoint,
never a hang. A moto server of this test's own (the session's stays up) serves a run started
through the CLI in its own process; once the first epoch is reported, the server is stopped."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _start_moto(port: int) -> subprocess.Popen:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import socket

    deadline = time.time() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def test_endpoint_gone_mid_run_fails_fast_naming_it(tmp_path):
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    moto = _start_moto(port)
    train = None
    try:
        env = dict(
            os.environ,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="outage")
        config = tmp_path / "outage.yaml"
        config.write_text(
            "data: {format: synthetic, synthetic_users: 120, synthetic_items: 30, "
            "max_seq_len: 20, prepared_path: 's3://outage/prepared'}\n"
            "model: {name: sasrec}\n"
            "train: {epochs: 200, batch_size: 32}\n"
            "run: {name: outage, storage_path: 's3://outage/runs', workers: 1, "
            "cpus_per_worker: 0.5}\n"
        )
        train = subprocess.Popen(
            [sys.executable, "-m", "fearec_dist.cli", "train", "--local", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in train.stdout], daemon=True).start()
        log: list[str] = []
        deadline = time.time() + 300
        while not any("epoch 1/" in line for line in log):
            assert time.time() < deadline, "no epoch finished within 300 s:\n" + "".join(log)
            assert train.poll() is None or not lines.empty(), "".join(log)
            with contextlib.suppress(queue.Empty):
                log.append(lines.get(timeout=1))
        moto.terminate()
        moto.wait(timeout=10)
        gone = time.time()
        rc = train.wait(timeout=300)  # bounded: a hang fails the test here
        time.sleep(0.5)
        while not lines.empty():
            log.append(lines.get())
        text = "".join(log)
        assert rc != 0, text[-3000:]
        assert f"lost the connection to the S3 endpoint {endpoint}" in text, text[-3000:]
        assert "resume" in text
        print(f"failed {time.time() - gone:.0f} s after the endpoint went away")
    finally:
        if train is not None and train.poll() is None:
            train.kill()
        if moto.poll() is None:
            moto.kill()

"""Shared fixtures: one local Ray instance per test session, and a real S3 endpoint (moto's
server on 127.0.0.1, started as a subprocess and stopped by its own handle)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray instance for the whole session (ray.init costs 6-8 s and ~1.8 GiB here).

    4 logical CPUs on this 2-core box: train workers and Tune drivers take fractions, and Ray
    Data's read tasks need CPUs of their own, or everything waits on everything. The S3 server
    starts first, so Ray's worker processes inherit its endpoint and dummy credentials from the
    environment, as workers on a cluster get theirs from the environment or the instance role.
    """
    import ray

    from fearec_dist.launch import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@dataclass
class S3Server:
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> None:
        client = self.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = f"{prefix.rstrip('/')}/{path.relative_to(local).as_posix()}"
                client.upload_file(str(path), bucket, key)


@pytest.fixture(scope="session")
def s3_server():
    """moto_server on a free loopback port; dummy credentials in the environment (the only
    place credentials ever come from), restored afterwards."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
        "moto_server"
    )
    if exe is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start within 30 s") from None
                time.sleep(0.2)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
)


@dataclass
class SyntheticLog:
    path: Path  # a directory of Parquet files (user_id, item_id, timestamp)
    table: Any  # the same rows as one pyarrow Table, in file order
    n_files: int


@pytest.fixture(scope="session")
def synthetic_log(tmp_path_factory) -> SyntheticLog:
    """A small multi-file synthetic log (150 users, 40 items, ~5k rows, 3 Parquet files, users
    spread over all files), written once per session. Treat it as read-only."""
    import pyarrow.parquet as pq

    from fearec_dist.data.synthetic import generate_log

    table = generate_log(150, 40, seed=3)
    path = tmp_path_factory.mktemp("synthetic_log")
    per = -(-table.num_rows // 3)
    for i in range(3):
        pq.write_table(table.slice(i * per, per), path / f"part-{i}.parquet")
    return SyntheticLog(path, table, 3)


def shared_dataset(*parts: str) -> Path:
    """A file under ../shared/data, or a skip with a clear message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"test dataset {path} is not present (expected beside the repo in ../shared)")
    return path


def _gloo_rank(target, rank: int, world: int, port: int, args: tuple, out) -> None:
    """One spawned rank: a gloo group around ``target(rank, world, *args, out)``.

    Teardown is where gloo crashes when it is left to chance ("terminate called without an active
    exception", 1 in ~75 runs here): a rank that destroys its group while its peer still reads, or
    gloo's threads still holding work when the interpreter finalizes. So the ranks meet at a
    barrier, destroy the group, flush the result queue, and leave without finalization. A rank
    whose ``target`` raised still exits through the exception (non-zero).
    """
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    out.close()
    out.join_thread()
    os._exit(0)


def run_gloo_ranks(target, args: tuple, world: int = 2, timeout: float = 180) -> list:
    """Runs ``target(rank, world, *args, out)`` in ``world`` spawned processes, each in a real gloo
    process group (set up and torn down here); returns what each put on ``out``, sorted (rank
    first)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_gloo_rank, args=(target, r, world, port, args, out))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=timeout) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"rank exit codes {codes}"
    return results

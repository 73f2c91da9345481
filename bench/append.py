"""Benchmark of ``prepare --append``: one day (1/30 of the log) appended to a prepared dataset,
against a full prepare of the same union; and the driver's peak RSS of ``prepare`` as users grow.

    .venv/bin/python bench/append.py                                # 10M and 40M interactions
    .venv/bin/python bench/append.py --sizes 1000000 --rss-users 100000 1000000

The log: 30 Hive partitions ``dt=01..30`` of Parquet (one file each), users drawn so that
about a third of a day's users are new, items Zipf-popular with new items every day, integer
timestamps inside each day. Rows of ``bench/results/append.json``:

- ``append``: ``seconds`` of the append of day 30 to days 1..29, ``full_seconds`` of a prepare
  of days 1..30, both ``bytes_read`` (input files consumed, plus for the append the parent
  version's files) and ``bytes_written`` (the new version's directory), ``ratio`` = append /
  full seconds;
  ``cpu_seconds`` / ``full_cpu_seconds``: CPU time of the driver and every Ray process
  (bench/common.py; independent of what else runs on the box), ``cpu_ratio``;
  ``buckets_written`` / ``buckets_copied`` of the append;
- ``rss``: the driver's peak RSS during a prepare of a log with ``users`` users (two
  interactions each; sampled every 0.2 s, bench/common.py). The prepare runs in a process of
  its own (``--rss-child``, joined to the benchmark's Ray instance), so the RSS is the
  prepare's alone: not the benchmark's, which generated the log (the first version of this
  benchmark measured in its own process and counted the generated table it still held: 444 MB
  at 1M users, 1,499 MB at 10M). ``baseline_rss_mb``: that process after importing the package
  and joining Ray, before the prepare.

Each row records the 1-minute load average after it: the box is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import PeakRSS  # bench/common.py (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
DAYS = 30


def write_log(root: Path, interactions: int, seed: int = 0) -> None:
    """30 daily partitions of ~interactions/30 rows each."""
    rng = np.random.default_rng(seed)
    per_day = interactions // DAYS
    users_per_day = max(1, per_day // 10)
    seen_users = 0
    for day in range(1, DAYS + 1):
        new = users_per_day // 3 if day > 1 else users_per_day
        pool = seen_users + new
        users = np.concatenate(
            [rng.integers(0, max(1, seen_users), users_per_day - new), seen_users + np.arange(new)]
        )
        seen_users = pool
        user = rng.choice(users, per_day)
        n_items = 1000 + 200 * day
        item = np.minimum(rng.zipf(1.3, per_day), n_items) - 1
        t = day * 86_400 + rng.integers(0, 86_400, per_day)
        table = pa.table(
            {
                "user_id": pa.array(user.astype(str)),
                "item_id": pa.array(item.astype(str)),
                "timestamp": pa.array(t),
            }
        )
        part = root / f"dt={day:02d}"
        part.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, part / "part-0.parquet")


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def append_case(interactions: int, work: Path) -> dict:
    from fearec_dist.data.prepare import prepare_dataset
    from fearec_dist.data.versions import resolve_version

    log, union = work / "log", work / "union"
    write_log(union, interactions)
    log.mkdir()
    for day in range(1, DAYS):
        os.symlink(union / f"dt={day:02d}", log / f"dt={day:02d}")
    ds, full = work / "ds", work / "full"
    prepare_dataset(str(log), "parquet", str(ds), progress=False)
    parent = Path(resolve_version(str(ds)).uri)
    os.symlink(union / f"dt={DAYS:02d}", log / f"dt={DAYS:02d}")
    with PeakRSS() as rss:
        start = time.perf_counter()
        meta = prepare_dataset(str(log), "parquet", str(ds), progress=False, append=True)
        seconds = time.perf_counter() - start
    appended = Path(resolve_version(str(ds)).uri)
    with PeakRSS() as full_rss:
        start = time.perf_counter()
        full_meta = prepare_dataset(str(union), "parquet", str(full), progress=False)
        full_seconds = time.perf_counter() - start
    assert full_meta["n_interactions"] == meta["n_interactions"]
    parts = ("sequences", "vocab/items.parquet", "buckets.parquet")
    parent_read = sum(tree_bytes(parent / p) for p in parts if (parent / p).exists())
    return {
        "case": "append",
        "interactions": meta["n_interactions"],
        "appended": meta["this_version"]["interactions"],
        "users": meta["n_users"],
        "items": meta["n_items"],
        "seconds": round(seconds, 2),
        "full_seconds": round(full_seconds, 2),
        "ratio": round(seconds / full_seconds, 3),
        "cpu_seconds": round(rss.cpu_seconds, 1),
        "full_cpu_seconds": round(full_rss.cpu_seconds, 1),
        "cpu_ratio": round(rss.cpu_seconds / full_rss.cpu_seconds, 3),
        "buckets_written": meta["this_version"].get("buckets_written"),
        "buckets_copied": meta["this_version"].get("buckets_copied"),
        "bytes_read": tree_bytes(union / f"dt={DAYS:02d}") + parent_read,
        "bytes_written": tree_bytes(appended),
        "full_bytes_read": tree_bytes(union),
        "full_bytes_written": tree_bytes(Path(resolve_version(str(full)).uri)),
        "peak_rss_driver_mb": round(rss.peak_driver / 2**20),
        "load_avg_1m_after": round(os.getloadavg()[0], 1),
    }


def rss_case(users: int, work: Path) -> dict:
    """Writes the log here, runs the prepare in a child process joined to this Ray instance."""
    import ray

    rng = np.random.default_rng(1)
    root = work / "rss" / str(users)
    root.mkdir(parents=True)
    user = np.repeat(np.arange(users), 2)
    table = pa.table(
        {
            "user_id": pa.array(np.char.add("u", user.astype(str))),
            "item_id": pa.array(rng.integers(0, 5000, len(user)).astype(str)),
            "timestamp": pa.array(np.tile([1, 2], users)),
        }
    )
    for i, part in enumerate(np.array_split(np.arange(len(user)), 8)):
        pq.write_table(table.take(part), root / f"part-{i}.parquet")
    del table, user
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = [sys.executable, __file__, "--rss-child", str(root), str(work / f"rss-out-{users}")]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the prepare of {users} users failed: {done.stderr[-3000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    assert child["n_users"] == users
    return {
        "case": "rss",
        "users": users,
        "interactions": child["n_interactions"],
        "seconds": child["seconds"],
        "peak_rss_driver_mb": child["peak_rss_driver_mb"],
        "baseline_rss_mb": child["baseline_rss_mb"],
        "driver_cpu_seconds": child["driver_cpu_seconds"],
        "load_avg_1m_after": round(os.getloadavg()[0], 1),
    }


def rss_child(root: str, out: str) -> None:
    """``--rss-child``: one prepare in this process (joined to the Ray at RAY_ADDRESS); prints
    its peak RSS as a JSON line."""
    import psutil

    from fearec_dist.data.prepare import prepare_dataset
    from fearec_dist.launch import ray_session

    with ray_session("cluster"):
        me = psutil.Process()
        baseline = me.memory_info().rss
        cpu = sum(me.cpu_times()[:2])
        with PeakRSS() as rss:
            start = time.perf_counter()
            meta = prepare_dataset(root, "parquet", out, progress=False)
            seconds = time.perf_counter() - start
        row = {
            "n_users": meta["n_users"],
            "n_interactions": meta["n_interactions"],
            "seconds": round(seconds, 2),
            "peak_rss_driver_mb": round(rss.peak_driver / 2**20),
            "baseline_rss_mb": round(baseline / 2**20),
            "driver_cpu_seconds": round(sum(me.cpu_times()[:2]) - cpu, 1),
        }
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000_000, 40_000_000])
    parser.add_argument("--rss-users", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "append.json"))
    parser.add_argument("--note", default="", help="recorded with every row (e.g. why smaller)")
    parser.add_argument("--rss-child", nargs=2, metavar=("LOG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return

    from fearec_dist.launch import ray_session

    rows = []
    with ray_session("local"), tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
        for n in args.sizes:
            work = Path(tmp) / f"append-{n}"
            work.mkdir()
            rows.append(append_case(n, work) | {"note": args.note})
            print(json.dumps(rows[-1]), flush=True)
        for users in args.rss_users:
            rows.append(rss_case(users, Path(tmp)) | {"note": args.note})
            print(json.dumps(rows[-1]), flush=True)
    rows.append({"case": "run", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()})
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

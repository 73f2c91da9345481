"""Training at growing log sizes: bounded worker memory, first-step latency, feed throughput.

    .venv/bin/python bench/scale.py                          # 1M, 10M, 40M interactions
    .venv/bin/python bench/scale.py --sizes 1e6 1e7 --steps 40
    .venv/bin/python bench/scale.py --feed-only              # the model-free feed rows only

Per size (synthetic logs over 100k items, written in chunks of 50k users; one child process per
size, so each starts from a fresh Ray instance and its memory is its own):

- ``prepare_s`` (generation + the prepare job), ``build_s`` (the one-time example count),
  ``disk_bytes_per_interaction`` (the prepared sequences + the examples' counts: nothing per
  example is stored);
- a FEARec (``fearec_official``) run through the real trainer path, 2 workers x 1 CPU, batch
  128 per worker, one epoch capped at ``--steps`` steps, no evaluation: ``first_step_s`` (from
  ``fit()`` to rank 0's first optimizer step: includes the epoch's pairing job), steady
  ``samples_per_s`` and ``data_wait_share`` (after the first step), the largest train worker's
  peak RSS and PSS, and the peak PSS summed over every Ray process (object store included);
- the feed alone (``mode: feed``): the epoch job plus both ranks streaming their shards through
  the shuffle buffer into batches, no model: examples per second divided by every CPU second the
  processes spent (Ray Data's tasks included).

Results: ``bench/results/scale.json`` (a list of rows) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import PeakRSS  # bench/common.py

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.json"
ITEMS = 100_000
MEAN_LEN = 35  # the generator's lengths are U{20..50}
GB = 1 << 20  # MB, for the *_mb fields


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(work: Path, interactions: int) -> tuple[str, dict, float, float]:
    from fearec_dist.config import DataSection
    from fearec_dist.data.examples import build_examples
    from fearec_dist.data.prepare import prepare_dataset

    data = DataSection(
        format="synthetic", synthetic_users=interactions // MEAN_LEN, synthetic_items=ITEMS
    )
    out = str(work / "prepared")
    t0 = time.time()
    prepare_dataset("", "synthetic", out, data=data, progress=False)
    prepare_s = time.time() - t0
    t0 = time.time()
    info = build_examples(out, 50)
    return out, info, prepare_s, time.time() - t0


def child(args: argparse.Namespace) -> None:
    import ray

    from fearec_dist.launch import start_local_ray

    work = Path(args.work)
    store = int(float(args.object_store_gb) * 2**30) if args.object_store_gb else None
    start_local_ray(4, object_store_memory=store)
    prepared, info, prepare_s, build_s = prepare(work, int(float(args.size)))
    disk = du(work / "prepared" / "sequences") + du(work / "prepared" / "examples")
    row = {
        "interactions": int(
            json.loads((work / "prepared" / "meta.json").read_text())["n_interactions"]
        ),
        "n_train": info.n_train,
        "prepare_s": round(prepare_s, 1),
        "build_s": round(build_s, 1),
        "disk_bytes_per_interaction": None,
        "object_store_gb": float(args.object_store_gb) if args.object_store_gb else "default",
    }
    row["disk_bytes_per_interaction"] = round(disk / row["interactions"], 2)
    if args.feed_only:
        row |= feed_row(prepared, info, args.head)
    else:
        row |= train_row(prepared, info, work, args.steps, args.head)
    ray.shutdown()
    print("ROW " + json.dumps(row), flush=True)


def feed_row(prepared: str, info: Any, head_rows: int) -> dict:
    import ray

    from fearec_dist.data.epochs import EpochSource, head_fraction
    from fearec_dist.data.feed import TrainFeed
    from fearec_dist.data.planner import rows_per_rank, start_planner

    source = EpochSource(prepared_uri=prepared, max_seq_len=50, seed=1, pair=True,
                         n_examples=info.n_train)  # fmt: skip
    head = head_fraction(head_rows, info.n_train)
    planner = start_planner(source, 2, 1, head=head, ahead=False)
    steps = rows_per_rank(info.n_train, 2, head) // 128
    t0 = time.time()
    with PeakRSS() as peak:

        @ray.remote(num_cpus=0.5)
        def consume(rank: int) -> tuple[int, float]:
            feed = TrainFeed(planner, rank=rank, batch_size=128, steps=steps, seed=1,
                             shuffle_buffer=65536, prefetch_blocks=4)  # fmt: skip
            n, first = 0, None
            for b in feed.epoch(0):
                first = first or time.time()
                n += len(b["target"])
            return n, first

        done = ray.get([consume.remote(r) for r in range(2)])
    wall = time.time() - t0
    n = sum(d[0] for d in done)
    return {
        "mode": "feed",
        "feed_examples": n,
        "feed_first_batch_s": round(max(d[1] for d in done) - t0, 1),
        "feed_wall_s": round(wall, 1),
        "feed_cpu_s": round(peak.cpu_seconds, 1),
        "feed_examples_per_cpu_s": round(n / max(peak.cpu_seconds, 1e-9), 1),
        "total_pss_mb": round(peak.peak_pss / GB, 1),
    }


def train_row(prepared: str, info: Any, work: Path, steps: int, head_rows: int) -> dict:
    import csv

    import ray

    from fearec_dist.config import load_config
    from fearec_dist.data.datasets import build_datasets
    from fearec_dist.train.trainer import build_trainer

    cfg = load_config(
        None,
        [
            f"data.path={prepared}",
            "model.name=fearec_official",
            "train.epochs=1",
            "train.batch_size=128",
            f"train.max_steps_per_epoch={steps}",
            "train.evaluate=false",
            f"train.first_epoch_head={head_rows}",
            "run.workers=2",
            "run.cpus_per_worker=1",
            f"run.storage_path={work / 'runs'}",
            "run.name=scale",
        ],
    )
    trainer = build_trainer(cfg, build_datasets(cfg, info), info, mode="local", name="scale")
    with PeakRSS(role="RayTrainWorker") as peak:
        t0 = time.time()
        trainer.fit()
        # with a head, the rest of epoch 1 is still being paired: when is it ready?
        planner = trainer.train_loop_config["planner"]
        first_part = ray.get(planner.shard.remote(0, 0))
        rest_ready = ray.get(planner.shard.remote(0, 0, first_part["parts"] - 1))
    with open(work / "runs" / "scale" / "metrics.csv") as f:
        r = next(csv.DictReader(f))
    first, last = float(r["first_step_unix"]), float(r["last_step_unix"])
    n_steps = int(float(r["train/steps"]))
    steady_s = max(last - first, 1e-9)
    # steady state: the waits after the first batch (not the plan's, not the first blocks')
    wait = float(r["data_wait_share"]) * float(r["train_seconds"]) - float(r["first_batch_wait_s"])
    samples_per_s = (n_steps - 1) * 256 / steady_s
    head = {k: int(float(r[k])) for k in ("head_rows", "head_self_paired") if r.get(k)}
    extra = {}
    if head:  # an uncapped epoch 1 waits for its rest if the head trains faster than it builds
        head_train_s = head["head_rows"] / samples_per_s
        extra = {
            # from fit(): the head's build began / ended, the rest's began / was ready
            "head_started_s": round(first_part["started_unix"] - t0, 1),
            "head_ready_s": round(first_part["ready_unix"] - t0, 1),
            "rest_started_s": round(rest_ready["started_unix"] - t0, 1),
            "rest_ready_s": round(rest_ready["ready_unix"] - t0, 1),
            "rest_build_s": round(rest_ready["seconds"], 1),
            "implied_rest_wait_s": round(
                max(0.0, rest_ready["ready_unix"] - first - head_train_s), 1
            ),
        }
    return {
        "mode": "train",
        "model": "fearec_official",
        "first_epoch_head": head_rows if head else 0,
        **head,
        **extra,
        "steps": n_steps,
        "first_step_s": round(first - t0, 1),
        "samples_per_s": round(samples_per_s, 1),
        "data_wait_share": round(max(wait, 0.0) / steady_s, 4),
        "peak_worker_rss_mb": round(peak.peak_role / GB, 1),
        "peak_worker_pss_mb": round(peak.peak_role_pss / GB, 1),
        # what that worker's PSS was made of at its peak: anon / file / object-store pages
        "peak_worker_pss_parts_mb": {
            k: round(v / GB, 1) for k, v in peak.peak_role_breakdown.items()
        },
        "total_pss_mb": round(peak.peak_pss / GB, 1),
        "driver_rss_mb": round(peak.peak_driver / GB, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1e6", "1e7", "4e7"])
    p.add_argument("--steps", type=int, default=60, help="training steps per size")
    p.add_argument("--feed-only", action="store_true", help="only the model-free feed rows")
    p.add_argument("--no-feed", action="store_true", help="skip the model-free feed rows")
    p.add_argument("--object-store-gb", help="cap Ray's object store (GiB); beyond it, spill")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child")
    head_help = "train.first_epoch_head (0: epoch 1 waits for its whole pairing job)"
    p.add_argument("--head", type=int, default=65536, help=head_help)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    modes = ["feed"] if args.feed_only else ["train"] + ([] if args.no_feed else ["feed"])
    for size in args.sizes:
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="fearec-scale-") as work:
                cmd = [sys.executable, __file__, "--child", "--size", size, "--work", work]
                cmd += ["--steps", str(args.steps)] + (["--feed-only"] if mode == "feed" else [])
                cmd += ["--head", str(args.head)]
                cmd += ["--object-store-gb", args.object_store_gb] if args.object_store_gb else []
                done = subprocess.run(
                    cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout
                )
                line = next((x for x in done.stdout.splitlines() if x.startswith("ROW ")), None)
                if line is None:
                    print(done.stdout[-3000:], done.stderr[-3000:])
                    raise SystemExit(f"bench/scale: the {size} {mode} child failed")
                row = json.loads(line[4:]) | {
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
                print(json.dumps(row), flush=True)
                key = ("interactions", "mode", "object_store_gb", "first_epoch_head")
                same = [row.get(k, "default") for k in key]
                rows = [r for r in rows if [r.get(k, "default") for k in key] != same] + [row]
                RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    keys = ("interactions", "mode", "object_store_gb", "first_epoch_head", "prepare_s",
            "build_s", "disk_bytes_per_interaction",
            "first_step_s", "samples_per_s", "data_wait_share", "rest_ready_s",
            "implied_rest_wait_s", "peak_worker_rss_mb",
            "peak_worker_pss_mb", "total_pss_mb", "feed_first_batch_s",
            "feed_examples_per_cpu_s")  # fmt: skip
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in sorted(rows, key=lambda r: (r["interactions"], r.get("mode", ""))):
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")


if __name__ == "__main__":
    main()

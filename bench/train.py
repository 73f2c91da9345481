"""Training throughput through the full Ray path against the bare loop, on this box.

    .venv/bin/python bench/train.py                  # ml-100k, one full epoch per case
    .venv/bin/python bench/train.py --steps 100      # capped epochs: quicker, but the feed's
                                                     # per-epoch start-up then weighs more
    .venv/bin/python bench/train.py --models sasrec

Cases, per model (SASRec and FEARec ``fearec_official``, batch 256 per step, L 50):

- ``bare 1x2``: the project's own epoch loop (``train_one_epoch`` with the feed's own buffer,
  partners, chunks and shuffle buffer as the epoch job makes them, forward/backward/Adam) over
  the same examples, built in the process, no Ray, 2 torch threads, in a child process;
- ``ray 1x2``: ``run_training`` through Ray Train + Ray Data, one worker with 2 threads;
- ``ray 2x1``: two DDP workers with 1 thread each, batch 128 per worker (global 256), gathered
  negatives.

``samples_per_s`` is the epoch's training samples over its training time (evaluation excluded,
data waits included); ``overhead_vs_bare`` is 1 - Ray's rate / the bare rate; ``data_wait_share``
the part of the epoch spent waiting for the feed. Peak RSS is sampled over the driver and its
process tree: the driver alone, the largest single train worker (``RayTrainWorker`` processes)
and the PSS total. Results: ``bench/results/train.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from common import PeakRSS  # bench/common.py (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
RESULTS = ROOT / "bench" / "results" / "train.json"
BATCH = 256


def data_overrides(work: Path) -> list[str]:
    if (ML100K / "ml-100k.inter").exists():
        source = [f"data.path={ML100K}", "data.format=atomic"]
    else:  # a synthetic log of similar size
        print(f"[bench/train] {ML100K} not found: using synthetic data")
        source = ["data.format=synthetic", "data.synthetic_users=1000", "data.synthetic_items=1600"]
    return [
        *source,
        "data.max_seq_len=50",
        f"data.prepared_path={work / 'prepared'}",
        f"run.storage_path={work / 'runs'}",
    ]


def bare_child(args: argparse.Namespace) -> None:
    """Child process: the epoch loop without Ray; prints one JSON line."""
    import numpy as np
    import pyarrow as pa
    import torch

    from fearec_dist.config import load_config
    from fearec_dist.data.datasets import prepare_run
    from fearec_dist.data.epochs import TrainRows, pair_and_scatter
    from fearec_dist.data.feed import shard_batches
    from fearec_dist.data.sequences import read_sequences
    from fearec_dist.models import build_model, get_spec
    from fearec_dist.train.build import build_optimizer
    from fearec_dist.train.loop import train_one_epoch

    torch.set_num_threads(args.threads)
    cfg = load_config(None, [*data_overrides(Path(args.work)), f"model.name={args.bare}"])
    _, info = prepare_run(cfg)
    spec = get_spec(args.bare)
    torch.manual_seed(0)
    model = build_model(args.bare, n_items=info.n_items, max_seq_len=info.max_seq_len)
    # the epoch job's output, built in this process: every example, paired, in permuted chunks
    offsets, items, users = read_sequences(info.prepared_uri, cfg.storage)
    seqs = pa.table(
        {"user": users, "items": pa.ListArray.from_arrays(offsets.astype(np.int32), items)}
    )
    pair = spec.needs_partner(model.config)
    chunks = list(pair_and_scatter(TrainRows(info.max_seq_len)(seqs), 0, 0, pair, 1024))
    chunks = [chunks[i] for i in np.random.default_rng(0).permutation(len(chunks))]
    steps = info.n_train // BATCH
    steps = min(steps, args.steps) if args.steps else steps

    class LocalFeed:  # TrainFeed's interface over the chunks in memory
        rank, padded, skipped, wait_s, plan_wait_s = 0, 0, 0, 0.0, 0.0

        def __init__(self) -> None:
            self.steps = steps

        def epoch(self, epoch: int, skip: int = 0):
            stats: dict[str, float] = {}
            yield from shard_batches(iter(chunks), batch_size=BATCH, steps=steps,
                                     buffer_size=65536, rng=np.random.default_rng(epoch),
                                     skip=skip, stats=stats)  # fmt: skip
            self.wait_s, self.skipped = stats["wait_s"], int(stats["skipped"])

    feed = LocalFeed()
    optimizer = build_optimizer(model, 1e-3, 0.0)
    device = torch.device("cpu")
    stats = train_one_epoch(model, model, spec.loss_terms, feed, 0, optimizer, device, "off", None)
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = int(next(line for line in status if line.startswith("VmHWM")).split()[1])
    print(
        json.dumps(
            {
                "samples": stats["train/samples"],
                "seconds": stats["seconds"],
                "data_wait_s": stats["data_wait_s"],
                "peak_rss_mb": hwm_kb / 1024,
            }
        )
    )


def bare_case(model: str, args: argparse.Namespace, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--bare", model, "--work", str(work)]
    cmd += ["--threads", "2", "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        sys.exit(f"[bench/train] bare loop failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "case": "bare 1x2",
        "samples": out["samples"],
        "train_seconds": round(out["seconds"], 2),
        "samples_per_s": round(out["samples"] / out["seconds"], 1),
        "data_wait_share": round(out["data_wait_s"] / out["seconds"], 4),
        "peak_rss_driver_mb": None,
        "peak_rss_worker_mb": round(out["peak_rss_mb"]),  # the one process
        "peak_pss_total_mb": None,
    }


def ray_case(model: str, workers: int, threads: int, args: argparse.Namespace, work: Path) -> dict:
    from fearec_dist.config import load_config
    from fearec_dist.train.trainer import run_training

    name = f"{model}-{workers}x{threads}"
    cfg = load_config(
        None,
        [
            *data_overrides(work),
            f"model.name={model}",
            "train.epochs=1",
            f"train.batch_size={BATCH // workers}",
            f"train.max_steps_per_epoch={args.steps}",
            f"train.torch_threads={threads}",
            f"run.workers={workers}",
            f"run.cpus_per_worker={threads}",
            f"run.name={name}",
        ],
    )
    with PeakRSS(role="RayTrainWorker") as rss:
        run_training(cfg, mode="local")
    with open(work / "runs" / name / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    return {
        "case": f"ray {workers}x{threads}",
        "samples": int(float(row["train/samples"])) * workers,
        "train_seconds": float(row["train_seconds"]),
        "samples_per_s": float(row["samples_per_s"]),
        "data_wait_share": float(row["data_wait_share"]),
        "peak_rss_driver_mb": round(rss.peak_driver / 2**20),
        "peak_rss_worker_mb": round(rss.peak_role / 2**20),
        "peak_pss_total_mb": round(rss.peak_pss / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sasrec", "fearec_official"])
    parser.add_argument("--steps", type=int, default=0, help="cap steps per epoch (0 = full)")
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # child: the loop without Ray
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.bare:
        bare_child(args)
        return

    import ray

    from fearec_dist.config import load_config
    from fearec_dist.data.datasets import prepare_run
    from fearec_dist.launch import start_local_ray

    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        start_local_ray(4)  # 2 cores: logical CPUs for the workers plus Ray Data's read tasks
        try:
            _, info = prepare_run(load_config(None, data_overrides(work)))
            for model in args.models:
                print(f"[bench/train] {model}: bare loop ...", flush=True)
                cases = [bare_case(model, args, work)]
                for workers, threads in ((1, 2), (2, 1)):
                    print(f"[bench/train] {model}: Ray {workers}x{threads} ...", flush=True)
                    cases.append(ray_case(model, workers, threads, args, work))
                bare = cases[0]["samples_per_s"]
                for case in cases:
                    case["model"] = model
                    case["overhead_vs_bare"] = round(1 - case["samples_per_s"] / bare, 3)
                rows += cases
        finally:
            ray.shutdown()
    for row in rows:
        base = next(r for r in rows if r["model"] == "sasrec" and r["case"] == row["case"])
        row["cost_vs_sasrec"] = round(base["samples_per_s"] / row["samples_per_s"], 2)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "dataset": info.uri,
        "n_train": info.n_train,
        "batch": BATCH,
        "steps_cap": args.steps,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    head = f"{'model':<16}{'case':<10}{'samples/s':>10}{'overhead':>10}{'wait':>8}"
    print("\n" + head + f"{'x sasrec':>9}{'driver MB':>10}{'worker MB':>10}{'PSS MB':>8}")
    for r in rows:
        print(
            f"{r['model']:<16}{r['case']:<10}{r['samples_per_s']:>10}"
            f"{r['overhead_vs_bare']:>10.1%}{r['data_wait_share']:>8.1%}"
            f"{r['cost_vs_sasrec']:>9}{r['peak_rss_driver_mb'] or '-':>10}"
            f"{r['peak_rss_worker_mb']:>10}{r['peak_pss_total_mb'] or '-':>8}"
        )
    print(f"({result['machine']}, load {result['load_avg_1m']}) -> {args.out}")


if __name__ == "__main__":
    main()

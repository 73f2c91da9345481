"""Serving latency and batch throughput at 12,101, 10⁵ and 10⁶ items.

    .venv/bin/python bench/serve.py                        # all three sizes (a few minutes)
    .venv/bin/python bench/serve.py --items 12101 --users 5000

For each catalogue size: a SASRec with random weights (d 64, L 50, 2 layers; random weights are
as costly to serve as trained ones) is written as an export with both an IVF and an HNSW index
(the export's default parameters; HNSW only up to ``--hnsw-max-items``, 10⁵ by default,
since its build at 10⁶ items takes many minutes on two shared cores), then

- single-history latency: ``recommend(export, history, k=10)`` in this process, end to end
  (raw ids -> ids, encoder, top-k, ids -> raw ids), for 100 random histories of 1..50 items,
  exact and with each index; p50 and p99 in ms (and the p50 of CPU time, which another job's
  load inflates less), one torch thread, measured for every size before Ray starts. ANN
  recall@10 against the exact answer on the same histories is recorded too: with random
  weights the table has no cluster structure, the worst case for IVF (docs/serving.md);
- batch: ``run_batch`` (the Ray Data job on a local Ray instance) over
  a Parquet file of ``--users`` random raw histories, exact and ANN (HNSW, IVF where there is no
  HNSW), k = 100, one actor with 1 CPU and 2 torch threads; users/s over the
  whole job (Ray Data start-up and the actor's export load included).

Rows go to ``bench/results/serve.json`` (a list), with the load average around each size: the
box is shared, so compare rows taken under similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
SIZES = (12_101, 100_000, 1_000_000)
N_LATENCY = 100
MAX_LEN = 50


def build_export(out: Path, n_items: int, seed: int, kinds: tuple[str, ...]) -> dict:
    from fearec_dist.models import build_model, get_spec
    from fearec_dist.serve.export import write_export

    torch.manual_seed(seed)
    model = build_model("sasrec", n_items=n_items, max_seq_len=MAX_LEN).eval()
    raw_ids = [f"item-{i}" for i in range(1, n_items + 1)]
    counts = np.random.default_rng(seed).zipf(1.5, n_items + 1).astype(np.int64)
    manifest = write_export(
        str(out), model, get_spec("sasrec"), "sasrec", {}, raw_ids, counts, say=lambda *_: None
    )
    times = {}
    from fearec_dist.serve.export import write_index

    for kind in kinds:  # the indexes beside the exact table
        start = time.time()
        weights = model.item_embedding.weight[1:].detach().numpy()
        info = write_index(kind, weights, None, None, str(out), None, lambda *_: None)
        times[kind] = round(time.time() - start, 1)
        manifest.setdefault("indexes", {})[kind] = info
    return {"index_build_s": times, "manifest": manifest}


def random_histories(n: int, n_items: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, MAX_LEN + 1, n)
    return [[f"item-{i}" for i in rng.integers(1, n_items + 1, k)] for k in lengths]


def latency(export, histories: list[list[str]], ann: bool) -> tuple[dict, list[list[str]]]:
    from fearec_dist.serve.recommend import recommend

    recommend(export, histories[0], k=10, ann=ann)  # warm-up
    times, cpu, answers = [], [], []
    for history in histories:
        start, start_cpu = time.perf_counter(), time.process_time()
        answers.append(recommend(export, history, k=10, ann=ann).item_ids)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "p50_cpu_ms": round(float(np.percentile(cpu, 50)), 3),  # CPU time: less load-dependent
    }, answers


def bench_latency(out: Path, n_items: int, seed: int, hnsw_max: int) -> list[dict]:
    """Builds the export at ``out`` and times single histories (no Ray running yet)."""
    from fearec_dist.serve.artifact import load_export
    from fearec_dist.serve.index import deserialize, set_search_params

    load_before = os.getloadavg()[0]
    kinds = ("ivf", "hnsw") if n_items <= hnsw_max else ("ivf",)
    built = build_export(out, n_items, seed, kinds)
    export = load_export(str(out))
    histories = random_histories(N_LATENCY, n_items, seed + 1)
    exact_lat, exact_answers = latency(export, histories, ann=False)
    base = {"n_items": n_items, "hidden_size": 64, "max_seq_len": MAX_LEN, "k_latency": 10}
    rows = [base | {"mode": "exact", **exact_lat, "recall_at_10": 1.0}]
    for kind, info in built["manifest"]["indexes"].items():
        export.index = deserialize((out / info["file"]).read_bytes())
        set_search_params(export.index, kind, info["params"])
        export.manifest["index"] = info
        lat, answers = latency(export, histories, ann=True)
        recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(answers, exact_answers)])
        rows.append(
            base
            | {"mode": kind, **lat, "recall_at_10": round(float(recall), 3)}
            | {"index_params": info["params"], "index_build_s": built["index_build_s"][kind]}
        )
    # the batch job reads the last index built (HNSW where there is one) from the manifest
    manifest = built["manifest"] | {"index": built["manifest"]["indexes"][kinds[-1]]}
    (out / "manifest.json").write_text(json.dumps(manifest))
    for row in rows:
        row["load_avg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    return rows


def bench_batch(out: Path, rows: list[dict], users: int, seed: int) -> None:
    """The batch job (Parquet of raw histories in, top-100 Parquet out), exact and ANN; adds
    its numbers to the exact row and to the row of the index it used."""
    from fearec_dist.serve.batch import run_batch

    n_items = rows[0]["n_items"]
    table = pa.table(
        {
            "user_id": [f"user-{u}" for u in range(users)],
            "item_ids": random_histories(users, n_items, seed + 2),
        }
    )
    pq.write_table(table, out.parent / "users.parquet")
    ann_kind = rows[-1]["mode"]
    for ann, kind in ((False, "exact"), (True, ann_kind)):
        load_before = os.getloadavg()[0]
        with PeakRSS(role="MapWorker") as mem:
            summary = run_batch(
                str(out), str(out.parent / "users.parquet"), str(out.parent / f"top-{kind}"),
                k=100, ann=ann, actors=1, cpus_per_actor=1, threads=2, progress=False,
            )  # fmt: skip
        assert summary["users"] == users, summary
        row = next(r for r in rows if r["mode"] == kind)
        row["batch_users"] = users
        row["batch_seconds"] = summary["seconds"]
        row["batch_users_per_s"] = summary["users_per_s"]
        row["batch_actor_peak_rss_mb"] = round(mem.peak_role / 2**20)
        row["batch_cpu_s"] = round(mem.cpu_seconds, 1)  # every process of the job
        row["batch_load_avg_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--items", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--users", type=int, default=5_000, help="batch users (a quarter at 10⁶)")
    p.add_argument(
        "--hnsw-max-items",
        type=int,
        default=100_000,
        help="build HNSW only up to this many items (its build at 10⁶ takes minutes here)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from fearec_dist.launch import ray_session

    stamp = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "torch": torch.__version__,
    }
    rows: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # 1. single histories, before Ray starts (its threads would share the process);
        #    one torch thread, as a request handler would run
        torch.set_num_threads(1)
        for n in args.items:
            start = time.time()
            rows[n] = bench_latency(
                Path(tmp) / f"n{n}" / "export", n, args.seed, args.hnsw_max_items
            )
            for row in rows[n]:
                print(json.dumps(row | stamp), flush=True)
            print(f"# latency at {n:,} items done in {time.time() - start:.0f} s", flush=True)
            save(rows, stamp)
        # 2. the batch job on a local Ray instance
        with ray_session("auto"):
            for n in args.items:
                start = time.time()
                users = args.users if n <= 100_000 else args.users // 4  # exact at 10⁶ is slow
                bench_batch(Path(tmp) / f"n{n}" / "export", rows[n], users, args.seed)
                for row in rows[n]:
                    print(json.dumps(row | stamp), flush=True)
                print(f"# batch at {n:,} items done in {time.time() - start:.0f} s", flush=True)
                save(rows, stamp)
    return 0


def save(rows: dict[int, list[dict]], stamp: dict) -> None:
    """Writes what is measured so far (a later phase adds to the same rows)."""
    RESULTS.parent.mkdir(exist_ok=True)
    results = [row | stamp for size in rows.values() for row in size]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of ``prepare``: interactions/s and peak memory, on a large synthetic log and on Beauty.

    .venv/bin/python bench/prepare.py                  # 10M synthetic interactions + Beauty
    .venv/bin/python bench/prepare.py --users 20000    # a quick run

Writes ``bench/results/prepare.json`` and prints a table. Peak memory is sampled over the driver
and every Ray process of this instance (workers, raylet, GCS, object store included): summed RSS
(double-counts shared object-store pages) and summed PSS (counts them once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil
from common import PeakRSS  # bench/common.py (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "beauty" / "Beauty.txt"


def run_case(name: str, inp: str, fmt: str, out: str) -> dict:
    from fearec_dist.data.prepare import prepare_dataset

    with PeakRSS() as rss:
        start = time.perf_counter()
        meta = prepare_dataset(inp, fmt, out, progress=False)
        seconds = time.perf_counter() - start
    return {
        "case": name,
        "interactions": meta["n_interactions"],
        "users": meta["n_users"],
        "items": meta["n_items"],
        "seconds": round(seconds, 2),
        "interactions_per_s": round(meta["n_interactions"] / seconds),
        "cpu_seconds": round(rss.cpu_seconds, 1),  # driver + Ray processes, robust to others' load
        "interactions_per_cpu_s": round(meta["n_interactions"] / max(rss.cpu_seconds, 1e-9)),
        "load_avg_1m_after": round(os.getloadavg()[0], 1),  # others' work on a shared box
        "peak_rss_driver_mb": round(rss.peak_driver / 2**20),
        "peak_rss_total_mb": round(rss.peak_total / 2**20),
        "peak_pss_total_mb": round(rss.peak_pss / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=286_000, help="synthetic users (~35 each)")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "prepare.json"))
    args = parser.parse_args()

    import ray

    from fearec_dist.data.synthetic import write_synthetic
    from fearec_dist.launch import start_local_ray

    start_local_ray(os.cpu_count() or 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = write_synthetic(
            f"{tmp}/raw", n_files=args.files, n_users=args.users, n_items=args.items, seed=1
        )
        print(f"synthetic log: {n:,} interactions in {args.files} Parquet files")
        rows.append(run_case(f"synthetic {n / 1e6:.1f}M", f"{tmp}/raw", "parquet", f"{tmp}/p1"))
        if BEAUTY.exists():
            rows.append(run_case("Beauty (seqtxt)", str(BEAUTY), "seqtxt", f"{tmp}/p2"))
    ray.shutdown()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.python_version()}",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\n{'case':<20}{'interactions':>14}{'seconds':>10}{'inter/s':>12}"
        f"{'per CPU-s':>11}{'RSS MB':>10}{'PSS MB':>10}{'driver MB':>11}"
    )
    for r in rows:
        print(
            f"{r['case']:<20}{r['interactions']:>14,}{r['seconds']:>10}"
            f"{r['interactions_per_s']:>12,}{r['interactions_per_cpu_s']:>11,}"
            f"{r['peak_rss_total_mb']:>10,}"
            f"{r['peak_pss_total_mb']:>10,}{r['peak_rss_driver_mb']:>11,}"
        )
    print(f"(driver + all Ray processes; {result['machine']}) -> {args.out}")


if __name__ == "__main__":
    main()

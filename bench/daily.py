"""Benchmark of continuous training: days 28-30 of a 30-day log as daily jobs, warm starts
against cold runs on the same dataset versions (issue 29).

    .venv/bin/python bench/daily.py                         # synthetic and ml-100k, 2 seeds
    .venv/bin/python bench/daily.py --datasets synthetic --seeds 0 --cold-epochs 2  # quick look

Two logs, each cut into 30 daily ``dt=`` partitions of Parquet:

- ``synthetic``: ``fearec_dist.data.synthetic.generate_daily_log`` (chains rewired, popularity
  re-ranked and items born every day, users coming back), ``--users`` × ``--items``;
- ``ml100k``: ``../shared/data/ml-100k/ml-100k.inter`` by time: its 214.8-day span cut into 30
  equal slices, each one "day" of 7.16 real days (the protocol's day is the slice).

Per seed, one pipeline (``daily.name = <dataset>-s<seed>``, ``train.seed = seed``) runs
``fearec-dist daily --local --json`` on the input holding days 1..27 (cold, promoted: the
bootstrap), then on days 1..28, 1..29, 1..30 (each adds one partition): append, warm start from
the promoted run, ``daily.warm_epochs`` epochs on the last ``daily.train_days`` days before the
validation window (defaults: 2 epochs on 7 days, the promoted run's optimizer state carried:
the settings ``bench/daily_tradeoff.py --chain`` found to meet the quality goal), export,
compare, promote. Beside each warm day, a cold run of the same
model for ``--cold-epochs`` on the same dataset version, with the same seed and cuts
(``fearec-dist train``). Both under ``data.split=temporal``: validation = the day before the
newest, test = the newest day.

Rows of ``bench/results/daily.json`` (``case`` = ``day``): dataset, day, seed, version,
``append_s`` (the daily job's append step; only the first pipeline of a day appends, the
second finds nothing new), ``warm`` and ``cold`` (``train_s``: the run's summed epoch training
seconds; ``wall_s``: the run's step of the daily job / the ``train`` command's wall time;
``test``: temporal-test HR@10, NDCG@10 and the warm-target versions), ``ratio`` = warm / cold
``train_s``, the ``decision`` and its reason. A ``summary`` row per dataset checks the goals:
warm ``train_s`` ≤ 0.3× cold, and warm HR@10 ≥ cold HR@10 − the spread between the seeds.
Each row records the 1-minute load average after it: the box is shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fearec_dist.data.synthetic import (  # noqa: E402
    DAY,
    generate_daily_log,
    write_daily_log,
)

FD = str(ROOT / ".venv" / "bin" / "fearec-dist")
ML100K = ROOT.parent / "shared" / "data" / "ml-100k" / "ml-100k.inter"
METRICS = ("hr@10", "ndcg@10", "warm_hr@10", "warm_ndcg@10")


def ml100k_days(path: Path, days: int = 30) -> tuple[list[pa.Table], int, float]:
    """ml-100k cut into ``days`` equal time slices: (tables, start, slice seconds)."""
    raw = np.loadtxt(path, skiprows=1, dtype=np.int64, usecols=(0, 1, 3))
    user, item, ts = raw.T
    start, end = int(ts.min()), int(ts.max()) + 1
    width = (end - start) / days
    cut = np.minimum(((ts - start) / width).astype(np.int64), days - 1)
    tables = []
    for d in range(days):
        m = cut == d
        tables.append(
            pa.table(
                {
                    "user_id": pa.array(user[m].astype(str)),
                    "item_id": pa.array(item[m].astype(str)),
                    "timestamp": pa.array(ts[m]),
                }
            )
        )
    return tables, start, width


def write_slices(root: Path, tables: list[pa.Table], start: int, width: float) -> list[str]:
    """One ``dt=`` partition per slice, named by the slice's first day (UTC)."""
    if width == DAY:
        return write_daily_log(str(root), tables, start=start)
    names = []
    for d, table in enumerate(tables):
        day = dt.datetime.fromtimestamp(start + d * width, dt.UTC).strftime("%Y-%m-%d")
        name = f"dt={day}"
        (root / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / name / "part-00000.parquet")
        names.append(name)
    return names


def load() -> float:
    return round(os.getloadavg()[0], 1)


def run(cmd: list[str], log: Path) -> tuple[float, str]:
    """Runs a CLI command, its output appended to ``log``; (wall seconds, stdout)."""
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return round(time.time() - t0, 1), proc.stdout


def test_metrics(results: dict) -> dict:
    return {m: round(results["test"][m], 4) for m in METRICS if m in results["test"]}


def bench_dataset(name: str, args: argparse.Namespace, out: list[dict]) -> None:
    work = Path(args.work) / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "input").mkdir(parents=True)
    if name == "synthetic":
        tables = generate_daily_log(args.users, args.items, 30, seed=args.data_seed)
        start, width = 1_793_491_200, float(DAY)
    else:
        tables, start, width = ml100k_days(ML100K)
    names = write_slices(work / "log", tables, start, width)
    days = width / DAY
    config = {
        "data": {
            "path": str(work / "prepared"),
            "max_seq_len": 50,
            "split": "temporal",
            "valid_days": days,
            "test_days": days,
        },
        "model": {"name": args.model},
        "train": {"epochs": args.cold_epochs, "batch_size": 256, "valid_metric": "ndcg@10"},
        "run": {"storage_path": str(work / "runs"), "workers": 1, "cpus_per_worker": 1.0},
        "daily": {
            "warm_epochs": args.warm_epochs,
            "train_days": args.train_days * days,
            "warm_optimizer": not args.fresh_optimizer,
        },
    }
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = work / "bench.log"
    first = args.days[0] - 1  # the bootstrap day: days 1..first
    for part in names[:first]:
        shutil.copytree(work / "log" / part, work / "input" / part)
    print(f"[bench] {name}: {sum(t.num_rows for t in tables):,} interactions, day = {days:.2f} d")
    for day in [first, *args.days]:
        if day > first:
            shutil.copytree(work / "log" / names[day - 1], work / "input" / names[day - 1])
        for seed in args.seeds:
            common = ["--config", str(cfg_path), "--local", "--set", f"train.seed={seed}"]
            wall, stdout = run(
                [FD, "daily", *common, "--input", str(work / "input"), "--json",
                 "--set", f"daily.name={name}-s{seed}"],
                log,
            )  # fmt: skip
            record = json.loads(stdout.strip().splitlines()[-1])
            results = json.loads(Path(record["new"]["run"], "results.json").read_text())
            row = {
                "case": "day",
                "dataset": name,
                "day": day,
                "seed": seed,
                "version": record["data"]["version"],
                "append_s": record["seconds"]["append"],
                "appended": record["appended"],
                "warm_start": record.get("warm_start"),
                "warm": {
                    "train_s": results["seconds_training"],
                    "wall_s": record["seconds"]["train"],
                    "epochs": results["epochs_run"],
                    "examples_before_since": (results.get("protocol") or {}).get(
                        "train_before_since"
                    ),
                    "items_copied": (results.get("warm_start") or {}).get("items_copied"),
                    "items_added": (results.get("warm_start") or {}).get("items_added"),
                    "test": test_metrics(results),
                },
                "decision": record["decision"],
                "reason": record["reason"],
                "scores": {
                    "new": record["new"]["test"].get(record["metric"]),
                    "current": (record.get("current") or {}).get("test", {}).get(record["metric"]),
                },
                "daily_wall_s": wall,
            }
            if day > first:  # the cold run beside it: same version, seed and cuts
                run_name = f"cold-d{day}-s{seed}"
                wall, _ = run(
                    [FD, "train", *common, "--name", run_name,
                     "--set", f"data.version={record['data']['version']}"],
                    log,
                )  # fmt: skip
                cold = json.loads((work / "runs" / run_name / "results.json").read_text())
                row["cold"] = {
                    "train_s": cold["seconds_training"],
                    "wall_s": wall,
                    "epochs": cold["epochs_run"],
                    "test": test_metrics(cold),
                }
                row["ratio"] = round(
                    row["warm"]["train_s"] / max(cold["seconds_training"], 1e-9), 3
                )
            row["load_avg_1m_after"] = load()
            print(json.dumps(row))
            out.append(row)
            Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    rows = [r for r in out if r.get("dataset") == name and "cold" in r]
    if rows:
        summary: dict = {"case": "summary", "dataset": name}
        for kind in ("warm", "cold"):
            hr = {s: np.mean([r[kind]["test"]["hr@10"] for r in rows if r["seed"] == s])
                  for s in args.seeds}  # fmt: skip
            summary[kind] = {
                "hr@10_mean": round(float(np.mean(list(hr.values()))), 4),
                "hr@10_seed_spread": round(float(max(hr.values()) - min(hr.values())), 4),
                "train_s_mean": round(float(np.mean([r[kind]["train_s"] for r in rows])), 1),
            }
        summary["ratio_mean"] = round(float(np.mean([r["ratio"] for r in rows])), 3)
        summary["goal_time"] = summary["ratio_mean"] <= 0.3
        summary["goal_quality"] = bool(
            summary["warm"]["hr@10_mean"]
            >= summary["cold"]["hr@10_mean"] - summary["cold"]["hr@10_seed_spread"]
        )
        print(json.dumps(summary))
        out.append(summary)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["synthetic", "ml100k"])
    p.add_argument("--days", nargs="+", type=int, default=[28, 29, 30])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--model", default="sasrec")
    p.add_argument("--cold-epochs", type=int, default=4)
    p.add_argument("--warm-epochs", type=int, default=2)
    p.add_argument("--train-days", type=float, default=7.0, help="warm: last N days (slices)")
    p.add_argument("--fresh-optimizer", action="store_true", help="daily.warm_optimizer: false")
    p.add_argument("--users", type=int, default=1000, help="synthetic users")
    p.add_argument("--items", type=int, default=400, help="synthetic items")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-daily"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "daily.json"))
    args = p.parse_args()
    out: list[dict] = [{"case": "run", "date": dt.date.today().isoformat(), "args": vars(args)}]
    for name in args.datasets:
        if name == "ml100k" and not ML100K.exists():
            print(f"[bench] skipping ml100k: {ML100K} is absent")
            continue
        bench_dataset(name, args, out)


if __name__ == "__main__":
    main()

"""The warm start's window and epochs against its quality, on the last day of a bench/daily.py run.

    .venv/bin/python bench/daily_tradeoff.py --variants 2:7 1:27   # epochs:days (27 = all)

Reads ``bench/results/daily.json`` (its last day's rows: the warm start's source, the dataset
version, the cuts of that day's runs), then per seed and variant trains one warm run from the
same source (the day before's promoted run) on the same version, ``train.epochs`` = epochs and
``data.train_since`` = the validation start − days (protocol days), with the same seed, model
and cuts. Rows (``case`` = ``variant``) are appended to ``bench/results/daily.json`` with the
warm and cold (from the day's row) test metrics and the train-seconds ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FD = str(ROOT / ".venv" / "bin" / "fearec-dist")
DAY = 86_400


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["2:7", "1:27"], help="epochs:days")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "daily.json"))
    p.add_argument("--dataset", default="synthetic", choices=["synthetic"])
    args = p.parse_args()
    rows = json.loads(Path(args.results).read_text())
    run = next(r for r in rows if r.get("case") == "run")
    work = Path(run["args"]["work"]) / args.dataset
    days = [
        r for r in rows if r.get("case") == "day" and r["dataset"] == args.dataset and "cold" in r
    ]
    last = max(r["day"] for r in days)
    for row in (r for r in days if r["day"] == last):
        source = row["warm_start"]
        cold_dir = work / "runs" / f"cold-d{last}-s{row['seed']}"
        cuts = json.loads((cold_dir / "results.json").read_text())["protocol"]
        day_s = DAY  # the synthetic log's day (ml-100k's protocol day is 7.16 days: not here)
        for variant in args.variants:
            epochs, span = (float(x) for x in variant.split(":"))
            name = f"variant-d{last}-s{row['seed']}-e{int(epochs)}-w{span:g}"
            since = int(cuts["valid_start"] - span * day_s)
            cmd = [FD, "train", "--config", str(work / "config.yaml"), "--local", "--name", name,
                   "--set", f"train.seed={row['seed']}", "--set", f"train.epochs={int(epochs)}",
                   "--set", f"data.version={row['version']}", "--set", f"train.warm_start={source}",
                   "--set", f"data.train_since={since}"]  # fmt: skip
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
            res = json.loads((work / "runs" / name / "results.json").read_text())
            out = {
                "case": "variant",
                "dataset": args.dataset,
                "day": last,
                "seed": row["seed"],
                "warm_epochs": int(epochs),
                "train_days": span,
                "train_s": res["seconds_training"],
                "wall_s": round(time.time() - t0, 1),
                "examples_before_since": res["protocol"].get("train_before_since"),
                "test": {m: round(res["test"][m], 4) for m in ("hr@10", "ndcg@10")},
                "cold": row["cold"],
                "ratio": round(res["seconds_training"] / row["cold"]["train_s"], 3),
                "load_avg_1m_after": round(os.getloadavg()[0], 1),
            }
            print(json.dumps(out), flush=True)
            rows.append(out)
            Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

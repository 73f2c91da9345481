"""The warm start's window and epochs against its quality, on the last day of a bench/daily.py run.

    .venv/bin/python bench/daily_tradeoff.py --variants 2:7 1:27   # epochs:days (27 = all)
    .venv/bin/python bench/daily_tradeoff.py --chain --variants 2:7:train.warm_start_optimizer=true

A variant is ``epochs:days`` and optionally ``:key=value,key=value`` (more ``--set`` overrides).

Reads ``bench/results/daily.json`` (its last day's rows: the warm start's source, the dataset
version, the cuts of that day's runs), then per seed and variant trains one warm run from the
same source (the day before's promoted run) on the same version, ``train.epochs`` = epochs and
``data.train_since`` = the validation start − days (protocol days), with the same seed, model
and cuts. Rows (``case`` = ``variant``) are appended to ``bench/results/daily.json`` with the
warm and cold (from the day's row) test metrics and the train-seconds ratio.

``--chain``: the variant as a daily schedule, every day of the run (28-30) per seed: day 28 warm
starts from the bootstrap's run, each later day from the variant's run of the day before (as
the daily job would when every day is promoted; the gate is not applied here), on that day's
version and cuts. Rows ``case`` = ``chain`` and one ``chain_summary`` per variant with the
goals of bench/daily.py (warm train s <= 0.3x cold; warm HR@10 >= cold - the seeds' spread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FD = str(ROOT / ".venv" / "bin" / "fearec-dist")
DAY = 86_400


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["2:7", "1:27"], help="epochs:days")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "daily.json"))
    p.add_argument("--dataset", default="synthetic", choices=["synthetic"])
    p.add_argument("--chain", action="store_true", help="each variant over all days, chained")
    args = p.parse_args()
    rows = json.loads(Path(args.results).read_text())
    run = next(r for r in rows if r.get("case") == "run")
    work = Path(run["args"]["work"]) / args.dataset
    days = [
        r for r in rows if r.get("case") == "day" and r["dataset"] == args.dataset and "cold" in r
    ]
    if args.chain:
        for variant in args.variants:
            chain(variant, days, work, rows, args)
        return
    last = max(r["day"] for r in days)
    for row in (r for r in days if r["day"] == last):
        for variant in args.variants:
            out = train_variant(variant, row, row["warm_start"], work, f"variant-d{last}")
            rows.append(out | {"case": "variant"})
            print(json.dumps(rows[-1]), flush=True)
            Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")


def parse_variant(variant: str) -> tuple[int, float, list[str]]:
    epochs, span, *rest = variant.split(":")
    sets = [kv for part in rest for kv in part.split(",") if kv]
    return int(epochs), float(span), sets


def train_variant(variant: str, row: dict, source: str, work: Path, prefix: str) -> dict:
    """One warm run of ``variant`` on ``row``'s day, version and cuts, from ``source``."""
    epochs, span, sets = parse_variant(variant)
    cold_dir = work / "runs" / f"cold-d{row['day']}-s{row['seed']}"
    cuts = json.loads((cold_dir / "results.json").read_text())["protocol"]
    day_s = DAY  # the synthetic log's day (ml-100k's protocol day is 7.16 days: not here)
    tag = "".join(f"-{kv.split('=')[0].split('.')[-1]}{kv.split('=')[1]}" for kv in sets)
    name = f"{prefix}-s{row['seed']}-e{epochs}-w{span:g}{tag}"
    since = int(cuts["valid_start"] - span * day_s)
    cmd = [FD, "train", "--config", str(work / "config.yaml"), "--local", "--name", name,
           "--set", f"train.seed={row['seed']}", "--set", f"train.epochs={epochs}",
           "--set", f"data.version={row['version']}", "--set", f"train.warm_start={source}",
           "--set", f"data.train_since={since}"]  # fmt: skip
    for kv in sets:
        cmd += ["--set", kv]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    res = json.loads((work / "runs" / name / "results.json").read_text())
    return {
        "dataset": "synthetic",
        "day": row["day"],
        "seed": row["seed"],
        "variant": variant,
        "run": str(work / "runs" / name),
        "warm_epochs": epochs,
        "train_days": span,
        "sets": sets,
        "train_s": res["seconds_training"],
        "wall_s": round(time.time() - t0, 1),
        "examples_before_since": res["protocol"].get("train_before_since"),
        "test": {m: round(res["test"][m], 4) for m in ("hr@10", "ndcg@10")},
        "cold": row["cold"],
        "ratio": round(res["seconds_training"] / row["cold"]["train_s"], 3),
        "load_avg_1m_after": round(os.getloadavg()[0], 1),
    }


def chain(variant: str, days: list[dict], work: Path, rows: list[dict], args) -> None:
    """``variant`` as a daily schedule over the run's days, per seed (see the docstring)."""
    out = []
    for seed in sorted({r["seed"] for r in days}):
        source = None
        for row in sorted((r for r in days if r["seed"] == seed), key=lambda r: r["day"]):
            source = source or row["warm_start"]  # day 28: the bootstrap's run
            res = train_variant(variant, row, source, work, f"chain-d{row['day']}")
            out.append(res | {"case": "chain", "warm_start": source})
            source = res["run"]
            print(json.dumps(out[-1]), flush=True)
            rows.append(out[-1])
            Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")
    seeds = sorted({r["seed"] for r in out})
    summary: dict = {"case": "chain_summary", "variant": variant}
    for kind, get in (("warm", lambda r: r["test"]), ("cold", lambda r: r["cold"]["test"])):
        hr = {s: float(np.mean([get(r)["hr@10"] for r in out if r["seed"] == s])) for s in seeds}
        summary[kind] = {
            "hr@10_mean": round(float(np.mean(list(hr.values()))), 4),
            "ndcg@10_mean": round(float(np.mean([get(r)["ndcg@10"] for r in out])), 4),
            "hr@10_seed_spread": round(max(hr.values()) - min(hr.values()), 4),
        }
    summary["ratio_mean"] = round(float(np.mean([r["ratio"] for r in out])), 3)
    summary["goal_time"] = summary["ratio_mean"] <= 0.3
    summary["goal_quality"] = bool(
        summary["warm"]["hr@10_mean"]
        >= summary["cold"]["hr@10_mean"] - summary["cold"]["hr@10_seed_spread"]
    )
    print(json.dumps(summary), flush=True)
    rows.append(summary)
    Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Rows of ``bench/results/beauty_quality.json`` from finished training runs.

    .venv/bin/python bench/quality_rows.py runs/sasrec-beauty-10ep-sampled-s2026 [RUN ...]

Each run directory's ``results.json`` (metrics at the best validation epoch, its config) and
``metrics.csv`` (every epoch) become one row; a row of the same run name is replaced, the
others are kept. Prints the README table's line for each.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "beauty_quality.json"
KEYS = ("hr@5", "hr@10", "ndcg@10", "masked_hr@10", "masked_ndcg@10")


def row(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    cfg = res["config"]
    train = cfg["train"]
    with open(run_dir / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    return {
        "run": run_dir.name,
        "model": cfg["model"]["name"],
        "softmax": train.get("softmax", "full"),
        "n_negatives": train.get("n_negatives") if train.get("softmax") == "sampled" else None,
        "negative_sampler": train.get("negative_sampler")
        if train.get("softmax") == "sampled"
        else None,
        "seed": train["seed"],
        "feed": "streaming (per-epoch Ray Data job)",
        "first_epoch_head": train.get("first_epoch_head"),
        # the head epoch 1 started on (rows, users, rows paired with themselves), if it had one
        **{k: int(float(v)) for k, v in epochs[0].items() if k.startswith("head_") and v},
        "epochs_run": res["epochs_run"],
        "best_epoch": res["best_epoch"],
        "valid": {k: round(res["valid"][k], 4) for k in KEYS},
        "test": {k: round(res["test"][k], 4) for k in KEYS},
        "seconds_training": res["seconds_training"],
        "per_epoch": [
            {
                "epoch": int(e["epoch"]),
                "train_seconds": float(e["train_seconds"]),
                "samples_per_s": float(e["samples_per_s"]),
                "data_wait_share": float(e["data_wait_share"]),
                "valid_hr@10": round(float(e["valid/hr@10"]), 4),
            }
            for e in epochs
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    for run_dir in args.runs:
        new = row(run_dir)
        rows = [r for r in rows if r["run"] != new["run"]] + [new]
        v, t = new["valid"], new["test"]
        print(
            f"| {new['model']} | {new['softmax']} | {new['seed']} | {new['epochs_run']} | "
            f"{new['best_epoch']} | {v['hr@10']:.4f} / {v['ndcg@10']:.4f} | {t['hr@5']:.4f} / "
            f"{t['hr@10']:.4f} / {t['ndcg@10']:.4f} | {t['masked_hr@10']:.4f} / "
            f"{t['masked_ndcg@10']:.4f} |"
        )
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

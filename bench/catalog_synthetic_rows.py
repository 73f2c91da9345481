"""``bench/results/catalog_synthetic.json`` from a finished ``bench/catalog_synthetic.sh`` run.

    .venv/bin/python bench/catalog_synthetic_rows.py --run runs/NAME --data runs/_prepared/DATA

Reads the run's ``metrics.csv`` and the two evaluations the script wrote beside it
(``eval-model.json``, ``eval-popularity.json``: the trained model and the popularity ranking on
the same seeded users), checks they scored the same users, and prints test HR@10 against
popularity's.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from quality_rows import KEYS  # the metrics the Beauty rows keep (bench/ is on the path)

RESULTS = Path(__file__).resolve().parent / "results" / "catalog_synthetic.json"


def load_printed_json(path: Path) -> dict:
    """The JSON object ``evaluate --json`` printed (anything printed before it is skipped)."""
    text = path.read_text()
    start = 0 if text.startswith("{") else text.index("\n{") + 1
    return json.loads(text[start:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="the finished run directory")
    p.add_argument("--data", type=Path, required=True, help="its prepared dataset")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    model = load_printed_json(args.run / "eval-model.json")
    pop = load_printed_json(args.run / "eval-popularity.json")
    if model["users"] != pop["users"]:
        raise SystemExit(
            f"the two evaluations scored different users: {model['users']} / {pop['users']}"
        )
    meta = json.loads((args.data / "meta.json").read_text())
    cfg = json.loads((args.run / "results.json").read_text())["config"]
    with open(args.run / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    t = cfg["train"]
    out = {
        "command": "bash bench/catalog_synthetic.sh",
        "data": {k: meta[k] for k in ("n_users", "n_items", "n_interactions", "seconds")},
        "train": {k: t.get(k) for k in ("softmax", "n_negatives", "negative_sampler",
                                        "in_batch_negatives", "logq_correction",
                                        "sparse_item_updates", "epochs", "batch_size", "seed")}
        | {"model": cfg["model"]["name"], "workers": cfg["run"]["workers"],
           "max_seq_len": cfg["data"]["max_seq_len"],
           "per_epoch": [{"epoch": int(e["epoch"]), "loss": round(float(e["train/loss"]), 4),
                          "train_seconds": float(e["train_seconds"]),
                          "samples_per_s": float(e["samples_per_s"]),
                          "data_wait_share": float(e["data_wait_share"])} for e in epochs]},
        "users": model["users"],
        "users_sampling": "sample_users: user ids drawn without replacement from a generator "
        "seeded [seed, 41]; the same users for both rows",
        "rows": [
            {"ranker": "model", "valid": {k: round(model["valid"][k], 4) for k in KEYS},
             "test": {k: round(model["test"][k], 4) for k in KEYS}},
            {"ranker": "popularity (training counts)",
             "valid": {k: round(pop["valid"][k], 4) for k in KEYS},
             "test": {k: round(pop["test"][k], 4) for k in KEYS}},
        ],
    }  # fmt: skip
    out["test_hr@10_ratio"] = round(model["test"]["hr@10"] / pop["test"]["hr@10"], 2)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"test HR@10: model {model['test']['hr@10']:.4f}, popularity {pop['test']['hr@10']:.4f} "
        f"({out['test_hr@10_ratio']}x) on {model['users']['scored']:,} users -> {args.out}"
    )


if __name__ == "__main__":
    main()

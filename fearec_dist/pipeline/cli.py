"""The ``daily`` command of the CLI (hooked in by ``cli.py``).

fearec-dist daily --config F --input URI [--format parquet] [--local] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any

from fearec_dist.config import ConfigError, add_set_argument, load_config
from fearec_dist.data.prepare import FORMATS
from fearec_dist.errors import DataError
from fearec_dist.models import validate_model_section
from fearec_dist.pipeline.daily import DailyFailed, check_daily, run_daily
from fearec_dist.train.trainer import TrainingFailed

DAILY_HELP = """\
One day of continuous training for the pipeline daily.name (docs/daily.md):

  1. read the pointer <run.storage_path>/pipelines/<daily.name>/current.json (its generation G)
  2. append --input to the prepared dataset data.path (prepare --append: only files or Delta
     commits not consumed yet; a full prepare when the dataset does not exist yet)
  3. train on the newest version under the temporal protocol (data.split: temporal,
     data.valid_days, data.test_days), warm-started from the promoted run (train.warm_start;
     cold on the first day); warm days train daily.warm_epochs epochs on the last
     daily.train_days days (data.train_since)
  4. export the run (<run dir>/export; daily.index adds an ANN index)
  5. score the new export and the promoted one on the same test rows: one evaluation code
     path, items matched by raw id, targets the promoted model does not know count as misses
  6. promote when the new model beats the promoted one on daily.promote_metric (default
     hr@10) by at least daily.min_gain (relative): a conditional create of history/<G+1>.json,
     then current.json. Of two overlapping days only one can promote; the other fails.

The decision, both scores and the reason are printed, written to the pipeline's decisions/
and to the run's results.json ("daily"), and logged to MLflow when run.tracking_uri is set.
A day with no new data whose dataset version was already decided does nothing (exit 0). A
failed day exits 1 and leaves the pointer on the promoted export.
"""


def add_daily_command(sub: Any) -> None:
    """Adds ``daily`` to the CLI's subparsers."""
    p = sub.add_parser(
        "daily",
        help="append new data, warm-start, train, export, promote if better (continuous training)",
        description=DAILY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="experiment YAML with a daily: section")
    p.add_argument(
        "--input",
        required=True,
        metavar="URI",
        help="the raw log's root, the same every day (e.g. s3://logs/interactions with dt=… "
        "partitions, or a Delta table): only what the dataset has not consumed is read",
    )
    p.add_argument(
        "--format", default="parquet", choices=list(FORMATS), help="format of --input (parquet)"
    )
    # no --debug: Ray Train's local mode keeps checkpoints in memory, and a day exports one
    p.add_argument(
        "--local",
        action="store_true",
        help="start a Ray instance on this machine (default: join the cluster at RAY_ADDRESS)",
    )
    p.add_argument("--json", action="store_true", help="also print the decision as one JSON line")
    add_set_argument(p, "override one config key, e.g. --set daily.min_gain=0.01 (repeatable)")


def cmd_daily(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    validate_model_section(cfg.model.name, cfg.model.params, cfg.data.max_seq_len)
    check_daily(cfg)
    mode = "local" if args.local else "cluster"
    try:
        record = run_daily(cfg, args.input, args.format, mode)
    except DailyFailed as err:
        if not isinstance(err.cause, (ConfigError, DataError, TrainingFailed, ValueError)):
            traceback.print_exception(err.cause, file=sys.stderr)
        print(f"fearec-dist: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(record, default=str))
    return 0


DAILY_COMMANDS = {"daily": cmd_daily}

"""Command line: argparse -> config (validated once, here) -> one call into data/, train/ or tune.

fearec-dist prepare --input URI --format {parquet,csv,atomic,seqtxt,delta,synthetic} --output URI
                    [--append]
fearec-dist data info|dump|gc PREPARED [--version N] [--json] [--output F.jsonl] [--keep N]
fearec-dist train --config F [--set section.key=value ...] [--local | --debug] [--workers N]
fearec-dist tune --config F --space F [--local]
fearec-dist evaluate (--checkpoint URI | --baseline popularity --data URI [--set data.split=…])
fearec-dist export --run DIR|URI [--output URI] [--index flat|ivf|hnsw]
fearec-dist recommend --export DIR|URI (--history "raw ids" | --input URI --output URI) [-k K]
fearec-dist daily --config F --input URI [--format F] [--local]   (continuous training)
fearec-dist submit CONFIG [--tune SPACE] [--address URL]   (ray job submit on a cluster)
fearec-dist config [--list | --markdown | --write FILE]   (every config key: type, default, use)
fearec-dist demo
python -m fearec_dist ...   (the same CLI)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fearec_dist.config import ConfigError, ExperimentConfig, add_set_argument, load_config
from fearec_dist.config.reference import ModelDoc, render_markdown, render_text
from fearec_dist.data.inspect import dataset_info, dump_dataset, format_info, format_summary
from fearec_dist.data.prepare import NothingNew, parse_columns, prepare_dataset
from fearec_dist.data.temporal import baseline_protocol, describe_record
from fearec_dist.data.versions import gc_versions
from fearec_dist.launch import ray_session
from fearec_dist.models import get_spec, model_names, validate_model_section
from fearec_dist.pipeline.cli import DAILY_COMMANDS, add_daily_command
from fearec_dist.serve.cli import SERVE_COMMANDS, add_serve_commands
from fearec_dist.submit import build_submit_parser, run_submit
from fearec_dist.train.evaluate import (
    BASELINE_SEED,
    BASELINES,
    describe_users,
    evaluate_checkpoint,
    evaluate_popularity,
)
from fearec_dist.train.trainer import TrainingFailed, run_training
from fearec_dist.tune import run_sweep

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo.yaml"

EPILOG = """\
examples:
  fearec-dist demo
  fearec-dist prepare --input data/Beauty.txt --format seqtxt --output prepared/beauty
  fearec-dist train --config jobs/configs/beauty.yaml --local --workers 2 --set train.lr=5e-4
  fearec-dist tune --config jobs/configs/beauty.yaml --space jobs/spaces/fearec.yaml --local
  fearec-dist evaluate --checkpoint runs/<name>/checkpoint_000004 --users 10000
  fearec-dist evaluate --baseline popularity --data prepared/beauty --users 10000

Config precedence: defaults < YAML file < --set overrides. An unknown key is an error naming it.
S3 credentials come from the standard AWS environment variables or the instance role only.
"""


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="experiment YAML (see README: config)")
    add_set_argument(
        p, "override one config key, e.g. --set train.lr=1e-4 (repeatable; value parsed as YAML)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fearec-dist",
        description="Distributed training of FEARec and other sequential recommenders on Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="validate raw logs and write a prepared dataset (Ray Data job)",
        description="Read interaction logs (local path, file://, s3://, any fsspec URI; a file, "
        "directory or glob), validate, filter, build the id vocabulary and time-ordered per-user "
        "sequences, and write them with meta.json to --output. Output is written only on success.",
    )
    p.add_argument("--input", default="", help="raw log URI (ignored for --format synthetic)")
    p.add_argument(
        "--format",
        required=True,
        choices=["parquet", "csv", "atomic", "seqtxt", "delta", "synthetic"],
        help="parquet/csv: columns user_id,item_id,timestamp[,rating]; atomic: RecBole .inter; "
        "seqtxt: 'user item item ...' per line, time-ordered; synthetic: generated demo logs",
    )
    p.add_argument("--output", required=True, help="output URI for the prepared dataset")
    p.add_argument("--attributes", help="item attributes: RecBole .item or item2attributes.json")
    p.add_argument("--columns", help="parquet/csv column mapping, e.g. user=uid,item=iid,time=ts")
    p.add_argument(
        "--append",
        action="store_true",
        help="add only the input not yet consumed (new files or partitions, Delta commits after "
        "the recorded version) to the newest version of --output, as a new version; ids of "
        "existing users, items and attributes never change",
    )
    _add_config_args(p, required=False)

    p = sub.add_parser(
        "train",
        help="train a model (local debug, local Ray, or the running cluster)",
        description="Train the configured model. Without --local/--debug it joins the running Ray "
        "cluster (RAY_ADDRESS, as inside `ray job submit`).",
    )
    _add_config_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="start a Ray instance on this machine")
    mode.add_argument(
        "--debug",
        action="store_true",
        help="run the train function in this process (Ray Train local mode; debuggers stop in it)",
    )
    p.add_argument("--workers", type=int, help="number of training workers (run.workers)")
    p.add_argument("--data", help="dataset URI (data.path)")
    p.add_argument("--name", help="run name (run.name); the same name resumes a run")
    p.add_argument(
        "--stage",
        choices=["train", "pretrain", "finetune"],
        help="S3Rec: pretrain, or finetune from --set train.pretrained=CHECKPOINT (train.stage)",
    )

    p = sub.add_parser("tune", help="hyper-parameter sweep with Ray Tune + ASHA")
    _add_config_args(p)
    p.add_argument("--space", required=True, help="search space YAML (dotted keys)")
    p.add_argument("--local", action="store_true", help="start a Ray instance on this machine")

    p = sub.add_parser(
        "evaluate",
        help="score a saved checkpoint, or a baseline, on valid and test",
        description="Full-ranking HR/NDCG/MRR on the valid and test rows (both protocols: history "
        "kept, and history masked), in this process without Ray. Two modes: --checkpoint "
        "re-scores a saved model on the dataset it was trained on; --baseline popularity --data "
        "ranks every item by its count in the training part of each sequence (valid and test "
        "targets never counted). --users N scores the same fixed seeded sample of N users in "
        "both modes, so a model and the baseline compare on the same users.",
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--checkpoint",
        metavar="URI",
        help="checkpoint directory, or a run directory (its newest checkpoint); path or URI",
    )
    what.add_argument(
        "--baseline", choices=BASELINES, help="score a baseline instead of a model (needs --data)"
    )
    p.add_argument(
        "--data", metavar="URI", help="--baseline: the prepared dataset (fearec-dist prepare)"
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        metavar="L",
        help="--baseline: history length L of the rows (default 50; a checkpoint uses its own)",
    )
    p.add_argument(
        "--users",
        type=int,
        default=0,
        metavar="N",
        help="score only a fixed seeded sample of N users, on valid and test (0: every user)",
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed of the --users sample (default: the run's train.seed for a checkpoint, "
        f"{BASELINE_SEED} for a baseline)",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_set_argument(p, "--baseline: the protocol (data.split=temporal, data.valid_start, "
                     "test_start, valid_days, test_days) and storage.*")  # fmt: skip

    p = sub.add_parser(
        "config",
        help="list every config key with its type, default and description",
        description="The config reference, generated from the config dataclasses and each "
        "model's config: plain text (--list, the default), Markdown (--markdown), or the "
        "Markdown written to a file (--write docs/config.md).",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--list", action="store_true", help="plain text, one key a line (default)")
    how.add_argument("--markdown", action="store_true", help="print the Markdown reference")
    how.add_argument("--write", metavar="FILE", help="write the Markdown reference to FILE")

    _add_data_commands(sub)

    build_submit_parser(sub)

    add_serve_commands(sub)
    add_daily_command(sub)

    p = sub.add_parser("demo", help="prepare synthetic data and train FEARec locally (make demo)")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="defaults to jobs/configs/demo.yaml")
    add_set_argument(p, "config override")
    return parser


def _train_config(args: argparse.Namespace) -> ExperimentConfig:
    """The command's config, validated once, model section included, before Ray starts."""
    extra: dict[str, Any] = {}
    if getattr(args, "workers", None) is not None:
        extra.setdefault("run", {})["workers"] = args.workers
    if getattr(args, "data", None):
        extra.setdefault("data", {})["path"] = args.data
    if getattr(args, "name", None):
        extra.setdefault("run", {})["name"] = args.name
    if getattr(args, "stage", None):
        extra.setdefault("train", {})["stage"] = args.stage
    cfg = load_config(args.config, args.overrides, extra=extra)

    validate_model_section(cfg.model.name, cfg.model.params, cfg.data.max_seq_len)
    return cfg


def _add_data_commands(sub: Any) -> None:
    """``fearec-dist data info | dump | gc`` (data/inspect.py, data/versions.py)."""
    p = sub.add_parser("data", help="what a prepared dataset holds: versions, counts, dump, gc")
    cmds = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = cmds.add_parser("info", help="versions (parent, kind, date), counts, time range, inputs")
    q.add_argument("prepared", metavar="PREPARED")
    q.add_argument("--version", type=int, help="the version to describe (default: the newest)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q = cmds.add_parser("dump", help="one JSON line per user: raw user, raw items, timestamps")
    q.add_argument("prepared", metavar="PREPARED")
    q.add_argument("--version", type=int, help="the version to dump (default: the newest)")
    q.add_argument("--output", required=True, metavar="FILE.jsonl", help="where to write")
    q = cmds.add_parser("gc", help="remove all versions but the newest N (never automatic)")
    q.add_argument("prepared", metavar="PREPARED")
    q.add_argument("--keep", type=int, required=True, metavar="N", help="versions to keep")
    for q in cmds.choices.values():
        add_set_argument(q, "storage options, e.g. --set storage.endpoint_url=…")


def cmd_data(args: argparse.Namespace) -> int:
    storage = load_config(None, args.overrides).storage
    if args.data_command == "info":
        info = dataset_info(args.prepared, args.version, storage)
        print(json.dumps(info, indent=2) if args.json else format_info(info))
    elif args.data_command == "dump":
        n = dump_dataset(args.prepared, args.output, args.version, storage)
        print(f"wrote {n:,} users to {args.output}")
    else:
        done = gc_versions(args.prepared, args.keep, storage)
        print(
            f"removed versions {done['removed'] or 'none'}; uncommitted directories removed: "
            f"{done['orphans'] or 'none'}; kept {done['kept']}"
        )
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(args.config or None, args.overrides)
    data = cfg.data
    if args.columns:
        data.columns = parse_columns(args.columns)
    with ray_session("auto"):
        try:
            meta = prepare_dataset(args.input, args.format, args.output, data=data,
                                   attributes_uri=args.attributes, append=args.append)  # fmt: skip
        except NothingNew as done:
            print(done)
            return 0
    print(format_summary(meta))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    mode = "debug" if args.debug else "local" if args.local else "cluster"
    results = run_training(cfg, mode)
    _print_results(results)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.debug, args.local, args.workers, args.data, args.name = False, True, None, None, None
    args.stage = None
    return cmd_train(args)


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    run_sweep(cfg, args.space, mode="local" if args.local else "cluster")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.users < 0:
        raise ValueError(f"--users: must be >= 0, got {args.users}")
    if args.baseline:
        if not args.data:
            raise ValueError(f"--baseline {args.baseline} needs --data PREPARED_URI")
        max_seq_len = 50 if args.max_seq_len is None else args.max_seq_len
        if max_seq_len < 1:
            raise ValueError(f"--max-seq-len: must be >= 1, got {max_seq_len}")
        seed = BASELINE_SEED if args.seed is None else args.seed
        protocol, storage = baseline_protocol(args.data, args.overrides)
        results = evaluate_popularity(args.data, max_seq_len, storage, users=args.users,
                                      seed=seed, protocol=protocol)  # fmt: skip
    else:
        for flag, value in (("--data", args.data), ("--max-seq-len", args.max_seq_len),
                            ("--set", args.overrides or None)):  # fmt: skip
            if value is not None:
                raise ValueError(f"{flag} is for --baseline; a checkpoint uses its run's own")
        results = evaluate_checkpoint(args.checkpoint, users=args.users, seed=args.seed)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        if args.baseline:
            print(f"baseline {args.baseline} on {args.data} (training counts)")
        _print_results(results)
        print(describe_users(results["users"]))
    return 0


def _print_results(results: dict[str, Any]) -> None:
    if not (results.get("valid") or results.get("test")):  # train.evaluate=false
        print(
            f"{results.get('epochs_run', 0)} epoch(s) run, none evaluated (train.evaluate=false); "
            "score the run with: fearec-dist evaluate --checkpoint RUN_DIR [--users N]"
        )
        return
    keys = ("hr@10", "ndcg@10", "mrr@10", "masked_hr@10", "masked_ndcg@10")
    print(f"{'split':<11}" + "".join(f"{k:>16}" for k in keys))
    for split in ("valid", "test"):
        row = results.get(split) or {}
        print(f"{split:<11}" + "".join(f"{row.get(k, float('nan')):>16.4f}" for k in keys))
        if "warm_hr@10" in row:  # temporal: the warm targets alone
            print(f"{split} warm".ljust(11) + "".join(f"{row['warm_' + k]:>16.4f}" for k in keys))
    if results.get("protocol"):
        print(describe_record(results["protocol"]))
    if results.get("best_epoch"):
        print(f"best epoch {results['best_epoch']} of {results.get('epochs_run')} run")
    elif "epochs_run" in results:  # a checkpoint of a run trained without evaluation
        print(f"{results['epochs_run']} epoch(s) run, scored at the last")


def model_docs() -> list[ModelDoc]:
    """Every registered model (not its presets, which become notes) for the config reference."""
    docs = []
    for name in model_names():
        spec = get_spec(name)
        if name not in spec.presets:
            docs.append(ModelDoc(name, spec.config_cls, dict(spec.presets)))
    return docs


def cmd_config(args: argparse.Namespace) -> int:
    if args.write:
        Path(args.write).write_text(render_markdown(model_docs()))
        print(f"config reference written to {args.write}")
    else:
        print(render_markdown(model_docs()) if args.markdown else render_text(model_docs()), end="")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    return run_submit(args)


COMMANDS = {
    "submit": cmd_submit,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "tune": cmd_tune,
    "evaluate": cmd_evaluate,
    "config": cmd_config,
    "data": cmd_data,
    "demo": cmd_demo,
    **SERVE_COMMANDS,
    **DAILY_COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"fearec-dist: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        print(f"fearec-dist: error: {err}", file=sys.stderr)
        return 1
    except TrainingFailed as err:  # the workers' report, without the driver's traceback
        print(f"fearec-dist: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m fearec_dist.cli
    sys.exit(main())

"""The serving commands of the CLI: ``export`` and ``recommend`` (hooked in by ``cli.py``).

fearec-dist export --run DIR|URI [--output URI] [--index flat|ivf|hnsw]
fearec-dist recommend --export DIR|URI --history "raw ids" [-k 10] [--ann] [--exclude-seen]
fearec-dist recommend --export DIR|URI --input URI --output URI [-k 100] [--ann]   (Ray Data)
fearec-dist serve --export DIR|URI [--host 127.0.0.1] [--port 8000] [--replicas N] [--ann]
    [--max-batch-size B] [--batch-wait-ms T] [--follow POINTER] [--local]   (Ray Serve, HTTP)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fearec_dist.launch import ray_session

EXPORT_HELP = """\
Write a servable export of a trained run (local path or s3://) from its best validation
weights: items.parquet (raw item id, internal id, embedding, training count), encoder.pt2 (the
sequence encoder as a torch.export program that plain torch loads, no fearec-dist needed),
manifest.json (model, dims, max_seq_len, scoring, vocab checksum, test metrics) and, with
--index, a FAISS inner-product index (needs faiss-cpu: pip install 'fearec-dist[serve]').
"""
RECOMMEND_HELP = """\
Top-k raw item ids for a history, from an export. Exact by default (one matmul over the item
table, plus the item bias where the model has one); --ann uses the export's FAISS index.

One history: --history "id id id" (raw ids, oldest first) prints the top-k with scores.
Batch: --input URI --output URI runs a Ray Data job (joins RAY_ADDRESS, else starts a local Ray)
over a prepared dataset or Parquet of user_id + item_ids (list of raw ids) and writes Parquet
of user_id, item_ids, scores, source, n_unknown, one row per user.

Raw ids not in the export's vocabulary are dropped and counted; --strict makes them an error
naming them. A history with no known id is an error unless --fallback popularity (the most
popular items by training counts, labelled source=popularity); in batch mode such users get a
row with no items and source=empty_history.
"""
SERVE_HELP = """\
Serve an export online over HTTP with Ray Serve (needs pip install 'fearec-dist[serve]'):

  POST /recommend        {"history": ["raw id", ...], "k": 10, "exclude_seen": false,
                          "strict": false, "fallback": "none" | "popularity"}
                         -> {"items", "scores", "unknown", "source", "export": {"model",
                            "export_id"}}
  POST /recommend/batch  a JSON list of such requests -> a list of answers
  GET  /healthz          200 once the export is loaded;  GET /info: its manifest

Concurrent requests are scored together (dynamic batching: up to --max-batch-size, waiting
at most --batch-wait-ms for a batch to fill). Bad requests get a 4xx naming the field.
--follow POINTER swaps to the export a promotion pointer (current.json) names, inside the
running replicas, without failing a request. Binds 127.0.0.1 unless --host says otherwise.
With --local it starts a Ray instance here, otherwise it joins the running cluster
(RAY_ADDRESS). Serves until Ctrl-C / SIGTERM, then removes the application.
"""


def add_serve_commands(sub: Any) -> None:
    """Adds ``export``, ``recommend`` and ``serve`` to the CLI's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "export",
        help="export a trained run for serving",
        description=EXPORT_HELP,
        formatter_class=fmt,
    )
    p.add_argument(
        "--run",
        required=True,
        metavar="DIR|URI",
        help="run directory (its newest complete checkpoint) or a checkpoint directory",
    )
    p.add_argument("--output", metavar="URI", help="export directory (default: <run>/export)")
    p.add_argument(
        "--index",
        choices=["flat", "ivf", "hnsw"],
        help="also build a FAISS index: ivf (nlist=√N, nprobe=nlist/4) or hnsw (M=32, "
        "efConstruction=200, efSearch=128); flat is exact (for checking)",
    )
    p.add_argument(
        "--index-param",
        action="append",
        default=[],
        metavar="KEY=INT",
        help="override an index parameter: nlist, nprobe, M, efConstruction, efSearch",
    )

    p = sub.add_parser(
        "recommend",
        help="top-k items for a history, or a batch job over many users",
        description=RECOMMEND_HELP,
        formatter_class=fmt,
    )
    p.add_argument("--export", required=True, metavar="DIR|URI", help="an export directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--history", metavar='"ID ID …"', help="raw item ids, oldest first")
    what.add_argument(
        "--input",
        metavar="URI",
        help="batch: a prepared dataset, or Parquet with user_id and item_ids (raw ids)",
    )
    p.add_argument("--output", metavar="URI", help="batch: directory for the top-k Parquet")
    p.add_argument("-k", type=int, help="items per history (default 10; batch: 100)")
    p.add_argument("--ann", action="store_true", help="use the export's FAISS index")
    p.add_argument(
        "--exclude-seen", action="store_true", help="never recommend an item of the history"
    )
    p.add_argument("--strict", action="store_true", help="unknown ids are an error, not dropped")
    p.add_argument(
        "--fallback",
        choices=["none", "popularity"],
        default="none",
        help="what a history with no known id gets (default: an error)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (batch: one GPU per actor)")
    p.add_argument("--json", action="store_true", help="one history: print JSON")
    p.add_argument("--actors", type=int, default=2, help="batch: largest actor pool (default 2)")
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="batch: Ray CPUs per actor, fractions allowed (default 1)",
    )
    p.add_argument("--threads", type=int, help="batch: torch threads per actor (default: its CPUs)")
    p.add_argument("--batch-size", type=int, default=1024, help="batch: users per batch")
    p.add_argument("--overwrite", action="store_true", help="batch: replace a non-empty --output")
    _add_serve_parser(sub, fmt)


def _add_serve_parser(sub: Any, fmt: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve an export online over HTTP (Ray Serve)",
        description=SERVE_HELP,
        formatter_class=fmt,
    )
    p.add_argument("--export", metavar="DIR|URI", help="the export to serve")
    p.add_argument(
        "--follow",
        metavar="POINTER",
        help='a promotion pointer (current.json with an "export" key): serve the export it '
        "names and swap when it changes (without --export, it also gives the first export)",
    )
    p.add_argument("--poll-s", type=float, default=10.0, help="how often --follow is read (10)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas of the model (1)")
    p.add_argument("--cpus-per-replica", type=float, default=0.5, help="Ray CPUs per replica (0.5)")
    p.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs per replica (0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (with --gpus-per-replica)")
    p.add_argument("--ann", action="store_true", help="use the export's FAISS index")
    p.add_argument(
        "--max-batch-size", type=int, default=32, help="requests scored together (32; 1: off)"
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=1.0,
        help="how long a batch waits to fill after its first request (1 ms)",
    )
    p.add_argument(
        "--max-ongoing-requests",
        type=int,
        help="requests a replica takes at once (default: 2 x --max-batch-size, at least 64)",
    )
    p.add_argument("--max-history", type=int, default=1000, help="ids per history (1000)")
    p.add_argument("--max-k", type=int, default=1000, help="largest k (1000)")
    p.add_argument(
        "--request-timeout-s", type=float, default=10.0, help="queue + scoring limit (10 s)"
    )
    p.add_argument("--access-log", action="store_true", help="Serve's per-request log lines")
    p.add_argument(
        "--local", action="store_true", help="start a Ray instance here (default: join cluster)"
    )


def _index_params(pairs: list[str]) -> dict[str, int]:
    from fearec_dist.serve.artifact import ServeError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.strip().isdigit():
            raise ServeError(f"--index-param {pair!r}: expected KEY=INT, e.g. nprobe=32")
        out[key.strip()] = int(value)
    return out


def cmd_export(args: argparse.Namespace) -> int:
    from fearec_dist.serve.export import export_run

    try:
        export_run(args.run, args.output, args.index, index_params=_index_params(args.index_param))
    except ImportError as err:
        print(f"fearec-dist: error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from fearec_dist.serve.artifact import ServeError

    if args.input is not None and not args.output:
        raise ServeError("recommend --input needs --output (where the top-k Parquet goes)")
    if args.history is not None and args.output:
        raise ServeError("--output is for the batch job (--input); --history prints")
    k = args.k or (10 if args.history is not None else 100)
    if k < 1:
        raise ServeError(f"-k {k}: must be >= 1")
    try:
        if args.history is not None:
            return _recommend_one(args, k)
        return _recommend_batch(args, k)
    except ImportError as err:
        print(f"fearec-dist: error: {err}", file=sys.stderr)
        return 1


def _recommend_one(args: argparse.Namespace, k: int) -> int:
    from fearec_dist.serve.artifact import load_export
    from fearec_dist.serve.recommend import recommend

    export = load_export(args.export, device=args.device, with_index=args.ann)
    history = args.history.split()
    rec = recommend(
        export,
        history,
        k,
        ann=args.ann,
        exclude_seen=args.exclude_seen,
        strict=args.strict,
        fallback=args.fallback,
    )
    if rec.n_unknown:
        more = " …" if rec.n_unknown > len(rec.unknown) else ""
        print(
            f"fearec-dist: dropped {rec.n_unknown} unknown item id(s): "
            f"{', '.join(rec.unknown)}{more}",
            file=sys.stderr,
        )
    mode = f"ann ({export.manifest['index']['kind']})" if args.ann else "exact"
    if args.json:
        print(json.dumps(rec.__dict__ | {"mode": mode}, indent=2))
        return 0
    if rec.source == "popularity":
        print(
            f"top {len(rec.item_ids)} by popularity (fallback: no known item in the history; "
            "score = training interactions)"
        )
    else:
        print(
            f"top {len(rec.item_ids)} for a history of {len(history)} ids "
            f"({rec.n_known} known), {export.manifest['model']}, {mode}"
        )
    print(f"{'rank':>4}  {'item_id':<20} {'score':>12}")
    for rank, (item, score) in enumerate(zip(rec.item_ids, rec.scores), 1):
        print(f"{rank:>4}  {item:<20} {score:>12.4f}")
    return 0


def _recommend_batch(args: argparse.Namespace, k: int) -> int:
    from fearec_dist.serve.batch import run_batch

    with ray_session("auto"):
        summary = run_batch(
            args.export,
            args.input,
            args.output,
            k=k,
            ann=args.ann,
            exclude_seen=args.exclude_seen,
            fallback=args.fallback,
            strict=args.strict,
            device=args.device,
            actors=args.actors,
            cpus_per_actor=args.cpus_per_actor,
            threads=args.threads,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
        )
    sources = ", ".join(f"{n:,} {s}" for s, n in sorted(summary["by_source"].items()))
    print(
        f"[fearec-dist] wrote top-{k} for {summary['users']:,} users ({sources}) to "
        f"{summary['output']} in {summary['seconds']:.1f} s ({summary['users_per_s']:,.0f} "
        f"users/s); {summary['unknown_ids']:,} unknown item ids dropped"
    )
    if summary["by_source"].get("empty_history"):
        print(
            "[fearec-dist] users with no known item got no items (source=empty_history); "
            "--fallback popularity gives them the most popular ones"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fearec_dist.serve.artifact import ServeError

    if not args.export and not args.follow:
        raise ServeError("serve needs --export DIR|URI or --follow POINTER")
    try:  # here, not at the top: Ray Serve's import is paid only by this command
        from fearec_dist.serve.online import serve_forever
    except ImportError as err:
        print(
            f"fearec-dist: error: {err}; serving online needs pip install 'fearec-dist[serve]'",
            file=sys.stderr,
        )
        return 1
    config = {
        "export": args.export,
        "follow": args.follow,
        "poll_s": args.poll_s,
        "ann": args.ann,
        "device": args.device,
        "threads": args.threads,
        "max_batch_size": args.max_batch_size,
        "batch_wait_ms": args.batch_wait_ms,
        "max_history": args.max_history,
        "max_k": args.max_k,
        "request_timeout_s": args.request_timeout_s,
    }
    serve_forever(
        config,
        mode="local" if args.local else "cluster",
        host=args.host,
        port=args.port,
        replicas=args.replicas,
        cpus_per_replica=args.cpus_per_replica,
        gpus_per_replica=args.gpus_per_replica,
        max_ongoing_requests=args.max_ongoing_requests,
        access_log=args.access_log,
    )
    return 0


SERVE_COMMANDS = {"export": cmd_export, "recommend": cmd_recommend, "serve": cmd_serve}

"""Large catalogues: train-step speed and memory, full vs sampled softmax, dense vs sparse items.

    .venv/bin/python bench/catalog.py                                  # 1e4 .. 1e7 items
    .venv/bin/python bench/catalog.py --sizes 1e4 1e6 --models sasrec --steps 6

One child process per (model, n_items, softmax, sparse item updates), so each peak RSS is its
own: random weights and random batches (batch 256, L 50, d 64, torch threads = --threads),
the trainer's own pieces (``build_model``, the spec's ``loss_terms``, ``SampledSoftmax`` with
1,024 popularity negatives + the in-batch targets + logQ, ``build_optimizer``, Adam or lazy
SparseAdam for the table). Per child: ``samples_per_s`` over ``--steps`` timed steps after 2
warm-up steps (forward, backward, optimizer step), ``peak_rss_mb`` (the process's maximum
resident set), and evaluation ``eval_rows_per_s`` (exact full ranking over every item,
``train.eval_item_chunk`` items at a time, both protocols). The full softmax is skipped where
its (batch x items) logits and their gradient do not fit this box (``full_max_items``).

Results: ``bench/results/catalog.json`` (a list of rows) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "catalog.json"
BATCH, L, EVAL_BATCH = 256, 50, 256
EVAL_KEYS = ("item_seq", "seq_len", "target", "seen_rows", "seen_items")


def random_batch(n_items: int, rows: int, g) -> dict:
    import torch

    lens = torch.randint(5, L + 1, (rows,), generator=g)
    seq = torch.randint(1, n_items + 1, (rows, L), generator=g)
    seq[torch.arange(L)[None, :] >= lens[:, None]] = 0
    perm = torch.randperm(rows, generator=g)
    target = torch.randint(1, n_items + 1, (rows,), generator=g)
    return {"item_seq": seq, "seq_len": lens, "target": target, "pos_seq": seq[perm],
            "pos_len": lens[perm]}  # fmt: skip


def child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from fearec_dist.config import TrainSection
    from fearec_dist.models import build_model, get_spec
    from fearec_dist.models.softmax import SampledSoftmax
    from fearec_dist.train.build import build_optimizer, softmax_options
    from fearec_dist.train.evaluate import evaluate

    torch.set_num_threads(args.threads)
    n, sampled, sparse = int(float(args.n_items)), args.softmax == "sampled", args.sparse
    torch.manual_seed(0)
    t0 = time.time()
    model = build_model(args.model, n_items=n, max_seq_len=L)
    build_s = time.time() - t0
    spec = get_spec(args.model)
    train = TrainSection(softmax=args.softmax, n_negatives=1024, negative_sampler="popularity",
                         sparse_item_updates=sparse, eval_item_chunk=args.eval_chunk)  # fmt: skip
    softmax = None
    if sampled:
        counts = np.zeros(n + 1)
        counts[1:] = 1e6 / np.arange(1, n + 1) ** 0.8  # Zipf-like training counts
        softmax = SampledSoftmax(softmax_options(train), n, counts, torch.device("cpu"))
    if sparse:
        model.item_embedding.sparse = True
    opt = build_optimizer(model, 1e-3, 0.0, sparse_items=sparse)
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(n, BATCH, g) for _ in range(2)]
    model.train()
    times, phases = [], {"negatives": [], "forward": [], "backward": [], "optimizer": []}
    for step in range(2 + args.steps):
        batch = batches[step % 2]
        t = [time.perf_counter()]
        cands = softmax.at_step(0, step) if softmax is not None else None
        t.append(time.perf_counter())
        loss = spec.loss_terms(model, batch, softmax=cands)["loss"]
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        times.append(t[-1] - t[0])
        if step >= 2:  # where a steady step spends its time
            for i, name in enumerate(phases):
                phases[name].append(t[i + 1] - t[i])
    steady = times[2:]
    eval_rows = []
    for _ in range(args.eval_batches):  # numpy, as the evaluation rows arrive
        b = random_batch(n, EVAL_BATCH, g)
        keep = b["item_seq"] > 0  # the masked protocol's history entries: the row's sequence
        b |= {"seen_rows": keep.nonzero()[:, 0], "seen_items": b["item_seq"][keep]}
        eval_rows.append({k: b[k].numpy() for k in EVAL_KEYS})
    t0 = time.perf_counter()
    evaluate(model, spec, eval_rows, [10], torch.device("cpu"), all_reduce=False,
             item_chunk=args.eval_chunk)  # fmt: skip
    eval_s = time.perf_counter() - t0
    return {
        "model": args.model,
        "n_items": n,
        "softmax": args.softmax,
        "sparse_item_updates": sparse,
        "samples_per_s": round(BATCH * len(steady) / sum(steady), 1),
        "step_ms": round(1000 * sum(steady) / len(steady), 1),
        "step_ms_median": round(1000 * float(np.median(steady)), 1),
        "step_ms_min": round(1000 * min(steady), 1),
        "step_ms_max": round(1000 * max(steady), 1),
        "phase_ms_median": {k: round(1000 * float(np.median(v)), 1) for k, v in phases.items()},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "eval_rows_per_s": round(EVAL_BATCH * len(eval_rows) / eval_s, 1),
        "eval_item_chunk": args.eval_chunk,
        "model_build_s": round(build_s, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }


def summarize(runs: list[dict]) -> dict:
    """One row from repeated processes: the median run's row, with the spread of samples/s."""
    speeds = sorted(r["samples_per_s"] for r in runs)
    row = dict(sorted(runs, key=lambda r: r["samples_per_s"])[(len(runs) - 1) // 2])
    row |= {"repeats": len(runs), "samples_per_s_min": speeds[0], "samples_per_s_max": speeds[-1]}
    row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return row


VARIANTS = {"full": ("full", False), "sampled": ("sampled", False),
            "sampled-sparse": ("sampled", True)}  # fmt: skip


def configs(args: argparse.Namespace) -> list[tuple[str, str, str, bool]]:
    out = []
    for model in args.models:
        for size in args.sizes:
            for name in args.variants:
                softmax, sparse = VARIANTS[name]
                if softmax == "full" and float(size) > args.full_max_items:
                    continue
                out.append((model, size, softmax, sparse))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["1e4", "1e5", "1e6", "1e7"])
    p.add_argument("--models", nargs="+", default=["sasrec", "fearec_official"])
    p.add_argument("--steps", type=int, default=8, help="timed steps per row (after 2 warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=2, help="evaluation batches of 256 rows")
    p.add_argument("--eval-chunk", type=int, default=65536, help="train.eval_item_chunk")
    p.add_argument("--full-max-items", type=float, default=1e6,
                   help="the largest catalogue the full softmax is run at")  # fmt: skip
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                   help="softmax variants (sampled-sparse: + sparse item updates)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1,
                   help="processes per row: samples/s is their median, with the range")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS, help="the JSON written")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--n-items", help=argparse.SUPPRESS)
    p.add_argument("--softmax", help=argparse.SUPPRESS)
    p.add_argument("--sparse", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return
    rows = []
    for model, size, softmax, sparse in configs(args):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--n-items", size,
               "--softmax", softmax, "--steps", str(args.steps), "--threads", str(args.threads),
               "--eval-batches", str(args.eval_batches),
               "--eval-chunk", str(args.eval_chunk)]  # fmt: skip
        cmd += ["--sparse"] if sparse else []
        print(f"[catalog] {model} {size} items, {softmax}, sparse={sparse}", flush=True)
        runs = []
        for _ in range(args.repeats):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ROW ")]
            if res.returncode != 0 or not lines:
                print(res.stderr[-2000:], file=sys.stderr)
                break
            runs.append(json.loads(lines[-1][4:]))
        if len(runs) < args.repeats:
            rows.append({"model": model, "n_items": int(float(size)), "softmax": softmax,
                         "sparse_item_updates": sparse, "error": res.stderr[-300:]})  # fmt: skip
            continue
        rows.append(summarize(runs))
        print("   ", rows[-1], flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
            "cpus": args.threads, "batch": BATCH, "max_seq_len": L}  # fmt: skip
    for r in rows:
        r.update(meta)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print("| model | items | softmax | sparse items | samples/s | peak RSS MB | eval rows/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            continue
        print(f"| {r['model']} | {r['n_items']:,} | {r['softmax']} | "
              f"{'yes' if r['sparse_item_updates'] else 'no'} | {r['samples_per_s']:,} | "
              f"{r['peak_rss_mb']:,} | {r['eval_rows_per_s']:,} |")  # fmt: skip


if __name__ == "__main__":
    main()

"""Train-step throughput of the models on CPU: forward + backward + Adam, in samples/s.

    .venv/bin/python bench/models.py                 # 30 timed steps per model, 2 threads
    .venv/bin/python bench/models.py --steps 10      # shorter
    .venv/bin/python bench/models.py --models sasrec --items 1682

Random right-padded histories (lengths uniform in 1..L) and random same-target partners:
batch 256, L 50, d 64, 2 layers, the item counts of ml-100k (1,682) and Beauty (12,101). FEARec
is the ``fearec_official`` preset (us_x: three encoder passes per step); BERT4Rec, LightSANs and
S3Rec (finetune, and ``s3rec:pretrain``, with a random attribute table) run their defaults.

Other jobs may share this box's cores, so for each item count the models are timed in the same
process in interleaved chunks of steps (model A chunk, model B chunk, … repeated 5 times): both
see the same contention, which keeps their ratio honest. ``samples_per_s`` is a model's median
chunk rate, ``samples_per_s_best`` its fastest. Peak RSS comes from a separate short run of each
model in its own subprocess. Results go to ``bench/results/models.json``, one row per (model,
n_items) with ``model, n_items, batch, samples_per_s``, the cost per sample relative to SASRec
at the same item count (``cost_vs_sasrec``), peak RSS and the load average around the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fearec_dist.models import build_model, get_spec

RESULTS = Path(__file__).resolve().parent / "results" / "models.json"
ROUNDS = 5


def random_batch(batch: int, max_seq_len: int, n_items: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for seq_key, len_key in (("item_seq", "seq_len"), ("pos_seq", "pos_len")):
        lens = torch.randint(1, max_seq_len + 1, (batch,), generator=g)
        seq = torch.randint(1, n_items + 1, (batch, max_seq_len), generator=g)
        out[seq_key] = seq * (torch.arange(max_seq_len)[None, :] < lens[:, None])
        out[len_key] = lens
    out["target"] = torch.randint(1, n_items + 1, (batch,), generator=g)
    return out


def random_attributes(n_items: int, seed: int = 0) -> torch.Tensor:
    """(n_items + 1, 6) attribute ids, 0 = none: ml-100k has 19 genres, Beauty ~1.2k attributes."""
    n_attributes = 19 if n_items < 5000 else 1221
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n_attributes + 1, (n_items + 1, 6), generator=g)
    width = torch.randint(1, 7, (n_items + 1, 1), generator=g)
    ids = ids * (torch.arange(6)[None, :] < width)
    ids[0] = 0  # padding item
    return ids


def build_step(case: str, n_items: int, batch: int, max_seq_len: int) -> Callable[[int], None]:
    """One Adam train step of ``case`` (a model name, or ``s3rec:pretrain``) on the i-th of 4
    fixed random batches."""
    name, _, stage = case.partition(":")
    spec = get_spec(name)
    inputs = {"item_attributes": random_attributes(n_items)} if spec.needs_attributes else {}
    torch.manual_seed(0)
    model = build_model(name, n_items=n_items, max_seq_len=max_seq_len, **inputs).train()
    loss_terms = spec.pretrain_loss_terms if stage == "pretrain" else spec.loss_terms
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [random_batch(batch, max_seq_len, n_items, seed) for seed in range(4)]

    def step(i: int) -> None:
        out = loss_terms(model, batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return step


def time_interleaved(names: list[str], n_items: int, args: argparse.Namespace) -> list[dict]:
    steps = {name: build_step(name, n_items, args.batch, args.max_seq_len) for name in names}
    for step in steps.values():
        for i in range(3):  # warm-up
            step(i)
    chunk = max(1, args.steps // ROUNDS)
    rates: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    for r in range(ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            for i in range(chunk):
                step(r * chunk + i)
            rates[name].append(args.batch * chunk / (time.perf_counter() - start))
    load_after = os.getloadavg()[0]
    rows = []
    for name in names:
        ordered = sorted(rates[name])
        median = ordered[len(ordered) // 2]
        rows.append(
            {
                "model": name,
                "n_items": n_items,
                "batch": args.batch,
                "max_seq_len": args.max_seq_len,
                "steps": chunk * ROUNDS,
                "samples_per_s": round(median, 1),
                "samples_per_s_best": round(ordered[-1], 1),
                "ms_per_step": round(1000 * args.batch / median, 1),
                "threads": torch.get_num_threads(),
                "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
            }
        )
    return rows


def peak_rss_mb(name: str, n_items: int, args: argparse.Namespace) -> float:
    """Peak RSS of a fresh process that builds ``name`` and runs 3 steps."""
    cmd = [sys.executable, __file__, "--rss-of", name, "--items", str(n_items)]
    cmd += ["--batch", str(args.batch), "--max-seq-len", str(args.max_seq_len)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["sasrec", "fearec_official", "bert4rec", "lightsans", "s3rec", "s3rec:pretrain"],
        help="models to time (SASRec first: the others' cost is relative to it); "
        "s3rec is its finetune step, s3rec:pretrain its four-objective pretraining step",
    )
    parser.add_argument("--items", nargs="+", type=int, default=[1682, 12101])
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)  # child process for peak RSS
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_of:
        step = build_step(args.rss_of, args.items[0], args.batch, args.max_seq_len)
        for i in range(3):
            step(i)
        # VmHWM, not getrusage's ru_maxrss: Linux carries the (large) parent's high-water
        # mark across fork + exec into the child's ru_maxrss
        status = Path("/proc/self/status").read_text()
        hwm = next(line for line in status.splitlines() if line.startswith("VmHWM"))
        hwm_kb = int(hwm.split()[1])
        print(round(hwm_kb / 1024, 1))
        return []

    rows = []
    for n_items in args.items:
        rows += time_interleaved(args.models, n_items, args)
    for row in rows:
        base = next(r for r in rows if r["n_items"] == row["n_items"])
        if base["model"] == "sasrec":  # cost per sample relative to SASRec's
            row["cost_vs_sasrec"] = round(base["samples_per_s"] / row["samples_per_s"], 2)
        row["peak_rss_mb"] = peak_rss_mb(row["model"], row["n_items"], args)
        row["torch"] = torch.__version__
        row["machine"] = f"{platform.machine()}, {os.cpu_count()} cpus"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    header = (
        f"{'model':<16} {'n_items':>7} {'batch':>5} {'samples/s':>9} {'best':>7} {'ms/step':>8}"
    )
    print(header + f" {'x sasrec':>8} {'rss MB':>7} {'load 1m':>11}")
    for r in rows:
        print(
            f"{r['model']:<16} {r['n_items']:>7} {r['batch']:>5} {r['samples_per_s']:>9} "
            f"{r['samples_per_s_best']:>7} {r['ms_per_step']:>8} {r.get('cost_vs_sasrec', ''):>8} "
            f"{r['peak_rss_mb']:>7} {'→'.join(map(str, r['load_avg_1m'])):>11}"
        )
    return rows


if __name__ == "__main__":
    main()

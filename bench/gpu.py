"""GPU bench without Ray: the train step, exact full ranking at 10^6 items, and SASRec and FEARec
on Amazon Beauty for a fixed time each, with the trainer's own model, loss and evaluation code.

    bash bench/gpu.sh                                     # = python bench/gpu.py --out …
    python bench/gpu.py --out /tmp/gpu --device cuda --budget-s 280
    python bench/gpu.py --out /tmp/gpu --sections beauty --device cpu --beauty-s 60
    python bench/gpu.py --tiny --device cpu --out /tmp/gpu_tiny   # the test suite's mode

Ray is never imported (the GPU machines this is for have torch, pyarrow, fsspec and numpy, not
Ray): the model is ``build_model``, the step is the trainer's ``train_one_epoch`` (autocast,
``spec.loss_terms``, backward, Adam from ``build_optimizer``), the batches come from
``MemoryFeed`` (``data/pairing.py``: FEARec's same-target partner drawn as the Ray job draws
it, in memory), and the metrics are ``evaluate`` (chunked exact full ranking, in float32: amp
off). Every row is appended to ``<out>/<section>.jsonl`` as soon as it is measured, so a run cut
short keeps its rows:

- ``train_step``: (a) samples/s of SASRec and FEARec (``fearec_official``) at batch 256 and
  1,024, fp32 (amp off; TF32 as torch's default leaves it, i.e. off for matmuls) and bf16
  autocast, after warm-up, on Beauty's examples; peak memory (``torch.cuda.max_memory_allocated``).
  ``compiled`` rows: the same with ``torch.compile`` of the model (bf16 by default), their
  compile time and speed-up over eager, measured last with the time that is left.
- ``eval_full_ranking``: (b) users/s of ``evaluate`` for SASRec over a random 10^6-item table
  (random histories; both protocols, history masked too), at the trainer's item chunk and a
  larger one.
- ``beauty``: (c) each model trained for ``--beauty-s`` seconds (batch 256, lr 1e-3, L 50, amp
  auto = bf16 on CUDA), valid and test metrics after every epoch; then a ``best`` row (the epoch
  with the best valid hr@10 and its test metrics, as the trainer reports).
- ``run``: the environment, the data, skipped parts (not enough budget left) and the end.

Every row carries the device name, torch version, dtype and date. ``--budget-s`` bounds the whole
run: parts that would not fit are skipped with a ``run`` row saying so.

Data: ``--data`` is a prepared dataset (a directory with ``meta.json``, ``fearec-dist prepare``)
or a raw ``user item item …`` text file (Beauty.txt), which is read with pyarrow/numpy under
``prepare``'s rules (``formats.read_seqtxt_file``, ids sorted and numbered from 1,
``stages.sorted_vocab``, items ordered by time then file order; no filters: Beauty.txt is
already 5-core). ``--tiny`` without ``--data`` uses small random sequences.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # --budget-s counts from here, imports included

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the device machine runs this from a copy, the package not installed

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402

from fearec_dist.data.examples import examples_table  # noqa: E402
from fearec_dist.data.feed import FeedStats, eval_batch_from_arrow  # noqa: E402
from fearec_dist.data.formats import read_seqtxt_file  # noqa: E402
from fearec_dist.data.pairing import MemoryFeed  # noqa: E402
from fearec_dist.data.sequences import build_loo_examples, read_sequences  # noqa: E402
from fearec_dist.data.stages import sorted_vocab  # noqa: E402
from fearec_dist.models import build_model, get_spec  # noqa: E402
from fearec_dist.train.build import build_optimizer  # noqa: E402
from fearec_dist.train.checkpoint import seed_rank  # noqa: E402
from fearec_dist.train.evaluate import evaluate  # noqa: E402
from fearec_dist.train.loop import StepContext, train_one_epoch  # noqa: E402

SECTIONS = ("train_step", "eval_full_ranking", "beauty", "compiled")
MODELS = ("sasrec", "fearec_official")
AMP_DTYPE = {"off": "fp32", "bf16": "bf16", "auto": "auto"}
BEAUTY_FILE = "beauty/Beauty.txt"
# where the raw Beauty file is looked for when --data is not given: a copy inside the repo (it
# travels to the device machine when carried) and the shared data beside the checkout
DATA_DIRS = (ROOT / "data-cache", ROOT.parent / "shared" / "data")
SEED = 2026
L, TINY_L = 50, 10  # max_seq_len (--tiny: shorter, so the CPU test is quick)
LR = 1e-3
TOPK = [5, 10, 20]


# ---------------------------------------------------------------- rows, time, device helpers


class Rows:
    """Appends each row to ``<out>/<section>.jsonl`` at once (one open, write, close per row)."""

    def __init__(self, out: Path, common: dict[str, Any]) -> None:
        self.out, self.common = out, common
        out.mkdir(parents=True, exist_ok=True)
        for section in (*SECTIONS[:3], "run"):  # a fresh run replaces the files' rows
            (out / f"{section}.jsonl").write_text("")

    def write(self, section: str, row: dict[str, Any]) -> dict[str, Any]:
        date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        full = {"section": section, **self.common, "date": date, **row}
        with open(self.out / f"{section}.jsonl", "a") as f:
            f.write(json.dumps(full) + "\n")
        shown = {k: v for k, v in row.items() if not isinstance(v, dict)}
        print(f"[gpu-bench] {section}: {json.dumps(shown)}", flush=True)
        return full


class Clock:
    """The run's deadline: ``--budget-s`` from the start of the process."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = STARTED + budget_s

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by torch on the GPU since the last reset (None on CPU)."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Hands the finished case's GPU memory back, so the next case's peak is its own."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("[gpu-bench] --device cuda: torch sees no GPU (torch.cuda.is_available())")
    return torch.device(name)


def environment(device: torch.device) -> dict[str, Any]:
    """What every row carries: the device and the software."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        name = f"cpu ({cpu}, {torch.get_num_threads()} threads)"
    return {"device": name, "device_type": device.type, "torch": torch.__version__}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


# ---------------------------------------------------------------- data, without Ray


def seqtxt_sequences(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A ``user item item …`` file -> (offsets, items, users, n_items), numbered as ``prepare``
    numbers them (raw ids sorted, numerically when all are integers, from 1)."""
    rows = read_seqtxt_file(path.read_bytes(), str(path), 0)
    user_raw = sorted_vocab(pc.unique(rows["user"]).to_pylist())
    item_raw = sorted_vocab(pc.unique(rows["item"]).to_pylist())
    # ids: 1 + the position in the sorted vocabulary; each user's items by (time, file order)
    user = pc.index_in(rows["user"], pa.array(user_raw, pa.string())).to_numpy() + 1
    item = pc.index_in(rows["item"], pa.array(item_raw, pa.string())).to_numpy() + 1
    order = np.lexsort((rows["order"].to_numpy(), rows["time"].to_numpy(), user))
    users, counts = np.unique(user[order], return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, item[order].astype(np.int32), users.astype(np.int32), len(item_raw)


def random_sequences(n_users: int, n_items: int, seed: int) -> tuple[Any, ...]:
    """``--tiny`` without ``--data``: users 1..n_users with 5..20 random items each."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(5, 21, n_users)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = rng.integers(1, n_items + 1, int(lens.sum())).astype(np.int32)
    return offsets, items, np.arange(1, n_users + 1, dtype=np.int32), n_items


def default_data() -> Path | None:
    for root in DATA_DIRS:
        if (root / BEAUTY_FILE).exists():
            return root / BEAUTY_FILE
    return None


def load_data(data: Path | None, tiny: bool, max_seq_len: int) -> dict[str, Any]:
    """The sequences, their leave-one-out examples and the valid/test rows as ``evaluate`` takes
    them (``eval_batch_from_arrow`` of ``examples_table``, the trainer's row format)."""
    if data is None and tiny:
        offsets, items, users, n_items = random_sequences(300, 60, SEED)
        source = "random sequences (--tiny)"
    elif data is None:
        sys.exit(
            f"[gpu-bench] no --data given and no {BEAUTY_FILE} under "
            f"{' or '.join(str(d) for d in DATA_DIRS)}"
        )
    elif (data / "meta.json").exists():
        offsets, items, users = read_sequences(str(data))
        n_items = int(json.loads((data / "meta.json").read_text())["n_items"])
        source = f"{data} (prepared)"
    elif data.is_file() and data.suffix == ".txt":
        offsets, items, users, n_items = seqtxt_sequences(data)
        source = f"{data} (raw seqtxt, prepare's numbering)"
    else:
        sys.exit(
            f"[gpu-bench] --data {data}: expected a prepared dataset directory (with meta.json) "
            "or a 'user item item …' .txt file"
        )
    split = build_loo_examples(offsets, items, users, max_seq_len)
    lens = np.diff(offsets)
    per_item = np.bincount(items, minlength=n_items + 1)[1:]
    summary = {
        "source": source,
        "users": len(users),
        "items": n_items,
        "interactions": int(lens.sum()),
        "min_per_user": int(lens.min()),
        "min_per_item": int(per_item.min()),
        **{f"n_{k}": len(v["target"]) for k, v in split.items()},
    }
    return {"n_items": n_items, "L": max_seq_len, "split": split, "summary": summary}


def eval_batches(split: dict[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    table = examples_table(split)
    return [
        eval_batch_from_arrow(table.slice(lo, batch_size))
        for lo in range(0, table.num_rows, batch_size)
    ]


class CycleFeed:
    """``TrainFeed``'s interface over a few batches built beforehand, cycled for ``steps``
    steps: the step timed without the host building batches (which the trainer overlaps)."""

    def __init__(self, batches: list[dict[str, np.ndarray]], steps: int) -> None:
        self.batches, self.steps, self.rank, self.stats = batches, steps, 0, FeedStats()

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for step in range(skip, self.steps):
            yield self.batches[step % len(self.batches)]


# ---------------------------------------------------------------- (a) the train step


class Compiled(torch.nn.Module):
    """``torch.compile(model)`` behind a plain module: the losses take ``forward or model``, and
    the truth value of torch's compiled wrapper raises (it forwards ``len()`` to the model)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.compiled(*args, **kwargs)


def timed_steps(
    spec: Any,
    model: torch.nn.Module,
    forward: torch.nn.Module,
    batches: list[dict[str, np.ndarray]],
    device: torch.device,
    amp: str,
    opts: argparse.Namespace,
) -> dict[str, Any]:
    """Warm-up, a probe of the step time, then enough steps for ``--step-seconds``; each call is
    the trainer's ``train_one_epoch`` (``forward`` is what it runs the loss through: the model,
    or its compiled wrapper)."""
    optimizer = build_optimizer(model, LR, 0.0)

    def run(steps: int, epoch: int) -> tuple[float, dict[str, float]]:
        sync(device)
        t0 = time.perf_counter()
        feed = CycleFeed(batches, steps)
        stats = train_one_epoch(StepContext(forward, model, spec.loss_terms, optimizer, feed,
                                            device, amp=amp), epoch)  # fmt: skip
        sync(device)
        return time.perf_counter() - t0, stats

    first_s, _ = run(1, 0)  # compile (when compiled), allocator and kernel selection
    if opts.warmup_steps:
        run(opts.warmup_steps, 1)
    probe_s, _ = run(opts.min_steps, 2)
    per_step = probe_s / opts.min_steps
    steps = max(opts.min_steps, min(opts.max_steps, math.ceil(opts.step_seconds / per_step)))
    reset_peak(device)
    seconds, stats = run(steps, 3)
    batch = len(batches[0]["target"])
    return {
        "steps": steps,
        "seconds": round(seconds, 4),
        "step_ms": round(1000 * seconds / steps, 3),
        "samples_per_s": round(steps * batch / seconds, 1),
        "first_step_s": round(first_s, 3),
        "warmup_steps": 1 + opts.warmup_steps + opts.min_steps,
        "peak_mem_bytes": peak_bytes(device),
        "loss": round(stats["train/loss"], 5),
    }


def step_batches(data: dict[str, Any], pair: bool, batch: int, count: int) -> list[dict]:
    """``count`` real training batches (the first of MemoryFeed's epoch 0)."""
    feed = MemoryFeed(data["split"]["train"], batch_size=batch, seed=SEED, pair=pair)
    out = []
    for step, b in enumerate(feed.epoch(0)):
        if step >= count:
            break
        out.append(b)
    return out


def train_step_case(
    rows: Rows, data: dict[str, Any], device: torch.device, opts: argparse.Namespace,
    name: str, amp: str, batch: int, compiled: bool, eager: dict[tuple, float],
) -> None:  # fmt: skip
    seed_rank(SEED, 0)
    spec = get_spec(name)
    model = build_model(name, n_items=data["n_items"], max_seq_len=data["L"]).to(device)
    pair = spec.needs_partner(model.config)
    batches = step_batches(data, pair, batch, opts.distinct_batches)
    if len(batches) < 1:
        raise SystemExit(f"[gpu-bench] too few training examples for a batch of {batch}")
    forward: torch.nn.Module = model
    if compiled:
        torch._dynamo.reset()  # a fresh cache per case: no recompiles carried over
        forward = Compiled(model)
    got = timed_steps(spec, model, forward, batches, device, amp, opts)
    row = {"model": name, "batch": batch, "dtype": AMP_DTYPE[amp], "compiled": compiled}
    row |= {"L": data["L"], "n_items": data["n_items"], "partner": pair, **got}
    row["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    key = (name, amp, batch)
    if compiled:  # the first step traced and compiled forward and backward
        row["compile_s"] = round(max(got["first_step_s"] - got["step_ms"] / 1000, 0.0), 2)
        if key in eager:
            row["speedup_vs_eager"] = round(got["samples_per_s"] / eager[key], 3)
    else:
        eager[key] = got["samples_per_s"]
    rows.write("train_step", row)


# ---------------------------------------------------------------- (b) full ranking at 10^6


def random_eval_batches(n_items: int, users: int, batch: int, L: int, seed: int) -> list[dict]:
    """Evaluation batches of random histories (1..L items) over ``n_items``; ``seen`` is the
    history, so the masked protocol does its work too."""
    rng = np.random.default_rng(seed)
    out = []
    for lo in range(0, users, batch):
        b = min(batch, users - lo)
        length = rng.integers(1, L + 1, b)
        hist = rng.integers(1, n_items + 1, (b, L))
        hist[np.arange(L)[None, :] >= length[:, None]] = 0
        rows, cols = np.nonzero(hist)
        out.append({
            "item_seq": hist.astype(np.int64),
            "seq_len": length.astype(np.int64),
            "target": rng.integers(1, n_items + 1, b).astype(np.int64),
            "user": np.arange(lo, lo + b, dtype=np.int64),
            "seen_rows": rows.astype(np.int64),
            "seen_items": hist[rows, cols].astype(np.int64),
        })  # fmt: skip
    return out


def eval_section(rows: Rows, device: torch.device, opts: argparse.Namespace, L: int) -> None:
    seed_rank(SEED, 0)
    spec = get_spec("sasrec")
    model = build_model("sasrec", n_items=opts.eval_items, max_seq_len=L).to(device)
    batches = random_eval_batches(opts.eval_items, opts.eval_users, opts.eval_batch, L, SEED)
    for chunk in opts.eval_chunks:

        def score(some: list[dict], chunk: int = chunk) -> dict[str, float]:
            return evaluate(model, spec, some, TOPK, device, amp="off", all_reduce=False,
                            item_chunk=chunk)  # fmt: skip

        sync(device)
        t0 = time.perf_counter()
        score(batches[:1])  # warm-up
        sync(device)
        warm_s = time.perf_counter() - t0
        reset_peak(device)
        t0 = time.perf_counter()
        metrics = score(batches)
        sync(device)
        seconds = time.perf_counter() - t0
        rows.write("eval_full_ranking", {
            "model": "sasrec (random weights)", "dtype": "fp32", "n_items": opts.eval_items,
            "users": metrics["n_users"], "batch": opts.eval_batch, "item_chunk": chunk,
            "hidden": model.config.hidden_size, "L": L, "seconds": round(seconds, 4),
            "users_per_s": round(metrics["n_users"] / seconds, 1),
            "warmup_s": round(warm_s, 3), "peak_mem_bytes": peak_bytes(device),
            "hr@10": metrics["hr@10"], "masked_hr@10": metrics["masked_hr@10"],
        })  # fmt: skip


# ---------------------------------------------------------------- (c) Beauty for a fixed time


def beauty_model(
    rows: Rows, data: dict[str, Any], device: torch.device, opts: argparse.Namespace,
    name: str, budget_s: float, valid: list[dict], test: list[dict],
) -> None:  # fmt: skip
    seed_rank(SEED, 0)
    spec = get_spec(name)
    model = build_model(name, n_items=data["n_items"], max_seq_len=data["L"]).to(device)
    pair = spec.needs_partner(model.config)
    feed = MemoryFeed(data["split"]["train"], batch_size=opts.beauty_batch, seed=SEED, pair=pair,
                      steps=opts.beauty_steps)  # fmt: skip
    optimizer = build_optimizer(model, LR, 0.0)
    run = StepContext(model, model, spec.loss_terms, optimizer, feed, device, amp="auto")
    dtype = AMP_DTYPE["bf16" if device.type == "cuda" else "off"]  # what amp auto gives

    def score(batches: list[dict]) -> dict[str, float]:
        got = evaluate(model, spec, batches, TOPK, device, amp="off", all_reduce=False,
                       item_chunk=65536)  # fmt: skip
        return {k: round(v, 5) for k, v in got.items() if k != "n_users"}

    start, epoch, best = time.perf_counter(), 0, None
    while True:
        sync(device)
        t0 = time.perf_counter()
        stats = train_one_epoch(run, epoch)
        sync(device)
        t1 = time.perf_counter()
        v, t = score(valid), score(test)
        sync(device)
        t2 = time.perf_counter()
        row = {
            "model": name, "dtype": dtype, "eval_dtype": "fp32", "epoch": epoch + 1,
            "batch": opts.beauty_batch, "steps": stats["train/steps"],
            "train_s": round(t1 - t0, 3), "eval_s": round(t2 - t1, 3),
            "wall_s": round(t2 - start, 3),
            "samples_per_s": round(stats["train/samples"] / (t1 - t0), 1),
            "loss": {k[6:]: round(x, 5) for k, x in stats.items() if k.startswith("train/")
                     and k not in ("train/steps", "train/samples")},
            "valid": v, "test": t, "budget_s": round(budget_s, 1),
        }  # fmt: skip
        rows.write("beauty", row)
        if best is None or v["hr@10"] > best["valid"]["hr@10"]:
            best = row
        epoch += 1
        elapsed = time.perf_counter() - start
        if epoch >= opts.max_epochs or elapsed + (t2 - t0) > budget_s:
            break
    assert best is not None
    rows.write("beauty", {
        "model": name, "dtype": dtype, "eval_dtype": "fp32", "best": True,
        "epochs": epoch, "wall_s": round(time.perf_counter() - start, 3),
        "best_epoch": best["epoch"], "valid": best["valid"], "test": best["test"],
        "budget_s": round(budget_s, 1),
    })  # fmt: skip


# ---------------------------------------------------------------- tables for docs/benchmarks.md


def read_rows(out: Path, section: str) -> list[dict[str, Any]]:
    path = out / f"{section}.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def tables(out: Path) -> str:
    """Markdown tables of a run's rows (``--table``), for docs/benchmarks.md."""
    lines = []
    for r in read_rows(out, "run")[:1]:
        lines.append(f"{r['device']}, torch {r['torch']}, CUDA {r['cuda']}, {r['date'][:10]}, "
                     f"commit {r['commit']}, data: {r['data']['source']}")  # fmt: skip
    steps = read_rows(out, "train_step")
    if steps:
        head = "| model | batch | dtype | compiled | samples/s | ms/step | peak MiB | compile s |"
        lines += ["", head + " vs eager |", "|---|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in steps:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'}"
                f" | {r['samples_per_s']:,.0f} | {r['step_ms']:.2f} | {mib(r['peak_mem_bytes'])}"
                f" | {r.get('compile_s', '–')} | {r.get('speedup_vs_eager', '–')} |"
            )
    ranking = read_rows(out, "eval_full_ranking")
    if ranking:
        lines += ["", "| items | users | batch | item chunk | users/s | peak MiB |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in ranking:
            lines.append(f"| {r['n_items']:,} | {r['users']:,} | {r['batch']} | {r['item_chunk']:,}"
                         f" | {r['users_per_s']:,.0f} | {mib(r['peak_mem_bytes'])} |")  # fmt: skip
    beauty = read_rows(out, "beauty")
    if beauty:
        head = "| model | budget s | epochs | wall s | samples/s | best epoch | valid hr@10 |"
        lines += ["", head + " valid ndcg@10 | test hr@10 | test ndcg@10 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for b in (r for r in beauty if r.get("best")):
            rate = np.median([r["samples_per_s"] for r in beauty
                              if r["model"] == b["model"] and not r.get("best")])  # fmt: skip
            v, t = b["valid"], b["test"]
            lines.append(
                f"| {b['model']} | {b['budget_s']:.0f} | {b['epochs']} | {b['wall_s']:.0f} | "
                f"{rate:,.0f} | {b['best_epoch']} | {v['hr@10']:.4f} | {v['ndcg@10']:.4f} | "
                f"{t['hr@10']:.4f} | {t['ndcg@10']:.4f} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory of the <section>.jsonl")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--data", type=Path, help="prepared dataset dir or a seqtxt file (Beauty.txt)")
    p.add_argument("--budget-s", type=float, default=280.0, help="the whole run, start included")
    p.add_argument("--beauty-s", type=float, default=75.0, help="(c): training time per model")
    p.add_argument("--sections", nargs="+", choices=SECTIONS,
                   help="default: all (--tiny: all but compiled)")  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--beauty-steps", type=int, default=0,
                   help="(c): cap on steps per epoch (0: whole epochs; --tiny: 3)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="small sizes: the CPU test of the bench")
    p.add_argument("--table", action="store_true", help="print the rows in --out as markdown")
    p.add_argument(
        "--compile-dtypes",
        nargs="+",
        default=["bf16"],
        choices=("off", "bf16"),
        help="amp settings also timed with torch.compile (off = fp32)",
    )
    p.add_argument("--compile-min-s", type=float, default=45.0,
                   help="start a compiled case only with this much budget left")  # fmt: skip
    opts = p.parse_args(argv)
    big = not opts.tiny
    opts.sections = opts.sections or [s for s in SECTIONS if big or s != "compiled"]
    opts.batches = [256, 1024] if big else [16, 32]
    opts.warmup_steps, opts.min_steps = (3, 10) if big else (0, 1)
    opts.max_steps, opts.step_seconds = (2000, 1.5) if big else (1, 0.0)
    opts.distinct_batches = 32 if big else 2
    opts.eval_items, opts.eval_users = (10**6, 8192) if big else (2000, 64)
    opts.eval_batch, opts.eval_chunks = (512, [65536, 262144]) if big else (32, [512, 4096])
    opts.beauty_batch = 256 if big else 32
    opts.beauty_steps = opts.beauty_steps or (0 if big else 3)
    opts.max_epochs = 10**6 if big else 2
    if opts.tiny and "--beauty-s" not in (argv or sys.argv):
        opts.beauty_s = 2.0
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.table:
        print(tables(opts.out))
        return
    big = not opts.tiny
    device = pick_device(opts.device)
    if opts.tiny:
        torch.set_num_threads(1)  # tiny tensors; spare a shared CI box's cores
    clock = Clock(opts.budget_s)
    data_path = opts.data or (None if opts.tiny else default_data())
    data = load_data(data_path, opts.tiny, L if big else TINY_L)
    common = environment(device) | {"tiny": opts.tiny}
    rows = Rows(opts.out, common)
    rows.write("run", {
        "event": "start", "dtype": None, "argv": sys.argv[1:], "commit": git_commit(),
        "python": platform.python_version(), "cuda": torch.version.cuda,
        "budget_s": opts.budget_s, "data": data["summary"],
        "startup_s": round(time.perf_counter() - STARTED, 2),
    })  # fmt: skip

    def attempt(part: str, fn: Any, *args: Any) -> None:
        """Runs one case; a failure is a ``run`` row (and the traceback on stderr), and the
        bench goes on: one GPU session should bring back every row it can."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - recorded, then the next case
            traceback.print_exc()
            rows.write("run", {"event": "error", "dtype": None, "part": part,
                               "error": f"{type(err).__name__}: {err}"[-2000:]})  # fmt: skip
        release(device)

    def skip(part: str, need: float) -> bool:
        if clock.left() >= need:
            return False
        rows.write("run", {"event": "skipped", "dtype": None, "part": part,
                           "left_s": round(clock.left(), 1), "needed_s": need})  # fmt: skip
        return True

    eager: dict[tuple, float] = {}
    cases = [(m, a, b) for m in opts.models for a in ("off", "bf16") for b in opts.batches]
    if "train_step" in opts.sections:
        for name, amp, batch in cases:
            part = f"train_step {name} {amp} {batch}"
            if not skip(part, 10.0 * big):
                attempt(part, train_step_case, rows, data, device, opts, name, amp, batch, False,
                        eager)  # fmt: skip
    if "eval_full_ranking" in opts.sections and not skip("eval_full_ranking", 15.0 * big):
        attempt("eval_full_ranking", eval_section, rows, device, opts, data["L"])
    if "beauty" in opts.sections:
        valid = eval_batches(data["split"]["valid"], 512)
        test = eval_batches(data["split"]["test"], 512)
        reserve = opts.compile_min_s if "compiled" in opts.sections and not opts.tiny else 0.0
        for i, name in enumerate(opts.models):
            share = (clock.left() - reserve) / (len(opts.models) - i)
            budget = min(opts.beauty_s, share)
            if not skip(f"beauty {name}", 5.0 * big) and budget > 0:
                attempt(f"beauty {name}", beauty_model, rows, data, device, opts, name, budget,
                        valid, test)  # fmt: skip
    if "compiled" in opts.sections:
        todo = sorted((c for c in cases if c[1] in opts.compile_dtypes), key=lambda c: c[2])
        for name, amp, batch in todo:  # the smaller batch of both models first
            part = f"compiled {name} {amp} {batch}"
            if not skip(part, opts.compile_min_s * big):
                attempt(part, train_step_case, rows, data, device, opts, name, amp, batch, True,
                        eager)  # fmt: skip
    rows.write("run", {"event": "end", "dtype": None,
                       "total_s": round(time.perf_counter() - STARTED, 2)})  # fmt: skip


if __name__ == "__main__":
    main()

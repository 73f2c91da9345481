"""FEARec training throughput: RecBole 1.2.1 as shipped vs fearec-dist, side by side, one run.

    .venv/bin/python bench/vs_recbole.py                   # 100 timed batches each, 2 threads
    .venv/bin/python bench/vs_recbole.py --batches 20      # shorter
    .venv/bin/python bench/vs_recbole.py --skip-ours       # only the RecBole side

Both train FEARec with the official Beauty settings (``contrast: us_x``, dot, tau 1, lmd_sem 0.1,
global_ratio 0.6, dual domain + std, spatial_ratio 0.1, dropout 0.5, batch 256, L 50, Adam 1e-3)
on ml-100k (``../shared/data/ml-100k``, RecBole atomic files, no filtering), for the same number
of batches with the same number of torch threads, and each side's timing covers what its own
training loop does per batch: data loading, the same-target partner sampling, forward, backward
and the Adam step.

- RecBole runs in a throwaway venv (``--venv``, created on first use with pip: the local
  torch==2.13.0 CPU wheel, then ``recbole==1.2.1``). NumPy 2 removed aliases RecBole 1.2.1 still
  uses (``np.float_``...); the runner shims them back before importing RecBole. Setting RecBole up
  switches on autograd anomaly detection: "as shipped" keeps it on, "anomaly off" turns it off
  after the import. Warm-up batches are not timed.
- fearec-dist, bare: the same epoch loop (``train_one_epoch`` over the real ``TrainFeed``) without
  Ray, in a child process (``bench/train.py --bare``), on the examples the Ray run prepared.
- fearec-dist runs through its full Ray path (``fearec-dist train --local``, one worker with all
  ``--threads`` threads, Ray Data feed), two capped epochs of ``--batches`` steps; the second
  epoch's ``samples_per_s`` from ``metrics.csv`` is the number (the first includes warm-up). Its
  train time includes the feed's start-up each epoch (reading the worker's whole shard for the
  whole-shard shuffle, ~5 s here), which a full epoch amortises and a capped one does not:
  keep ``--batches`` well above 20.

Results: ``bench/results/vs_recbole.json`` and a table on stdout with the ratio.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "vs_recbole.json"
DEFAULT_VENV = Path.home() / ".cache" / "fearec-dist" / "recbole-1.2.1-venv"

# the official Beauty run's FEARec settings (spec/fearec.md §7), in RecBole's keys
RECBOLE_FEAREC = {
    "contrast": "us_x",
    "sim": "dot",
    "tau": 1,
    "lmd": 0.1,
    "lmd_sem": 0.1,
    "global_ratio": 0.6,
    "dual_domain": True,
    "std": True,
    "spatial_ratio": 0.1,
    "topk_factor": 1,
    "hidden_dropout_prob": 0.5,
    "attn_dropout_prob": 0.5,
    "train_batch_size": 256,
    "learning_rate": 1e-3,
    "MAX_ITEM_LIST_LENGTH": 50,
}

RUNNER = r"""
import json, sys, time
import numpy as np
# NumPy 2 removed these aliases; RecBole 1.2.1 still uses them
for alias, real in {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}.items():
    if not hasattr(np, alias):
        setattr(np, alias, real)
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, init_seed

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
cfg = dict(args["settings"])
cfg.update({
    "data_path": args["data_path"], "checkpoint_dir": args["workdir"], "show_progress": False,
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "train_neg_sample_args": None, "loss_type": "CE", "use_gpu": False, "seed": 2026,
})
config = Config(model="FEARec", dataset="ml-100k", config_dict=cfg)
init_seed(config["seed"], config["reproducibility"])
train_data, _, _ = data_preparation(config, create_dataset(config))
model = get_model("FEARec")(config, train_data.dataset)
if not args["as_shipped"]:
    torch.autograd.set_detect_anomaly(False)
opt = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
model.train()
done, samples, it = 0, 0, iter(train_data)
start = time.perf_counter()
while done < args["warmup"] + args["batches"]:
    try:
        inter = next(it)
    except StopIteration:
        it = iter(train_data)
        continue
    opt.zero_grad()
    loss = model.calculate_loss(inter)  # samples same-target partners, three forwards
    loss.backward()
    opt.step()
    done += 1
    if done == args["warmup"]:
        start = time.perf_counter()
    elif done > args["warmup"]:
        samples += len(inter)
seconds = time.perf_counter() - start
print(json.dumps({"samples": samples, "seconds": seconds,
                  "anomaly_detection": torch.is_anomaly_enabled(),
                  "train_rows": len(train_data.dataset)}))
"""


def ensure_venv(venv: Path) -> Path:
    """The throwaway RecBole venv's python, created with pip on first use."""
    python = venv / "bin" / "python"
    stamp = venv / ".fearec-dist-ready"
    if stamp.exists():
        return python
    print(f"[vs_recbole] creating {venv} (torch 2.13.0 CPU wheel, recbole 1.2.1) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: pip takes the local wheel
    subprocess.run([*pip, "recbole==1.2.1"], check=True)
    stamp.write_text("ok\n")
    return python


def run_recbole(python: Path, args: argparse.Namespace, as_shipped: bool, work: Path) -> dict:
    script = work / "recbole_runner.py"
    script.write_text(RUNNER)
    payload = {
        "threads": args.threads,
        "data_path": str(args.data),
        "workdir": str(work / "saved"),
        "as_shipped": as_shipped,
        "warmup": args.warmup,
        "batches": args.batches,
        "settings": RECBOLE_FEAREC,
    }
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(
        [str(python), str(script), json.dumps(payload)],
        cwd=work,  # RecBole writes log/ and saved/ into its working directory
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    if done.returncode:
        sys.exit(f"[vs_recbole] RecBole run failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["samples_per_s"] = round(out["samples"] / out["seconds"], 1)
    return out


def run_ours(args: argparse.Namespace, work: Path) -> dict:
    """Two capped epochs through `fearec-dist train --local`; epoch 2's samples/s."""
    config = work / "ours.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "data": {
                    "path": str(args.data / "ml-100k"),
                    "format": "atomic",
                    "prepared_path": str(work / "prepared"),
                    "max_seq_len": 50,
                },
                "model": {"name": "fearec_official"},
                "train": {
                    "epochs": 2,
                    "batch_size": 256,
                    "lr": 1e-3,
                    "max_steps_per_epoch": args.batches,
                    "torch_threads": args.threads,
                    "seed": 2026,
                },
                "run": {
                    "name": "vs-recbole",
                    "storage_path": str(work / "runs"),
                    "workers": 1,
                    "cpus_per_worker": float(args.threads),
                },
            }
        )
    )
    cmd = [sys.executable, "-m", "fearec_dist.cli", "train", "--local", "--config", str(config)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        sys.exit(
            f"[vs_recbole] fearec-dist run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    rows = list(csv.DictReader((work / "runs" / "vs-recbole" / "metrics.csv").open()))
    last = rows[-1]
    return {
        "samples": int(float(last["train/samples"])),
        "seconds": float(last["train_seconds"]),
        "samples_per_s": float(last["samples_per_s"]),
        "data_wait_share": float(last["data_wait_share"]),
        "epoch_1_samples_per_s": float(rows[0]["samples_per_s"]),
    }


def run_bare(args: argparse.Namespace, work: Path) -> dict:
    """The same epoch loop without Ray (bench/train.py's child mode) on the examples the Ray run
    prepared under ``work``: ``--batches`` steps, warm-up included."""
    cmd = [sys.executable, str(ROOT / "bench" / "train.py"), "--bare", "fearec_official"]
    cmd += ["--work", str(work), "--steps", str(args.batches), "--threads", str(args.threads)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        sys.exit(f"[vs_recbole] bare loop failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "samples": out["samples"],
        "seconds": round(out["seconds"], 2),
        "samples_per_s": round(out["samples"] / out["seconds"], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100, help="timed batches per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed RecBole warm-up batches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="directory holding ml-100k/ (RecBole atomic files)",
    )
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="RecBole's throwaway venv")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.data / "ml-100k" / "ml-100k.inter").exists():
        sys.exit(f"[vs_recbole] {args.data / 'ml-100k' / 'ml-100k.inter'} not found (--data)")
    python = ensure_venv(args.venv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs-recbole-") as tmp:
        work = Path(tmp)
        load_before = os.getloadavg()[0]
        for label, shipped in (
            ("recbole 1.2.1, as shipped", True),
            ("recbole 1.2.1, anomaly off", False),
        ):
            print(f"[vs_recbole] {label} ...", flush=True)
            rows.append({"system": label, **run_recbole(python, args, shipped, work)})
        if not args.skip_ours:
            print("[vs_recbole] fearec-dist (Ray path, 1 worker) ...", flush=True)
            rows.append({"system": "fearec-dist, Ray, 1 worker", **run_ours(args, work)})
            print("[vs_recbole] fearec-dist (bare epoch loop, no Ray) ...", flush=True)
            rows.append({"system": "fearec-dist, bare loop", **run_bare(args, work)})
        load_after = os.getloadavg()[0]
    shipped = rows[0]["samples_per_s"]
    for row in rows:
        row["vs_recbole_as_shipped"] = round(row["samples_per_s"] / shipped, 2)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {args.threads} torch threads",
        "dataset": "ml-100k",
        "model": "FEARec, official Beauty settings (us_x)",
        "batches": args.batches,
        "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'system':<30}{'samples/s':>11}{'x recbole':>11}")
    for row in rows:
        print(f"{row['system']:<30}{row['samples_per_s']:>11}{row['vs_recbole_as_shipped']:>11}")
    print(f"({result['machine']}, load {load_before:.1f}->{load_after:.1f}) -> {args.out}")
    return result


if __name__ == "__main__":
    main()

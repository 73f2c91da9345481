"""End to end through a real local Ray instance: prepare -> examples -> TorchTrainer (2 workers,
DDP, gathered negatives) -> outputs; 2-worker metrics equal a 1-process re-evaluation."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

from fearec_dist.config import load_config
from fearec_dist.data.examples import ExamplesInfo, iter_eval_rows, read_item_counts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    overrides = [
        "data.format=synthetic",
        "data.synthetic_users=301",  # odd: users do not divide by the workers
        "data.synthetic_items=60",
        "data.max_seq_len=20",
        "model.name=fearec_official",
        "train.epochs=3",
        "train.batch_size=64",
        "train.eval_batch_size=50",
        "run.workers=2",
        "run.cpus_per_worker=0.5",
        f"run.storage_path={root}",
    ]
    return overrides


def _popularity_hr10(info: ExamplesInfo) -> float:
    counts = read_item_counts(info, _storage()).astype(float)  # training targets only
    counts[0] = -np.inf
    target = np.concatenate(
        [
            t.column("target").to_numpy()
            for t in iter_eval_rows(info.prepared_uri, info.max_seq_len, "test", 100, _storage())
        ]
    )
    ranks = (counts[None, :] > counts[target][:, None]).sum(1) + 1
    return float((ranks <= 10).mean())


def tensorboard_scalars(logdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every TFRecord event file in ``logdir`` (read by hand: each
    record is length u64, crc u32, an ``Event`` proto, crc u32)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, dict[int, float]] = {}
    files = [f for f in sorted(os.listdir(logdir)) if "tfevents" in f]
    assert files, f"no event file in {logdir}"
    for name in files:
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def _storage():
    from fearec_dist.config import StorageSection

    return StorageSection()


def test_two_worker_run(ray_session, synth_cfg):
    from fearec_dist.data.datasets import prepare_run
    from fearec_dist.train.checkpoint import load_state
    from fearec_dist.train.evaluate import evaluate_checkpoint
    from fearec_dist.train.trainer import run_training

    cfg = load_config(None, [*synth_cfg, "run.name=two-workers"])
    results = run_training(cfg, mode="local")
    run_dir = f"{cfg.run.storage_path}/two-workers"
    with open(f"{run_dir}/results.json") as f:
        saved = json.load(f)
    assert saved["epochs_run"] == 3 and saved["best_epoch"] >= 1
    assert saved == json.loads(json.dumps(results))
    with open(f"{run_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["train/loss"]) > 0 for r in rows)
    with open(f"{run_dir}/curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    losses = tensorboard_scalars(f"{run_dir}/tensorboard")["train/loss"]
    assert sorted(losses) == [1, 2, 3]
    for r in rows:
        assert losses[int(r["epoch"])] == pytest.approx(float(r["train/loss"]), rel=1e-6)

    _, info = prepare_run(cfg)
    assert results["test"]["hr@10"] > _popularity_hr10(info) + 0.05

    # the same best weights re-scored in one process: every user once, identical metrics
    ckpts = sorted(
        p
        for p in os.listdir(run_dir)
        if os.path.isdir(f"{run_dir}/{p}") and p.startswith("checkpoint_")
    )
    again = evaluate_checkpoint(f"{run_dir}/{ckpts[-1]}")
    # each rank's own RNG states, gathered into rank 0's checkpoint
    rng = load_state(f"{run_dir}/{ckpts[-1]}")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert again["n_valid"] == info.n_valid and again["n_test"] == info.n_test
    for split in ("valid", "test"):
        for key, value in results[split].items():
            assert again[split][key] == pytest.approx(value, abs=1e-9), (split, key)


def test_debug_mode_runs_in_process(ray_session, synth_cfg):
    from fearec_dist.train.trainer import run_training

    cfg = load_config(None, [*synth_cfg, "run.name=debug", "train.epochs=1", "model.name=sasrec"])
    results = run_training(cfg, mode="debug")
    assert results["epochs_run"] == 1 and 0 <= results["valid"]["hr@10"] <= 1


def test_sampled_softmax_with_sparse_items_on_two_workers(ray_session, synth_cfg):
    """The large-catalogue path end to end: sampled softmax (in-batch candidates gathered from
    both workers, popularity negatives, logQ), row-sparse item updates through the workers' own
    exchange (the table outside DDP), evaluation in chunks of 7 items. Both ranks must hold the
    same table: the in-run metrics (each rank scores its users with its own copy) equal rank 0's
    checkpoint re-scored in one process, unchunked."""
    from fearec_dist.data.datasets import prepare_run
    from fearec_dist.train.checkpoint import latest_checkpoint, load_state
    from fearec_dist.train.evaluate import evaluate_checkpoint
    from fearec_dist.train.trainer import run_training

    sampled = ["train.softmax=sampled", "train.n_negatives=32", "train.negative_sampler=popularity",
               "train.negative_alpha=0.75", "train.sparse_item_updates=true",
               "train.eval_item_chunk=7",
               # trained under bf16 autocast: the metrics it reports must still be the float32
               # ones evaluate_checkpoint reproduces (evaluation never scores in bf16)
               "train.amp=bf16"]  # fmt: skip
    cfg = load_config(
        None, [*synth_cfg, *sampled, "run.name=sampled", "model.name=sasrec", "train.epochs=2"]
    )
    results = run_training(cfg, mode="local")
    run_dir = f"{cfg.run.storage_path}/sampled"
    _, info = prepare_run(cfg)
    assert results["test"]["hr@10"] > _popularity_hr10(info) + 0.05
    ckpt = latest_checkpoint(run_dir)
    assert set(load_state(ckpt)["optimizer"]) == {"dense", "sparse"}  # Adam + lazy SparseAdam
    again = evaluate_checkpoint(ckpt)
    for split in ("valid", "test"):
        for key, value in results[split].items():
            assert again[split][key] == pytest.approx(value, abs=1e-9), (split, key)

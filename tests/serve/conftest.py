"""Small trained runs for the serving tests, written in the trainer's layout without Ray.

``make_run(model)`` writes a prepared dataset (vocab with raw ids that differ from the internal
ones, sequences, meta.json), its leave-one-out test examples, trains the model for a few
hundred milliseconds (full-softmax CE on the training examples) and saves a checkpoint the way
the trainer does (``<run>/checkpoint_000001/state.pt`` with model, best_model, config, data,
progress). Exporting the Ray trainer's own run directory (on s3://) is in
``tests/train/test_s3_run.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

N_USERS, N_ITEMS, MAX_LEN = 120, 80, 12
SMALL = ["model.hidden_size=16", "model.inner_size=32", "model.n_heads=2"]


def raw_item(i: int) -> str:
    return f"sku-{i * 7 + 3}"  # raw ids are not the internal ones


def write_prepared(root: Path, sequences: list[np.ndarray], n_items: int) -> None:
    """A prepared dataset in ``prepare``'s layout (users u1..uU, items raw_item(1..N))."""
    (root / "vocab").mkdir(parents=True)
    (root / "sequences").mkdir()
    ids = np.arange(1, n_items + 1, dtype=np.int32)
    counts = np.bincount(np.concatenate(sequences), minlength=n_items + 1)[1:]
    pq.write_table(
        pa.table({"id": ids, "raw": [raw_item(i) for i in ids], "count": counts.astype(np.int64)}),
        root / "vocab" / "items.parquet",
    )
    users = np.arange(1, len(sequences) + 1, dtype=np.int32)
    pq.write_table(
        pa.table({"id": users, "raw": [f"u{u}" for u in users]}), root / "vocab" / "users.parquet"
    )
    items = pa.array([s.astype(np.int32) for s in sequences], pa.list_(pa.int32()))
    half = len(sequences) // 2  # two files, as prepare writes several
    table = pa.table({"user": users, "items": items})
    pq.write_table(table.slice(0, half), root / "sequences" / "part-0.parquet")
    pq.write_table(table.slice(half), root / "sequences" / "part-1.parquet")
    n = int(sum(len(s) for s in sequences))
    meta = {"n_users": len(sequences), "n_items": n_items, "n_interactions": n, "dropped": {}}
    (root / "meta.json").write_text(__import__("json").dumps(meta))


def random_sequences(n_users: int, n_items: int, seed: int) -> list[np.ndarray]:
    """Users walk item chains (i -> i + 1 mostly), lengths 1..30, so models learn something."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n_users):
        length = 1 if u == 0 else 2 if u == 1 else int(rng.integers(3, 30))
        start = int(rng.integers(1, n_items + 1))
        steps = np.where(rng.random(length) < 0.8, 1, rng.integers(2, 9, length))
        out.append(((start - 1 + np.cumsum(steps) - steps[0]) % n_items + 1).astype(np.int64))
    return out


@dataclass
class Run:
    dir: Path
    prepared: Path
    model_name: str
    model: torch.nn.Module  # the trained model, eval mode
    test_seq: torch.Tensor  # (T, L) the test histories
    test_len: torch.Tensor  # (T,)
    sequences: list[np.ndarray]


def _train_run(root: Path, name: str, overrides: list[str], seed: int = 0) -> Run:
    from fearec_dist.config import load_config
    from fearec_dist.data.sequences import build_loo_examples, sequences_to_csr
    from fearec_dist.models import build_model, get_spec
    from fearec_dist.train.checkpoint import save_state

    sequences = random_sequences(N_USERS, N_ITEMS, seed)
    prepared = root / "prepared"
    write_prepared(prepared, sequences, N_ITEMS)
    offsets, items = sequences_to_csr(sequences)
    splits = build_loo_examples(offsets, items, np.arange(1, N_USERS + 1), MAX_LEN)
    examples = prepared / "examples" / "L12-test"  # the test rows are cut from the sequences

    cfg = load_config(
        None,
        [
            "data.format=prepared",
            f"data.path={prepared}",
            f"data.max_seq_len={MAX_LEN}",
            f"model.name={name}",
            *SMALL,
            *overrides,
        ],
    )
    torch.manual_seed(seed)
    model = build_model(name, n_items=N_ITEMS, max_seq_len=MAX_LEN, **cfg.model.params)
    spec = get_spec(name)
    train = splits["train"]
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(30):
        rows = np.random.default_rng(step).integers(0, len(train["target"]), 64)
        batch = {
            "item_seq": torch.from_numpy(train["history"][rows].astype(np.int64)),
            "seq_len": torch.from_numpy(train["length"][rows].astype(np.int64)),
        }
        logits = spec.full_scores(model, batch)
        loss = torch.nn.functional.cross_entropy(
            logits, torch.from_numpy(train["target"][rows]).long()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    run_dir = root / "runs" / name
    state = {
        "model": {k: torch.zeros_like(v) for k, v in best.items()},  # best_model must win
        "best_model": best,
        "config": cfg.to_dict(),
        "data": {
            "uri": str(examples),
            "prepared_uri": str(prepared),
            "fingerprint": "test",
            "n_items": N_ITEMS,
            "n_users": N_USERS,
            "max_seq_len": MAX_LEN,
        },
        "progress": {
            "epoch": 2,
            "best_epoch": 1,
            "valid": {"valid/hr@10": 0.5},
            "test": {"test/hr@10": 0.25},
        },
    }
    (run_dir / "checkpoint_000001").mkdir(parents=True)
    save_state(run_dir / "checkpoint_000001", state)
    test = splits["test"]
    return Run(
        run_dir,
        prepared,
        name,
        model,
        torch.from_numpy(test["history"].astype(np.int64)),
        torch.from_numpy(test["length"].astype(np.int64)),
        sequences,
    )


@pytest.fixture(scope="session")
def make_run(tmp_path_factory):
    """``make_run(name, *overrides)`` -> a trained Run (cached per arguments for the session)."""
    cache: dict[tuple, Run] = {}

    def make(name: str, *overrides: str) -> Run:
        key = (name, *overrides)
        if key not in cache:
            cache[key] = _train_run(tmp_path_factory.mktemp(f"run-{name}"), name, list(overrides))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_export(make_run, tmp_path_factory):
    """``make_export(name, index=None)`` -> (Run, export dir), cached."""
    from fearec_dist.serve.export import export_run

    cache: dict[tuple, tuple[Run, Path]] = {}

    def make(name: str, index: str | None = None) -> tuple[Run, Path]:
        if (name, index) not in cache:
            run = make_run(name)
            out = tmp_path_factory.mktemp(f"export-{name}") / "export"
            export_run(str(run.dir), str(out), index, say=lambda *_: None)
            cache[(name, index)] = (run, out)
        return cache[(name, index)]

    return make

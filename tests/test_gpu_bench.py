"""bench/gpu.py's tiny CPU mode, run as the GPU machine runs it: in a process where Ray cannot be
imported, reading a raw seqtxt file; every section writes rows with sane fields."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# the bench, with every import of ray failing (the GPU machines have no Ray)
NO_RAY = (
    "import runpy, sys; sys.modules['ray'] = None; "
    "sys.argv = ['bench/gpu.py', *sys.argv[1:]]; "
    "runpy.run_path('bench/gpu.py', run_name='__main__')"
)


def _write_seqtxt(path: Path, n_users: int = 120, n_items: int = 40) -> None:
    """A Beauty-like ``user item item …`` file; raw item ids are spread out (x 7 + 3), so the
    bench must renumber them 1..n as prepare does."""
    rng = np.random.default_rng(11)
    lines = []
    for user in range(1, n_users + 1):
        items = rng.integers(1, n_items + 1, int(rng.integers(5, 15))) * 7 + 3
        lines.append(" ".join(map(str, [user, *items.tolist()])))
    path.write_text("\n".join(lines) + "\n")


def _rows(out: Path, section: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{section}.jsonl").read_text().splitlines()]


def _positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, row)


def test_tiny_cpu_mode_writes_every_section_without_ray(tmp_path) -> None:
    data, out = tmp_path / "Beauty.txt", tmp_path / "out"
    _write_seqtxt(data)
    cmd = [sys.executable, "-c", NO_RAY, "--tiny", "--device", "cpu", "--out", str(out),
           "--data", str(data)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    run = _rows(out, "run")
    assert [r["event"] for r in run] == ["start", "end"]  # nothing skipped
    summary = run[0]["data"]
    assert summary["users"] == 120 and summary["items"] <= 40
    assert summary["n_train"] + summary["n_valid"] + summary["n_test"] > 0
    every = [r for s in ("run", "train_step", "eval_full_ranking", "beauty") for r in _rows(out, s)]
    for row in every:
        assert row["device"].startswith("cpu") and row["torch"] and row["date"]
        assert "dtype" in row and row["tiny"] is True

    steps = _rows(out, "train_step")
    cases = {(r["model"], r["dtype"], r["batch"]) for r in steps}
    assert cases == {(m, d, b) for m in ("sasrec", "fearec_official") for d in ("fp32", "bf16")
                     for b in (16, 32)}  # fmt: skip
    for r in steps:
        _positive(r, "samples_per_s", "step_ms", "seconds", "loss")
        assert r["compiled"] is False and r["peak_mem_bytes"] is None  # CPU: no CUDA peak
        assert r["partner"] == (r["model"] == "fearec_official")

    ranking = _rows(out, "eval_full_ranking")
    assert len(ranking) == 2
    for r in ranking:
        _positive(r, "users_per_s", "seconds", "users", "n_items")
        assert 0.0 <= r["hr@10"] <= 1.0

    beauty = _rows(out, "beauty")
    for model in ("sasrec", "fearec_official"):
        epochs = [r for r in beauty if r["model"] == model and not r.get("best")]
        (best,) = [r for r in beauty if r["model"] == model and r.get("best")]
        assert [r["epoch"] for r in epochs] == list(range(1, len(epochs) + 1)) and epochs
        assert best["epochs"] == len(epochs)
        for r in epochs:
            _positive(r, "samples_per_s", "train_s", "eval_s", "wall_s")
            assert all(math.isfinite(v) for v in r["loss"].values())
            for split in ("valid", "test"):
                assert 0.0 <= r[split]["ndcg@10"] <= r[split]["hr@10"] <= 1.0
        assert best["valid"] == max(epochs, key=lambda r: r["valid"]["hr@10"])["valid"]


def test_raw_seqtxt_is_numbered_as_prepare_numbers_it(tmp_path) -> None:
    """Raw ids sorted numerically and numbered from 1, each user's items in file order."""
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "seq.txt"
    path.write_text("20 300 10 300\n3 10 7\n")  # users 20, 3; items 300, 10, 7
    offsets, items, users, n_items = bench.seqtxt_sequences(path)
    assert n_items == 3 and users.tolist() == [1, 2]  # raw user 3 -> 1, 20 -> 2
    seqs = [items[offsets[u] : offsets[u + 1]].tolist() for u in range(2)]
    assert seqs == [[2, 1], [3, 2, 3]]  # items 7 -> 1, 10 -> 2, 300 -> 3

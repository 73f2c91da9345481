"""Resume RNG: every rank saves and restores its own generator states exactly.

Each rank seeds its own generators (``seed + rank``), so a checkpoint must carry every rank's
torch CPU (CUDA where present), numpy and Python ``random`` states: gathered to rank 0, which
writes the checkpoint, and rank r restores entry r. numpy's state includes its position, so a
generator saved mid-way through its key block continues exactly.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from fearec_dist.train import checkpoint as ckpt
from tests.conftest import run_gloo_ranks


def _draws() -> tuple[list[float], list[float], list[float]]:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def _advance(rank: int) -> None:
    """Moves every generator to a rank-specific point, numpy off its key-block boundary."""
    torch.rand(5 + rank)
    np.random.rand(7 + rank)  # position no longer 624
    np.random.randn(1)  # a cached Gaussian
    [random.random() for _ in range(3 + rank)]


def test_rng_state_round_trip_is_exact(tmp_path):
    ckpt.seed_rank(11, 0)
    _advance(0)
    ckpt.save_state(tmp_path, {"rng": [ckpt.rng_state()]})
    expected = _draws()
    ckpt.seed_rank(99, 0)  # scramble
    state = ckpt.load_state(tmp_path)  # weights_only: the states survive the safe loader
    assert ckpt.restore_rng_state(state["rng"], 0)
    assert _draws() == expected


def _rank(rank: int, world: int, directory: str, out) -> None:
    ckpt.seed_rank(2026, rank)
    _advance(rank)
    saved = ckpt.rng_state()
    states = ckpt.gather_rng_states(rank, world)  # a collective, as in the epoch report
    if rank == 0:
        assert states is not None and len(states) == world
        ckpt.save_state(directory, {"rng": states})
    else:
        assert states is None
    expected = _draws()
    dist.barrier()
    ckpt.seed_rank(7, 0)  # scrambled, and the same on every rank
    assert ckpt.restore_rng_state(ckpt.load_state(directory)["rng"], rank)
    restored = ckpt.rng_state()
    same = (
        torch.equal(restored["torch"], saved["torch"])
        and restored["numpy"] == saved["numpy"]
        and restored["python"] == saved["python"]
    )
    out.put((rank, same, _draws() == expected, saved["numpy"]["pos"]))


def test_each_rank_restores_its_own_rng_states(tmp_path):
    results = run_gloo_ranks(_rank, (str(tmp_path),), world=2)
    assert [r[0] for r in results] == [0, 1]
    for rank, same_state, same_draws, pos in results:
        assert same_state, f"rank {rank}: restored states differ from the saved ones"
        assert same_draws, f"rank {rank}: the draws after the restore differ"
        assert pos != 624  # the exact position was exercised, not the block boundary
    saved = ckpt.load_state(tmp_path)["rng"]
    assert not torch.equal(saved[0]["torch"], saved[1]["torch"])  # one entry per rank


def test_resume_with_more_workers_keeps_the_extra_ranks_seeded():
    state = ckpt.rng_state()
    assert not ckpt.restore_rng_state([state], 1)
    assert not ckpt.restore_rng_state(state, 0)  # the single-dict format of older checkpoints

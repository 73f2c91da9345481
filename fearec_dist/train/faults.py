"""Fault injection for the tests: a worker that exits hard at a chosen step, once.

Owns ``TEST_KILL_ENV`` and ``kill_if_asked``, called by the loop before every step. Unset (the
normal case), it costs one environment lookup per step.
"""

from __future__ import annotations

import os

from fearec_dist.train.console import say

TEST_KILL_ENV = "FEAREC_DIST_TEST_KILL"


def kill_if_asked(epoch: int, step: int, rank: int) -> None:
    """``FEAREC_DIST_TEST_KILL=<marker>:<epoch>:<step>:<rank>`` (0-based) makes that rank's
    process exit hard at that step once: the marker file is created first, and an existing marker
    disarms the hook (the restarted worker runs on)."""
    spec = os.environ.get(TEST_KILL_ENV)
    if not spec:
        return
    marker, at_epoch, at_step, at_rank = spec.rsplit(":", 3)
    if (epoch, step, rank) != (int(at_epoch), int(at_step), int(at_rank)):
        return
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"killed rank {rank} at epoch {epoch} step {step}\n")
    say(f"[fearec-dist] {TEST_KILL_ENV}: rank {rank} exits at epoch {epoch} step {step}")
    os._exit(1)

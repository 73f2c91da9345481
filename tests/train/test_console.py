"""The in-epoch progress line: when it prints, what it says, and that a resumed epoch's rate
and ETA count only the steps trained since the resume."""

from __future__ import annotations

import pytest

from fearec_dist.config import ConfigError, ExperimentConfig
from fearec_dist.train.console import StepProgress, format_duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _partial(steps: int, seconds: float, per_step_loss: float = 2.0, batch: int = 8) -> dict:
    return {"steps": steps, "samples": steps * batch, "seconds": seconds,
            "sums": {"loss": per_step_loss * steps}}  # fmt: skip


def test_prints_every_interval_with_rate_and_eta():
    clock, lines = Clock(), []
    progress = StepProgress(1, 3, 100, 60.0, world=2, clock=clock, out=lines.append)
    progress.tick(_partial(1, 1.0))  # the first step sets the base, prints nothing
    clock.now = 30.0
    progress.tick(_partial(30, 30.0))
    assert lines == []  # not yet 60 s
    clock.now = 61.0
    progress.tick(_partial(41, 41.0))  # 40 steps in 40 s since the base
    assert lines == [
        "[fearec-dist] epoch 1/3 step 41/100 (41%) | loss 2.0000 | 16 samples/s | epoch ETA 59s"
    ]
    clock.now = 100.0
    progress.tick(_partial(60, 60.0))
    assert len(lines) == 1  # 39 s after the last line
    clock.now = 125.0
    progress.tick(_partial(70, 70.0))
    assert len(lines) == 2 and "step 70/100 (70%)" in lines[1]


def test_resumed_epoch_rate_excludes_replayed_steps():
    clock, lines = Clock(), []
    progress = StepProgress(2, 2, 1000, 10.0, world=1, clock=clock, out=lines.append)
    # resumed at step 500 (its 500 s came from before the cut), then 10 steps in 20 s
    progress.tick(_partial(501, 502.0))
    clock.now = 20.0
    progress.tick(_partial(511, 522.0))
    assert lines and "4 samples/s" in lines[0]  # 10 steps x 8 rows / 20 s
    assert "epoch ETA 16m18s" in lines[0]  # 489 steps left at 2 s each


def test_off_prints_nothing():
    clock, lines = Clock(), []
    progress = StepProgress(1, 1, 10, 0.0, world=1, clock=clock, out=lines.append)
    for step in range(1, 9):
        clock.now = step * 100.0
        progress.tick(_partial(step, step * 100.0))
    assert lines == []


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 425, 3599.6, 11_530)] == [
        "0s", "42s", "7m05s", "1h00m", "3h12m"
    ]  # fmt: skip


def test_negative_interval_is_a_config_error():
    with pytest.raises(ConfigError, match="run.progress_every_s"):
        ExperimentConfig.from_dict({"run": {"progress_every_s": -1}}, "test")

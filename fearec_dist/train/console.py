"""What a run prints: one line per event, from rank 0, straight to stdout.

Owns ``say`` (one console line), ``quiet_ray_train_console`` (Ray Train's per-report INFO lines
stay in its log files), the start-up banner with the derived values (global batch, steps,
negatives per row), the in-epoch progress line and the per-epoch line.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from fearec_dist.config import ExperimentConfig


def say(message: str) -> None:
    """One console line. Written to stdout directly: Ray Train's patched ``print`` on workers
    sends each line to the console twice (once through its logger)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def quiet_ray_train_console() -> None:
    """Ray Train logs every report (the whole metrics dict) at INFO on the console; keep that in
    its log files and show warnings only."""
    for handler in logging.getLogger("ray.train").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def print_start(
    cfg: ExperimentConfig,
    module: Any,
    world: int,
    steps: int,
    gathered: bool,
    device: Any,
    threads: int,
    run_dir: str,
) -> None:
    """The derived values, once (nanoGPT's ``tokens_per_iter``): global batch, steps per epoch
    and, for a contrastive model, the InfoNCE candidates per row (``gathered``: from all
    workers)."""
    batch = cfg.train.batch_size
    nce = ""
    if getattr(module.config, "contrast", "none") != "none":
        negatives = 2 * batch * (world if gathered else 1)
        nce = f"InfoNCE candidates/row {negatives - 1} | "
    n_params = sum(p.numel() for p in module.parameters())
    say(
        f"[fearec-dist] {cfg.model.name}: {n_params:,} params | {world} worker(s) x batch {batch} "
        f"= global batch {batch * world} | {steps} steps/epoch | {nce}device {device} | "
        f"torch threads {threads} | run dir {run_dir}"
    )


def print_epoch(row: dict[str, Any], metric: str, epochs: int, valid_on: str = "") -> None:
    """``epoch e/E | loss … | valid/<metric> … | … samples/s, data wait …%``; ``valid_on``
    says which users validation scored (all, or a sample)."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('train/loss', math.nan):.4f}"]
    if valid_on and f"valid/{metric}" in row:
        parts.append(f"valid on {valid_on}")
    for key in (f"valid/{metric}", "valid/ndcg@10", "valid/masked_ndcg@10", "test/hr@10"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s, data wait {row['data_wait_share']:.1%}")
    say("[fearec-dist] " + " | ".join(parts))


def head_line(head: dict[str, int], epoch: int) -> str:
    """Epoch ``epoch`` (0-based) starts on a head: what it holds and what it approximates."""
    text = (
        f"[fearec-dist] epoch {epoch + 1} starts on a head of {head['head_rows']:,} examples "
        f"({head['head_users']:,} users sampled by seed) while the rest of the epoch is built"
    )
    if "head_self_paired" in head:
        text += (
            f"; head partners are drawn within the head: {head['head_self_paired']:,} rows pair "
            "with themselves although their target has other members in the training set"
        )
    return text


class StepProgress:
    """``epoch e/E step s/S (p%) | loss … | … samples/s | ETA …`` every ``every_s`` seconds of
    an epoch (an epoch at 10^8 examples is hours long; the epoch line comes only at its end).

    ``tick(partial)`` takes the loop's running state (``steps``, ``samples``, ``sums``,
    ``seconds``, as in a step checkpoint); the rate counts only this call's steps, so a resumed
    epoch's ETA does not credit the replayed ones.
    """

    def __init__(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        every_s: float,
        world: int,
        clock: Callable[[], float] = time.monotonic,
        out: Callable[[str], None] = say,
    ) -> None:
        self.epoch, self.epochs, self.steps, self.every_s = epoch, epochs, steps, every_s
        self.world, self.clock, self.out = world, clock, out
        self.last = clock()
        self.base: tuple[float, int, int] | None = None  # (seconds, steps, samples) at start

    def tick(self, partial: dict[str, Any]) -> None:
        if self.base is None:  # the first step of this call: rates start here
            self.base = (partial["seconds"], partial["steps"], partial["samples"])
            return
        now = self.clock()
        if not self.every_s or now - self.last < self.every_s:
            return
        self.last = now
        seconds, steps, samples = (partial[k] - b for k, b in zip(
            ("seconds", "steps", "samples"), self.base))  # fmt: skip
        done = partial["steps"]
        loss = partial["sums"].get("loss")
        parts = [f"epoch {self.epoch}/{self.epochs} step {done:,}/{self.steps:,} "
                 f"({done / self.steps:.0%})"]  # fmt: skip
        if loss is not None:
            parts.append(f"loss {float(loss) / done:.4f}")
        if seconds > 0 and steps > 0:
            eta = (self.steps - done) * seconds / steps
            parts.append(f"{samples * self.world / seconds:.0f} samples/s")
            parts.append(f"epoch ETA {format_duration(eta)}")
        self.out("[fearec-dist] " + " | ".join(parts))


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h12m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"

"""What a run prints: one line per event, from rank 0, straight to stdout.

Owns ``say`` (one console line), ``quiet_ray_train_console`` (Ray Train's per-report INFO lines
stay in its log files), the start-up banner with the derived values (global batch, steps,
negatives per row) and the per-epoch line.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any


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
    name: str,
    n_params: int,
    world: int,
    batch_size: int,
    steps: int,
    negatives: int | None,
    device: Any,
    threads: int,
    run_dir: str,
) -> None:
    """The derived values, once (nanoGPT's ``tokens_per_iter``): global batch, steps, negatives.

    ``negatives``: InfoNCE candidates per row, or None for a model without a contrastive term.
    """
    nce = f"InfoNCE candidates/row {negatives - 1} | " if negatives is not None else ""
    say(
        f"[fearec-dist] {name}: {n_params:,} params | {world} worker(s) x batch {batch_size} = "
        f"global batch {batch_size * world} | {steps} steps/epoch | {nce}device {device} | "
        f"torch threads {threads} | run dir {run_dir}"
    )


def print_epoch(row: dict[str, Any], metric: str, epochs: int) -> None:
    """``epoch e/E | loss … | valid/<metric> … | … samples/s, data wait …%``."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row.get('train/loss', math.nan):.4f}"]
    for key in (f"valid/{metric}", "valid/ndcg@10", "valid/masked_ndcg@10", "test/hr@10"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['samples_per_s']:.0f} samples/s, data wait {row['data_wait_share']:.1%}")
    say("[fearec-dist] " + " | ".join(parts))

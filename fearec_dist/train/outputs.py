"""Run outputs written by rank 0 every epoch: ``results.json``, ``metrics.csv``, ``curves.png``
and the TensorBoard event files, all through the storage layer.

Written inside ``train_func`` (not after ``fit()``, which Tune may never reach). ``metrics.csv``
is rewritten whole from the per-epoch history kept in the checkpoint, so replaying an epoch after a
restart never duplicates a row. The run directory may be local or any URI (``s3://…``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from fearec_dist.config import StorageSection
from fearec_dist.storage import is_remote, write_bytes


def metrics_csv(history: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    return buf.getvalue()


def plot_curves(history: list[dict[str, Any]], title: str) -> bytes:
    """PNG: the loss terms per epoch (left) and valid NDCG@10 under both protocols (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in history]
    for key in sorted({k for r in history for k in r if k.startswith("train/")}):
        if key in ("train/samples", "train/steps"):
            continue
        ax_loss.plot(epochs, [r.get(key, math.nan) for r in history], marker=".", label=key[6:])
    ax_loss.set_xlabel("epoch")
    ax_loss.set_title("training loss terms")
    ax_loss.legend(fontsize=8)
    for key in ("valid/ndcg@10", "valid/masked_ndcg@10"):
        pts = [(r["epoch"], r[key]) for r in history if key in r]
        if pts:
            ax_metric.plot(*zip(*pts), marker="o", label=key)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_title("validation")
    ax_metric.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_run_outputs(
    run_dir: str,
    history: list[dict[str, Any]],
    results: dict[str, Any],
    storage: StorageSection | None = None,
) -> None:
    base = run_dir.rstrip("/")
    write_bytes(f"{base}/metrics.csv", metrics_csv(history).encode(), storage)
    text = json.dumps(results, indent=2, default=str, allow_nan=True)
    write_bytes(f"{base}/results.json", text.encode(), storage)
    if history:
        png = plot_curves(history, str(results.get("config", {}).get("model", {}).get("name", "")))
        write_bytes(f"{base}/curves.png", png, storage)


def _summary_writer_class() -> Any:
    """torch's SummaryWriter (needs the ``tensorboard`` extra), else tensorboardX's (which
    ``ray[tune]`` installs), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        return None


class TensorBoardLog:
    """Rank 0's TensorBoard event file in ``<run_dir>/tensorboard/``: every numeric metric of
    each epoch row, at step = epoch. For a remote run directory the events are written to a
    local temporary directory and copied up after each epoch. A resumed run adds an event file
    beside the old ones (TensorBoard reads them as one run; a replayed epoch shows its last
    value). Without a SummaryWriter available, it says so once and does nothing."""

    def __init__(self, run_dir: str, storage: StorageSection | None = None) -> None:
        import tempfile

        self.remote = is_remote(run_dir)
        self.target = f"{run_dir.rstrip('/')}/tensorboard"
        self.storage, self.writer = storage, None
        writer_cls = _summary_writer_class()
        if writer_cls is None:
            print("[fearec-dist] TensorBoard logging off: pip install 'fearec-dist[tensorboard]'")
            return
        self.local = tempfile.mkdtemp(prefix="fearec-tb-") if self.remote else self.target
        self.writer = writer_cls(log_dir=self.local.removeprefix("file://"))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(row["epoch"])
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key if "/" in key else f"run/{key}", value, step)
        self.writer.flush()
        if self.remote:
            from pathlib import Path

            for path in Path(self.local).iterdir():
                write_bytes(f"{self.target}/{path.name}", path.read_bytes(), self.storage)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

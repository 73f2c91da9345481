"""Checkpoint state: everything an exact resume needs, in one ``state.pt`` per checkpoint dir.

Owns the state (``TrainState``: ``to_state``, ``restore``; it is built by ``build.py``), the
per-rank RNG states (``rng_state``/``set_rng_state``/``gather_rng_states``), and the files
(``save_state``, ``load_state``, ``load_state_uri``, ``latest_checkpoint``).

Contents (nanoGPT's checkpoint dict is the model): ``model`` (the unwrapped module's state dict),
``optimizer``, ``scaler`` (``train.amp: fp16``'s loss scale, else None), ``progress`` (epoch,
best metric and epoch, patience counter, per-epoch history rows), ``best_model`` (weights of the
best validation epoch, for the test metrics), ``rng`` (a list, one entry per rank: torch CPU,
CUDA when present, numpy and Python ``random`` states, each exact), ``config`` (the experiment
dict), ``data`` (``{"uri", "version"}`` of the dataset version trained on, and ``examples``:
the examples info, URI and fingerprint) and ``warm_start`` (``train.warm_start``'s lineage,
``warm_start.WarmStart.record``, None for a cold start). Saved with ``torch.save`` and read
back with ``weights_only=True``: nothing pickled is ever executed.

Per-rank RNG: every rank seeds its own generators (``seed + rank``), so each rank's states are
gathered to rank 0 (``gather_object`` over the process group) and rank r restores entry r. A
run resumed with more workers than it saved seeds the extra ranks afresh.

Atomicity: rank 0 writes into a fresh temporary directory (``state.pt.tmp`` renamed to
``state.pt``), which ``ray.train.report`` then persists; Ray only registers a checkpoint after
its upload finished, so Ray's own restore never sees a half-written one, and
``latest_checkpoint`` (evaluate, finetune) skips a checkpoint directory whose ``state.pt`` is
not a complete file.
"""

from __future__ import annotations

import copy
import io
import os
import random
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from fearec_dist.data.examples import ExamplesInfo
from fearec_dist.storage import resolve
from fearec_dist.train.console import say
from fearec_dist.train.progress import Progress

STATE_FILE = "state.pt"


def seed_rank(seed: int, rank: int) -> None:
    """Each rank's own generators: torch (CPU and CUDA) and numpy."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def rng_state() -> dict[str, Any]:
    """This process's RNG states, exactly (numpy's position and cached Gaussian included)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what ``rng_state`` saved (CUDA only where both have it)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


def gather_rng_states(rank: int, world: int) -> list[dict[str, Any]] | None:
    """Every rank's ``rng_state()`` on rank 0, in rank order (None on the other ranks).

    A collective: every rank calls it. Without a process group (one worker, debug mode) it is
    this process's state alone.
    """
    mine = rng_state()
    if world == 1 or not dist.is_available() or not dist.is_initialized():
        return [mine]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, out, dst=0)
    return out


def restore_rng_state(saved: list[dict[str, Any]], rank: int) -> bool:
    """Restores rank ``rank``'s saved states; False (nothing restored) when the checkpoint holds
    fewer ranks (a resume with more workers: that rank keeps its fresh seed) or is of the format
    before per-rank states (one dict)."""
    if isinstance(saved, dict) or rank >= len(saved):
        return False
    set_rng_state(saved[rank])
    return True


@dataclass
class TrainState:
    """What a checkpoint saves and restores: the bare module, its optimizer, the progress and
    the weights of the best epoch."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    progress: Progress
    best_model: dict[str, torch.Tensor] | None = None
    scaler: torch.amp.GradScaler | None = None  # train.amp: fp16's loss scale
    warm_start: dict[str, Any] | None = None  # train.warm_start's lineage (None: a cold start)

    def keep_best(self) -> None:
        """Copies the current weights as the best epoch's (CPU, detached)."""
        state = self.module.state_dict()
        self.best_model = {k: v.detach().cpu().clone() for k, v in state.items()}

    def to_state(
        self, rng: list[dict[str, Any]], config: dict[str, Any], info: ExamplesInfo
    ) -> dict[str, Any]:
        """The checkpoint dict (``rng``: every rank's states, from ``gather_rng_states``)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": copy.deepcopy(asdict(self.progress)),
            "best_model": self.best_model,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rng,
            "config": config,
            # lineage (DESIGN.md): {"uri", "version"} of the dataset, and the examples read
            "data": info.data | {"examples": info.to_dict()},
            "warm_start": self.warm_start,  # where the run's first weights came from
        }

    def restore_from(self, checkpoint: Any, rank: int, device: torch.device) -> None:
        """Restores from a ``ray.train.Checkpoint`` (rank 0 says so on the console).

        Each rank reads its own copy of the state file through the checkpoint's filesystem.
        ``Checkpoint.as_directory()`` shares one temporary download per node, and a rank that
        takes the download lock after another rank's download has finished downloads again
        over the files that rank is still reading (seen with 2 ranks on s3: "PytorchStreamReader
        failed reading file")."""
        self.restore(load_checkpoint_state(checkpoint, device), rank)
        if rank == 0:
            epoch, step = self.progress.epoch + 1, self.progress.partial.get("steps", 0)
            say(f"[fearec-dist] resumed at epoch {epoch} step {step} ({checkpoint.path})")

    def restore(self, state: dict[str, Any], rank: int) -> None:
        """Loads a checkpoint dict into this state, and this rank's RNG states."""
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        self.best_model = state.get("best_model")
        self.warm_start = state.get("warm_start")  # a resumed run keeps its start's lineage
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])  # the loss scale, so resume is exact
        restore_rng_state(state["rng"], rank)


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Writes ``state`` to ``directory/state.pt`` atomically (temp file, then rename)."""
    path = Path(directory) / STATE_FILE
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {STATE_FILE} in this checkpoint directory")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checkpoint_state(checkpoint: Any, map_location: Any = "cpu") -> dict[str, Any]:
    """The state of a ``ray.train.Checkpoint``, read into this process (local or remote)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return load_state(checkpoint.path, map_location)
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as f:
        data = io.BytesIO(f.read())
    return torch.load(data, map_location=map_location, weights_only=True)


def load_state_uri(uri: str, storage: Any = None) -> dict[str, Any]:
    """Reads a checkpoint directory from a local path or any URI (``s3://…/checkpoint_…``)."""
    local = Path(uri.removeprefix("file://"))
    if "://" not in uri or uri.startswith("file://"):
        return load_state(local)
    fs, path = resolve(uri, storage)
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{path.rstrip('/')}/{STATE_FILE}"
        pafs.copy_files(source, f"{tmp}/{STATE_FILE}", source_filesystem=fs)
        return load_state(tmp)


def is_complete(fs: Any, path: str) -> bool:
    """Whether ``path/state.pt`` exists and is a whole file: ``torch.save`` writes a zip whose
    central directory comes last, so a copy cut short (or not yet written) fails to open."""
    source = f"{path.rstrip('/')}/{STATE_FILE}"
    if fs.get_file_info(source).type != pafs.FileType.File:
        return False
    try:
        with fs.open_input_file(source) as f, zipfile.ZipFile(f) as z:
            return bool(z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def latest_checkpoint(uri: str, storage: Any = None) -> str:
    """``uri`` itself when it is a checkpoint; for a run directory, its newest complete one.

    Incomplete checkpoint directories (a crash during the copy into storage) are skipped, so a
    half-written checkpoint is never picked up.
    """
    fs, path = resolve(uri, storage)
    if fs.get_file_info(f"{path}/{STATE_FILE}").type == pafs.FileType.File:
        if not is_complete(fs, path):
            raise FileNotFoundError(f"{uri}: its {STATE_FILE} is not complete (cut short)")
        return uri
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(
        (
            i.base_name
            for i in infos
            if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
        ),
        reverse=True,
    )
    for name in names:
        if is_complete(fs, f"{path}/{name}"):
            return f"{uri.rstrip('/')}/{name}"
    raise FileNotFoundError(f"{uri}: neither a checkpoint nor a run directory with a complete one")

"""Checkpoints: everything an exact resume needs, in one ``state.pt`` per checkpoint directory.

Contents (nanoGPT's checkpoint dict is the model): ``model`` (the unwrapped module's state dict),
``optimizer``, ``progress`` (epoch, best metric and epoch, patience counter, per-epoch history
rows), ``best_model`` (weights of the best validation epoch, for the test metrics), ``rng`` (torch,
numpy and Python states), ``config`` (the experiment dict) and ``data`` (examples info: URI and
fingerprint of the prepared data). Saved with ``torch.save`` and read back with
``weights_only=True``: nothing pickled is ever executed.

Atomicity: rank 0 writes into a fresh temporary directory (``state.pt.tmp`` renamed to
``state.pt``), which ``ray.train.report`` then persists; Ray only registers a checkpoint after
its upload finished, so Ray's own restore never sees a half-written one, and
``latest_checkpoint`` (evaluate, finetune) skips a checkpoint directory whose ``state.pt`` is
not a complete file.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "python": list(random.getstate()[1]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.asarray(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


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


def load_state_uri(uri: str, storage: Any = None) -> dict[str, Any]:
    """Reads a checkpoint directory from a local path or any URI (``s3://…/checkpoint_…``)."""
    local = Path(uri.removeprefix("file://"))
    if "://" not in uri or uri.startswith("file://"):
        return load_state(local)
    import tempfile

    import pyarrow.fs as pafs

    from fearec_dist.storage import resolve

    fs, path = resolve(uri, storage)
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{path.rstrip('/')}/{STATE_FILE}"
        pafs.copy_files(source, f"{tmp}/{STATE_FILE}", source_filesystem=fs)
        return load_state(tmp)


def is_complete(fs: Any, path: str) -> bool:
    """Whether ``path/state.pt`` exists and is a whole file: ``torch.save`` writes a zip whose
    central directory comes last, so a copy cut short (or not yet written) fails to open."""
    import zipfile

    import pyarrow.fs as pafs

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
    import pyarrow.fs as pafs

    from fearec_dist.storage import resolve

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

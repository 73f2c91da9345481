"""A pipeline's promotion pointer and its history of decisions, written so that two overlapping
days can never both promote.

Layout of one pipeline (``<run.storage_path>/pipelines/<daily.name>``)::

    history/<G>.json     promotion number G (generation): the pointer as it was promoted, plus
                         ``generation`` and ``previous``; created only if absent (never changed)
    current.json         a copy of the newest history/<G>.json, for readers (``serve --follow``):
                         {"export", "run", "data": {"uri", "version"}, "test": {...},
                          "promoted_at", "generation", ...}
    decisions/<stamp>-v<version>-<run>.json   every day's decision: promoted, rejected, failed

The truth is the newest ``history/<G>.json``. A day reads it at its start (generation G) and
promotes by creating ``history/<G+1>.json`` with a conditional create (``data/versions.py``'s:
S3 ``PutObject`` with ``If-None-Match: *``, a hard link on a local disk): of two days that both
read G, exactly one creates G + 1; the other gets ``PromotionConflict``. Only then is
``current.json`` rewritten whole (one PUT on S3; a temporary file renamed over it on a local disk:
a reader sees the old or the new pointer, never a part), and read back against the history: a
slower winner of an older generation that writes ``current.json`` last is corrected from the
history, by itself or by the next reader (``read_state`` repairs a stale copy).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fearec_dist.config import ExperimentConfig, StorageSection
from fearec_dist.data.versions import conditional_create
from fearec_dist.errors import DataError
from fearec_dist.storage import (
    is_remote,
    list_children,
    read_json,
    redact,
    storage_root,
    write_bytes,
    write_json,
)

PIPELINES = "pipelines"
CURRENT = "current.json"
HISTORY = "history"
DECISIONS = "decisions"
_GENERATION = re.compile(r"^(\d+)\.json$")
_DECISION = re.compile(r"^\d{8}T\d{6}\d*Z-v(\d+)-.+\.json$")


class PromotionConflict(DataError):
    """Another day promoted the generation this day was promoting."""


@dataclass(frozen=True)
class PipelineState:
    """A pipeline as a day reads it at its start: the newest generation (0: nothing promoted
    yet) and its pointer (None then)."""

    root: str
    generation: int
    current: dict[str, Any] | None


def pipeline_root(cfg: ExperimentConfig) -> str:
    """``<run.storage_path>/pipelines/<daily.name>`` (absolute for a local path)."""
    return f"{storage_root(cfg.run.storage_path)}/{PIPELINES}/{cfg.daily.name}"


def _generations(root: str, storage: StorageSection | None) -> list[int]:
    names = list_children(f"{root}/{HISTORY}", storage)
    return sorted(int(m.group(1)) for n in names if (m := _GENERATION.match(n)))


def read_state(root: str, storage: StorageSection | None = None, say: Any = print) -> PipelineState:
    """The pipeline's newest promotion; a ``current.json`` that is missing or older than the
    history (a day killed between the two writes) is rewritten from the history first."""
    generations = _generations(root, storage)
    if not generations:
        return PipelineState(root, 0, None)
    newest = generations[-1]
    pointer = read_json(f"{root}/{HISTORY}/{newest}.json", storage)
    try:
        copy = read_json(f"{root}/{CURRENT}", storage)
    except (FileNotFoundError, json.JSONDecodeError):
        copy = None
    if not isinstance(copy, dict) or copy.get("generation") != newest:
        seen = copy.get("generation") if isinstance(copy, dict) else None
        say(
            f"[fearec-dist] {redact(root)}/{CURRENT} is at generation {seen}, the history at "
            f"{newest}: rewritten from history/{newest}.json"
        )
        publish_current(root, storage)
    return PipelineState(root, newest, pointer)


def write_current(uri: str, pointer: dict[str, Any], storage: StorageSection | None) -> None:
    """``pointer`` as the whole object at ``uri``, atomically: one PUT on object storage, a
    temporary file renamed over it on a local disk."""
    body = json.dumps(pointer, indent=2, default=str).encode()
    if is_remote(uri):
        write_bytes(uri, body, storage)
        return
    path = uri.removeprefix("file://")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish_current(root: str, storage: StorageSection | None = None, tries: int = 5) -> int:
    """Writes ``current.json`` from the newest history entry until it reads back as the newest
    (a writer of an older generation may overwrite it in between); returns that generation."""
    newest = 0
    for _ in range(tries):
        newest = _generations(root, storage)[-1]
        write_current(f"{root}/{CURRENT}", read_json(f"{root}/{HISTORY}/{newest}.json", storage),
                      storage)  # fmt: skip
        if _generations(root, storage)[-1] == newest:
            written = read_json(f"{root}/{CURRENT}", storage)
            if written.get("generation") == newest:
                return newest
    return newest


def promote(
    state: PipelineState, pointer: dict[str, Any], storage: StorageSection | None = None
) -> dict[str, Any]:
    """Makes ``pointer`` generation ``state.generation + 1``: the conditional create of its
    history entry, then ``current.json``.

    Raises:
        PromotionConflict: another day created that generation first (its run is named);
            nothing of this day was promoted.
    """
    generation = state.generation + 1
    body = pointer | {"generation": generation, "previous": state.generation or None}
    uri = f"{state.root}/{HISTORY}/{generation}.json"
    data = json.dumps(body, indent=2, default=str).encode()
    if not conditional_create(uri, data, storage):
        try:
            rival = read_json(uri, storage).get("run")
        except (FileNotFoundError, json.JSONDecodeError, AttributeError):
            rival = "?"
        raise PromotionConflict(
            f"{redact(state.root)}: generation {generation} was promoted by another day "
            f"(run {rival}) while this one ran from generation {state.generation}; this day's "
            f"model ({pointer.get('run')}) was not promoted. Run the day again to compare it "
            "with the new current model"
        )
    publish_current(state.root, storage)
    return body


def record_decision(
    root: str, decision: dict[str, Any], storage: StorageSection | None = None
) -> str:
    """Writes a day's decision under ``decisions/`` (a new object each time); returns its URI."""
    now = time.time_ns()  # names sort by time: seconds, then microseconds
    stamp = (
        time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9)) + f"{now // 1000 % 10**6:06d}Z"
    )
    run = os.path.basename(str(decision.get("run") or "none").rstrip("/"))
    version = (decision.get("data") or {}).get("version", 0)
    uri = f"{root}/{DECISIONS}/{stamp}-v{version}-{run}.json"
    write_json(uri, decision, storage)
    return uri


def list_decisions(
    root: str, version: int | None = None, storage: StorageSection | None = None
) -> list[dict[str, Any]]:
    """Every recorded decision, oldest first (only those on dataset ``version`` when given)."""
    out = []
    for name in list_children(f"{root}/{DECISIONS}", storage):
        m = _DECISION.match(name)
        if m and (version is None or int(m.group(1)) == version):
            out.append(read_json(f"{root}/{DECISIONS}/{name}", storage) | {"file": name})
    return out

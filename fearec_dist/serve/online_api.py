"""The online endpoint's requests, limits and scoring, without Ray (``online.py`` serves them).

Shapes: B requests in a batch, k items per answer, N items in the export.

- ``serving_config``: the deployment's settings (Serve's ``user_config``), with defaults,
  checked and coerced (``serve run … key=value`` passes strings).
- ``parse_query``: one JSON request -> ``Query``, or a ``RequestError`` (a 4xx status and the
  field it is about).
- ``Loaded`` / ``load_state``: an export loaded for serving (tables on the device, a warm-up
  call made, its ``export_id``); swapping exports swaps one such object.
- ``score_queries``: B queries -> B answers (or per-query errors) with as few
  ``recommend_batch`` calls as the batch's options allow (one per ``exclude_seen`` value):
  each call uses the largest k among its queries and every answer is cut to its own k;
  ``fallback`` only changes the answer of an empty history, so it does not split a batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fearec_dist.serve.artifact import Export, ServeError, load_export
from fearec_dist.serve.recommend import FALLBACKS, Histories, item_tables, recommend_batch
from fearec_dist.storage import is_remote, read_json

QUERY_FIELDS = ("history", "k", "exclude_seen", "strict", "fallback")
MAX_NAMED = 10  # unknown ids named in a strict error


@dataclass
class ServingConfig:
    """What a replica serves and its limits (Serve's ``user_config``; changing it on a running
    deployment reconfigures the replicas in place: a new ``export`` is swapped in)."""

    export: str | None = None  # the export directory (local or s3://)
    follow: str | None = None  # a promotion pointer (current.json with an "export" key)
    poll_s: float = 10.0  # how often the pointer is read
    ann: bool = False  # the export's FAISS index instead of the exact top-k
    device: str = "cpu"
    threads: int = 1  # torch threads per replica
    max_batch_size: int = 32  # requests scored in one recommend_batch call
    batch_wait_ms: float = 1.0  # how long a batch waits to fill after its first request
    max_history: int = 1000  # ids per history
    max_k: int = 1000
    max_body_bytes: int = 1 << 20
    max_batch_requests: int = 256  # requests in one POST /recommend/batch
    read_timeout_s: float = 5.0  # to receive the whole body (408 after)
    request_timeout_s: float = 10.0  # queued and scored (503 after)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TYPES = {name: f.type for name, f in ServingConfig.__dataclass_fields__.items()}
_POSITIVE = ("poll_s", "threads", "max_batch_size", "max_history", "max_k", "max_body_bytes")
_POSITIVE += ("max_batch_requests", "read_timeout_s", "request_timeout_s")


def serving_config(values: dict[str, Any] | None) -> ServingConfig:
    """``values`` (JSON, or strings from ``serve run key=value``) -> a checked ServingConfig.

    Raises:
        ValueError: an unknown key or a value of the wrong type or range, naming the key.
    """
    values = dict(values or {})
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise ValueError(
            f"serving config: unknown key(s) {', '.join(unknown)}; expected some of "
            f"{', '.join(_TYPES)}"
        )
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = _TYPES[key]
        if value is None and "None" in kind:
            out[key] = None
        elif "str" in kind:
            if not isinstance(value, str) or not value:
                raise ValueError(f"serving config: {key} must be a non-empty string")
            out[key] = value
        elif kind == "bool":
            out[key] = _as_bool(key, value)
        else:
            out[key] = _as_number(key, value, int if kind == "int" else float)
    cfg = ServingConfig(**out)
    for key in _POSITIVE:
        if not getattr(cfg, key) > 0:
            raise ValueError(f"serving config: {key} must be > 0, got {getattr(cfg, key)}")
    if cfg.batch_wait_ms < 0:
        raise ValueError(f"serving config: batch_wait_ms must be >= 0, got {cfg.batch_wait_ms}")
    return cfg


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"serving config: {key} must be true or false, got {value!r}")


def _as_number(key: str, value: Any, kind: type) -> int | float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(
            f"serving config: {key} must be {'an integer' if kind is int else 'a number'}, "
            f"got {value!r}"
        ) from None
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(f"serving config: {key} must be finite, got {value!r}")
    return number


class RequestError(Exception):
    """A bad request: its HTTP status, the field it is about and what is wrong."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message = status, field, message

    def body(self) -> dict[str, str]:
        return {"error": f"{self.field}: {self.message}", "field": self.field}


@dataclass(frozen=True)
class Query:
    """One recommend request, checked."""

    history: list[str]
    k: int = 10
    exclude_seen: bool = False
    strict: bool = False
    fallback: str = "none"


def parse_json(body: bytes) -> Any:
    """The request body as JSON, or a 400 saying where it stops being JSON."""
    try:
        return json.loads(body)
    except UnicodeDecodeError as err:
        raise RequestError(400, "body", f"not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RequestError(
            400, "body", f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def parse_query(obj: Any, cfg: ServingConfig, where: str = "") -> Query:
    """A decoded JSON request -> Query; ``where`` prefixes field names (``[3].`` in a batch).

    Raises:
        RequestError: 422 naming the field (missing ``history``, a wrong type, ``k`` out of
            range, a history over ``max_history`` ids, an unknown field).
    """
    if not isinstance(obj, dict):
        raise RequestError(
            422, where.rstrip(".") or "body", f"expected a JSON object, got {_type_name(obj)}"
        )
    extra = sorted(set(obj) - set(QUERY_FIELDS))
    if extra:
        raise RequestError(
            422, f"{where}{extra[0]}", f"unknown field; expected {', '.join(QUERY_FIELDS)}"
        )
    if "history" not in obj:
        raise RequestError(422, f"{where}history", "required (a list of raw item ids)")
    history = obj["history"]
    if not isinstance(history, list):
        raise RequestError(422, f"{where}history", f"expected a list, got {_type_name(history)}")
    if len(history) > cfg.max_history:
        raise RequestError(
            422,
            f"{where}history",
            f"{len(history)} ids, more than the limit of {cfg.max_history}",
        )
    for i, item in enumerate(history):
        if not isinstance(item, str):
            raise RequestError(
                422,
                f"{where}history[{i}]",
                f"expected a raw item id as a string, got "
                f"{_type_name(item)} {json.dumps(item)[:40]}",
            )
    k = obj.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int):
        raise RequestError(422, f"{where}k", f"expected an integer, got {_type_name(k)}")
    if not 1 <= k <= cfg.max_k:
        raise RequestError(422, f"{where}k", f"{k} is out of range 1..{cfg.max_k}")
    flags = {}
    for name in ("exclude_seen", "strict"):
        flags[name] = obj.get(name, False)
        if not isinstance(flags[name], bool):
            raise RequestError(
                422, f"{where}{name}", f"expected true or false, got {_type_name(flags[name])}"
            )
    fallback = obj.get("fallback", "none")
    if fallback not in FALLBACKS:
        raise RequestError(
            422,
            f"{where}fallback",
            f"{json.dumps(fallback)[:40]}: expected one of {', '.join(FALLBACKS)}",
        )
    return Query(history, k, flags["exclude_seen"], flags["strict"], fallback)


def parse_batch(obj: Any, cfg: ServingConfig) -> list[Query]:
    """``POST /recommend/batch``'s body (a JSON list of requests, or ``{"requests": [...]}``)."""
    if isinstance(obj, dict) and set(obj) == {"requests"}:
        obj = obj["requests"]
    if not isinstance(obj, list):
        raise RequestError(422, "body", f"expected a list of requests, got {_type_name(obj)}")
    if len(obj) > cfg.max_batch_requests:
        raise RequestError(
            422, "body", f"{len(obj)} requests, more than the limit of {cfg.max_batch_requests}"
        )
    return [parse_query(item, cfg, f"[{i}].") for i, item in enumerate(obj)]


@dataclass
class Loaded:
    """An export ready to serve. Replicas swap whole Loaded objects, so a batch scored with
    one never sees half of another."""

    uri: str
    export: Export
    tables: Any  # (weights, bias) tensors on the device
    ann: bool
    export_id: str
    load_s: float
    loaded_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @property
    def model(self) -> str:
        return str(self.export.manifest.get("model"))

    def tag(self) -> dict[str, str]:
        return {"model": self.model, "export_id": self.export_id}


def export_id_of(manifest: dict[str, Any]) -> str:
    """The manifest's ``export_id``; for exports written before it existed, a hash of the
    manifest (which holds the export's creation time)."""
    if manifest.get("export_id"):
        return str(manifest["export_id"])
    text = json.dumps(manifest, sort_keys=True, default=str)
    return "manifest-sha256:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def load_state(uri: str, ann: bool = False, device: str = "cpu") -> Loaded:
    """Loads an export (its own formats only: the torch.export program, Parquet, FAISS) and
    scores one history with it, so the first request after a swap pays no first-call cost."""
    start = time.perf_counter()
    export = load_export(uri, device=device, with_index=ann)
    state = Loaded(uri, export, item_tables(export), ann, export_id_of(export.manifest), 0.0)
    first = export.raw_of(np.array([1])).to_pylist()
    score_queries(state, [Query(first, k=1)])
    state.load_s = round(time.perf_counter() - start, 3)
    return state


def read_pointer(uri: str) -> str:
    """The export URI in a promotion pointer (``current.json``: ``{"export": URI, …}``); a
    relative local path is taken relative to the pointer's directory."""
    try:
        pointer = read_json(uri)
    except FileNotFoundError:
        raise ServeError(f"{uri}: no such pointer file") from None
    except json.JSONDecodeError as err:
        raise ServeError(f"{uri}: not valid JSON ({err.msg})") from None
    export = pointer.get("export") if isinstance(pointer, dict) else None
    if not isinstance(export, str) or not export:
        raise ServeError(f'{uri}: no "export" key with the export\'s URI')
    if not is_remote(export) and not posixpath.isabs(export) and not is_remote(uri):
        export = posixpath.normpath(posixpath.join(posixpath.dirname(uri), export))
    return export


def score_queries(state: Loaded, queries: list[Query]) -> list[dict[str, Any] | RequestError]:
    """Answers B queries with one export: a response dict per query, or its RequestError
    (``k`` beyond the catalogue, unknown ids with ``strict``)."""
    export = state.export
    out: list[dict[str, Any] | RequestError | None] = [None] * len(queries)
    lengths = np.array([len(q.history) for q in queries], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    raw = [item for q in queries for item in q.history]
    ids = export.ids_of(raw) if raw else np.zeros(0, dtype=np.int64)
    missing = np.flatnonzero(ids == 0)
    unknown: list[list[str]] = [[] for _ in queries]
    for pos, row in zip(missing, np.searchsorted(offsets, missing, side="right") - 1):
        unknown[row].append(raw[pos])
    groups: dict[bool, list[int]] = {}
    for b, q in enumerate(queries):
        if q.k > export.n_items:
            out[b] = RequestError(
                422, "k", f"{q.k} is more than the {export.n_items} items of the catalogue"
            )
        elif q.strict and unknown[b]:
            more = " …" if len(unknown[b]) > MAX_NAMED else ""
            out[b] = RequestError(
                422,
                "history",
                f"{len(unknown[b])} item id(s) not in the export's vocabulary: "
                f"{', '.join(unknown[b][:MAX_NAMED])}{more} (set strict to false to skip them)",
            )
        else:
            groups.setdefault(q.exclude_seen, []).append(b)
    tag = state.tag()
    for exclude_seen, rows in groups.items():
        kept = [ids[offsets[b] : offsets[b + 1]] for b in rows]
        kept = [row[row > 0] for row in kept]
        hist = Histories(
            np.concatenate([[0], np.cumsum([len(r) for r in kept])]).astype(np.int64),
            np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64),
            np.array([len(unknown[b]) for b in rows], dtype=np.int64),
        )
        recs = recommend_batch(
            export,
            hist,
            max(queries[b].k for b in rows),
            ann=state.ann,
            exclude_seen=exclude_seen,
            fallback="popularity",  # cut back to empty_history below where it was not asked
            tables=state.tables,
        )
        top = [recs.ids[j, : queries[b].k] for j, b in enumerate(rows)]
        top = [t[t > 0] for t in top]
        names = export.raw_of(np.concatenate(top)).to_pylist() if top else []
        start = 0
        for j, b in enumerate(rows):
            n, source = len(top[j]), str(recs.source[j])
            items, scores = names[start : start + n], recs.scores[j, :n].tolist()
            start += n
            if source == "popularity" and queries[b].fallback != "popularity":
                source, items, scores = "empty_history", [], []
            out[b] = {
                "items": items,
                "scores": scores,
                "unknown": unknown[b],
                "source": source,
                "export": tag,
            }
    return out  # type: ignore[return-value]

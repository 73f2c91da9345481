"""Approximate top-k over the item table with FAISS (``faiss-cpu``, the ``[serve]`` extra).

Shapes: N items (ids 1..N; the padding row is never indexed), D hidden size, B queries.

Scores are inner products (``METRIC_INNER_PRODUCT``), the same dot product the exact path
computes. A model with an item bias (BERT4Rec) is indexed as ``[w_i, b_i]`` and queried with
``[q, 1]``: ``[q, 1]·[w_i, b_i] = q·w_i + b_i``, so the ANN ranks exactly what the exact path
ranks.

Defaults (``DEFAULTS``; stored in ``manifest.json``, overridable at query time):

- ``ivf``: ``IndexIVFFlat``, ``nlist = round(sqrt(N))`` lists (at least 39 training points
  per list, FAISS's own floor), ``nprobe = ceil(nlist / 4)`` lists scanned per query; k-means
  trained on the whole table with seed 1234. At 12,101 items: nlist 110, nprobe 28.
- ``hnsw``: ``IndexHNSWFlat`` with ``M = 32`` links per node, ``efConstruction = 200``,
  ``efSearch = 128``.

``tests/serve/test_index.py`` measures recall@10 of both against the exact top-10 at 12k items;
``docs/serving.md`` has the numbers and the unstructured worst case.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KINDS = ("flat", "ivf", "hnsw")
KMEANS_SEED = 1234
PARALLEL_QUERIES = 16  # fewer queries than this are searched on one thread
DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf": {"nlist": "round(sqrt(N))", "nprobe": "ceil(nlist / 4)"},
    "hnsw": {"M": 32, "efConstruction": 200, "efSearch": 128},
}


def import_faiss() -> Any:
    """faiss, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "the ANN index needs FAISS: pip install 'fearec-dist[serve]' (or pip install faiss-cpu)"
        ) from None
    return faiss


def default_params(kind: str, n_items: int) -> dict[str, int]:
    """The concrete parameters ``build_index`` uses for ``kind`` at ``n_items`` items."""
    if kind == "ivf":
        nlist = max(1, min(round(math.sqrt(n_items)), n_items // 39))
        return {"nlist": nlist, "nprobe": max(1, math.ceil(nlist / 4))}
    if kind == "hnsw":
        return dict(DEFAULTS["hnsw"])
    if kind == "flat":
        return {}
    raise ValueError(f"--index {kind!r}: expected one of {', '.join(KINDS)}")


def index_vectors(weights: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """(N, D) item rows -> (N, D or D + 1) float32 vectors to index (bias as the last column)."""
    vectors = np.asarray(weights, dtype=np.float32)
    if bias is not None:
        vectors = np.concatenate([vectors, np.asarray(bias, np.float32)[:, None]], axis=1)
    return np.ascontiguousarray(vectors)


def query_vectors(seq_repr: np.ndarray, has_bias: bool) -> np.ndarray:
    """(B, D) -> (B, D or D + 1) float32 queries matching ``index_vectors``."""
    queries = np.asarray(seq_repr, dtype=np.float32)
    if has_bias:
        queries = np.concatenate([queries, np.ones((len(queries), 1), np.float32)], axis=1)
    return np.ascontiguousarray(queries)


def build_index(
    kind: str, weights: np.ndarray, bias: np.ndarray | None, params: dict[str, int] | None = None
) -> tuple[Any, dict[str, int]]:
    """An inner-product FAISS index over the item rows; position p holds item id p + 1.

    Args:
        kind: ``flat`` (exact, for checking), ``ivf`` or ``hnsw``.
        weights: (N, D) item embeddings, ids 1..N in order (no padding row).
        bias: (N,) item bias or None.
        params: overrides of ``default_params(kind, N)``.

    Returns:
        (index, the parameters used).
    """
    faiss = import_faiss()
    vectors = index_vectors(weights, bias)
    n, dim = vectors.shape
    defaults = default_params(kind, n)
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"--index-param {unknown[0]}: not a parameter of {kind}; "
            f"valid: {', '.join(defaults) or 'none'}"
        )
    used = defaults | (params or {})
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(dim), dim, used["nlist"], faiss.METRIC_INNER_PRODUCT
        )
        index.cp.seed = KMEANS_SEED
        index.train(vectors)
        index.nprobe = used["nprobe"]
    else:
        index = faiss.IndexHNSWFlat(dim, used["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = used["efConstruction"]
        index.hnsw.efSearch = used["efSearch"]
    index.add(vectors)
    return index, used


def set_search_params(index: Any, kind: str, params: dict[str, int]) -> None:
    """Applies the query-time parameters (``nprobe`` / ``efSearch``) to a loaded index."""
    if kind == "ivf" and "nprobe" in params:
        index.nprobe = int(params["nprobe"])
    if kind == "hnsw" and "efSearch" in params:
        index.hnsw.efSearch = int(params["efSearch"])


def search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids (B, k) int64 (-1 where the index found fewer) and scores (B, k) float32.

    A few queries run on one OpenMP thread: FAISS parallelises over queries, and for one query
    its thread team only adds start-up and spinning (p50 several times worse on a busy box).
    """
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    if len(queries) < PARALLEL_QUERIES:
        faiss.omp_set_num_threads(1)
    try:
        scores, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    finally:
        faiss.omp_set_num_threads(threads)
    ids = np.where(positions >= 0, positions + 1, -1)
    return ids.astype(np.int64), scores.astype(np.float32)


def serialize(index: Any) -> bytes:
    return import_faiss().serialize_index(index).tobytes()


def deserialize(blob: bytes) -> Any:
    return import_faiss().deserialize_index(np.frombuffer(blob, dtype=np.uint8))

"""The FAISS indexes with the parameters ``export`` uses by default: recall@10 against the exact
top-10 on a Beauty-sized catalogue, and the bias column that makes inner-product search rank
exactly what the exact path ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss", reason="faiss-cpu is in the test extra: pip install -e '.[test]'")

N_ITEMS, DIM, N_QUERIES = 12_101, 64, 1_000  # Amazon Beauty's catalogue, the models' width


def trained_like_catalogue(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item rows and queries shaped like a trained model's (fixed seed).

    Items: √N topics (co-purchase clusters), each item its topic's centre plus noise of the
    same scale (spread 1.0: neighbouring topics overlap), norms log-normal (popular items get
    larger norms). Queries: the mean of 3 random items plus noise, as a history's
    representation sits near the items it predicts; a bias ~ N(0, 0.5) per item.
    """
    rng = np.random.default_rng(seed)
    n_topics = int(np.sqrt(N_ITEMS))
    centres = rng.standard_normal((n_topics, DIM)).astype(np.float32)
    items = centres[rng.integers(0, n_topics, N_ITEMS)]
    items = items + rng.standard_normal((N_ITEMS, DIM)).astype(np.float32)
    items *= rng.lognormal(0.0, 0.3, (N_ITEMS, 1)).astype(np.float32)
    picks = rng.integers(0, N_ITEMS, (N_QUERIES, 3))
    queries = items[picks].mean(axis=1) + 0.5 * rng.standard_normal((N_QUERIES, DIM))
    bias = rng.normal(0.0, 0.5, N_ITEMS).astype(np.float32)
    return items, queries.astype(np.float32), bias


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_at_defaults(kind):
    from fearec_dist.serve.index import build_index, default_params, query_vectors, search
    from fearec_dist.serve.recommend import exact_topk

    items, queries, _ = trained_like_catalogue()
    exact, _ = exact_topk(torch.from_numpy(queries), torch.from_numpy(items), None, 10)
    index, used = build_index(kind, items, None)
    assert used == default_params(kind, N_ITEMS)
    if kind == "ivf":
        assert used == {"nlist": 110, "nprobe": 28}
        assert index.nprobe < index.nlist  # approximate: most lists are never scanned
    else:
        assert used == {"M": 32, "efConstruction": 200, "efSearch": 128}
    found, _ = search(index, query_vectors(queries, False), 10)
    recall = recall_at_10(found, exact)
    print(f"{kind} recall@10 = {recall:.3f} at {used}")
    assert recall >= 0.95, (kind, recall, used)


def test_index_params_are_checked():
    from fearec_dist.serve.index import build_index

    items, _, _ = trained_like_catalogue()
    index, used = build_index("ivf", items[:2000], None, {"nprobe": 3})
    assert used == {"nlist": 45, "nprobe": 3} and index.nprobe == 3
    with pytest.raises(ValueError, match="efSearch: not a parameter of ivf; valid: nlist, nprobe"):
        build_index("ivf", items[:2000], None, {"efSearch": 3})


def test_bias_column_ranks_like_the_exact_scores():
    from fearec_dist.serve.index import build_index, query_vectors, search
    from fearec_dist.serve.recommend import exact_topk

    items, queries, bias = trained_like_catalogue()
    items, queries, bias = items[:2000], queries[:50], bias[:2000]
    want_i, want_s = exact_topk(
        torch.from_numpy(queries), torch.from_numpy(items), torch.from_numpy(bias), 10
    )
    index, _ = build_index("flat", items, bias)
    got_i, got_s = search(index, query_vectors(queries, True), 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_recommend_ann_through_an_export(make_export, kind):
    """``--ann`` on a BERT4Rec export (with its bias): a flat index gives the exact answer."""
    from fearec_dist.serve.artifact import load_export
    from fearec_dist.serve.recommend import recommend
    from tests.serve.conftest import raw_item

    run, out = make_export("bert4rec", kind)
    export = load_export(str(out), with_index=True)
    assert export.manifest["index"]["kind"] == kind
    history = [raw_item(int(i)) for i in run.test_seq[0, : run.test_len[0]]]
    exact = recommend(export, history, k=10)
    ann = recommend(export, history, k=10, ann=True)
    if kind == "flat":
        assert ann.item_ids == exact.item_ids
    assert len(set(ann.item_ids) & set(exact.item_ids)) >= 8
    seen = recommend(export, history, k=10, ann=True, exclude_seen=True)
    assert len(seen.item_ids) == 10 and not set(seen.item_ids) & set(history)

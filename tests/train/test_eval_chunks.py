"""Full-catalogue evaluation in item chunks (train/evaluate.py) equals the full (B, V) matrix, and
the popularity baseline on a hand-made dataset whose metrics are computed by hand.

No Ray: batches are built with the same pure functions the evaluation rows come from
(``build_loo_examples`` -> ``examples_table``), and the baseline reads its prepared dataset with
pyarrow (``iter_eval_rows``, ``read_training_counts``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from fearec_dist.data.examples import examples_table, sample_users
from fearec_dist.data.feed import eval_batch_from_arrow
from fearec_dist.data.sequences import build_loo_examples
from fearec_dist.models.spec import scores_against
from fearec_dist.train.device import autocast_for, to_device
from fearec_dist.train.evaluate import (
    BASELINE_SEED,
    BASELINES,
    PopularityScorer,
    chunked_ranks,
    evaluate,
    evaluate_popularity,
)
from fearec_dist.train.metrics import MetricAccumulator, mask_history_, ranks_from_scores

N_ITEMS, L, D = 22, 6, 8
V = N_ITEMS + 1  # 23 rows: no chunk size in 2..22 divides it
CHUNKS = [1, 2, 5, V - 1, V, 64]
CPU = torch.device("cpu")
TOPK = [1, 3, 5, 10]


# ---------------------------------------------------------------- the reference: the full matrix


@torch.no_grad()
def reference_ranks(
    full_scores: Any, model: nn.Module, batch: dict[str, torch.Tensor], amp: str = "off"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation before chunking: the whole (B, V) matrix, padding -inf, ranks, then the
    history masked in place (the target kept) and ranks again."""
    with autocast_for(CPU, amp):
        scores = full_scores(model, batch)
    scores = scores.float()
    scores[:, 0] = float("-inf")
    target = batch["target"]
    ranks = ranks_from_scores(scores, target)
    if "seen_rows" in batch:
        mask_history_(scores, batch["seen_rows"], batch["seen_items"], target)
    return ranks, ranks_from_scores(scores, target)


def reference_evaluate(full_scores: Any, model: nn.Module, batches: list[Any], amp: str = "off"):
    model.eval()
    acc = MetricAccumulator(TOPK)
    for raw in batches:
        batch = to_device(raw if isinstance(raw, dict) else eval_batch_from_arrow(raw), CPU)
        acc.add(*reference_ranks(full_scores, model, batch, amp))
    return acc.result(all_reduce=False)


# ---------------------------------------------------------------- a toy model and its spec


class Toy(nn.Module):
    """A tied item table (V, D), optionally an output bias (V,) as BERT4Rec has; the query is
    the last history item's row, through a linear layer unless ``integer`` (then every score is
    an exact small integer, so ties are real and the same in any summation order)."""

    def __init__(self, bias: bool, integer: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.integer = integer
        self.item_embedding = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)
        self.output_bias = nn.Parameter(torch.randn(V, generator=g)) if bias else None
        with torch.no_grad():
            if integer:
                self.item_embedding.weight.copy_(torch.randint(-2, 3, (V, D), generator=g))
                if bias:
                    self.output_bias.copy_(torch.randint(-2, 3, (V,), generator=g))
            else:
                self.item_embedding.weight.normal_(generator=g)

    def forward(self, item_seq: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        last = self.item_embedding(item_seq.gather(1, (seq_len - 1).clamp(min=0)[:, None])[:, 0])
        return last if self.integer else self.proj(last)


@dataclass(frozen=True)
class ToySpec:
    def encode(self, model: Toy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["item_seq"], batch["seq_len"])

    def item_table(self, model: Toy) -> tuple[torch.Tensor, torch.Tensor | None]:
        return model.item_embedding.weight, model.output_bias

    def full_scores(self, model: Toy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return scores_against(self.encode(model, batch), *self.item_table(model))


def eval_tables(n_users: int = 40, seed: int = 0, batch: int = 16) -> list[pa.Table]:
    """Valid and test rows of random sequences (items repeat, so a target can sit in its own
    history), as the pyarrow batches the evaluation reads, ``batch`` rows each."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 14, n_users)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    items = rng.integers(1, N_ITEMS + 1, int(lens.sum())).astype(np.int32)
    users = np.arange(1, n_users + 1, dtype=np.int32)
    out = build_loo_examples(offsets, items, users, L, splits=("valid", "test"))
    tables = []
    for split in ("valid", "test"):
        table = examples_table(out[split])
        tables += [table.slice(i, batch) for i in range(0, table.num_rows, batch)]
    return tables


# ---------------------------------------------------------------- chunked == the full matrix


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("integer", [False, True], ids=["float", "ties"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_ranks_equal_the_full_matrix(chunk: int, bias: bool, integer: bool) -> None:
    model, spec = Toy(bias, integer).eval(), ToySpec()
    weights, b = spec.item_table(model)
    n_ties = 0
    for table in eval_tables():
        batch = to_device(eval_batch_from_arrow(table), CPU)
        want, want_masked = reference_ranks(spec.full_scores, model, batch)
        with torch.no_grad():
            got, got_masked = chunked_ranks(
                spec.encode(model, batch), weights, b, batch["target"],
                batch["seen_rows"], batch["seen_items"], chunk,
            )  # fmt: skip
            s = spec.full_scores(model, batch)
            n_ties += int((s == s.gather(1, batch["target"][:, None])).sum() - len(s))
        assert torch.equal(got, want) and torch.equal(got_masked, want_masked)
        assert got.dtype == torch.long
    if integer:
        assert n_ties > 20  # the tie rule (ties go to the target) really was exercised


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk", [1, 5, V, 64])
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_evaluate_equals_the_unchunked_metrics(chunk: int, bias: bool, amp: str) -> None:
    """Both protocols, every K; under bf16 autocast on exact integer scores (the matmul's
    rounding then cannot differ between the chunk and the target's own product)."""
    model, spec = Toy(bias, integer=amp != "off"), ToySpec()
    tables = eval_tables(seed=3)
    got = evaluate(model, spec, tables, TOPK, CPU, amp, all_reduce=False, item_chunk=chunk)
    assert model.training  # left as found
    assert got == reference_evaluate(spec.full_scores, model, tables, amp)
    assert got["n_users"] == sum(t.num_rows for t in tables) > 0
    assert got["masked_hr@5"] >= got["hr@5"]  # masking only removes competitors


def test_without_history_the_masked_ranks_are_the_kept_ones() -> None:
    model, spec = Toy(bias=True).eval(), ToySpec()
    batch = to_device(eval_batch_from_arrow(eval_tables()[0]), CPU)
    del batch["seen_rows"], batch["seen_items"]
    with torch.no_grad():
        ranks, masked = chunked_ranks(
            spec.encode(model, batch), *spec.item_table(model), batch["target"], item_chunk=4
        )
    assert torch.equal(ranks, masked)
    assert torch.equal(ranks, reference_ranks(spec.full_scores, model, batch)[0])


def test_target_never_beats_itself_and_padding_is_no_candidate() -> None:
    """Row 0: target 2 ties with item 3 and loses to 1; padding (row 0 of the table) scores
    highest but is never counted. Row 1: its target 3 is also in its history (kept), item 1 is
    masked."""
    weights = torch.tensor([[9.0], [5.0], [4.0], [4.0], [1.0]])
    query = torch.ones(2, 1)
    target = torch.tensor([2, 3])
    seen_rows, seen_items = torch.tensor([1, 1, 1]), torch.tensor([1, 3, 4])
    for chunk in (1, 2, 3, 5, 8):
        ranks, masked = chunked_ranks(query, weights, None, target, seen_rows, seen_items, chunk)
        assert ranks.tolist() == [2, 2] and masked.tolist() == [2, 1]


def test_the_target_column_is_excluded_by_index_not_by_comparison(monkeypatch) -> None:
    """With the target's own score one ulp below its column's value (another summation order
    could do that), the target must still not count as beating itself."""
    import fearec_dist.train.evaluate as ev

    exact = ev.target_scores

    def one_ulp_low(*args: Any) -> torch.Tensor:
        scores = exact(*args)
        return torch.nextafter(scores, torch.full_like(scores, -math.inf))

    model, spec = Toy(bias=True).eval(), ToySpec()
    batch = to_device(eval_batch_from_arrow(eval_tables()[0]), CPU)
    want = reference_ranks(spec.full_scores, model, batch)
    monkeypatch.setattr(ev, "target_scores", one_ulp_low)
    with torch.no_grad():
        got = chunked_ranks(
            spec.encode(model, batch), *spec.item_table(model), batch["target"],
            batch["seen_rows"], batch["seen_items"], item_chunk=5,
        )  # fmt: skip
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_item_chunk_must_be_positive() -> None:
    with pytest.raises(ValueError, match="item_chunk"):
        chunked_ranks(torch.ones(1, 1), torch.ones(3, 1), None, torch.tensor([1]), item_chunk=0)


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_model_specs_chunked_equal_their_full_scores(name: str) -> None:
    """The registry's specs (BERT4Rec: output bias, mask row outside the table) through
    ``evaluate`` equal their own ``full_scores`` over the whole matrix."""
    from fearec_dist.models import build_model, get_spec

    torch.manual_seed(0)
    model = build_model(name, n_items=N_ITEMS, max_seq_len=L, hidden_size=16, inner_size=32)
    spec = get_spec(name)
    if name == "bert4rec":
        with torch.no_grad():
            model.output_bias.normal_()
    tables = eval_tables(seed=5)
    want = reference_evaluate(spec.full_scores, model, tables)
    for chunk in (1, 7, 1 << 16):
        assert evaluate(model, spec, tables, TOPK, CPU, all_reduce=False, item_chunk=chunk) == want


# ---------------------------------------------------------------- the popularity baseline


def test_popularity_scorer_ranks_by_count_ties_to_the_target() -> None:
    """counts 1: 5, 2: 3, 3: 2, 4-6: 0 -> target 4 (tied with 5 and 6) ranks 4; masked."""
    scorer = PopularityScorer.from_counts(np.array([0, 5, 3, 2, 0, 0, 0]))
    batch = {
        "item_seq": np.array([[1, 2, 3], [1, 2, 1]]),
        "seq_len": np.array([3, 3]),
        "target": np.array([4, 2]),
        "user": np.array([1, 2]),
        "seen_rows": np.array([0, 0, 0, 1, 1, 1]),
        "seen_items": np.array([1, 2, 3, 1, 2, 1]),
    }
    out = evaluate(nn.Module(), scorer, [batch], [1, 3, 4], CPU, all_reduce=False, item_chunk=2)
    # ranks 4 and 2 kept; 1 and 1 masked (row 1: target 2 is in its history, kept)
    assert out["hr@1"] == 0 and out["hr@3"] == 0.5 and out["hr@4"] == 1
    assert out["mrr@4"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert out["masked_hr@1"] == 1 and out["n_users"] == 2


def write_prepared(root: Any, sequences: dict[int, list[int]], n_items: int) -> str:
    """A prepared dataset by hand: sequences/part-0.parquet (user, items) and meta.json."""
    (root / "sequences").mkdir(parents=True)
    table = pa.table(
        {
            "user": pa.array(list(sequences), pa.int32()),
            "items": pa.array(list(sequences.values()), pa.list_(pa.int32())),
        }
    )
    pq.write_table(table, root / "sequences" / "part-0.parquet")
    meta = {"n_users": len(sequences), "n_items": n_items, "n_interactions": 0}
    (root / "meta.json").write_text(json.dumps(meta))
    return str(root)


# u1: train 1 2 3 | valid 4 | test 5;  u2: train 1 2 1 | valid 6 | test 2;
# u3: train 2 1 | test 3 (no valid row);  u4: train 3 1 (no valid or test row)
HAND = {1: [1, 2, 3, 4, 5], 2: [1, 2, 1, 6, 2], 3: [2, 1, 3], 4: [3, 1]}


def test_popularity_baseline_on_a_hand_made_dataset(tmp_path) -> None:
    """Training counts: 1 -> 5, 2 -> 3, 3 -> 2, 4, 5, 6 -> 0 (the valid/test targets 4, 6, 5, 2,
    3 are not counted). Ranks (1 + items counted higher; ties go to the target):
    valid  u1 target 4: 4 (masked {1,2,3}: 1)   u2 target 6: 4 (masked {1,2}: 2)
    test   u1 target 5: 4 (masked {1,2,3,4}: 1) u2 target 2: 2 (masked {1,6}: 1)
           u3 target 3: 3 (masked {2,1}: 1)"""
    uri = write_prepared(tmp_path / "prep", HAND, n_items=6)
    out = evaluate_popularity(uri, max_seq_len=3, topk=[1, 3, 5], item_chunk=4)
    valid, test = out["valid"], out["test"]
    assert (out["n_valid"], out["n_test"]) == (2, 3)
    assert valid["hr@1"] == 0 and valid["hr@3"] == 0 and valid["hr@5"] == 1
    assert valid["masked_hr@1"] == 0.5 and valid["masked_mrr@5"] == pytest.approx(0.75)
    assert test["hr@1"] == 0 and test["hr@3"] == pytest.approx(2 / 3) and test["hr@5"] == 1
    ndcg5 = (1 / math.log2(5) + 1 / math.log2(3) + 1 / math.log2(4)) / 3
    assert test["ndcg@5"] == pytest.approx(ndcg5)
    assert test["masked_hr@1"] == 1 and test["masked_ndcg@5"] == 1
    assert out["users"] == {"scored": 4, "of": 4, "seed": None}
    # the same numbers whatever the chunk and the history width
    again = evaluate_popularity(uri, max_seq_len=50, topk=[1, 3, 5], item_chunk=1)
    assert again["valid"] == valid and again["test"] == test


def test_popularity_baseline_on_a_seeded_sample_of_users(tmp_path) -> None:
    uri = write_prepared(tmp_path / "prep", HAND, n_items=6)
    ids = sample_users(4, 2, 7)
    out = evaluate_popularity(uri, users=2, seed=7, topk=[5])
    assert out["users"] == {"scored": 2, "of": 4, "seed": 7}
    assert out["n_test"] == sum(len(HAND[int(u)]) >= 3 for u in ids)
    assert out["n_valid"] == sum(len(HAND[int(u)]) >= 4 for u in ids)


def test_cli_takes_the_evaluators_constants() -> None:
    """One definition: the CLI's --baseline choices and default seed are the evaluator's."""
    from fearec_dist import cli

    assert cli.BASELINES is BASELINES and cli.BASELINE_SEED is BASELINE_SEED

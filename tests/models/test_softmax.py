"""The sampled softmax (``train.softmax: sampled``) and sparse item updates.

- with every table row as a candidate, no in-batch part and no correction it *is* the full CE;
- 2 gloo ranks with gathered in-batch candidates = one process on the whole batch (loss and
  gradients), and not without the gather;
- logQ brings the sampled gradient closer to the full-softmax gradient under a skewed sampler;
- accidental hits count once; bad keys are config errors naming the key;
- every model's loss runs on it, and a sparse table gets a row-sparse gradient;
- sparse item updates over 2 gloo ranks = one process's dense-equivalent lazy step.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fearec_dist.config import ConfigError, TrainSection
from fearec_dist.models import build_model, get_spec
from fearec_dist.models.softmax import (
    NegativeSampler,
    SampledSoftmax,
    SoftmaxOptions,
    in_batch_probability,
    next_item_ce,
    sampled_ce,
)
from fearec_dist.train import distributed
from fearec_dist.train.build import build_optimizer
from tests.conftest import run_gloo_ranks

N_ITEMS, L, B = 30, 8, 6
NO_DROPOUT = {"hidden_dropout": 0.0, "attn_dropout": 0.0, "hidden_size": 16, "inner_size": 32}


def _batch(rows: int = 2 * B, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, L + 1, (rows,), generator=g)
    seq = torch.randint(1, N_ITEMS + 1, (rows, L), generator=g)
    seq[torch.arange(L)[None, :] >= lens[:, None]] = 0
    perm = torch.randperm(rows, generator=g)
    target = torch.randint(1, N_ITEMS + 1, (rows,), generator=g)
    target[1] = target[0]  # a repeated target: an accidental hit between rows
    return {"item_seq": seq, "seq_len": lens, "target": target, "pos_seq": seq[perm],
            "pos_len": lens[perm]}  # fmt: skip


def _sasrec(double: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("sasrec", n_items=N_ITEMS, max_seq_len=L, **NO_DROPOUT)
    return model.double() if double else model


def _train(**kw) -> SoftmaxOptions:
    base = dict(seed=7, n_negatives=16, sampler="uniform", alpha=1.0, in_batch=True, logq=True,
                temperature=1.0)  # fmt: skip
    return SoftmaxOptions(**(base | kw))


def _counts() -> np.ndarray:
    counts = np.arange(N_ITEMS + 1, dtype=np.int64) ** 2  # skewed
    counts[0] = 0
    return counts


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_dense().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_all_rows_as_candidates_without_correction_is_the_full_ce():
    batch = _batch()
    full_model, sampled_model = _sasrec(), _sasrec()
    full = next_item_ce(full_model, full_model(batch["item_seq"], batch["seq_len"]),
                        batch["target"], None)  # fmt: skip
    full.backward()
    rep = sampled_model(batch["item_seq"], batch["seq_len"])
    w = sampled_model.item_embedding.weight
    sampled = sampled_ce(rep, batch["target"], w, None, torch.arange(N_ITEMS + 1))
    sampled.backward()
    assert torch.allclose(full, sampled, atol=1e-6)
    g_full, g_sampled = _grads(full_model), _grads(sampled_model)
    assert g_full.keys() == g_sampled.keys()
    for name in g_full:
        assert torch.allclose(g_full[name], g_sampled[name], atol=1e-6), name


def test_accidental_hits_count_once_and_other_rows_targets_stay_negatives():
    torch.manual_seed(0)
    rep, w = torch.randn(3, 4), torch.randn(10, 4)
    target = torch.tensor([2, 5, 7])
    cands = torch.tensor([2, 2, 5, 9, 3])
    got = sampled_ce(rep, target, w, None, cands, reduction="none")
    logits = rep @ w.T
    for i, t in enumerate(target.tolist()):
        others = [c for c in cands.tolist() if c != t]  # every copy of the target masked
        expect = torch.logsumexp(logits[i, [t, *others]], 0) - logits[i, t]
        assert torch.allclose(got[i], expect, atol=1e-6)


def test_same_step_draws_the_same_negatives_and_the_next_step_others():
    s = SampledSoftmax(_train(), N_ITEMS, _counts(), torch.device("cpu"))
    a, b, c = s.at_step(0, 3).negatives, s.at_step(0, 3).negatives, s.at_step(0, 4).negatives
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 1 and int(a.max()) <= N_ITEMS


def test_popularity_sampler_follows_count_power_alpha():
    counts = _counts()
    counts[5] = 0  # an item no training example targets
    sampler = NegativeSampler("popularity", N_ITEMS, counts, alpha=0.5)
    ids = sampler.draw(200_000, torch.Generator().manual_seed(0))
    freq = np.bincount(ids.numpy(), minlength=N_ITEMS + 1) / len(ids)
    expect = counts**0.5 / (counts**0.5).sum()
    assert freq[0] == 0 and freq[5] == 0  # padding and zero-count items are never drawn
    assert np.abs(freq - expect).max() < 0.005


def test_logq_uses_the_true_training_target_count_and_floors_only_zero_counts():
    """E[count of c among the candidates] = n_in · count(c) / T + K · q(c), T the training
    targets: an item with no count adds nothing to T (it gets the floor 1 / T)."""
    counts = np.array([0, 6, 3, 0, 1, 0], dtype=np.int64)  # padding, 5 items, T = 10
    p = in_batch_probability(counts)
    assert p.tolist() == pytest.approx([0.0, 0.6, 0.3, 0.1, 0.1, 0.1])
    opts = SoftmaxOptions(n_negatives=4, sampler="uniform", in_batch=True, logq=True)
    s = SampledSoftmax(opts, 5, counts, torch.device("cpu"))
    step = s.at_step(0, 0)
    target = torch.tensor([1, 2, 1])  # n_in = 3 in-batch candidates
    cands, log_q = step.candidates(target)
    expected = 3 * torch.tensor(p, dtype=torch.float32)[cands] + 4 * (1 / 5)
    assert torch.equal(cands[:3], target) and torch.allclose(log_q, torch.log(expected))
    assert float(torch.exp(log_q[0])) == pytest.approx(3 * 0.6 + 0.8)  # not 3 * 6 / 12 + 0.8
    with pytest.raises(ValueError, match="all zero"):
        in_batch_probability(np.zeros(4))


def test_logq_correction_brings_the_sampled_gradient_closer_to_the_full_one():
    """A skewed (popularity) sampler over-represents popular items among the candidates; the
    corrected estimate of d(CE)/d(query) is closer to the full softmax's than the uncorrected."""
    torch.manual_seed(0)
    n_items, dim, k = 200, 8, 400
    w = torch.randn(n_items + 1, dim)
    q = torch.randn(dim, requires_grad=True)
    target = torch.tensor([3])
    full = torch.nn.functional.cross_entropy((q @ w[1:].T)[None], target - 1)
    (g_full,) = torch.autograd.grad(full, q)
    counts = np.zeros(n_items + 1)
    counts[1:] = 1.0 / np.arange(1, n_items + 1) ** 1.2  # Zipf-like
    sampler = NegativeSampler("popularity", n_items, counts)
    log_q = torch.log(torch.as_tensor(k * sampler.prob, dtype=torch.float32).clamp(min=1e-30))
    g = torch.Generator().manual_seed(1)
    sums = {True: torch.zeros(dim), False: torch.zeros(dim)}
    draws = 1000
    for _ in range(draws):
        cands = sampler.draw(k, g)
        for corrected in (True, False):
            loss = sampled_ce(q[None], target, w, None, cands, log_q[cands] if corrected else None)
            sums[corrected] += torch.autograd.grad(loss, q)[0]
    err = {c: float((sums[c] / draws - g_full).norm() / g_full.norm()) for c in sums}
    print(f"relative gradient error: corrected {err[True]:.3f}, uncorrected {err[False]:.3f}")
    assert err[True] < 0.5 * err[False]


@pytest.mark.parametrize(
    ("key", "value"),
    [("softmax", "sample"), ("negative_sampler", "zipf"), ("n_negatives", 0),
     ("softmax_temperature", 0.0), ("eval_item_chunk", 0)],
)  # fmt: skip
def test_bad_softmax_keys_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainSection(**{"softmax": "sampled", key: value})


def test_sparse_item_updates_need_the_sampled_softmax():
    with pytest.raises(ConfigError, match="train.sparse_item_updates.*sampled"):
        TrainSection(sparse_item_updates=True)


def _model_and_batch(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    kwargs = {"hidden_size": 16, "inner_size": 32}
    model = build_model(name, n_items=N_ITEMS, max_seq_len=L, **kwargs)
    return model, _batch()


@pytest.mark.parametrize("name", ["sasrec", "fearec_official", "bert4rec", "lightsans", "s3rec"])
def test_every_model_trains_on_the_sampled_softmax_with_a_sparse_table(name, one_thread):
    model, batch = _model_and_batch(name)
    model.item_embedding.sparse = True
    spec = get_spec(name)
    softmax = SampledSoftmax(_train(sampler="popularity"), N_ITEMS, _counts(),
                             torch.device("cpu"))  # fmt: skip
    terms = spec.loss_terms(model, batch, softmax=softmax.at_step(0, 0))
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grad = model.item_embedding.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    assert 0 < len(touched) <= N_ITEMS + 2
    full = spec.loss_terms(model, batch)["loss"]
    assert torch.isfinite(full) and not torch.allclose(full, terms["loss"])


# --- 2 gloo ranks -------------------------------------------------------------------------


def _sampled_step(model, batch, softmax, sparse: bool) -> tuple[float, dict]:
    """One Adam step (float64: Adam's first step divides by |g|); the loss, the (averaged)
    gradients and the updated parameters."""
    module = getattr(model, "module", model)
    opt = build_optimizer(module, lr=0.05, weight_decay=0.0, sparse_items=sparse)
    loss = get_spec("sasrec").loss_terms(module, batch, forward=model, softmax=softmax)["loss"]
    opt.zero_grad()
    loss.backward()
    grads = _grads(module)
    if sparse:
        distributed.average_sparse_grad(module.item_embedding.weight)
        grads["item_embedding.weight"] = module.item_embedding.weight.grad.to_dense()
    opt.step()
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    return float(loss.detach()), {"grads": grads, "params": params}


CASES = [(True, False), (True, True), (False, False)]  # (gather the candidates, sparse table)


def _numpy(state: dict) -> dict:
    return {part: {k: v.numpy() for k, v in d.items()} for part, d in state.items()}


def _rank_worker(rank: int, world: int, out) -> None:
    """Every case in one pair of processes (spawning costs more than the steps)."""
    torch.set_num_threads(1)
    results = {}
    for gather, sparse in CASES:
        torch.manual_seed(100 + rank)  # unequal starts: the broadcasts make them equal
        module = _sasrec(double=True) if rank == 0 else build_model(
            "sasrec", n_items=N_ITEMS, max_seq_len=L, **NO_DROPOUT
        ).double()  # fmt: skip
        if sparse:
            module.item_embedding.sparse = True
            distributed.keep_table_out_of_ddp(module)
        model = torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
        batch = {k: v[rank * B : (rank + 1) * B] for k, v in _batch().items()}
        ids = distributed.build_gather_ids(gather)
        softmax = SampledSoftmax(_train(), N_ITEMS, _counts(), torch.device("cpu"), ids)
        loss, state = _sampled_step(model, batch, softmax.at_step(2, 5), sparse)
        losses = [None] * world
        dist.all_gather_object(losses, loss)
        results[gather, sparse] = (sum(losses) / world, _numpy(state))
    out.put((rank, results))  # numpy only: tensors would share memory with a dead process


def _one_process(sparse: bool) -> tuple[float, dict]:
    model = _sasrec(double=True)
    model.item_embedding.sparse = sparse
    softmax = SampledSoftmax(_train(), N_ITEMS, _counts(), torch.device("cpu"))
    loss, state = _sampled_step(model, _batch(), softmax.at_step(2, 5), sparse)
    return loss, _numpy(state)


def _close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=atol) for k in a)


def test_two_ranks_equal_one_process_with_the_gather_and_differ_without():
    """Sampled loss with in-batch candidates gathered over 2 ranks (DDP, and the sparse exchange
    with lazy Adam) = one process on the whole batch: loss, gradients, updated weights (1e-6)."""
    ranks = dict(run_gloo_ranks(_rank_worker, ()))
    for sparse in (False, True):
        whole_loss, whole = _one_process(sparse)
        for rank in ranks:
            loss, state = ranks[rank][True, sparse]
            assert abs(loss - whole_loss) < 1e-6
            assert _close(state["grads"], whole["grads"], 1e-6)
            assert _close(state["params"], whole["params"], 1e-6)
        if sparse:  # lazy Adam: rows no step touched keep their values
            before = _sasrec(double=True).item_embedding.weight.detach().numpy()
            touched = np.abs(whole["grads"]["item_embedding.weight"]).sum(1) > 0
            after = whole["params"]["item_embedding.weight"]
            assert 0 < touched.sum() < N_ITEMS + 1
            assert np.array_equal(after[~touched], before[~touched])
            assert not np.allclose(after[touched], before[touched])
    whole_loss, whole = _one_process(False)
    for rank in ranks:  # local candidates only: a smaller pool, another loss and gradient
        loss, state = ranks[rank][False, False]
        assert abs(loss - whole_loss) > 1e-4
        assert not _close(state["grads"], whole["grads"], 1e-4)


def test_split_optimizer_state_round_trips_and_refuses_a_dense_checkpoint():
    """A resumed run continues the lazy Adam exactly; a state saved without sparse item updates
    is refused with the setting named."""

    def step(model, opt, seed):
        softmax = SampledSoftmax(_train(), N_ITEMS, _counts(), torch.device("cpu"))
        loss = get_spec("sasrec").loss_terms(model, _batch(seed=seed),
                                             softmax=softmax.at_step(0, seed))["loss"]  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()

    a = _sasrec()
    a.item_embedding.sparse = True
    opt_a = build_optimizer(a, 0.01, 0.0, sparse_items=True)
    step(a, opt_a, 1)
    b = _sasrec()
    b.item_embedding.sparse = True
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, 0.01, 0.0, sparse_items=True)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as read from a file
    step(a, opt_a, 2)
    step(b, opt_b, 2)
    for (name, pa_), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa_, pb), name
    dense = build_optimizer(_sasrec(), 0.01, 0.0).state_dict()
    with pytest.raises(ValueError, match="sparse_item_updates"):
        opt_b.load_state_dict(dense)
